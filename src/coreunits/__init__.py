"""coreunits: find the core units of a trained PyTorch classifier.

For a class of interest, the core units of a layer are the smallest set of
units (conv channels, neurons, input positions) that, kept on while every
other unit is masked, keep the model's "this class / not this class"
decisions. The method is that of "Interpreting Deep Classification Models
With Bayesian Inference" (switch gates, an IBP prior with MAP asymptotics, a
center-based binary classifier).

Example:
    >>> from coreunits import find_core_units
    >>> result = find_core_units(model, "max1", target_class=0, data=dataset)
    >>> result.units["max1"], result.holding_rate_strict
"""

from coreunits._core.ablation import ABLATIONS
from coreunits._core.cache import ActivationCache
from coreunits._core.errors import (
    CoreUnitsError,
    DataError,
    LayerNotFoundError,
    MissingDataError,
    ModelOutputError,
    OptionError,
)
from coreunits._core.evaluation import holding_rate, mask_units
from coreunits._core.layers import Heads, Neurons
from coreunits._core.problem import SelectionProblem
from coreunits._core.result import CoreUnits
from coreunits._core.selection import SelectionConfig, find_core_units, find_core_units_batched
from coreunits._core.specialist import ClassDetector, Specialist, export_specialist
from coreunits._core.stability import Stability, stability

__version__ = "0.1.0"

__all__ = [
    "ABLATIONS",
    "ActivationCache",
    "ClassDetector",
    "CoreUnits",
    "CoreUnitsError",
    "DataError",
    "Heads",
    "LayerNotFoundError",
    "MissingDataError",
    "ModelOutputError",
    "Neurons",
    "OptionError",
    "SelectionConfig",
    "SelectionProblem",
    "Specialist",
    "Stability",
    "__version__",
    "export_specialist",
    "find_core_units",
    "find_core_units_batched",
    "holding_rate",
    "mask_units",
    "stability",
]
