"""Exceptions raised by coreunits.

Every error says what is wrong and how to fix it; they subclass the built-in
exception a caller would naturally catch (``ValueError``, ``LookupError``).
"""

from __future__ import annotations

__all__ = ["CoreUnitsError", "DataError", "LayerNotFoundError", "ModelOutputError"]


class CoreUnitsError(ValueError):
    """Base class of the errors coreunits raises for bad input."""


class LayerNotFoundError(CoreUnitsError, LookupError):
    """A requested layer does not exist, is ambiguous, or never runs in forward."""


class DataError(CoreUnitsError):
    """The data is empty, has the wrong shape/dtype, or gives no usable D'_c."""


class ModelOutputError(CoreUnitsError):
    """The model's output is not an (N, num_classes) tensor of finite scores."""
