"""Lazy re-scoring for backward elimination (Minoux's lazy greedy, 1978).

Backward elimination scores, at every step, the mask left by removing each
remaining unit, and drops the best. Removing a unit from a smaller mask harms
at least as much, as a rule, so a unit's score from an earlier step bounds its
score now from above: re-scoring units in order of their bounds, a step can
stop once no unit still unscored could beat the best re-scored one. When the
rule holds, the order is the one full re-scoring gives; when it does not, the
order is an approximation (the drops are still verified on all of D'_c).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["best_first"]


def best_first(candidates: list[int], score: Callable[..., Any],
               bounds: dict[int, Any] | None) -> tuple[list[int], dict[int, Any]]:
    """``candidates`` best first, and the scores computed for it.

    Args:
        candidates: unit ids, in the order that breaks ties (stable).
        score: the score of removing a unit now, called with the unit; higher is better (any ordered
            type). Typed loosely: callers pass lambdas that bind their mask as a default argument.
        bounds: scores from earlier steps, updated in place (lazy re-scoring), or
            None to score every candidate.

    Returns:
        The scored candidates by score, best first, then the unscored ones by
        their bounds; and ``{unit: score}`` for the units scored in this call.
    """
    if bounds is None:
        fresh = {j: score(j) for j in candidates}
        return sorted(candidates, key=lambda j: fresh[j], reverse=True), fresh
    fresh = {j: score(j) for j in candidates if j not in bounds}
    stale = sorted((j for j in candidates if j not in fresh), key=lambda j: bounds[j], reverse=True)
    for j in stale:
        if fresh and bounds[j] < max(fresh.values()):
            break  # no unit left unscored can beat the best scored one
        fresh[j] = score(j)
    bounds.update(fresh)
    scored = sorted((j for j in candidates if j in fresh), key=lambda j: fresh[j], reverse=True)
    return scored + [j for j in stale if j not in fresh], fresh


