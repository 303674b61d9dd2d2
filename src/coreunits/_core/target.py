"""Target mode: the smallest unit set whose holding rate reaches a target.

The paper fixes alpha by hand and reports whatever holding rate follows. A
user asks the converse: "the fewest units that keep 99.5% of the decisions".
Two steps answer it without the user tuning alpha:

1. Calibrate: run the selection; while its rounded mask misses the target,
   lower alpha (unit cost) and run again, up to ``calibration_runs`` times.
   Only this direction needs new optimisations: a mask with too many units
   is fixed by step 2, one evaluation per kept unit, without optimising again.
2. Refine the rounded mask against the exact hard-mask holding rate: add back
   the unit that raises the holding rate most while the target is missed,
   then try dropping each kept unit, lowest gate first, keeping each drop
   that leaves the target met.

Holding rates are judged on D'_c with the hard mask, in the requested reading.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from coreunits._core.cache import ActivationCache
from coreunits._core.dprime import DPrime
from coreunits._core.evaluation import evaluate_gates

__all__ = ["Judge", "Refinement", "mask_judge", "refine_mask"]

class Judge:
    """Holding rate of a bool mask over all gated units (concatenated), and an early-exit test."""

    def __init__(self, holding: Callable[[torch.Tensor], float],
                 reaches: Callable[[torch.Tensor, float], tuple[bool, float]] | None = None) -> None:
        self.holding = holding
        self._reaches = reaches

    def reaches(self, mask: torch.Tensor, target: float) -> tuple[bool, float]:
        """(holding rate >= target, the rate or a bound on it)."""
        if self._reaches is not None:
            return self._reaches(mask, target)
        rate = self.holding(mask)
        return rate >= target, rate


@dataclass
class Refinement:
    """What refining one rounded mask did."""

    mask: torch.Tensor
    holding_rate: float
    units_before: int
    holding_before: float
    added: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    evaluations: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "units_before": self.units_before, "holding_rate_before": self.holding_before,
            "units_after": int(self.mask.sum()), "holding_rate_after": self.holding_rate,
            "added": self.added, "dropped": self.dropped, "evaluations": self.evaluations,
        }


def mask_judge(cache: ActivationCache, dprime: DPrime, target_class: int, reading: str) -> Judge:
    """Holding rate (one reading) of a mask over all the cache's layers' units, concatenated.

    A single gated layer uses :class:`SelectionProblem`'s sparse fast path;
    several layers are evaluated directly.
    """
    sizes = [s.num_units for s in cache.specs]
    if len(sizes) == 1:
        from coreunits._core.problem import SelectionProblem

        problem = SelectionProblem(cache, cache.specs[0].name, target_class, reading=reading, dprime=dprime)
        return Judge(problem.holding, problem.reaches)

    def holding(mask: torch.Tensor) -> float:
        gates: list[torch.Tensor | None] = [m.float().to(cache.device) for m in mask.split(sizes)]
        r = evaluate_gates(cache, dprime.index, gates, target_class)
        return r.strict if reading == "strict" else r.paper

    return Judge(holding)


def refine_mask(judge: Judge | Callable[[torch.Tensor], float], mask: torch.Tensor, gate_values: torch.Tensor, target: float) -> Refinement:
    """Add back, then drop, units of a rounded mask against the target holding rate.

    Args:
        judge: holding rate of a bool mask (all layers' units concatenated), or a
            :class:`Judge` (whose early-exit test makes rejected drops cheap).
        mask: the rounded mask (True = kept).
        gate_values: the gates' values, same length: the order to try units in.
        target: the holding rate to keep.

    Returns:
        The refined mask with its holding rate, and what changed. When no mask
        reaches the target, the result keeps every unit that was added.
    """
    if not isinstance(judge, Judge):
        judge = Judge(judge)
    mask = mask.flatten().bool().cpu().clone()
    values = gate_values.flatten().float().cpu()
    rate = judge.holding(mask)
    out = Refinement(mask, rate, int(mask.sum()), rate, evaluations=1)
    # Add back: each round adds the unit that raises the holding rate most.
    while rate < target and not bool(mask.all()):
        best_j, best_rate = -1, -1.0
        for j in torch.nonzero(~mask).flatten().tolist():
            trial = mask.clone()
            trial[j] = True
            r = judge.holding(trial)
            out.evaluations += 1
            if r > best_rate:
                best_j, best_rate = j, r
        mask[best_j] = True
        rate = best_rate
        out.added.append(best_j)
    if rate >= target:
        # Drop: lowest gate first (the optimiser's own estimate of what matters least).
        kept = torch.nonzero(mask).flatten()
        for j in kept[torch.argsort(values[kept], stable=True)].tolist():
            if j in out.added:
                continue
            trial = mask.clone()
            trial[j] = False
            reached, r = judge.reaches(trial, target)
            out.evaluations += 1
            if reached:
                mask, rate = trial, r
                out.dropped.append(j)
    out.mask, out.holding_rate = mask, rate
    return out

