"""Class specialists: a copy of a classifier physically cut down to one class's core units.

A mask keeps the full cost of the model: masked channels are still computed,
then multiplied by zero. A specialist removes them. On a ``torch.fx`` graph of a
copy of the model, each gated layer's kept units are followed

* **upstream** through per-unit operations (activations, pooling, dropout,
  BatchNorm, which is sliced) to the ``Conv2d``/``Linear`` that produces them,
  whose other output channels are dropped; and
* **downstream** through operations that map a zero unit to zero (activations
  with f(0) = 0, pooling, dropout, flatten, local response norm, which is
  rebuilt over the kept channels' original positions) to the ``Conv2d``/``Linear``
  that consumes them, whose other input channels / features are dropped.

Where a walk meets something it cannot follow (a residual addition, a tensor
with several consumers, a reshape, a grouped convolution, another gated
layer), it stops there and stays exact: upstream, the full tensor is computed
and the kept units are gathered from it; downstream, the kept units are put
back into a zero tensor of the full width. Each such stop is recorded as a
one-line reason. A layer whose units are not channels or features (input
positions, a module called more than once) is masked in the graph instead,
and a model that ``torch.fx`` cannot trace, or one where no module could be
cut, becomes a masked copy at full size (hooks), said in
:attr:`Specialist.fallback`. The result is always checked against the
masked model on example inputs; if their scores disagree, the masked copy is
used and the disagreement is stated.

The specialist answers one question, the strict reading of the holding rate:
``argmax(scores) == c``.
"""

from __future__ import annotations

import copy
import io
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from coreunits._core import mha
from coreunits._core.cache import iter_input_batches
from coreunits._core.dprime import build_dprime, check_class
from coreunits._core.engine import apply_gate, gate_tensor
from coreunits._core.errors import ModelOutputError, OptionError
from coreunits._core.guard import preserved_model_state
from coreunits._core.io import atomic_write_bytes, model_device
from coreunits._core.layers import INPUT, LayerSpec, resolve_layers
from coreunits._core.result import CoreUnits

__all__ = [
    "ClassDetector",
    "KeptChannelLRN",
    "LayerCut",
    "Specialist",
    "build_specialist",
    "count_flops",
    "detector_holding_rate",
    "export_specialist",
    "save_specialist",
]

log = logging.getLogger(__name__)

# Elementwise: a unit's output depends on that unit alone, at any unit dim. The first group maps 0 to 0.
_ELEMENTWISE_ZERO = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Hardswish, nn.Hardtanh, nn.Mish,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity,
)
_ELEMENTWISE_OTHER = (nn.Sigmoid, nn.Softplus)
# Pooling acts on each channel alone (unit dim 1) and pools zeros to zero.
_POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)
_ZERO_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.tanh, torch.nn.functional.gelu}


