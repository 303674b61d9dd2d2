"""The one interface every way of choosing units implements.

A strategy answers a :class:`SelectionProblem` (model, layer, class, D'_c,
reading) with a :class:`StrategyResult`: a *ranking* of the units (higher =
keep first) and/or a *set* chosen for a target holding rate. Ranking-only
strategies get their set from the ranking: the smallest top-k whose holding
rate reaches the target. All are judged by the same ``problem.holding``.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from coreunits._core.problem import SelectionProblem

__all__ = ["RankingStrategy", "Strategy", "StrategyResult", "smallest_top_k"]


@dataclass
class StrategyResult:
    """What a strategy chose for one problem.

    Attributes:
        method: the strategy's name.
        ranking: importance per unit (higher = keep first), or None for pure set methods.
        mask: bool mask of the chosen set (True = kept), or None when no target was given.
        holding_rate: holding rate of ``mask`` on D'_c in the problem's reading (None without a mask).
        seconds: wall time of the strategy (ranking + choosing the set).
        evaluations: hard masks evaluated on D'_c.
        info: strategy-specific details (e.g. units before refinement, calibration steps).
    """

    method: str
    ranking: torch.Tensor | None
    mask: torch.Tensor | None
    holding_rate: float | None
    seconds: float
    evaluations: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_units(self) -> int | None:
        """Size of the chosen set (None without a mask)."""
        return None if self.mask is None else int(self.mask.sum())

    @property
    def units(self) -> list[int] | None:
        """Indices of the chosen units (None without a mask)."""
        return None if self.mask is None else torch.nonzero(self.mask.flatten()).flatten().tolist()


def smallest_top_k(problem: SelectionProblem, ranking: torch.Tensor, target: float) -> tuple[torch.Tensor, float]:
    """The smallest top-k of ``ranking`` whose holding rate reaches ``target``.

    Scans k upwards from 0 and stops at the first k that reaches the target:
    exact even though the curve need not be monotone (keeping more units can
    hold less), and cheap: small masks go through the sparse fast path and a
    k that misses is rejected early (:meth:`SelectionProblem.reaches`). When
    no k reaches the target, all units are kept.
    """
    order = torch.argsort(ranking.flatten().float().cpu(), descending=True, stable=True)
    mask = torch.zeros(problem.num_units, dtype=torch.bool)
    for k in range(problem.num_units + 1):
        if k > 0:
            mask[order[k - 1]] = True
        reached, rate = problem.reaches(mask, target)
        if reached:
            return mask.clone(), rate
    return mask.clone(), problem.holding(mask)


class Strategy(ABC):
    """A way of choosing units. Subclasses set ``name`` and implement :meth:`run`."""

    name: ClassVar[str] = "strategy"

    @abstractmethod
    def run(self, problem: SelectionProblem, target: float | None) -> StrategyResult:
        """Answer ``problem``; with a ``target`` holding rate, also choose a set."""

    def __repr__(self) -> str:
        # Includes every public setting: compare's stored records are keyed by it.
        args = ", ".join(f"{k}={v!r}" for k, v in sorted(vars(self).items()) if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class RankingStrategy(Strategy):
    """A strategy that scores units; its set is the smallest top-k reaching the target."""

    @abstractmethod
    def rank(self, problem: SelectionProblem) -> torch.Tensor:
        """Importance per unit, shape ``(num_units,)``, higher = keep first."""

    def run(self, problem: SelectionProblem, target: float | None) -> StrategyResult:
        t0 = time.perf_counter()
        before = problem.evaluations
        ranking = self.rank(problem).detach().flatten().float().cpu()
        if ranking.numel() != problem.num_units:
            raise ValueError(f"{self.name} ranked {ranking.numel()} units, the layer has {problem.num_units}")
        mask, rate = (None, None) if target is None else smallest_top_k(problem, ranking, target)
        return StrategyResult(self.name, ranking, mask, rate, time.perf_counter() - t0,
                              problem.evaluations - before)
