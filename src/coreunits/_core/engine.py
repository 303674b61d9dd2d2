"""Running a classifier with switch gates on chosen layers.

The engine splits the model at the gated layers so the work before them
(the *prefix*) is done once and cached, and each optimisation step only runs
the *suffix*: the gated layers' outputs multiplied by the gates, then the rest
of the network. The split is made with ``torch.fx``: the suffix graph takes
the *frontier* (every value computed before the gates that the rest of the
network reads: the gated layer's output, and e.g. a residual branch's
identity) and the gates as inputs. Models that ``torch.fx`` cannot trace (data
dependent control flow) fall back to forward hooks on the real modules, with
the whole model run per step; both paths compute the same numbers.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx, nn

from coreunits._core import mha
from coreunits._core.errors import CoreUnitsError, LayerNotFoundError, ModelOutputError, OptionError
from coreunits._core.layers import INPUT, LayerSpec

__all__ = ["GatedModel", "OutputFn", "apply_gate", "check_scores", "gate_tensor"]

OutputFn = Callable[[Any], torch.Tensor]

log = logging.getLogger(__name__)


def apply_gate(x: torch.Tensor, gate: torch.Tensor | None, spec: LayerSpec,
               baseline: torch.Tensor | None = None) -> torch.Tensor:
    """Gate ``x`` along the spec's unit dims: ``x * gate``, or ``x * gate + baseline * (1 - gate)``.

    Args:
        x: the layer output ``(N, ...)``.
        gate: ``None`` (no gating), ``(K,)`` shared by the batch, or ``(N, K)``.
        spec: the layer's unit layout.
        baseline: what a closed gate leaves (``(1 or N, ...)`` like ``x``; None: zero), see ``_core.ablation``.
    """
    assert spec.unit_dims is not None
    return gate_tensor(x, gate, spec.unit_dims, spec.unit_shape, spec.group_size, baseline)


def check_scores(out: Any, batch: int, output_fn: OutputFn | None) -> torch.Tensor:
    """Validate model scores and return them as float32 ``(N, H)``."""
    if output_fn is not None:
        out = output_fn(out)
    if not isinstance(out, torch.Tensor):
        raise ModelOutputError(
            f"the model returned a {type(out).__name__}, not a tensor of class scores; "
            "pass output_fn=... to pick the logits (e.g. output_fn=lambda out: out['logits'])"
        )
    if out.dim() != 2 or out.shape[0] != batch or out.shape[1] < 2:
        raise ModelOutputError(
            f"the model's output has shape {tuple(out.shape)} for a batch of {batch}; coreunits needs "
            "(N, num_classes) scores with at least 2 classes (pass output_fn=... to select or reshape them)"
        )
    if not out.is_floating_point():
        raise ModelOutputError(f"the model's scores have dtype {out.dtype}; they must be floating point")
    return out.float()


class _LeafTracer(fx.Tracer):
    """Traces only the modules on the path to the gated layers.

    Every other submodule stays a single call_module node, so its own
    forward (with any Python-side state or control flow) runs for real at
    each step instead of being frozen into the graph at trace time.
    """

    def __init__(self, gated: set[str]) -> None:
        super().__init__()
        self.gated = gated

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        name = module_qualified_name
        if name in self.gated:
            return True
        # The root and every module on the path to a gated layer are traced; the rest stay calls.
        return not (name == "" or any(g.startswith(name + ".") for g in self.gated))


def trace_gated(model: nn.Module, gated: set[str]) -> fx.Graph:
    """The graph of ``model(x)`` as coreunits calls it: traced to the gated layers, other arguments at their defaults.

    A forward's optional arguments (timm's ``attn_mask=None, is_causal=False``) are
    specialised to their defaults, so Python branches on them take the path a
    one-argument call takes; they remain placeholders with defaults in the graph.
    """
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    defaults = {p.name: p.default for p in params if p.kind in kinds and p.default is not inspect.Parameter.empty}
    return _LeafTracer(gated).trace(model, concrete_args=defaults or None)


def _input_dependent(graph: fx.Graph) -> set[fx.Node]:
    """Nodes computed from the input (the first placeholder); the rest are constants of the model.

    A constant (a parameter reshaped, as timm's ConvNeXt does with ``gamma``, or an
    optional argument at its default) is not per-example: the suffix recomputes it.
    """
    dep: set[fx.Node] = set()
    for node in graph.nodes:
        if (node.op == "placeholder" and not dep and not node.args) or any(a in dep for a in node.all_input_nodes):
            dep.add(node)
    return dep


def gate_tensor(
    x: torch.Tensor, gate: torch.Tensor | None, unit_dims: tuple[int, ...], unit_shape: tuple[int, ...],
    group: int = 1, baseline: torch.Tensor | None = None,
) -> torch.Tensor:
    # Also inserted into fx graphs as a call_function node, hence plain arguments.
    if gate is None:
        # A copy even without a gate: x may be a cached frontier tensor, and an
        # in-place op after the layer (ReLU(inplace=True), `out += identity`)
        # would otherwise write into the cache.
        return x.clone()
    shape = [gate.shape[0] if gate.dim() == 2 else 1] + [1] * (x.dim() - 1)
    for d, size in zip(unit_dims, unit_shape):
        shape[d] = size
    g = gate.reshape(shape).to(x.dtype)
    if group > 1:  # a unit is a block of adjacent features (a head): one gate value for each of them
        g = g.repeat_interleave(group, dim=unit_dims[-1])
    if baseline is None:
        return x * g
    # Not baseline + (x - baseline) * g: that is not exactly x where g = 1.
    return x * g + baseline.to(x.dtype) * (1 - g)


def _frontier(graph: fx.Graph, gated: dict[fx.Node, int]) -> tuple[set[fx.Node], list[fx.Node], list[fx.Node]]:
    """(descendants of the gates, gated roots, frontier) of a traced graph.

    Descendants are recomputed every step; roots are gated nodes none of whose
    inputs depends on a gate; the frontier is every value computed before the
    gates that the rest of the network reads (roots included), in graph order.
    """
    desc: set[fx.Node] = set()
    for node in graph.nodes:
        if node in gated or any(a in desc for a in node.all_input_nodes):
            desc.add(node)
    roots = [g for g in gated if not any(a in desc for a in g.all_input_nodes)]
    dep = _input_dependent(graph)
    frontier: list[fx.Node] = []
    for node in graph.nodes:
        if node in desc and node.op != "output" and node not in roots:
            for a in node.all_input_nodes:
                if a not in desc and a in dep and a not in frontier:
                    frontier.append(a)
        if node.op == "output":
            for a in node.all_input_nodes:
                if a not in desc and a not in frontier:
                    frontier.append(a)
    for r in roots:
        if r not in frontier:
            frontier.append(r)
    return desc, roots, frontier


def _prefix_module(model: nn.Module, graph: fx.Graph, frontier: list[fx.Node]) -> fx.GraphModule:
    """The original graph with the frontier as its output."""
    pre = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node.op == "output":
            continue
        env[node] = pre.node_copy(node, lambda n: env[n])
    pre.output(tuple(env[f] for f in frontier))
    prefix_gm = fx.GraphModule(model, pre)
    prefix_gm.graph.eliminate_dead_code()
    prefix_gm.recompile()
    return prefix_gm


class GatedModel:
    """A model with switch gates on some layers, split so its prefix can be cached.

    Use inside :meth:`activated` (which adds and removes the hooks the hook path
    needs). ``prefix(x)`` gives the frontier tensors for a batch of inputs,
    ``suffix(frontier, gates)`` the class scores with the gates applied.

    Args:
        model: the classifier, already in the mode it should run in.
        specs: the gated layers, as resolved by :func:`resolve_layers`.
        output_fn: maps the model's output to ``(N, H)`` scores.
        engine: ``"auto"`` (fx split, hooks when tracing fails), ``"fx"`` or ``"hooks"``.
    """

    def __init__(
        self,
        model: nn.Module,
        specs: Sequence[LayerSpec],
        output_fn: OutputFn | None = None,
        engine: str = "auto",
    ) -> None:
        if engine not in ("auto", "fx", "hooks"):
            raise OptionError(f"engine must be 'auto', 'fx' or 'hooks', got {engine!r}")
        self.model = model
        self.specs = list(specs)
        self.output_fn = output_fn
        self.requested_engine = engine
        self.engine = "hooks"
        self.fallback_reason: str | None = None
        self._gates: list[torch.Tensor | None] = [None] * len(self.specs)
        self._baselines: list[torch.Tensor | None] = [None] * len(self.specs)
        self._prefix_gm: fx.GraphModule | None = None
        self._suffix_gm: fx.GraphModule | None = None
        self._clone_frontier: list[bool] = []
        self._depth = 0

    # ------------------------------------------------------------------ set-up
    def probe(self, x: torch.Tensor) -> torch.Tensor:
        """Run one batch through the real model to learn each layer's output shape.

        Checks that each gated module runs exactly once per forward and returns a
        floating tensor, then builds the fx split. Returns the scores.
        """
        counts = [0] * len(self.specs)
        shapes: list[tuple[int, ...] | None] = [None] * len(self.specs)
        handles = []

        def recorder(i: int) -> Callable[[Any], None]:
            def hook(out: Any) -> None:
                counts[i] += 1
                if not isinstance(out, torch.Tensor):
                    spec = self.specs[i]
                    hint = (f"; for its heads, give 'heads:{spec.name}'" if isinstance(spec.module, nn.MultiheadAttention)
                            else "")
                    raise LayerNotFoundError(
                        f"layer {spec.name!r} returns a {type(out).__name__}, not a tensor; "
                        f"gate a submodule whose output is a single tensor{hint}"
                    )
                if not out.is_floating_point():
                    raise LayerNotFoundError(
                        f"layer {self.specs[i].name!r} outputs dtype {out.dtype}; gates need a floating output"
                    )
                shapes[i] = tuple(out.shape)

            return hook

        try:
            for i, spec in enumerate(self.specs):
                if spec.name == INPUT:
                    counts[i], shapes[i] = 1, tuple(x.shape)
                else:
                    handles.append(spec.register_output_hook(recorder(i)))
            with torch.no_grad():
                try:
                    out = self.model(x.clone())  # a forward may modify its input in place
                except LayerNotFoundError:
                    raise
                except Exception as err:
                    raise ModelOutputError(
                        f"the model failed on a batch of the data (input shape {tuple(x.shape)}, dtype {x.dtype}): "
                        f"{type(err).__name__}: {err}. Check that the data yields inputs the model accepts."
                    ) from err
        finally:
            for h in handles:
                h.remove()
        for spec, n, shape in zip(self.specs, counts, shapes):
            if n == 0:
                raise LayerNotFoundError(
                    f"layer {spec.name!r} never runs in the model's forward pass, so gating it has no effect; "
                    "pick a module that forward() calls"
                )
            if n > 1:
                raise LayerNotFoundError(
                    f"layer {spec.name!r} runs {n} times in one forward pass (a shared module), so its units "
                    "are ambiguous; gate a module that runs once (e.g. the layer after it)"
                )
            assert shape is not None
            spec.bind(shape)
        scores = check_scores(out, x.shape[0], self.output_fn)
        if self.requested_engine != "hooks":
            try:
                self._build_fx(x)
                self.engine = "fx"
            except Exception as err:  # any tracing failure: hooks are always correct
                if self.requested_engine == "fx":
                    raise CoreUnitsError(
                        f"engine='fx' was requested but torch.fx cannot split this model "
                        f"({type(err).__name__}: {err}); use engine='auto' (falls back to hooks) or 'hooks'"
                    ) from err
                self.fallback_reason = f"{type(err).__name__}: {err}"
                log.warning("torch.fx cannot split %s (%s); using forward hooks instead: the whole model runs "
                            "every step (same numbers, slower)", type(self.model).__name__, self.fallback_reason)
                self._prefix_gm = self._suffix_gm = None
        return scores

    def _build_fx(self, x: torch.Tensor) -> None:
        """Split the traced model at the gated layers: frontier, prefix, suffix, then verify on ``x``."""
        graph = trace_gated(self.model, {s.module_path for s in self.specs if s.name != INPUT})
        for spec in self.specs:
            if spec.attention:  # the heads get a node of their own (see _core.mha)
                mha.expose_heads(graph, spec.module_path)
        gated = self._gated_nodes(graph)
        desc, roots, frontier = _frontier(graph, gated)
        prefix_gm = _prefix_module(self.model, graph, frontier)
        suffix_gm = self._suffix_module(graph, gated, desc, roots, frontier)
        self._verify_split(prefix_gm, suffix_gm, x)
        # A suffix op may modify a non-gated frontier tensor in place (e.g. `out += identity`
        # reads identity but `identity += out` would write it): clone those per step so the
        # cache is never corrupted. Gated ones are multiplied first, which makes a copy.
        gated_front = {k for k, f in enumerate(frontier) if f in gated}
        self._clone_frontier = [k not in gated_front for k in range(len(frontier))]
        self._prefix_gm, self._suffix_gm = prefix_gm, suffix_gm

    def _gated_nodes(self, graph: fx.Graph) -> dict[fx.Node, int]:
        """The graph node of each gated layer -> its index in ``specs`` (each must appear exactly once)."""
        # The input, then any optional arguments (placeholders holding their defaults).
        placeholders = [n for n in graph.nodes if n.op == "placeholder"][:1]
        if not placeholders or placeholders[0].args or any(
            n.op == "placeholder" and not n.args for n in graph.nodes if n is not placeholders[0]
        ):
            raise RuntimeError("fx split needs a forward() with exactly one required input")
        gated: dict[fx.Node, int] = {}
        for i, spec in enumerate(self.specs):
            if spec.name == INPUT:
                nodes = placeholders
            elif spec.attention:
                nodes = [n for n in graph.nodes if n.meta.get(mha.HEADS_META) == spec.module_path]
            else:
                nodes = [n for n in graph.nodes if n.op == "call_module" and n.target == spec.module_path]
            if len(nodes) != 1:
                raise RuntimeError(f"layer {spec.name} appears {len(nodes)} times in the traced graph")
            gated[nodes[0]] = i
        return gated

    def _suffix_module(self, graph: fx.Graph, gated: dict[fx.Node, int], desc: set[fx.Node],
                       roots: list[fx.Node], frontier: list[fx.Node]) -> fx.GraphModule:
        """Frontier + one gate per layer as inputs, the descendants of the gates copied, each gated output gated."""
        suf = fx.Graph()
        front_in = {f: suf.placeholder(f"frontier_{k}") for k, f in enumerate(frontier)}
        gate_in = [suf.placeholder(f"gate_{i}") for i in range(len(self.specs))]
        base_in = [suf.placeholder(f"baseline_{i}") for i in range(len(self.specs))]
        env: dict[fx.Node, Any] = dict(front_in)
        ungated: dict[fx.Node, fx.Node] = {}  # each gated node's value before its gate

        def gate(value: fx.Node, node: fx.Node) -> fx.Node:
            i = gated[node]
            ungated[node] = value
            return suf.call_function(gate_tensor, (value, gate_in[i], *self._layout(i), base_in[i]))

        dep = _input_dependent(graph)
        for node in graph.nodes:
            if node in roots:  # a gated layer computed before every gate: its cached output, gated
                env[node] = gate(front_in[node], node)
            elif node.op == "call_function" and node.target is mha.ungated:  # attention heads before their gates
                env[node] = ungated[node.args[0]]  # type: ignore[index]
            elif node.op == "placeholder" and node not in dep:  # an optional argument: its default
                env[node] = node.args[0]
            elif node not in dep and node.op != "output":  # a constant of the model, recomputed
                env[node] = suf.node_copy(node, lambda n: env[n])
            elif node in desc and node.op != "placeholder":
                copied = suf.node_copy(node, lambda n: env[n])
                env[node] = gate(copied, node) if node in gated else copied
        suffix_gm = fx.GraphModule(self.model, suf)
        suffix_gm.graph.eliminate_dead_code()
        suffix_gm.recompile()
        return suffix_gm

    def _verify_split(self, prefix_gm: fx.GraphModule, suffix_gm: fx.GraphModule, x: torch.Tensor) -> None:
        """Raise unless prefix + ungated suffix reproduce the model's scores exactly on ``x``."""
        with torch.no_grad():
            front = prefix_gm(x.clone())
            front = front if isinstance(front, tuple) else (front,)
            # The frontier must be per-example tensors, or it cannot be cached and sliced.
            for f in front:
                if not isinstance(f, torch.Tensor) or f.dim() == 0 or f.shape[0] != x.shape[0]:
                    raise RuntimeError("the fx frontier holds a value that is not a per-example tensor")
            ref = self.model(x.clone())
            got = suffix_gm(*front, *([None] * (2 * len(self.specs))))
        if not torch.equal(check_scores(ref, x.shape[0], self.output_fn), check_scores(got, x.shape[0], self.output_fn)):
            raise RuntimeError("the fx split does not reproduce the model's scores exactly")

    def _layout(self, i: int) -> tuple[tuple[int, ...], tuple[int, ...], int]:
        spec = self.specs[i]
        assert spec.unit_dims is not None
        return spec.unit_dims, spec.unit_shape, spec.group_size

    # ----------------------------------------------------------------- running
    @contextmanager
    def activated(self) -> Iterator[GatedModel]:
        """Add the gating hooks (hook path) for the duration of the block (re-entrant)."""
        handles = []
        entered = False
        try:
            if self._depth == 0 and self.engine == "hooks":
                for i, spec in enumerate(self.specs):
                    if spec.module is not None:
                        handles.append(spec.register_output_hook(self._hook(i)))
            self._depth += 1
            entered = True
            yield self
        finally:
            if entered:
                self._depth -= 1
            for h in handles:
                h.remove()

    def _hook(self, i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        spec = self.specs[i]

        def hook(out: torch.Tensor) -> torch.Tensor:
            return apply_gate(out, self._gates[i], spec, self._baselines[i])

        return hook

    def prefix(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The frontier tensors for a batch of inputs (computed without gradients)."""
        if self._prefix_gm is None:
            return (x,)
        with torch.no_grad():
            front = self._prefix_gm(x.clone())  # the caller may keep x
        return front if isinstance(front, tuple) else (front,)

    def suffix(self, frontier: Sequence[torch.Tensor], gates: Sequence[torch.Tensor | None],
               baselines: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """Scores ``(N, H)`` (float32) of the gated model from cached frontier tensors.

        ``baselines``: per gated layer, what its closed gates leave (None: zero; see ``_core.ablation``).
        """
        if self._depth == 0:
            raise RuntimeError("GatedModel.suffix must run inside GatedModel.activated()")
        batch = frontier[0].shape[0]
        bases: list[torch.Tensor | None] = list(baselines) if baselines is not None else [None] * len(self.specs)
        if self._suffix_gm is not None:
            front = [f.clone() if c else f for f, c in zip(frontier, self._clone_frontier)]
            out = self._suffix_gm(*front, *gates, *bases)
        else:
            x = frontier[0].clone()  # the cached input: the forward may modify it in place
            self._gates, self._baselines = list(gates), bases
            for i, spec in enumerate(self.specs):
                if spec.name == INPUT:
                    x = apply_gate(x, gates[i], spec, bases[i])
            try:
                out = self.model(x)
            finally:
                self._gates = [None] * len(self.specs)
                self._baselines = [None] * len(self.specs)
        return check_scores(out, batch, self.output_fn)


def slice_frontier(frontier: Sequence[torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
    """Rows ``index`` of every frontier tensor."""
    return [f.index_select(0, index.to(f.device)) for f in frontier]