class KeptChannelLRN(nn.Module):
    """``nn.LocalResponseNorm`` over a subset of the channels, the rest being zero.

    Each kept channel is normalised by the squares of its neighbours within the
    window of the *original* channel positions, so it equals the full LRN of a
    tensor whose other channels are zero (which add nothing to the sums).
    """

    def __init__(self, lrn: nn.LocalResponseNorm, kept: torch.Tensor) -> None:
        super().__init__()
        self.size, self.alpha, self.beta, self.k = lrn.size, lrn.alpha, lrn.beta, lrn.k
        pos = kept.long()
        offset = pos[None, :] - pos[:, None]  # [i, j]: how far kept channel j is from kept channel i
        # torch's window for channel c: c - size // 2 ... c + (size - 1) // 2.
        band = (offset >= -(self.size // 2)) & (offset <= (self.size - 1) // 2)
        self.register_buffer("band", band.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (N, K, ...) with K kept channels."""
        sums = torch.einsum("ij,nj...->ni...", self.band, x * x)
        return x / (self.k + self.alpha / self.size * sums).pow(self.beta)


class ClassDetector(nn.Module):
    """``argmax(body(x)) == target_class``: the class-c decision of a (cut-down) classifier, as a bool per input."""

    def __init__(self, body: nn.Module, target_class: int) -> None:
        super().__init__()
        self.body = body
        self.target_class = int(target_class)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Bool ``(N,)``: True where the model's decision is class c."""
        return self.body(x).argmax(dim=1) == self.target_class


@dataclass
class LayerCut:
    """What was done to one gated layer.

    Attributes:
        layer: the gated layer's name.
        kept: kept unit indices.
        total: number of units.
        producer: the module whose output units were cut, or None.
        consumers: modules whose input units were cut.
        masked: True when the layer is only masked (its units are not channels/features, or it runs twice).
        stops: why a walk stopped short of a Conv2d/Linear (one line each).
    """

    layer: str
    kept: list[int]
    total: int
    producer: str | None = None
    consumers: list[str] = field(default_factory=list)
    masked: bool = False
    stops: list[str] = field(default_factory=list)


@dataclass
class Specialist:
    """A class-c detector built from core units, with what was cut and how it was checked.

    Attributes:
        module: the :class:`ClassDetector` (bool per input).
        target_class: class c.
        cuts: one :class:`LayerCut` per gated layer.
        fallback: None when the model was cut; otherwise why it is the masked model
            at full size (the decisions are the same, the cost is not lower).
        max_score_diff: largest |score| difference between ``module.body`` and the
            masked model on the example inputs.
    """

    module: ClassDetector
    target_class: int
    cuts: list[LayerCut]
    fallback: str | None
    max_score_diff: float

    @property
    def pruned(self) -> bool:
        """True when some module is physically smaller."""
        return self.fallback is None and any(c.producer or c.consumers for c in self.cuts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (no tensors)."""
        return {
            "target_class": self.target_class,
            "decision": "strict: argmax(scores) == target_class",
            "pruned": self.pruned,
            "fallback": self.fallback,
            "max_score_diff": self.max_score_diff,
            "layers": [vars(c) for c in self.cuts],
        }


# ---------------------------------------------------------------------------
# Graph helpers (call_function targets: plain functions, so fx and torch.export keep them)
# ---------------------------------------------------------------------------


def _gather_units(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """The units at ``index`` of ``x`` along ``dim``."""
    return x.index_select(dim, index)


def _scatter_units(x: torch.Tensor, index: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Put ``x``'s units back at ``index`` of a zero tensor ``size`` wide along ``dim``."""
    shape = list(x.shape)
    shape[dim] = size
    return x.new_zeros(shape).index_copy(dim, index, x)


class _Tracer(fx.Tracer):
    """torch.nn's modules and the gated layers stay single nodes; everything else is traced through."""

    def __init__(self, gated: set[str]) -> None:
        super().__init__()
        self.gated = gated

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.gated or super().is_leaf_module(m, module_qualified_name)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _shape(node: fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    return tuple(int(s) for s in meta.shape) if meta is not None and hasattr(meta, "shape") else ()


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        owner = node.graph.owning_module
        kind = type(owner.get_submodule(str(node.target))).__name__ if owner is not None else "module"
        return f"{node.target} ({kind})"
    if node.op == "output":
        return "the model's output"
    if node.op == "placeholder":
        return "the model's input"
    return f"{getattr(node.target, '__name__', node.target)}"


class _Cutter:
    """Plans the cuts of every gated layer on one traced copy, then applies them."""

    def __init__(self, gm: fx.GraphModule, gated: set[str]) -> None:
        self.gm = gm
        self.gated_nodes = {n for n in gm.graph.nodes if n.op == "call_module" and n.target in gated}
        self.out_keep: dict[str, torch.Tensor] = {}
        self.in_keep: dict[str, torch.Tensor] = {}
        self.batchnorms: dict[str, torch.Tensor] = {}
        self.lrns: dict[str, torch.Tensor] = {}
        self._constants = 0

    # -- small graph edits --------------------------------------------------
    def _insert_after(self, node: fx.Node, fn: Any, tensor: torch.Tensor, extra: Sequence[Any],
                      users: Sequence[fx.Node]) -> fx.Node:
        """``fn(node, <tensor>, *extra)`` right after ``node``, feeding ``users`` instead of ``node``."""
        name = f"_coreunits_units_{self._constants}"
        self._constants += 1
        self.gm.register_buffer(name, tensor)
        with self.gm.graph.inserting_after(node):
            attr = self.gm.graph.get_attr(name)
        with self.gm.graph.inserting_after(attr):
            new = self.gm.graph.call_function(fn, (node, attr, *extra))
        for u in users:
            u.replace_input_with(node, new)
        return new

    def _module(self, node: fx.Node) -> nn.Module | None:
        return self.gm.get_submodule(str(node.target)) if node.op == "call_module" else None

    def _single_input(self, node: fx.Node, src: fx.Node) -> bool:
        return bool(node.args) and node.args[0] is src and node.all_input_nodes == [src]

    def _elementwise(self, node: fx.Node, m: nn.Module | None, dim: int, zero: bool) -> bool:
        """Does ``node`` act on each unit alone (and, with ``zero``, keep a zero unit at zero)?"""
        kinds = _ELEMENTWISE_ZERO if zero else _ELEMENTWISE_ZERO + _ELEMENTWISE_OTHER
        if isinstance(m, kinds) or (isinstance(m, _POOLS) and dim == 1):
            return True
        if not zero and isinstance(m, nn.modules.batchnorm._BatchNorm) and dim == 1:
            return True
        return node.op == "call_function" and node.target in _ZERO_FUNCTIONS and len(node.all_input_nodes) == 1

    def _producer(self, node: fx.Node, m: nn.Module | None, dim: int) -> bool:
        if str(node.target) in self.out_keep:
            return False
        if isinstance(m, nn.Conv2d):
            return dim == 1 and m.groups == 1
        return isinstance(m, nn.Linear) and dim == len(_shape(node)) - 1

    def _consumer(self, node: fx.Node, m: nn.Module | None, src: fx.Node, dim: int, ndim: int) -> bool:
        if str(node.target) in self.in_keep or not self._single_input(node, src):
            return False
        if isinstance(m, nn.Conv2d):
            return dim == 1 and m.groups == 1
        return isinstance(m, nn.Linear) and dim == ndim - 1

    # -- one gated layer ------------------------------------------------------
    def cut(self, spec: LayerSpec, kept: torch.Tensor) -> LayerCut:
        """Plan the cut of one layer (graph edits now, module edits in :meth:`apply`)."""
        record = LayerCut(spec.name, kept.tolist(), spec.num_units)
        if spec.attention:  # the node build_specialist gave the heads (see _core.mha)
            nodes = [n for n in self.gm.graph.nodes if n.meta.get(mha.HEADS_META) == spec.module_path]
        else:
            nodes = [n for n in self.gm.graph.nodes if n.op == "call_module" and n.target == spec.module_path]
        dims = spec.unit_dims or ()
        ndim = len(_shape(nodes[0])) if len(nodes) == 1 else 0
        if (spec.name == INPUT or len(nodes) != 1 or len(dims) != 1 or dims[0] not in (1, ndim - 1)
                or spec.groups):
            why = ("the input's positions are not a layer's channels" if spec.name == INPUT else
                   f"{spec.name} runs {len(nodes)} times in the graph" if len(nodes) != 1 else
                   "its units are heads, not single channels" if spec.groups else
                   "its units are neither channels (dim 1) nor features (last dim)")
            record.masked, record.stops = True, [f"masked, not cut: {why}"]
            self._mask(spec, kept, nodes)
            return record
        narrowed = self._upstream(nodes[0], kept, dims[0], record)
        self._downstream(narrowed, kept, dims[0], ndim, record)
        return record

    def _mask(self, spec: LayerSpec, kept: torch.Tensor, nodes: Sequence[fx.Node]) -> None:
        mask = torch.zeros(spec.num_units)
        mask[kept] = 1.0
        if spec.name == INPUT:
            nodes = [next(n for n in self.gm.graph.nodes if n.op == "placeholder")]
        for n in nodes:
            # Attention heads are also read before their gate, to know what the closed ones contributed.
            users = [u for u in n.users if not (u.op == "call_function" and u.target is mha.ungated)]
            self._insert_after(n, gate_tensor, mask.reshape(spec.unit_shape),
                               (spec.unit_dims, spec.unit_shape, spec.group_size), users)

    def _upstream(self, node: fx.Node, kept: torch.Tensor, dim: int, record: LayerCut) -> fx.Node:
        """Cut the units' producer, or gather them where the walk stops; the node whose output is the kept units."""
        path: list[fx.Node] = []  # nodes that now compute the kept units only
        n = node
        while True:
            m = self._module(n)
            if self._producer(n, m, dim):
                self.out_keep[str(n.target)] = kept
                record.producer = str(n.target)
                path.append(n)
                break
            if not self._elementwise(n, m, dim, zero=False):
                # n computes at full width; the units are taken from its output for the path's first node.
                users = [path[-1]] if path else list(n.users)
                gather = self._insert_after(n, _gather_units, kept, (dim,), users)
                record.stops.append(f"upstream: {_describe(n)} is not a per-unit operation; the units are "
                                    "gathered from its full output")
                if not path:
                    return gather
                break
            path.append(n)
            src = n.all_input_nodes[0] if len(n.all_input_nodes) == 1 else None
            if src is None or len(src.users) != 1 or src in self.gated_nodes or src.op == "placeholder":
                what = "the model's input" if src is None or src.op == "placeholder" else _describe(src)
                why = ("also feeds other operations" if src is not None and len(src.users) != 1 else
                       "is another gated layer" if src in self.gated_nodes else "cannot be cut")
                if src is not None:
                    self._insert_after(src, _gather_units, kept, (dim,), [n])
                record.stops.append(f"upstream: {what} {why}; the units are gathered from its full output")
                break
            n = src
        for p in path:
            if isinstance(self._module(p), nn.modules.batchnorm._BatchNorm):
                self.batchnorms[str(p.target)] = kept
        return node

    def _downstream(self, node: fx.Node, kept: torch.Tensor, dim: int, ndim: int, record: LayerCut) -> None:
        """Cut the units' consumer, or put them back at full width where the walk stops."""
        n, index, size = node, kept, record.total
        while True:
            users = list(n.users)
            if len(users) != 1:
                names = ", ".join(_describe(u) for u in users[:3])
                return self._scatter(n, index, size, dim, record, f"{_describe(n)} feeds {len(users)} operations "
                                     f"({names})")
            u = users[0]
            m = self._module(u)
            if u in self.gated_nodes:
                return self._scatter(n, index, size, dim, record, f"{_describe(u)} is another gated layer")
            if self._consumer(u, m, n, dim, ndim):
                self.in_keep[str(u.target)] = index
                record.consumers.append(str(u.target))
                return None
            if isinstance(m, nn.LocalResponseNorm) and dim == 1 and self._single_input(u, n):
                self.lrns[str(u.target)] = index
                n = u
                continue
            if self._elementwise(u, m, dim, zero=True) and self._single_input(u, n):
                n = u
                continue
            if dim == 1 and self._flattens_from_dim1(u, m) and self._single_input(u, n):
                per = 1
                for s in _shape(n)[2:]:
                    per *= s
                index = (index[:, None] * per + torch.arange(per)[None, :]).flatten()
                size, ndim, n = size * per, 2, u
                continue
            return self._scatter(n, index, size, dim, record, f"{_describe(u)} would not keep a masked unit at zero "
                                 "(or cannot be followed)")

    @staticmethod
    def _flattens_from_dim1(u: fx.Node, m: nn.Module | None) -> bool:
        if isinstance(m, nn.Flatten):
            return m.start_dim == 1 and m.end_dim == -1
        return u.op == "call_function" and u.target is torch.flatten and tuple(u.args[1:]) == (1,) and not u.kwargs

    def _scatter(self, n: fx.Node, index: torch.Tensor, size: int, dim: int, record: LayerCut, reason: str) -> None:
        record.stops.append(f"downstream: {reason}; the units are put back at full width there")
        self._insert_after(n, _scatter_units, index, (size, dim), list(n.users))

    # -- apply ----------------------------------------------------------------
    def apply(self) -> None:
        """Replace every planned module by its cut-down copy."""
        for name in set(self.out_keep) | set(self.in_keep):
            _set_module(self.gm, name, _cut_linear_or_conv(self.gm.get_submodule(name), self.out_keep.get(name),
                                                           self.in_keep.get(name)))
        for name, keep in self.batchnorms.items():
            _set_module(self.gm, name, _cut_batchnorm(self.gm.get_submodule(name), keep))  # type: ignore[arg-type]
        for name, keep in self.lrns.items():
            _set_module(self.gm, name, KeptChannelLRN(self.gm.get_submodule(name), keep))  # type: ignore[arg-type]
        self.gm.graph.lint()
        self.gm.recompile()


def _cut_linear_or_conv(m: nn.Module, out_keep: torch.Tensor | None, in_keep: torch.Tensor | None) -> nn.Module:
    """A copy of a Linear or Conv2d with only the ``out_keep`` outputs and ``in_keep`` inputs (None: all)."""
    assert isinstance(m, (nn.Linear, nn.Conv2d))
    w = m.weight.detach()
    b = None if m.bias is None else m.bias.detach()
    if out_keep is not None:
        w = w.index_select(0, out_keep)
        b = None if b is None else b.index_select(0, out_keep)
    if in_keep is not None:
        w = w.index_select(1, in_keep)
    new = copy.deepcopy(m)  # keeps stride, padding, dilation, padding_mode
    new.weight = nn.Parameter(w.clone(), requires_grad=m.weight.requires_grad)
    if b is not None:
        new.bias = nn.Parameter(b.clone(), requires_grad=m.weight.requires_grad)
    if isinstance(new, nn.Linear):
        new.out_features, new.in_features = w.shape[0], w.shape[1]
    else:
        new.out_channels, new.in_channels = w.shape[0], w.shape[1]
    return new


def _cut_batchnorm(m: nn.modules.batchnorm._BatchNorm, keep: torch.Tensor) -> nn.Module:
    new = type(m)(keep.numel(), m.eps, m.momentum, m.affine, m.track_running_stats,  # type: ignore[call-arg]
                  device=keep.device)
    state = {k: (v.index_select(0, keep) if v.dim() == 1 else v) for k, v in m.state_dict().items()}
    new.load_state_dict(state)
    return new.train(m.training)


# ---------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------


def _kept_units(model: nn.Module, units: Mapping[str, Sequence[int]], example: torch.Tensor) -> list[LayerSpec]:
    specs = resolve_layers(model, list(units))
    for spec in specs:
        if spec.name == INPUT:
            spec.bind(example.shape)
    def binder(spec: LayerSpec) -> Callable[[torch.Tensor], None]:
        return lambda out: spec.bind(out.shape)

    handles = [s.register_output_hook(binder(s)) for s in specs if s.module is not None]
    try:
        with torch.no_grad():
            out = model(example)
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ModelOutputError("a specialist needs a model that returns (N, num_classes) scores; "
                               f"this one returned {type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
    for spec in specs:
        bad = [i for i in units[spec.name] if not 0 <= int(i) < spec.num_units]
        if bad:
            raise OptionError(f"units {bad[:5]} of layer {spec.name!r} are out of range: it has {spec.num_units} units "
                              "(does the result belong to this model?)")
    return specs


def _masker(mask: torch.Tensor, layout: LayerSpec) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda out: apply_gate(out, mask.to(out), layout)


def _masked_copy(model: nn.Module, specs: Sequence[LayerSpec], units: Mapping[str, Sequence[int]]) -> nn.Module:
    """A copy of ``model`` whose non-kept units output zero (forward hooks on the copy: the fallback)."""
    body = copy.deepcopy(model).eval()
    named = dict(body.named_modules())
    for spec in specs:
        mask = torch.zeros(spec.num_units)
        mask[list(units[spec.name])] = 1.0
        mask = mask.reshape(spec.unit_shape)
        layout = copy.copy(spec)
        if spec.name == INPUT:
            body.register_forward_pre_hook(
                lambda _m, args, mask=mask, layout=layout: (apply_gate(args[0], mask.to(args[0]), layout), *args[1:]))
        else:
            layout.module = named[spec.module_path]  # the copy's module
            layout.register_output_hook(_masker(mask, layout))
    return body


def build_specialist(
    model: nn.Module,
    result: CoreUnits | Mapping[str, Sequence[int]],
    example: torch.Tensor,
    target_class: int | None = None,
    *,
    check_inputs: torch.Tensor | None = None,
    atol: float = 1e-4,
) -> Specialist:
    """A class-c detector that computes only the core units of ``result`` (see the module docstring).

    Args:
        model: the classifier the result was found on; left exactly as it was (a copy is cut).
        result: a :class:`CoreUnits`, or ``{layer: kept unit indices}`` with ``target_class``.
        example: a batch of inputs (fixes the shapes the graph is read with).
        target_class: class c (taken from ``result`` when it is a CoreUnits).
        check_inputs: inputs the cut model is compared on with the masked model (default ``example``).
        atol: largest score difference accepted, relative to the scores' scale.

    Returns:
        The :class:`Specialist`; its ``module`` returns a bool per input.
    """
    ablation = result.settings.get("ablation", "zero") if isinstance(result, CoreUnits) else "zero"
    if ablation != "zero":
        # A cut unit computes nothing, i.e. zero: a mean- or resample-ablated set would decide differently.
        raise OptionError(f"this result was found with {ablation} ablation; a specialist drops the other units, "
                          "which is zero ablation: find the units with ablation='zero' to export them")
    units = result.units if isinstance(result, CoreUnits) else {str(k): list(v) for k, v in result.items()}
    c = result.target_class if isinstance(result, CoreUnits) else target_class
    if c is None:
        raise OptionError("target_class is needed when result is a dict of units")
    with preserved_model_state(model):
        work = copy.deepcopy(model).eval()
    with torch.no_grad():
        specs = _kept_units(work, units, example)
        masked = _masked_copy(work, specs, units)
        checks = example if check_inputs is None else check_inputs
        reference = masked(checks)
        cuts = [LayerCut(s.name, sorted(int(i) for i in units[s.name]), s.num_units, masked=True) for s in specs]
        try:
            graph = _Tracer({s.module_path for s in specs}).trace(work)
            for s in specs:
                if s.attention:
                    mha.expose_heads(graph, s.module_path)
            gm = fx.GraphModule(work, graph)
        except Exception as err:  # noqa: BLE001 - any tracing failure means: use the masked copy
            reason = f"torch.fx cannot trace the model ({type(err).__name__}: {str(err).splitlines()[0][:160]})"
            log.warning("specialist: %s; exporting the masked model at full size", reason)
            return Specialist(ClassDetector(masked, c), c, cuts, reason, 0.0)
        ShapeProp(gm).propagate(example)
        cutter = _Cutter(gm, {s.name for s in specs})
        cuts = [cutter.cut(s, torch.tensor(sorted(int(i) for i in units[s.name]), dtype=torch.long)) for s in specs]
        cutter.apply()
        body = gm.eval()
        diff = float((body(checks) - reference).abs().max())
        scale = float(reference.abs().max()) or 1.0
    if not any(cut.producer or cut.consumers for cut in cuts):
        reason = "no module could be cut: " + "; ".join(f"{cut.layer}: {stop}" for cut in cuts for stop in cut.stops)
        log.warning("specialist: %s; exporting the masked model at full size", reason)
        return Specialist(ClassDetector(masked, c), c, cuts, reason, 0.0)
    if diff > atol * max(scale, 1.0):
        reason = (f"the cut model's scores differ from the masked model's by {diff:.3g} (a graph the cutter "
                  "misread); exporting the masked model at full size")
        log.warning("specialist: %s", reason)
        return Specialist(ClassDetector(masked, c), c, cuts, reason, diff)
    return Specialist(ClassDetector(body, c), c, cuts, None, diff)


def count_flops(module: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward pass over ``example`` (torch.utils.flop_counter: matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(example)
    return int(counter.get_total_flops())


def detector_holding_rate(
    detector: nn.Module, model: nn.Module, data: Any, target_class: int, *, seed: int = 0, batch_size: int = 256
) -> tuple[float, int]:
    """(holding rate, |D'_c|): how often ``detector``'s decision equals ``model``'s on D'_c of ``data``.

    D'_c is built from the model's predictions on ``data`` (all inputs predicted as c
    plus as many others, drawn with ``seed``), as for every holding rate; the
    decision compared is ``argmax == c``. ``detector`` is a :class:`ClassDetector`
    or the module loaded back from its torch.export file.
    """
    device = model_device(model)
    full: list[torch.Tensor] = []
    mine: list[torch.Tensor] = []
    with preserved_model_state(model), torch.inference_mode():
        for x in iter_input_batches(data, batch_size):
            x = x.to(device)
            scores = model(x)
            check_class(target_class, scores.shape[1])
            full.append(scores.argmax(1).cpu())
            mine.append(detector(x).cpu())
    predictions, decisions = torch.cat(full), torch.cat(mine)
    rows = build_dprime(predictions, target_class, generator=torch.Generator().manual_seed(seed)).index
    return float((decisions[rows] == (predictions[rows] == target_class)).float().mean()), int(rows.numel())


def save_specialist(specialist: Specialist, path: str | os.PathLike[str], example: torch.Tensor) -> None:
    """Write the detector as a ``torch.export`` program (``path``, batch size free) and its state_dict beside it.

    ``torch.export.load(path).module()(x)`` runs it without coreunits; the state_dict
    (``<path>.state_dict.pt``) is for those who rebuild the module themselves.
    """
    module = specialist.module.eval()
    batch = torch.export.Dim("batch", min=1)
    try:
        program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    except Exception as err:  # noqa: BLE001 - some graphs only export at a fixed batch size
        log.warning("specialist: exporting with a fixed batch of %d (%s)", example.shape[0], str(err).splitlines()[0])
        program = torch.export.export(module, (example,))
    buf = io.BytesIO()
    torch.export.save(program, buf)
    atomic_write_bytes(path, buf.getvalue())
    state = io.BytesIO()
    torch.save(module.state_dict(), state)
    atomic_write_bytes(f"{os.fspath(path)}.state_dict.pt", state.getvalue())


def export_specialist(
    model: nn.Module,
    result: CoreUnits | Mapping[str, Sequence[int]],
    example: torch.Tensor,
    path: str | os.PathLike[str] | None = None,
    *,
    target_class: int | None = None,
    check_inputs: torch.Tensor | None = None,
) -> Specialist:
    """Cut ``model`` down to the core units of ``result`` and, with ``path``, write it with torch.export.

    The detector returns a bool per input: True where ``argmax(scores) == c``, the
    decision the strict holding rate judges. It computes only the kept channels of
    each gated layer where the graph allows (see :attr:`Specialist.cuts` for what was
    cut and where a walk stopped), and is checked against the masked model on
    ``check_inputs``; where the model cannot be cut (an untraceable model, or a
    disagreement) it is the masked model at full size, and :attr:`Specialist.fallback`
    says why.

    Args:
        model: the classifier the result was found on (left exactly as it was).
        result: a :class:`CoreUnits` (one or several layers), or ``{layer: kept units}`` with ``target_class``.
        example: a batch of inputs the model takes (shapes; the export's example).
        path: where to write the ``torch.export`` program (``torch.export.load(path).module()``
            runs it without coreunits); its state_dict goes beside it as ``<path>.state_dict.pt``.
        target_class: class c when ``result`` is a dict.
        check_inputs: inputs the cut model is compared on with the masked model (default ``example``).

    Returns:
        The :class:`Specialist`.
    """
    if not isinstance(example, torch.Tensor) or example.dim() < 2 or len(example) == 0:
        raise OptionError("example must be a non-empty batch of inputs (N, ...) the model takes")
    specialist = build_specialist(model, result, example, target_class, check_inputs=check_inputs)
    if path is not None:
        save_specialist(specialist, path, example)
    return specialist
