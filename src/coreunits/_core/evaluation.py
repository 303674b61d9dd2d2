"""Holding rate: how often a hard mask leaves the model's decision for c unchanged.

Two readings, always named:

* ``strict``: the masked model's argmax is c exactly when the unmasked
  model's argmax is c.
* ``paper``: the masked model's center-based binary classifier (``y_hat >= 0.5``,
  with ``w_b`` given or refitted on the hard mask) says "c" exactly when the
  unmasked model predicts c. It admits positives where c is close to, but not
  at, the top (and can reject negatives where c is close to the top), so it
  can read above or below the strict one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from coreunits._core.cache import ActivationCache
from coreunits._core.dprime import build_dprime, check_class
from coreunits._core.engine import OutputFn, apply_gate
from coreunits._core.errors import DataError, LayerNotFoundError, OptionError
from coreunits._core.incremental import build_incremental
from coreunits._core.layers import INPUT, Heads, LayerArg, LayerSpec, Neurons, resolve_layers
from coreunits._core.objective import center_margin, center_score, refit_w_b, strict_decision
from coreunits._core.scoring import dense_masked_scores

__all__ = [
    "HoldingRates",
    "dense_masked_scores",
    "evaluate_gates",
    "gates_from_masks",
    "holding_rate",
    "mask_units",
    "masked_scores",
    "paper_holding",
    "removal_curve",
]

MaskArg = Mapping[LayerArg, Any]


@dataclass
class HoldingRates:
    """Both readings of the holding rate of one hard mask on some rows."""

    strict: float
    paper: float
    w_b: float
    num_inputs: int


def masked_scores(
    cache: ActivationCache,
    rows: torch.Tensor,
    gates: Sequence[torch.Tensor | None],
    batch_size: int = 1024,
) -> torch.Tensor:
    """Scores of the model with fixed gates on the given cached rows.

    A hard (0/1) mask on the single layer of a cache whose next layer is a
    ``Linear`` or ``Conv2d`` is evaluated on the kept units alone (see
    ``_core.incremental``): exact, and about k/K of that layer's cost.
    """
    sparse = _hard_mask_evaluator(cache, gates)
    if sparse is not None:
        evaluator, mask = sparse
        return evaluator.scores_of_mask(rows, mask, batch_size)
    return dense_masked_scores(cache, rows, gates, batch_size)


def _hard_mask_evaluator(cache: ActivationCache, gates: Sequence[torch.Tensor | None]) -> Any:
    """(incremental evaluator, bool mask) when ``gates`` is one hard mask it can evaluate, else None."""
    if len(gates) != 1 or len(cache.specs) != 1:
        return None
    gate = gates[0]
    if gate is None or gate.requires_grad or not bool(((gate == 0) | (gate == 1)).all()):
        return None
    evaluator = build_incremental(cache, cache.specs[0].name)
    return None if evaluator is None else (evaluator, gate.flatten().bool())


def evaluate_gates(
    cache: ActivationCache,
    rows: torch.Tensor,
    gates: Sequence[torch.Tensor | None],
    target_class: int,
    w_b: float | None = None,
    batch_size: int = 1024,
) -> HoldingRates:
    """Holding rate (both readings) of fixed gates on ``rows`` of the cache.

    Args:
        cache: decisions and activations of the unmasked model.
        rows: row indices to judge on (e.g. D'_c).
        gates: one gate tensor (or ``None`` = all on) per cached layer.
        target_class: class c.
        w_b: center classifier weight for the paper reading; refitted on these
            rows when ``None``.
    """
    if rows.numel() == 0:
        raise DataError("cannot compute a holding rate on zero inputs")
    scores = masked_scores(cache, rows, gates, batch_size)
    original = _original_decisions(cache, rows, target_class)
    return _holding_rates(scores, original, target_class, w_b)


def _original_decisions(cache: ActivationCache, rows: torch.Tensor, target_class: int) -> torch.Tensor:
    """The unmasked model's binary decision (predicts c) for the given cache rows."""
    return cache.predictions.index_select(0, rows.to(cache.predictions.device)) == target_class


def _holding_rates(scores: torch.Tensor, original: torch.Tensor, target_class: int,
                   w_b: float | None) -> HoldingRates:
    strict = float((strict_decision(scores, target_class) == original).float().mean())
    paper, wb = paper_holding(center_margin(scores, target_class), original, w_b)
    return HoldingRates(strict, paper, wb, int(original.numel()))


def paper_holding(margin: torch.Tensor, original: torch.Tensor, w_b: float | None = None) -> tuple[float, float]:
    """The paper reading's holding rate of one mask's center margins, and the ``w_b`` it used (refitted when None)."""
    wb = refit_w_b(margin, original.float()) if w_b is None else float(w_b)
    return float(((center_score(margin, wb) >= 0.5) == original).float().mean()), wb


def _rates_of(scores: torch.Tensor, original: torch.Tensor, target_class: int) -> dict[str, float]:
    r = _holding_rates(scores, original, target_class, None)
    return {"holding_rate": r.paper, "holding_rate_strict": r.strict}


def _mask_tensor(mask: Any, spec: LayerSpec) -> torch.Tensor:
    m = torch.as_tensor(mask)
    if m.numel() != spec.num_units:
        raise DataError(
            f"the mask for layer {spec.name!r} has {m.numel()} entries but the layer has "
            f"{spec.num_units} units (unit shape {spec.unit_shape})"
        )
    return m.reshape(-1).bool()


def gates_from_masks(specs: Sequence[LayerSpec], masks: MaskArg, model: nn.Module) -> list[torch.Tensor | None]:
    """One float 0/1 gate tensor per spec (``None`` for layers without a mask)."""
    wanted = {s.name: s for s in resolve_layers(model, list(masks.keys()))}
    by_name = {}
    for key, value in masks.items():
        if isinstance(key, (Neurons, Heads)):
            name = key.key
        elif isinstance(key, str):
            name = key
        else:
            name = next(n for n, s in wanted.items() if s.module is key)
        by_name[name] = value
    known = {s.name for s in specs}
    extra = set(by_name) - known
    if extra:
        raise LayerNotFoundError(
            f"masks name layers {sorted(extra)} that the cache was not built for (it has {sorted(known)})"
        )
    gates: list[torch.Tensor | None] = []
    for s in specs:
        if s.name in by_name:
            gates.append(_mask_tensor(by_name[s.name], s).float())
        else:
            gates.append(None)
    return gates


def holding_rate(
    model: nn.Module,
    masks: MaskArg,
    target_class: int,
    data: Any,
    *,
    reading: str = "strict",
    build_dprime_first: bool = False,
    positives_only: bool = False,
    seed: int = 0,
    w_b: float | None = None,
    batch_size: int = 256,
    output_fn: OutputFn | None = None,
    device: str | torch.device | None = None,
    unit_dim: int | Sequence[int] | None = None,
    ablation: str | None = None,
) -> float:
    """Share of inputs whose binary decision for ``target_class`` a hard mask leaves unchanged.

    Args:
        model: the classifier (left unchanged).
        masks: ``{layer: bool tensor}``, True = unit kept; layers as in
            :func:`find_core_units`. Layers not named stay fully on.
        target_class: class c.
        data: Dataset, DataLoader, tensor of inputs, or an :class:`ActivationCache`.
        reading: ``"strict"`` (argmax) or ``"paper"`` (center-based classifier).
        build_dprime_first: judge on D'_c (all positives + as many random
            negatives, seeded) instead of on all of ``data``.
        positives_only: with ``build_dprime_first``, D'_c without negatives.
        seed: seed for drawing D'_c's negatives.
        w_b: the center classifier's weight for the paper reading (refitted on
            the hard mask when ``None``).
        batch_size: evaluation batch size.
        output_fn: maps the model's output to ``(N, H)`` scores.
        device: where to compute (defaults to the model's device).
        unit_dim: output dim(s) one mask entry covers, as given to :func:`find_core_units`
            (e.g. ``2`` for the features of a ViT block's ``(N, tokens, dim)`` output);
            ignored when ``data`` is an :class:`ActivationCache` (built with its own).
        ablation: what a masked unit becomes: ``"zero"``, ``"mean"`` (over ``data``) or
            ``"resample"`` (from another input of ``data``); None: the cache's, zero otherwise.

    Returns:
        The holding rate in [0, 1].
    """
    if reading not in ("strict", "paper"):
        raise OptionError(f"reading must be 'strict' or 'paper', got {reading!r}")
    if isinstance(data, ActivationCache):
        cache = data
        cache.check_model(model)
        cache.require_ablation(ablation)
    else:
        cache = ActivationCache(
            model, list(masks.keys()), data, batch_size=batch_size, output_fn=output_fn, device=device,
            unit_dim=unit_dim, ablation=ablation or "zero",
        )
    target_class = check_class(target_class, cache.num_classes)
    gates = [g.to(cache.device) if g is not None else None for g in gates_from_masks(cache.specs, masks, cache.model)]
    if build_dprime_first:
        gen = torch.Generator().manual_seed(seed)
        rows = build_dprime(cache.predictions, target_class, generator=gen, positives_only=positives_only).index
    else:
        rows = torch.arange(len(cache))
    rates = evaluate_gates(cache, rows, gates, target_class, w_b=w_b, batch_size=batch_size)
    return rates.strict if reading == "strict" else rates.paper


@contextmanager
def mask_units(model: nn.Module, masks: MaskArg, unit_dim: int | Sequence[int] | None = None) -> Iterator[nn.Module]:
    """Apply hard masks to ``model`` while inside the block.

    Units whose mask is False output zeros (a whole feature map for a conv
    channel). For ``"input"``, a forward pre-hook masks the model's first
    positional input. Hooks are removed on exit, also after an exception.

    Args:
        model: the model to mask.
        masks: ``{layer: bool tensor}`` (True = kept), keyed by name, module or ``"input"``.
        unit_dim: output dim(s) one mask entry covers, as given to :func:`find_core_units`
            (default: channels of 4-D outputs, features of 2-D ones).

    Yields:
        The same model, masked.
    """
    specs = resolve_layers(model, list(masks.keys()), unit_dim)
    values = list(masks.values())
    handles = []

    def make_hook(spec: LayerSpec, mask: Any, on_input: bool):  # type: ignore[no-untyped-def]
        m = torch.as_tensor(mask).bool()

        def gate_of(x: torch.Tensor) -> torch.Tensor:
            if not spec.output_ndim:  # not bound to an output yet (unit_dims may be given)
                spec.bind(x.shape)
            return _mask_tensor(m, spec).to(device=x.device, dtype=x.dtype)

        if on_input:
            def pre_hook(_mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
                x = args[0]
                return (apply_gate(x, gate_of(x), spec), *args[1:])

            return pre_hook

        def hook(out: torch.Tensor) -> torch.Tensor:
            return apply_gate(out, gate_of(out), spec)

        return hook

    try:
        for spec, value in zip(specs, values):
            if spec.name == INPUT:
                handles.append(model.register_forward_pre_hook(make_hook(spec, value, True)))
            else:
                handles.append(spec.register_output_hook(make_hook(spec, value, False)))
        yield model
    finally:
        for h in handles:
            h.remove()



def removal_curve(
    cache: ActivationCache,
    rows: torch.Tensor,
    layer: str,
    gate_values: torch.Tensor,
    target_class: int,
    ks: Sequence[int] | None = None,
    batch_size: int = 1024,
    incremental: bool = True,
) -> list[dict[str, float]]:
    """Holding rate versus units kept, masking units from the smallest gate value up.

    The paper's Fig. 6: keep the ``k`` units with the largest gate values, for
    each ``k`` in ``ks`` (default: every k from all units down to 0).

    Args:
        cache: decisions and activations (built for ``layer``, possibly with others).
        rows: cache rows to judge on (D'_c).
        layer: the layer whose units are masked; other cached layers stay on.
        gate_values: the gates of that layer (any shape; flattened).
        target_class: class c.
        ks: numbers of kept units to evaluate.
        incremental: drop units incrementally through the next linear layer when
            the structure allows (exact up to float rounding; see ``_core.incremental``).

    Returns:
        One record per k: ``{"units": k, "holding_rate": paper, "holding_rate_strict": strict}``.
    """
    names = [s.name for s in cache.specs]
    if layer not in names:
        raise LayerNotFoundError(f"layer {layer!r} is not in the cache (it has {names})")
    pos = names.index(layer)
    order = torch.argsort(gate_values.flatten(), descending=True, stable=True)
    total = order.numel()
    ks = list(range(total, -1, -1)) if ks is None else list(ks)
    out = []
    original = _original_decisions(cache, rows, target_class)
    if incremental and len(names) == 1:
        inc = build_incremental(cache, layer)
        if inc is not None:
            for k, scores in sorted(inc.scores(rows, order, ks, batch_size).items(), reverse=True):
                out.append(_rates_of(scores, original, target_class) | {"units": k})
            return sorted(out, key=lambda r: ks.index(int(r["units"])))
    for k in ks:
        mask = torch.zeros(total, device=cache.device)
        mask[order[:k].to(cache.device)] = 1.0
        gates: list[torch.Tensor | None] = [None] * len(names)
        gates[pos] = mask
        scores = dense_masked_scores(cache, rows, gates, batch_size)
        out.append({"units": k} | _rates_of(scores, original, target_class))
    return out
