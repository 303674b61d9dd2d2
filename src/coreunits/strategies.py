"""Unit-selection strategies, all answering a :class:`SelectionProblem` through one interface.

Example:
    >>> from coreunits import ActivationCache, SelectionProblem
    >>> from coreunits.strategies import GreedyBackwardElimination, SwitchGates
    >>> problem = SelectionProblem(ActivationCache(model, "max1", data), "max1", target_class=0)
    >>> for method in (SwitchGates(), GreedyBackwardElimination()):
    ...     result = method.run(problem, target=0.995)
    ...     print(method.name, result.num_units, result.holding_rate, result.seconds)

Write your own by subclassing :class:`RankingStrategy` (implement ``rank``) or
:class:`Strategy` (implement ``run``).
"""

from coreunits._core.strategies import (
    CaptumConductance,
    ExactGreedyElimination,
    GradientTimesActivation,
    GreedyBackwardElimination,
    HardConcreteL0,
    MeanActivation,
    RandomRanking,
    RankingStrategy,
    Strategy,
    StrategyResult,
    SwitchGates,
    TruncatedMonteCarloShapley,
    smallest_top_k,
)

__all__ = [
    "CaptumConductance",
    "ExactGreedyElimination",
    "GradientTimesActivation",
    "GreedyBackwardElimination",
    "HardConcreteL0",
    "MeanActivation",
    "RandomRanking",
    "RankingStrategy",
    "Strategy",
    "StrategyResult",
    "SwitchGates",
    "TruncatedMonteCarloShapley",
    "smallest_top_k",
]
