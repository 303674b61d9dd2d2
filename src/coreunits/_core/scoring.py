"""Scores of the model with fixed gates on cached rows: the computation every evaluator shares.

Below both :mod:`~coreunits._core.evaluation` (holding rates) and
:mod:`~coreunits._core.incremental` (the sparse path, which checks itself
against this direct computation before it is trusted), so neither has to
import the other.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from coreunits._core.cache import ActivationCache
from coreunits._core.guard import preserved_model_state

__all__ = ["dense_masked_scores"]


def dense_masked_scores(
    cache: ActivationCache,
    rows: torch.Tensor,
    gates: Sequence[torch.Tensor | None],
    batch_size: int = 1024,
) -> torch.Tensor:
    """Scores of the model with fixed ``gates`` on cached ``rows``: the whole network after the gated layers.

    One gate tensor (or ``None`` = all on) per cached layer, multiplied in.
    """
    out = []
    with preserved_model_state(cache.model), cache.gated.activated(), torch.inference_mode():
        for chunk in rows.split(batch_size):
            out.append(cache.gated.suffix(cache.frontier_rows(chunk), gates))
    return torch.cat(out) if out else torch.zeros(0, cache.num_classes, device=cache.device)
