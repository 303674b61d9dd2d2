"""Scores of the model with fixed gates on cached rows: the computation every evaluator shares.

Below both :mod:`~coreunits._core.evaluation` (holding rates) and
:mod:`~coreunits._core.incremental` (the sparse path, which checks itself
against this direct computation before it is trusted), so neither has to
import the other.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from coreunits._core.cache import ActivationCache
from coreunits._core.guard import preserved_model_state
from coreunits._core.objective import decision_margin

__all__ = ["dense_masked_scores", "margin_gradient"]


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
            out.append(cache.suffix_scores(chunk, gates))
    return torch.cat(out) if out else torch.zeros(0, cache.num_classes, device=cache.device)


def margin_gradient(
    cache: ActivationCache,
    rows: torch.Tensor,
    mask: torch.Tensor,
    position: int,
    target_class: int,
    original: torch.Tensor,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Gradient of the mean log-sigmoid signed decision margin over ``rows`` w.r.t. one layer's gates at ``mask``.

    The signed margin is positive where a row keeps its decision (``original``: the unmasked model predicts c).
    One forward and one backward pass of the network after the layer: a first-order estimate of every unit's
    toggle at once, for ordering candidates where judging each exactly costs a pass of its own.
    """
    gate = mask.detach().float().to(cache.device).requires_grad_(True)
    gates: list[torch.Tensor | None] = [None] * len(cache.specs)
    gates[position] = gate
    total = gate.new_zeros(())
    with preserved_model_state(cache.model), cache.gated.activated(), torch.enable_grad():
        for chunk, orig in zip(rows.split(batch_size), original.split(batch_size), strict=True):
            m = decision_margin(cache.suffix_scores(chunk, gates), target_class)
            total = total + F.logsigmoid(torch.where(orig.to(m.device), m, -m)).sum()
        (grad,) = torch.autograd.grad(total, gate)
    return grad / max(len(rows), 1)
