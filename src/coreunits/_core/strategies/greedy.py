"""Greedy backward elimination: drop the least needed unit while the target still holds.

Starting from all units, each step tries removing every remaining unit and
drops the one whose removal leaves the highest holding rate, as long as that
rate stays at or above the target. It costs O(K^2) mask evaluations (cheap
ones: the sparse path of ``SelectionProblem.scores`` costs about k/K of the
next layer for a mask keeping k units), and is the natural "search directly
on the judged quantity" baseline for the switch-gate selection.
"""

from __future__ import annotations

import time

import torch

from coreunits._core.elimination import Trace, eliminate, ranked_elimination, without
from coreunits._core.lazy import best_first
from coreunits._core.problem import SelectionProblem
from coreunits._core.progress import progress_bar
from coreunits._core.strategies.base import Strategy, StrategyResult
from coreunits._core.strategies.shapley import draw_probe

__all__ = ["ExactGreedyElimination", "GreedyBackwardElimination", "exact_elimination"]


class GreedyBackwardElimination(Strategy):
    """Drop units one at a time, always the one whose removal holds best, down to the target.

    The elimination order is also a ranking: a unit dropped later ranks
    higher, the units never dropped rank highest (ordered among themselves by
    how much their removal would cost at the last step). Without a target the
    elimination runs until no unit is left and only the ranking is returned.

    Args:
        probe_rows: score the candidates of each step on a fixed random probe of
            this many rows of D'_c (None: on all of D'_c, the exact elimination of
            :func:`exact_elimination`). The best candidate is
            then verified on all of D'_c; if it misses the target, up to
            ``retries`` next-best candidates are verified before stopping.
        seed: seed of the probe.
        retries: next-best candidates verified after the best one fails (probe only).
        lazy: re-score only the candidates whose score at an earlier step could
            still make them the best (``_core.lazy``; Minoux's lazy greedy). Off
            by default: the textbook elimination, which ``coreunits compare`` runs.
    """

    name = "greedy_backward"

    def __init__(self, probe_rows: int | None = None, seed: int = 0, retries: int = 3, lazy: bool = False) -> None:
        self.probe_rows, self.seed, self.retries, self.lazy = probe_rows, seed, retries, lazy

    def run(self, problem: SelectionProblem, target: float | None) -> StrategyResult:
        if self.probe_rows is None and not self.lazy:
            return exact_elimination(self.name, problem, target)
        t0 = time.perf_counter()
        before = problem.evaluations
        k = problem.num_units
        probe = draw_probe(problem, self.probe_rows, self.seed)
        dropped: list[int] = []
        counts = {"candidates": 0, "verifications": 0}
        # Candidates and their scores at the last step, to order the units never dropped.
        last: tuple[list[int], torch.Tensor] = ([], torch.zeros(0))
        bounds: dict[int, float] | None = {} if self.lazy else None
        fresh: dict[int, float] = {}

        def rank(m: torch.Tensor, cands: list[int]) -> list[int]:
            nonlocal last, fresh
            # Stable: among equally good candidates the lowest index goes first (reproducible).
            order, fresh = best_first(cands, lambda j: problem.holding(without(m, j), rows=probe), bounds)
            counts["candidates"] += len(fresh)
            last = (cands, torch.tensor([fresh[j] if j in fresh else bounds[j] for j in cands],  # type: ignore[index]
                                        dtype=torch.float64))
            return order

        def drop(m: torch.Tensor, j: int) -> bool:
            if target is None:
                ok = True
            elif probe is None:
                # Scored on all of D'_c already: if the best misses the target, every candidate does.
                ok = fresh[j] >= target
            else:
                counts["verifications"] += 1
                ok = problem.reaches(without(m, j), target)[0]
            if ok:
                dropped.append(j)
            return ok

        tries = 1 if target is None or probe is None else 1 + self.retries
        kept = ranked_elimination(torch.ones(k, dtype=torch.bool), rank, drop, tries)
        candidate_evals, verifications = counts["candidates"], counts["verifications"]

        ranking = torch.zeros(k)
        for step, j in enumerate(dropped):
            ranking[j] = float(step)
        if kept.any():
            cands, scores = last
            # At the last step the candidates are exactly the kept units; a unit whose
            # removal would leave a higher holding rate is less needed, so it ranks lower.
            for pos, i in enumerate(torch.argsort(scores, descending=True, stable=True).tolist()):
                ranking[cands[i]] = float(len(dropped) + pos)
        info = {
            "candidate_evaluations": candidate_evals,
            "verifications": verifications,
            "probe_rows": None if probe is None else int(probe.numel()),
            "dropped": len(dropped),
            "lazy": self.lazy,
        }
        if target is None:
            return StrategyResult(self.name, ranking, None, None, time.perf_counter() - t0,
                                  problem.evaluations - before, info)
        rate = problem.holding(kept)  # always judged on all of D'_c, whatever the probe said
        return StrategyResult(self.name, ranking, kept.clone(), rate, time.perf_counter() - t0,
                              problem.evaluations - before, info)

    def __repr__(self) -> str:
        lazy = ", lazy=True" if self.lazy else ""
        return (f"GreedyBackwardElimination(probe_rows={self.probe_rows}, seed={self.seed}, "
                f"retries={self.retries}{lazy})")


