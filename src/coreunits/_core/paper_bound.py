"""How few decisions the paper reading can change, judged on part of D'_c: what lets it give a mask up early.

The strict reading judges each input on its own, so a mask is given up as soon
as more inputs changed decision than the target allows. The paper reading
refits ``w_b`` on all of D'_c, which seemed to forbid that. But the refit picks
``w_b`` from a fixed grid (:func:`~coreunits._core.objective.w_b_grid`), and for
a given ``w_b`` each input's decision is again its own: c exactly where the
center margin ``m <= ln 3 / w_b`` (``y_hat = 2 sigmoid(-w_b m) >= 0.5``). So
whatever ``w_b`` the refit will pick, the inputs judged so far change at least
the fewest decisions any grid ``w_b`` changes on them, and a mask whose fewest
exceeds the target's allowance misses it. The bound is counted with a slack on
each threshold, so float rounding at the boundary can only make it lower.

Measured (``benchmarks/paper_bound.py``, CIFAR-10 max2 at 97%): it fires late, since a
mask that misses does so by a little, and saves little: target mode 1.03-1.12x, exact
greedy 0.98-1.04x, the same units either way.
"""

from __future__ import annotations

import math

import torch

from coreunits._core.objective import w_b_grid

__all__ = ["PaperMissBound"]

#: Relative slack on each threshold ``ln 3 / w_b``: an input within it counts as kept either way.
_SLACK = 1e-4


class PaperMissBound:
    """Per mask (row ``i``), the decisions changed so far under every ``w_b`` of the refit's grid.

    ``least()`` is a lower bound of the changed decisions the paper reading
    will count on all of D'_c, whatever ``w_b`` the refit then chooses.
    """

    def __init__(self, masks: int, device: torch.device | str | None = None) -> None:
        thresholds = math.log(3.0) / w_b_grid(device)
        self._kept_below = thresholds * (1.0 - _SLACK)  # m at or below: surely decided "c"
        self._kept_above = thresholds * (1.0 + _SLACK)  # m above: surely decided "not c"
        self.misses = torch.zeros(masks, thresholds.numel(), dtype=torch.long, device=device)

    def add(self, margin: torch.Tensor, original: torch.Tensor, which: torch.Tensor | None = None) -> None:
        """Count inputs judged: ``margin`` (masks, inputs) center margins, ``original`` (inputs,) the unmasked
        decision (predicts c); ``which`` the masks' rows (default all, in order)."""
        rows = which if which is not None else torch.arange(self.misses.shape[0], device=self.misses.device)
        count = torch.zeros(margin.shape[0], self.misses.shape[1], dtype=torch.long, device=self.misses.device)
        original = original.to(margin.device).bool()
        for inputs, thresholds, changed_above in ((margin[:, original], self._kept_above, True),
                                                   (margin[:, ~original], self._kept_below, False)):
            if inputs.shape[1] == 0:
                continue
            ordered = inputs.float().sort(dim=1).values.contiguous()
            at_or_below = torch.searchsorted(ordered, thresholds.expand(len(ordered), -1).contiguous(), right=True)
            # Inputs of c change decision above the threshold; the others at or below it.
            count += (inputs.shape[1] - at_or_below) if changed_above else at_or_below
        self.misses.index_add_(0, rows.to(self.misses.device), count)

    def least(self, which: torch.Tensor | None = None) -> torch.Tensor:
        """The fewest changed decisions over the grid, per mask (``which``: those rows only)."""
        misses = self.misses if which is None else self.misses[which.to(self.misses.device)]
        return misses.min(dim=1).values
