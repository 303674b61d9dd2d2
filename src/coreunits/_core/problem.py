"""One unit-selection question, and fast holding rates of hard masks for it.

A :class:`SelectionProblem` is (model, layer, class c, D'_c) plus the reading
of the holding rate the answer is judged by. Every way of choosing units
(switch gates, rankings, greedy search, Shapley values) answers the same
problem and is judged by the same :meth:`SelectionProblem.holding`, so the
comparison between them is fair by construction.

The problem remembers the scores of recently evaluated masks (a few MiB), so
that no method pays twice for the same rows of the same mask: a drop verified
on D'_c after it was scored on a probe only evaluates the rows outside the
probe, and a mask verified on D'_c is not run again for its final holding
rate. Its early-exit test (:meth:`SelectionProblem.reaches`) looks first at the
inputs closest to changing decision under the last mask judged on all of
D'_c, so a mask that misses the target is rejected after a small part of D'_c.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Any, Literal

import torch
import torch.nn.functional as F

from coreunits._core.cache import ActivationCache
from coreunits._core.dprime import DPrime, build_dprime, check_class
from coreunits._core.errors import LayerNotFoundError, OptionError
from coreunits._core.evaluation import (
    HoldingRates,
    _holding_rates,
    _original_decisions,
    masked_scores,
    paper_holding,
    removal_curve,
)
from coreunits._core.incremental import build_incremental
from coreunits._core.objective import center_margin, decision_margin, strict_decision
from coreunits._core.paper_bound import PaperMissBound
from coreunits._core.scoring import margin_gradient

__all__ = ["READINGS", "SelectionProblem"]

#: The two readings of the holding rate (see ``_core.evaluation``).
READINGS = ("strict", "paper")

#: Bytes of remembered scores per problem (a 2,048-row probe of 10 classes is 80 KiB).
MEMO_BYTES = 64 << 20

#: Most bytes a problem spends on its units' contributions to the next Linear layer
#: (MNIST max2: 12,000 rows x 64 units x 1,024 features = 3.1 GB); above it, toggled
#: masks compute the contributions per chunk instead (same scores, slower).
CONTRIBUTION_BYTES = int(os.environ.get("COREUNITS_CONTRIBUTION_BYTES", str(4 << 30)))


class SelectionProblem:
    """The units of ``layer`` that keep the model's decisions for ``target_class`` on D'_c.

    Args:
        cache: activations of the model (built for ``layer``, possibly with others,
            which then stay fully on).
        layer: name of the layer whose units are chosen.
        target_class: class c.
        seed: seed of D'_c's random negatives (the same seed gives the same D'_c
            as :func:`find_core_units`).
        positives_only: D'_c without negatives (the paper's input-layer setting).
        reading: ``"strict"`` (argmax decision for c unchanged) or ``"paper"``
            (the center-based binary classifier's decision, ``w_b`` refitted).
        dprime: use this D'_c instead of drawing one.

    Attributes:
        rows: cache rows of D'_c.
        labels: 1 for positives, 0 for negatives (float, on the cache's device).
        evaluations: number of hard masks evaluated on all of D'_c so far.
    """

    def __init__(
        self,
        cache: ActivationCache,
        layer: str,
        target_class: int,
        *,
        seed: int = 0,
        positives_only: bool = False,
        reading: str = "strict",
        dprime: DPrime | None = None,
    ) -> None:
        if reading not in READINGS:
            raise OptionError(f"reading must be one of {READINGS}, got {reading!r}")
        names = cache.layer_names
        if layer not in names:
            raise LayerNotFoundError(f"layer {layer!r} is not in the cache (it has {names}); build one for it")
        self.cache = cache
        self.layer = layer
        self.position = names.index(layer)
        self.spec = cache.specs[self.position]
        self.target_class = check_class(target_class, cache.num_classes)
        self.seed = seed
        self.reading = reading
        if dprime is None:
            gen = torch.Generator().manual_seed(seed)
            dprime = build_dprime(cache.predictions, self.target_class, generator=gen, positives_only=positives_only)
        self.dprime = dprime
        self.rows = dprime.index
        self.labels = dprime.labels.to(cache.device)
        self.original = _original_decisions(cache, self.rows, self.target_class)
        self.evaluations = 0
        # Position in D'_c of every cache row (-1: not in D'_c), to reuse scores across row sets.
        self._position = torch.full((len(cache.predictions),), -1, dtype=torch.long)
        self._position[self.rows.cpu()] = torch.arange(len(self.rows))
        # mask bytes -> (positions in D'_c, or None for all of it in order; scores), oldest first.
        self._memo: OrderedDict[bytes, tuple[torch.Tensor | None, torch.Tensor]] = OrderedDict()
        self._memo_bytes = 0
        self._risk: torch.Tensor | None = None  # positions of D'_c, closest to changing decision first
        self._contrib: torch.Tensor | Literal[False] | None = False  # False: not tried yet; None: not affordable
        self._base: tuple[bytes, torch.Tensor] | None = None  # (mask bytes, its next-layer pre-activation on D'_c)

    @property
    def num_units(self) -> int:
        """Number of units of the layer."""
        return self.spec.num_units

    def scores(self, mask: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The masked model's scores on ``rows`` (default D'_c); ``mask`` True = unit kept."""
        mask = self._check(mask)
        key = _key(mask)
        entry = self._memo.get(key)
        if rows is None:
            if entry is not None and entry[0] is None:
                return entry[1].clone()
            scores = self._compute(mask, self.rows)
            self._remember(key, None, scores)
            return scores
        positions = self._position[rows.cpu()]
        inside = bool((positions >= 0).all())
        if entry is not None and inside:
            known, known_scores = entry
            if known is None:
                return known_scores.index_select(0, positions.to(known_scores.device))
            if torch.equal(known, positions):
                return known_scores.clone()
        scores = self._compute(mask, rows)
        if inside and (entry is None or entry[0] is not None):
            self._remember(key, positions, scores)
        return scores

    def rates(self, mask: torch.Tensor, rows: torch.Tensor | None = None) -> HoldingRates:
        """Both readings of the holding rate of ``mask`` on ``rows`` (default D'_c)."""
        if rows is None:
            entry = self._memo.get(_key(self._check(mask)))
            if entry is None or entry[0] is not None:
                self.evaluations += 1  # not remembered: a new evaluation on all of D'_c
        rows_ = self.rows if rows is None else rows
        original = self.original if rows is None else _original_decisions(self.cache, rows_, self.target_class)
        return _holding_rates(self.scores(mask, rows), original, self.target_class, None)

    def holding(self, mask: torch.Tensor, rows: torch.Tensor | None = None) -> float:
        """The holding rate of ``mask`` in this problem's reading."""
        r = self.rates(mask, rows)
        return r.strict if self.reading == "strict" else r.paper

    def reaches(self, mask: torch.Tensor, target: float, chunk: int = 1024) -> tuple[bool, float]:
        """Whether ``mask``'s holding rate on D'_c reaches ``target``, stopping as soon as it cannot.

        D'_c is judged chunk by chunk and the pass stops once more inputs have
        changed decision than the target allows: in the strict reading each
        input's decision is final on its own; in the paper reading, which refits
        ``w_b`` on all inputs, once more have changed under every ``w_b`` the
        refit could choose (:class:`PaperMissBound`). Rows whose scores under
        ``mask`` are remembered (a probe it was ranked on) are not run again, and
        the others are run closest-to-changing first (by their margin under the
        last mask judged on all of D'_c), so a mask that misses the target is
        usually rejected after its first chunk. Returns (reached, holding rate);
        the rate is exact when every row was judged, else an upper bound of the
        true (missing) rate.
        """
        mask = self._check(mask)
        key = _key(mask)
        n = len(self.rows)
        allowed = int((1.0 - target) * n + 1e-9)
        entry = self._memo.get(key)
        if entry is not None and entry[0] is None:
            rate = self._rate_of(entry[1])
            return rate >= target, rate
        self.evaluations += 1
        todo = self._risk if self._risk is not None else torch.arange(n)
        done_pos: list[torch.Tensor] = []
        done_scores: list[torch.Tensor] = []
        bound = PaperMissBound(1, self.cache.device) if self.reading == "paper" else None
        if bound is not None:
            allowed += 1  # the paper rate is a float32 mean: one more before giving up, never one too few
        changed = 0

        def judge(scores: torch.Tensor, pos: torch.Tensor) -> bool:
            """Count ``scores`` (rows at ``pos`` of D'_c) in; whether the target is surely missed."""
            nonlocal changed
            done_pos.append(pos)
            done_scores.append(scores)
            if bound is None:
                changed += int((~self._kept(scores, pos)).sum())
            else:
                bound.add(center_margin(scores, self.target_class)[None], self.original[pos.to(self.original.device)])
                changed = int(bound.least()[0])
            return changed > allowed

        if entry is not None:
            known, known_scores = entry
            assert known is not None
            fresh = torch.ones(n, dtype=torch.bool)
            fresh[known] = False
            todo = todo[fresh[todo]]
            if judge(known_scores, known):
                return False, 1.0 - changed / n
        for start in range(0, len(todo), chunk):
            pos = todo[start : start + chunk]
            if judge(self._compute(mask, self.rows[pos]), pos):
                return False, 1.0 - changed / n
        # Every row was judged, so the whole of D'_c's scores are known for this mask.
        positions = torch.cat(done_pos)
        scores = torch.cat(done_scores)
        full = torch.empty_like(scores)
        full[positions.to(full.device)] = scores
        self._remember(key, None, full)
        if bound is None:
            return True, 1.0 - changed / n  # no more changed than allowed, counted exactly
        rate = self._rate_of(full)
        return rate >= target, rate

    def _rate_of(self, scores: torch.Tensor) -> float:
        """The holding rate, in this problem's reading, of one mask's scores on all of D'_c."""
        if self.reading == "strict":
            return float(self._kept(scores, None).float().mean())
        return paper_holding(center_margin(scores, self.target_class), self.original)[0]

    @property
    def batched_toggles(self) -> bool:
        """Whether :meth:`toggle_rates` judges all candidates in one batched pass (else one pass each)."""
        return len(self.cache.specs) == 1 and build_incremental(self.cache, self.layer) is not None

    def toggle_rates(self, mask: torch.Tensor, candidates: list[int], target: float | None = None,
                     chunk: int = 1024, positions: torch.Tensor | None = None) -> dict[int, tuple[float, float] | None]:
        """Each candidate unit toggled in ``mask`` (dropped if kept, added if not), judged on all of D'_c.

        ``positions`` (rows of D'_c, by position) judges on those rows only: a
        probe, for ordering candidates cheaply (the figures are then the probe's).
        Where no batched path exists a probe gives a first-order estimate instead
        (:meth:`_first_order_toggles`): one backward pass, not one pass per candidate.

        Returns ``{unit: (holding rate, mean log-sigmoid signed margin)}``, the
        margin separating masks that keep equally many decisions. With a
        ``target`` a candidate that misses it is ``None``; it is given up as soon
        as more inputs changed decision under it than the target allows (in the
        paper reading, under every ``w_b`` the refit could pick:
        :meth:`_paper_toggles`): the best candidate that reaches the target, or
        the fact that none does, is still exact. Rows are run closest-to-changing
        first, and all live candidates at once through the incremental path where
        the layer feeds a ``Linear`` or ``Conv2d`` (``IncrementalCurve.toggled_scores``).
        """
        mask = self._check(mask).bool().cpu()
        n = len(self.rows) if positions is None else len(positions)
        evaluator = build_incremental(self.cache, self.layer) if len(self.cache.specs) == 1 else None
        if evaluator is None:
            if positions is not None:
                return self._first_order_toggles(mask, candidates, positions)
            return {j: self._toggle_rate(mask, j, target) for j in candidates}
        if positions is None:
            self.evaluations += len(candidates)
        if self.reading != "strict":
            return self._paper_toggles(evaluator, mask, candidates, target, positions, chunk)
        allowed = n if target is None else int((1.0 - target) * n + 1e-9)
        if positions is not None:
            order = positions
        else:
            order = self._risk if self._risk is not None else torch.arange(n)
        changed = dict.fromkeys(candidates, 0)
        margin = dict.fromkeys(candidates, 0.0)
        alive = list(candidates)
        # Building every unit's contribution costs about one pass of the next layer over D'_c:
        # worth it for steps that score most units (greedy from all units), not for a small set.
        contrib = self._contributions(evaluator, build=len(candidates) * 4 >= self.num_units and positions is None)
        for start in range(0, n, chunk):
            if not alive:
                break
            pos = order[start : start + chunk]
            scores = self._toggled(evaluator, contrib, mask, pos, alive)
            original = self.original[pos.to(self.original.device)]
            m = decision_margin(scores.reshape(-1, scores.shape[-1]), self.target_class).reshape(len(alive), -1)
            signed = torch.where(original, m, -m)
            fails = (signed <= 0).sum(dim=1).tolist()
            logsig = F.logsigmoid(signed.double()).sum(dim=1).tolist()
            for j, f, ls in zip(alive, fails, logsig):
                changed[j] += int(f)
                margin[j] += float(ls)
            alive = [j for j in alive if changed[j] <= allowed]
        out: dict[int, tuple[float, float] | None] = dict.fromkeys(candidates)
        for j in alive:
            out[j] = (1.0 - changed[j] / n, margin[j] / n)
        return out

    def _paper_toggles(self, evaluator: Any, mask: torch.Tensor, candidates: list[int], target: float | None,
                       positions: torch.Tensor | None, chunk: int) -> dict[int, tuple[float, float] | None]:
        """:meth:`toggle_rates` in the paper reading, through the same batched pass.

        Every live candidate's center and decision margins are kept for the rows
        run so far (closest-to-changing first on all of D'_c); a candidate is given
        up once it changed more decisions than the target allows under every
        ``w_b`` the refit could choose (:class:`PaperMissBound`). The others are
        read on all the rows as :func:`_holding_rates` reads one mask's.
        """
        n = len(self.rows) if positions is None else len(positions)
        order = torch.arange(n) if positions is None else positions  # the row of D'_c judged at each slot
        run = self._risk if positions is None and self._risk is not None else torch.arange(n)
        # One more than the strict count allows: the rate is a float32 mean, so never give up one too early.
        allowed = n if target is None else int((1.0 - target) * n) + 1
        device = self.original.device
        original = self.original[order.to(device)]
        contrib = self._contributions(evaluator, build=len(candidates) * 4 >= self.num_units and positions is None)
        centre = torch.zeros(len(candidates), n, device=device)
        decided = torch.zeros(len(candidates), n, device=device)
        bound = PaperMissBound(len(candidates), device)
        alive = torch.arange(len(candidates))
        for start in range(0, n, chunk):
            if not len(alive):
                break
            slots = run[start : start + chunk]
            pos = order[slots]
            group = [candidates[i] for i in alive.tolist()]
            scores = self._toggled(evaluator, contrib, mask, pos, group)
            flat = scores.reshape(-1, scores.shape[-1]).to(device)
            cells = (alive.to(device)[:, None], slots.to(device)[None, :])
            margin = center_margin(flat, self.target_class).reshape(len(group), -1)
            centre[cells] = margin
            decided[cells] = decision_margin(flat, self.target_class).reshape(len(group), -1)
            bound.add(margin, original[slots.to(device)], alive)
            if target is not None:
                alive = alive[(bound.least(alive) <= allowed).cpu()]
        out: dict[int, tuple[float, float] | None] = dict.fromkeys(candidates)
        for i in alive.tolist():
            out[candidates[i]] = _scored(paper_holding(centre[i], original)[0], decided[i], original, target)
        return out

    def _toggled(self, evaluator: Any, contrib: torch.Tensor | None, mask: torch.Tensor, pos: torch.Tensor,
                 cands: list[int]) -> torch.Tensor:
        """Scores ``(G, len(pos), H)`` of ``mask`` with each candidate toggled, on rows ``pos`` of D'_c.

        With the units' contributions, only the candidates' are gathered for the rows: the mask's own
        pre-activation is summed once over D'_c and kept while the mask is the same (every chunk of
        rows of a step), so a chunk costs its live candidates, not all K units. Gathering all K for
        every chunk made exact greedy on MNIST max2 class 0 take 180.6 s instead of 68.8 s.
        """
        if contrib is None:
            return evaluator.toggled_scores(self.rows[pos], mask, cands)
        key = _key(mask)
        if self._base is None or self._base[0] != key:
            self._base = (key, evaluator.pre_activation_from_contributions(contrib, mask))
        p = pos.to(contrib.device)
        idx = torch.tensor(cands, dtype=torch.long, device=contrib.device)
        sign = 1.0 - 2.0 * mask[cands].to(contrib.device, contrib.dtype)  # kept: dropped (-1); outside: added
        return evaluator.toggled_from_contributions(self._base[1][p], contrib[p[:, None], idx[None, :]], sign)

    def _contributions(self, evaluator: Any, build: bool) -> torch.Tensor | None:
        """The units' contributions to the next Linear on D'_c: built once (when ``build`` and affordable), then reused."""
        if self._contrib is False and build:
            spec = evaluator.linear
            size = len(self.rows) * self.num_units * getattr(spec, "out_features", 0) * 4
            self._contrib = evaluator.unit_contributions(self.rows) if 0 < size <= CONTRIBUTION_BYTES else None
        return None if self._contrib is False else self._contrib

    def _first_order_toggles(self, mask: torch.Tensor, candidates: list[int],
                             positions: torch.Tensor) -> dict[int, tuple[float, float] | None]:
        """Each toggle's first-order change of the probe's mean log-sigmoid margin (the rate is left at 0).

        Only an order: exchange verifies its few best candidates exactly. On a ResNet-18 layer3 (256 units, the
        next block's convolutions and a residual branch, so no batched path) one exchange round scored 242
        outside units with 242 passes of layer4 before; one backward pass now.
        """
        rows = self.rows[positions]
        original = _original_decisions(self.cache, rows, self.target_class)
        grad = margin_gradient(self.cache, rows, mask, self.position, self.target_class, original).cpu()
        sign = torch.where(mask, -1.0, 1.0)  # a kept unit's gate goes 1 -> 0, an outside unit's 0 -> 1
        return {j: (0.0, float(grad[j] * sign[j])) for j in candidates}

    def _toggle_rate(self, mask: torch.Tensor, j: int, target: float | None,
                     rows: torch.Tensor | None = None) -> tuple[float, float] | None:
        """One toggled mask judged on its own (a layer the incremental path does not cover, or the paper reading).

        ``rows`` (cache rows of D'_c): judged on those only, as a probe, with no target.
        """
        trial = mask.clone()
        trial[j] = not bool(mask[j])
        if rows is not None:
            scores = self.scores(trial, rows)
            original = _original_decisions(self.cache, rows, self.target_class)
        elif target is None:
            self.evaluations += 1  # with a target, reaches() counts it
        elif not self.reaches(trial, target)[0]:
            return None
        if rows is None:
            scores, original = self.scores(trial), self.original
        return self._judged(scores, original, target)

    def _judged(self, scores: torch.Tensor, original: torch.Tensor,
                target: float | None) -> tuple[float, float] | None:
        """(holding rate in this reading, mean log-sigmoid signed margin) of one mask's scores; None below ``target``."""
        rates = _holding_rates(scores, original, self.target_class, None)
        rate = rates.strict if self.reading == "strict" else rates.paper
        return _scored(rate, decision_margin(scores, self.target_class), original, target)

    def _check(self, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.flatten()
        if mask.numel() != self.num_units:
            raise ValueError(f"mask has {mask.numel()} entries, layer {self.layer!r} has {self.num_units} units")
        return mask

    def _compute(self, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        # A hard mask on a single-layer cache takes masked_scores' sparse path.
        gates: list[torch.Tensor | None] = [None] * len(self.cache.specs)
        gates[self.position] = mask.to(self.cache.device).float()
        return masked_scores(self.cache, rows, gates)

    def _kept(self, scores: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """Whether each row keeps its strict decision (rows at ``positions`` of D'_c; all of it if None)."""
        original = self.original if positions is None else self.original[positions.to(self.original.device)]
        return strict_decision(scores, self.target_class) == original

    def _remember(self, key: bytes, positions: torch.Tensor | None, scores: torch.Tensor) -> None:
        old = self._memo.pop(key, None)
        if old is not None:
            self._memo_bytes -= _nbytes(old[1])
        self._memo[key] = (positions, scores.clone())
        self._memo_bytes += _nbytes(scores)
        while self._memo_bytes > MEMO_BYTES and len(self._memo) > 1:
            _, (_, dropped) = self._memo.popitem(last=False)
            self._memo_bytes -= _nbytes(dropped)
        if positions is None:
            # The next masks tried are usually this one with a unit more or less: the inputs
            # it keeps by the smallest margin (or already changed) are the likeliest to change.
            if self.reading == "strict":
                margin = decision_margin(scores, self.target_class)
            else:
                # The paper reading's margin: how far the center margin is from this mask's threshold.
                centre = center_margin(scores, self.target_class)
                margin = math.log(3.0) / paper_holding(centre, self.original)[1] - centre
            signed = torch.where(self.original, margin, -margin)
            self._risk = torch.argsort(signed.cpu(), stable=True)

    def top_k_mask(self, ranking: torch.Tensor, k: int) -> torch.Tensor:
        """Bool mask keeping the ``k`` units with the highest ``ranking`` (ties: lower index first)."""
        order = torch.argsort(ranking.flatten().float().cpu(), descending=True, stable=True)
        mask = torch.zeros(self.num_units, dtype=torch.bool)
        mask[order[:k]] = True
        return mask

    def curve(self, ranking: torch.Tensor, ks: list[int] | None = None) -> list[dict[str, float]]:
        """Holding rate (both readings) keeping the top-k units of ``ranking``, for each k.

        Returns records ``{"units": k, "holding_rate": paper, "holding_rate_strict": strict}``
        for k from all units down to 0 (or ``ks``).
        """
        return removal_curve(self.cache, self.rows, self.layer, ranking.flatten().float().to(self.cache.device),
                             self.target_class, ks)


def _scored(rate: float, margin: torch.Tensor, original: torch.Tensor,
            target: float | None) -> tuple[float, float] | None:
    """(``rate``, mean log-sigmoid of the decision ``margin`` signed by ``original``); None below ``target``."""
    if target is not None and rate < target:
        return None
    signed = torch.where(original, margin, -margin)
    return rate, float(F.logsigmoid(signed.double()).mean())


def _key(mask: torch.Tensor) -> bytes:
    return mask.detach().flatten().bool().cpu().numpy().tobytes()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
