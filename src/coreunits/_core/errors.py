"""Exceptions raised by coreunits.

Every error says what is wrong and how to fix it; they subclass the built-in
exception a caller would naturally catch (``ValueError``, ``LookupError``).
"""

from __future__ import annotations

__all__ = ["ClassIndexError", "CoreUnitsError", "DataError", "LayerNotFoundError", "MissingDataError", "ModelOutputError", "OptionError"]


class CoreUnitsError(ValueError):
    """Base class of the errors coreunits raises for bad input."""


class LayerNotFoundError(CoreUnitsError, LookupError):
    """A requested layer does not exist, is ambiguous, or never runs in forward."""


class OptionError(CoreUnitsError, ValueError):
    """An option is out of range or unknown (a bad coefficient, reading, class or method name)."""


class MissingDataError(CoreUnitsError, FileNotFoundError):
    """A data set or checkpoint is not where it was looked for (the message says where it looked)."""


class DataError(CoreUnitsError):
    """The data is empty, has the wrong shape/dtype, or gives no usable D'_c."""


class ClassIndexError(DataError, OptionError):
    """A class index the model does not output (an option, judged against the model's scores)."""


class ModelOutputError(CoreUnitsError):
    """The model's output is not an (N, num_classes) tensor of finite scores."""
