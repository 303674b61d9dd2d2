"""Elimination loops: the one place units are dropped one at a time.

``eliminate`` (exact greedy, and target mode's last step) ranks candidates by
the holding rate of the toggled mask on all of D'_c, ties broken by the mean
log-sigmoid signed margin (how far the inputs are from changing decision),
then by unit index; ``toggle`` answers a whole step at once
(:meth:`SelectionProblem.toggle_rates` runs every candidate in one batched
pass where the layer feeds a Linear or Conv2d, and gives up on a candidate
once it cannot reach the target). ``exchange`` swaps units in where
elimination stalls. ``ranked_elimination`` ranks cheaply (on a probe) and
verifies the best few on all of D'_c: the probe greedy and target mode's
least-harm drops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["SWAP_TRIES", "Toggle", "Trace", "eliminate", "exchange", "ranked_elimination", "without"]

#: ``toggle(mask, candidates, target)`` -> ``{unit: (holding rate, margin) or None}`` (None: misses ``target``).
Toggle = Callable[[torch.Tensor, list[int], "float | None"], dict[int, "tuple[float, float] | None"]]


#: Outside units an exchange round tries adding (the best-scoring additions first).
SWAP_TRIES = 8


@dataclass
class Trace:
    """What a search did: units dropped and added in order, candidate evaluations, the last step's scores."""

    dropped: list[int] = field(default_factory=list)
    added: list[int] = field(default_factory=list)
    evaluations: int = 0
    last_scores: dict[int, tuple[float, float] | None] = field(default_factory=dict)


def without(mask: torch.Tensor, j: int) -> torch.Tensor:
    """A copy of ``mask`` with unit ``j`` dropped (the mask a removal is judged on)."""
    trial = mask.clone()
    trial[j] = False
    return trial


def _best(scores: dict[int, tuple[float, float] | None]) -> int | None:
    alive = [(s[0], s[1], -j) for j, s in scores.items() if s is not None]
    return -max(alive)[2] if alive else None


def eliminate(toggle: Toggle, mask: torch.Tensor, target: float | None,
              trace: Trace | None = None, protected: set[int] | None = None) -> tuple[torch.Tensor, float | None]:
    """Drop, one at a time, the kept unit whose removal holds best, while the target still holds.

    Args:
        toggle: scores each candidate's toggled mask (see module docstring).
        mask: bool mask to start from (True = kept); not modified.
        target: holding rate to keep; None runs until no unit is left (an order).
        trace: filled with the drops and the last step's scores.
        protected: units never dropped.

    Returns:
        The smallest mask reached and its holding rate (None if nothing was dropped).
    """
    trace = trace if trace is not None else Trace()
    mask = mask.flatten().bool().cpu().clone()
    rate: float | None = None
    while bool(mask.any()):
        cands = [j for j in torch.nonzero(mask).flatten().tolist() if not protected or j not in protected]
        if not cands:
            break
        scores = toggle(mask, cands, target)
        trace.evaluations += len(cands)
        trace.last_scores = scores
        best = _best(scores)
        if best is None:
            break
        mask[best] = False
        rate = scores[best][0]  # type: ignore[index]
        trace.dropped.append(best)
    return mask, rate


def ranked_elimination(mask: torch.Tensor, rank: Callable[[torch.Tensor, list[int]], list[int]],
                       drop: Callable[[torch.Tensor, int], bool], tries: int | None,
                       candidates: Callable[[torch.Tensor], list[int]] | None = None) -> torch.Tensor:
    """Drop, one at a time, the first of the ``tries`` best-ranked kept units that ``drop`` accepts.

    The elimination of greedy on a probe and of target mode's least-harm drops:
    ``rank`` orders the candidates cheaply (on a probe of D'_c, re-scored
    lazily), ``drop(mask, j)`` judges removing ``j`` on all of D'_c and says
    whether it holds; when none of the ``tries`` best holds (None: all of
    them), elimination stops. Where every candidate is scored on all of D'_c,
    :func:`eliminate` needs no verification.

    Args:
        mask: bool mask to start from (True = kept); not modified.
        rank: ``(mask, candidates)`` -> the candidates, best first.
        drop: accepts or refuses one removal (and records it, if it wants).
        tries: candidates verified per step before giving up.
        candidates: the kept units to rank (default: all, in index order).
    """
    mask = mask.flatten().bool().clone()
    while bool(mask.any()):
        cands = candidates(mask) if candidates is not None else torch.nonzero(mask).flatten().tolist()
        order = rank(mask, cands)
        for j in order if tries is None else order[:tries]:
            if drop(mask, j):
                mask[j] = False
                break
        else:
            break
    return mask


def exchange(toggle: Toggle, mask: torch.Tensor, rate: float, target: float, tries: int = SWAP_TRIES,
             trace: Trace | None = None, rank: Toggle | None = None) -> tuple[torch.Tensor, float]:
    """Swap outside units in where that lets more kept units go; repeat until no try helps.

    Elimination stops at a set from which no single unit can go; a smaller set
    may still exist that holds a unit elimination dropped early. Each round
    scores every outside unit's addition in one pass and tries the ``tries``
    best: the unit is added and kept while elimination runs on the others
    (without that, elimination would drop it first and return to the same
    set), then once more with it free to go. The first try that ends smaller
    than the current set is taken. ``rank`` (default ``toggle``) scores the
    additions for that order only: a probe of D'_c is enough to order them.
    """
    trace = trace if trace is not None else Trace()
    mask = mask.flatten().bool().cpu().clone()
    improved = True
    while improved and not bool(mask.all()):
        improved = False
        outside = torch.nonzero(~mask).flatten().tolist()
        scores = (rank or toggle)(mask, outside, None)
        trace.evaluations += len(outside)
        order = sorted(outside, key=lambda j: (scores[j] or (-1.0, float("-inf")), -j), reverse=True)
        for u in order[:tries]:
            trial = mask.clone()
            trial[u] = True
            sub = Trace()
            smaller, r = eliminate(toggle, trial, target, sub, protected={u})
            if r is not None:
                smaller, r_free = eliminate(toggle, smaller, target, sub)
                r = r if r_free is None else r_free
            trace.evaluations += sub.evaluations
            if r is not None and int(smaller.sum()) < int(mask.sum()):
                trace.added.append(u)
                trace.dropped += sub.dropped
                mask, rate, improved = smaller, r, True
                break
    return mask, rate
