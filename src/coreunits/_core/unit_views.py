"""What a core unit responds to: its top-activating inputs, its activation maps, and its necessity.

One pass over the data (:func:`collect_activations`) records the model's decisions and, per unit of each
requested layer, its peak response to every input (the maximum over the unit's positions: a conv channel's
strongest spot); the top-k inputs of D'_c (and of class c) are read from that. Their activation maps come
from a second, small pass over just those inputs (:func:`layer_outputs`). Necessity is the holding-rate drop
when one unit alone is removed from the core set, judged by the existing evaluator
(:func:`~coreunits._core.evaluation.evaluate_gates`) on an activation cache of the rows it needs.
The user's model is run under :func:`~coreunits._core.guard.preserved_model_state` and left as it was.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from coreunits._core.cache import ActivationCache, iter_input_batches
from coreunits._core.dprime import build_dprime, random_rows
from coreunits._core.engine import OutputFn, check_scores
from coreunits._core.errors import DataError
from coreunits._core.evaluation import evaluate_gates
from coreunits._core.guard import preserved_model_state
from coreunits._core.io import model_device
from coreunits._core.layers import INPUT, LayerSpec, resolve_layers

__all__ = [
    "Activations",
    "Necessity",
    "collect_activations",
    "dprime_rows",
    "gather_inputs",
    "layer_outputs",
    "necessity",
    "top_rows",
]


@dataclass
class Activations:
    """The model's decisions and every unit's peak response over some data.

    Attributes:
        predictions: ``(N,)`` the unmasked model's class decisions.
        peaks: layer -> ``(N, U)``: unit u's largest value over its positions for input n.
        unit_shapes: layer -> the layer's unit layout.
        class_means: ``(classes, *input shape)`` mean input per predicted class, when asked for.
    """

    predictions: torch.Tensor
    peaks: dict[str, torch.Tensor]
    unit_shapes: dict[str, tuple[int, ...]]
    class_means: torch.Tensor | None = None


def _per_unit(t: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """``(N, U, positions)``: the output with the unit dims first and everything else flattened."""
    if not spec.output_ndim:
        spec.bind(t.shape)
    assert spec.unit_dims is not None
    rest = [d for d in range(1, t.dim()) if d not in spec.unit_dims]
    moved = t.permute(0, *spec.unit_dims, *rest)
    return moved.reshape(t.shape[0], spec.num_units, -1)


def _recorder(store: dict[str, torch.Tensor]) -> Callable[[str], Callable[[torch.Tensor], None]]:
    def make(name: str) -> Callable[[torch.Tensor], None]:
        def hook(out: torch.Tensor) -> None:
            store[name] = out.detach()

        return hook

    return make


def _run(model: nn.Module, specs: Sequence[LayerSpec], x: torch.Tensor,
         output_fn: OutputFn | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scores and the named layers' outputs for one batch (hooks removed after)."""
    store: dict[str, torch.Tensor] = {}
    make = _recorder(store)
    handles = [s.register_output_hook(make(s.name)) for s in specs if s.module is not None]
    try:
        with torch.no_grad():
            out = model(x.clone())
    finally:
        for h in handles:
            h.remove()
    for s in specs:
        if s.name == INPUT:
            store[INPUT] = x
    return check_scores(out, x.shape[0], output_fn), store


def collect_activations(model: nn.Module, layers: Sequence[str], data: Any, *, batch_size: int = 500,
                        output_fn: OutputFn | None = None, class_means: bool = False) -> Activations:
    """One pass over ``data``: decisions, per-unit peak responses of ``layers``, optionally class-mean inputs."""
    specs = resolve_layers(model, list(layers))
    device = model_device(model)
    preds: list[torch.Tensor] = []
    peaks: dict[str, list[torch.Tensor]] = {s.name: [] for s in specs}
    sums: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    with preserved_model_state(model):
        for x in iter_input_batches(data, batch_size):
            scores, outs = _run(model, specs, x.to(device), output_fn)
            pred = scores.argmax(1).cpu()
            preds.append(pred)
            for s in specs:
                peaks[s.name].append(_per_unit(outs[s.name].float(), s).amax(-1).cpu())
            if class_means:
                xs = x.detach().float().cpu().reshape(x.shape[0], -1)
                if sums is None:
                    sums = torch.zeros(scores.shape[1], xs.shape[1])
                    counts = torch.zeros(scores.shape[1])
                assert counts is not None
                sums.index_add_(0, pred, xs)
                counts += torch.bincount(pred, minlength=scores.shape[1]).float()
    if not preds:
        raise DataError("data is empty: it yielded no inputs")
    means = None
    if sums is not None and counts is not None:
        means = (sums / counts.clamp(min=1)[:, None]).reshape(sums.shape[0], *x.shape[1:])
    return Activations(torch.cat(preds), {k: torch.cat(v) for k, v in peaks.items()},
                       {s.name: s.unit_shape for s in specs}, means)


