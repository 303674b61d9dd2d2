"""One unit-selection question, and fast holding rates of hard masks for it.

A :class:`SelectionProblem` is (model, layer, class c, D'_c) plus the reading
of the holding rate the answer is judged by. Every way of choosing units
(switch gates, rankings, greedy search, Shapley values) answers the same
problem and is judged by the same :meth:`SelectionProblem.holding`, so the
comparison between them is fair by construction.
"""

from __future__ import annotations

import torch

from coreunits._core.cache import ActivationCache
from coreunits._core.dprime import DPrime, build_dprime, check_class
from coreunits._core.errors import LayerNotFoundError
from coreunits._core.evaluation import (
    HoldingRates,
    _holding_rates,
    _original_decisions,
    masked_scores,
    removal_curve,
)

__all__ = ["READINGS", "SelectionProblem"]

#: The two readings of the holding rate (see ``_core.evaluation``).
READINGS = ("strict", "paper")


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
            raise ValueError(f"reading must be one of {READINGS}, got {reading!r}")
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

    @property
    def num_units(self) -> int:
        """Number of units of the layer."""
        return self.spec.num_units

    def scores(self, mask: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The masked model's scores on ``rows`` (default D'_c); ``mask`` True = unit kept."""
        rows = self.rows if rows is None else rows
        mask = mask.flatten().to(self.cache.device)
        if mask.numel() != self.num_units:
            raise ValueError(f"mask has {mask.numel()} entries, layer {self.layer!r} has {self.num_units} units")
        # A hard mask on a single-layer cache takes masked_scores' sparse path.
        gates: list[torch.Tensor | None] = [None] * len(self.cache.specs)
        gates[self.position] = mask.float()
        return masked_scores(self.cache, rows, gates)

    def rates(self, mask: torch.Tensor, rows: torch.Tensor | None = None) -> HoldingRates:
        """Both readings of the holding rate of ``mask`` on ``rows`` (default D'_c)."""
        if rows is None:
            self.evaluations += 1
        rows_ = self.rows if rows is None else rows
        original = self.original if rows is None else _original_decisions(self.cache, rows_, self.target_class)
        return _holding_rates(self.scores(mask, rows_), original, self.target_class, None)

    def holding(self, mask: torch.Tensor, rows: torch.Tensor | None = None) -> float:
        """The holding rate of ``mask`` in this problem's reading."""
        r = self.rates(mask, rows)
        return r.strict if self.reading == "strict" else r.paper

    def reaches(self, mask: torch.Tensor, target: float, chunk: int = 1024) -> tuple[bool, float]:
        """Whether ``mask``'s holding rate on D'_c reaches ``target``, stopping as soon as it cannot.

        In the strict reading each input's decision is final on its own, so D'_c
        is judged chunk by chunk and the pass stops once more inputs have changed
        decision than the target allows: a mask that misses the target is usually
        rejected after a fraction of D'_c. (The paper reading refits ``w_b`` on
        all inputs, so it is judged whole.) Returns (reached, holding rate); the
        rate is exact when reached, else an upper bound of the true (missing) rate.
        """
        if self.reading != "strict":
            rate = self.holding(mask)
            return rate >= target, rate
        self.evaluations += 1
        n = len(self.rows)
        allowed = int((1.0 - target) * n + 1e-9)
        changed = 0
        for start in range(0, n, chunk):
            rows = self.rows[start : start + chunk]
            decision = self.scores(mask, rows).argmax(dim=1) == self.target_class
            changed += int((decision != self.original[start : start + chunk]).sum())
            if changed > allowed:
                return False, 1.0 - changed / n
        return True, 1.0 - changed / n

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