class ExactGreedyElimination(GreedyBackwardElimination):
    """Textbook greedy backward elimination on all of D'_c, the reference ``compare`` judges every method against.

    ``GreedyBackwardElimination(probe_rows=None)`` under its own name, so a
    comparison holds it beside the probe-ranked greedy (see :func:`exact_elimination`).
    """

    name = "greedy_exact"

    def __init__(self) -> None:
        super().__init__(probe_rows=None)

    def __repr__(self) -> str:
        return "ExactGreedyElimination()"


def exact_elimination(name: str, problem: SelectionProblem, target: float | None) -> StrategyResult:
    """Greedy backward elimination with every candidate scored on all of D'_c.

    Each step scores every kept unit's removal by the holding rate on the
    whole of D'_c (ties: mean log-sigmoid margin, then lower index) and drops
    the best while it reaches the target. A step is one batched pass where the
    layer feeds a ``Linear`` (each unit's contribution to it computed once) or a
    ``Conv2d``, and a candidate is given up as soon as it changed more decisions
    than the target allows (:meth:`SelectionProblem.toggle_rates`): the same
    drops as scoring each candidate in full, at a fraction of the cost.
    """
    t0 = time.perf_counter()
    before = problem.evaluations
    trace = Trace()
    # Minutes on a wide layer: a bar (one tick per step, quiet when stderr is not a terminal).
    bar = progress_bar(enabled=True, total=problem.num_units, desc=f"exact greedy, class {problem.target_class}",
                       unit="step", leave=False)

    def toggle(mask: torch.Tensor, cands: list[int], tgt: float | None) -> dict[int, tuple[float, float] | None]:
        bar.update(1)
        bar.set_postfix(kept=int(mask.sum()), refresh=False)
        return problem.toggle_rates(mask, cands, tgt)

    with bar:
        kept, rate = eliminate(toggle, torch.ones(problem.num_units, dtype=torch.bool), target, trace)
    # Dropped later = more needed; the units never dropped rank above, the one whose
    # removal would have held best lowest among them (given-up candidates highest).
    ranking = torch.zeros(problem.num_units)
    for step, j in enumerate(trace.dropped):
        ranking[j] = float(step)
    last = sorted(torch.nonzero(kept).flatten().tolist(),
                  key=lambda j: trace.last_scores.get(j) or (-1.0, float("-inf")), reverse=True)
    for pos, j in enumerate(last):
        ranking[j] = float(len(trace.dropped) + pos)
    info = {"candidate_evaluations": trace.evaluations, "dropped": len(trace.dropped), "probe_rows": None}
    mask: torch.Tensor | None = None
    if target is None:
        rate = None  # an order only: no set was asked for
    else:
        mask = kept
        if rate is None:
            rate = problem.holding(kept)
    return StrategyResult(name, ranking, mask, rate, time.perf_counter() - t0, problem.evaluations - before, info)