def dprime_rows(predictions: torch.Tensor, target_class: int, seed: int, positives_only: bool = False) -> torch.Tensor:
    """The rows of D'_c as a selection with this seed drew them (same generator, same call)."""
    gen = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():  # a shortage of negatives was reported when the selection was made
        warnings.simplefilter("ignore", UserWarning)
        return build_dprime(predictions, target_class, generator=gen, positives_only=positives_only).index


def top_rows(values: torch.Tensor, rows: torch.Tensor, k: int) -> list[int]:
    """The ``k`` rows (of ``rows``) with the largest ``values``, largest first."""
    if rows.numel() == 0:
        return []
    picked = torch.topk(values.index_select(0, rows), min(k, rows.numel())).indices
    return [int(r) for r in rows.index_select(0, picked)]


def gather_inputs(data: Any, rows: Sequence[int]) -> torch.Tensor:
    """The inputs at ``rows`` of an indexable data set (a tensor, a TensorDataset, any map-style Dataset)."""
    index = torch.as_tensor(list(rows), dtype=torch.long)
    if isinstance(data, torch.Tensor):
        return data.index_select(0, index)
    tensors = getattr(data, "tensors", None)
    if isinstance(tensors, tuple) and tensors and isinstance(tensors[0], torch.Tensor):
        return tensors[0].index_select(0, index)
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        items = [data[int(i)] for i in index]
        return torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items])
    raise DataError(f"the per-unit views need data that can be read by index (a Dataset or a tensor), "
                    f"got {type(data).__name__}")


def layer_outputs(model: nn.Module, layer: str, inputs: torch.Tensor, batch_size: int = 500,
                  output_fn: OutputFn | None = None) -> torch.Tensor:
    """``(n, U, *positions)``: the layer's output per unit for a few inputs (unit dims first)."""
    spec = resolve_layers(model, [layer])[0]
    device = model_device(model)
    parts = []
    with preserved_model_state(model):
        for x in inputs.split(batch_size):
            _, outs = _run(model, [spec], x.to(device), output_fn)
            t = outs[spec.name].float()
            flat = _per_unit(t, spec).cpu()
            rest = [t.shape[d] for d in range(1, t.dim()) if d not in (spec.unit_dims or ())]
            if spec.groups:  # a head's features join its positions
                rest = [spec.group_size, *rest]
            parts.append(flat.reshape(flat.shape[0], flat.shape[1], *rest))
    return torch.cat(parts)


@dataclass
class Necessity:
    """Holding rates of one core set and of the set without each of its units, on (a probe of) D'_c.

    Attributes:
        strict: strict holding rate of the whole core set.
        paper: the paper's reading of it.
        drop_strict: unit -> strict rate of the whole set minus the rate without that unit.
        drop_paper: the same in the paper's reading.
        rows: how many inputs of D'_c judged it.
        dprime_size: the size of D'_c.
    """

    strict: float
    paper: float
    drop_strict: dict[int, float]
    drop_paper: dict[int, float]
    rows: int
    dprime_size: int


def _probe(predictions: torch.Tensor, c: int, seed: int, positives_only: bool,
           probe_rows: int | None) -> tuple[torch.Tensor, int]:
    rows = dprime_rows(predictions, c, seed, positives_only)
    probe = random_rows(rows, probe_rows, seed)
    return (rows if probe is None else probe), int(rows.numel())


def necessity(model: nn.Module, layer: str, data: Any, predictions: torch.Tensor,
              sets: Sequence[tuple[int, int, bool, Sequence[int]]], *, probe_rows: int | None = 1024,
              output_fn: OutputFn | None = None) -> list[Necessity]:
    """Leave-one-out holding rates of core sets of one layer, one activation cache for all of them.

    Args:
        sets: per core set ``(class, seed, positives_only, units)``; D'_c is drawn as the selection drew it.
        probe_rows: judge on this many inputs of each D'_c (a seeded subset; None = all of D'_c).
    """
    probes = [_probe(predictions, c, seed, pos, probe_rows) for c, seed, pos, _ in sets]
    union = torch.unique(torch.cat([p for p, _ in probes])) if probes else torch.zeros(0, dtype=torch.long)
    if union.numel() == 0:
        return []
    cache = ActivationCache(model, layer, gather_inputs(data, union.tolist()), batch_size=500, output_fn=output_fn)
    total = cache.specs[0].num_units
    out = []
    for (c, _, _, units), (rows, size) in zip(sets, probes):
        local = torch.searchsorted(union, rows)
        mask = torch.zeros(total, device=cache.device)
        mask[list(units)] = 1.0
        base = evaluate_gates(cache, local, [mask], c)
        drop_s, drop_p = {}, {}
        for u in units:
            without = mask.clone()
            without[u] = 0.0
            r = evaluate_gates(cache, local, [without], c)
            drop_s[int(u)], drop_p[int(u)] = base.strict - r.strict, base.paper - r.paper
        out.append(Necessity(base.strict, base.paper, drop_s, drop_p, int(rows.numel()), size))
    return out
