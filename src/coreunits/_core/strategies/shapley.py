"""Truncated Monte Carlo Shapley values of units (Neuron Shapley, Ghorbani & Zou 2020).

The value of a set S of units is the holding rate with only S kept. A unit's
Shapley value is its mean marginal contribution ``v(S + j) - v(S)`` over
random orders of adding units. Truncation: once the units added so far hold
as much as all units do (within ``tolerance``), the rest of the order is
taken to add nothing, which is where most of the cost would go for a layer
whose few core units come early in the order.
"""

from __future__ import annotations

import torch

from coreunits._core.dprime import random_rows
from coreunits._core.errors import OptionError
from coreunits._core.problem import SelectionProblem
from coreunits._core.strategies.base import RankingStrategy, StrategyResult

__all__ = ["TruncatedMonteCarloShapley", "draw_probe"]


def draw_probe(problem: SelectionProblem, size: int | None, seed: int) -> torch.Tensor | None:
    """A fixed random subset of ``size`` rows of D'_c, or None for all of D'_c.

    None (not the rows themselves) when the probe would be all of D'_c, so that
    evaluations on it go through ``problem.holding(mask)`` and are counted as
    full-D'_c evaluations.
    """
    return random_rows(problem.rows, size, seed)


class TruncatedMonteCarloShapley(RankingStrategy):
    """Units ranked by their truncated Monte Carlo Shapley value for the holding rate.

    Args:
        permutations: random orders sampled.
        tolerance: truncate an order once ``|v(all) - v(S)| <= tolerance``.
        probe_rows: the value is measured on a fixed random subset of this many
            rows of D'_c (all of D'_c when smaller), bounding the cost per value.
        seed: seed of the probe and the orders.
    """

    name = "tmc_shapley"

    def __init__(self, permutations: int = 20, tolerance: float = 0.005, probe_rows: int | None = 1024,
                 seed: int = 0) -> None:
        if permutations < 1:
            raise OptionError(f"permutations must be >= 1, got {permutations}")
        self.permutations, self.tolerance, self.probe_rows, self.seed = permutations, tolerance, probe_rows, seed
        self._info: dict[str, object] = {}

    def rank(self, problem: SelectionProblem) -> torch.Tensor:
        k = problem.num_units
        probe = draw_probe(problem, self.probe_rows, self.seed)
        # Orders get their own stream so the probe does not shift them when probe_rows changes.
        gen = torch.Generator().manual_seed(self.seed + 1)
        values = 0

        def value(mask: torch.Tensor) -> float:
            nonlocal values
            values += 1
            return problem.holding(mask, rows=probe)

        v_all = value(torch.ones(k, dtype=torch.bool))
        v_empty = value(torch.zeros(k, dtype=torch.bool))
        total = torch.zeros(k, dtype=torch.float64)
        truncated = 0
        for _ in range(self.permutations):
            mask = torch.zeros(k, dtype=torch.bool)
            prev = v_empty
            for j in torch.randperm(k, generator=gen).tolist():
                if abs(v_all - prev) <= self.tolerance:
                    truncated += 1
                    break  # the remaining units of this order get 0
                mask[j] = True
                cur = value(mask)
                total[j] += cur - prev
                prev = cur
        self._info = {
            "value_evaluations": values,
            "probe_rows": None if probe is None else int(probe.numel()),
            "truncated_permutations": truncated,
            "value_all": v_all,
            "value_empty": v_empty,
        }
        return (total / self.permutations).float()

    def run(self, problem: SelectionProblem, target: float | None) -> StrategyResult:
        result = super().run(problem, target)
        result.info.update(self._info)
        return result

    def __repr__(self) -> str:
        return (f"TruncatedMonteCarloShapley(permutations={self.permutations}, tolerance={self.tolerance}, "
                f"probe_rows={self.probe_rows}, seed={self.seed})")
