"""Unit-selection strategies behind one interface (see ``base``)."""

from coreunits._core.strategies.base import RankingStrategy, Strategy, StrategyResult, smallest_top_k
from coreunits._core.strategies.gates import HardConcreteL0, SwitchGates
from coreunits._core.strategies.greedy import ExactGreedyElimination, GreedyBackwardElimination
from coreunits._core.strategies.rankings import (
    CaptumConductance,
    GradientTimesActivation,
    MeanActivation,
    RandomRanking,
)
from coreunits._core.strategies.shapley import TruncatedMonteCarloShapley

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
