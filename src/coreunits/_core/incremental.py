"""Incremental evaluation of "drop one more unit" through the next linear layer.

Masking the units of a layer one by one (the holding-rate-versus-units curve,
refinement passes) re-runs the network after the layer once per mask. When
the gated layer feeds a ``Linear`` (through flatten/reshape) or a ``Conv2d``,
that layer's pre-activation is linear in the units: dropping unit j subtracts
exactly its own contribution ``W[:, cols_j] @ x_j``. So the pre-activation is
computed once, each drop costs 1/K of that layer, and only the network after
it is re-run. For the paper's MNIST max2 (-> fc1) that is most of the cost.

If the structure does not fit (a branch, another consumer, a grouped conv, a
frontier with more than one tensor) :func:`build_incremental` returns ``None``
and callers evaluate masks directly. Built evaluators are checked against the
direct computation on a batch before use.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from coreunits._core.cache import ActivationCache
from coreunits._core.engine import GatedModel, trace_gated
from coreunits._core.guard import preserved_model_state
from coreunits._core.layers import INPUT, LayerSpec
from coreunits._core.scoring import dense_masked_scores

__all__ = ["IncrementalCurve", "build_incremental"]

log = logging.getLogger(__name__)

_SHAPE_METHODS = {"view", "reshape", "flatten", "contiguous"}


def _is_shape_op(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], nn.Flatten)
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    if node.op == "call_function":
        return node.target in (torch.flatten, torch.reshape)
    return False


class IncrementalCurve:
    """Scores of masks that keep the top-k units, for every k, computed incrementally."""

    def __init__(self, cache: ActivationCache, spec: LayerSpec, chain: list[fx.Node],
                 linear_name: str, linear: nn.Linear | nn.Conv2d, post: GatedModel) -> None:
        self.cache, self.spec, self.linear, self.post = cache, spec, linear, post
        self.linear_name = linear_name
        self._chain_gm: fx.GraphModule | None = None
        if chain:
            g = fx.Graph()
            x = g.placeholder("x")
            env: dict[fx.Node, fx.Node] = {chain[0].args[0]: x}  # type: ignore[dict-item]
            for node in chain:
                env[node] = g.node_copy(node, lambda n: env[n])
            g.output(env[chain[-1]])
            self._chain_gm = fx.GraphModule(cache.model, g)
        self._cols: list[torch.Tensor] | None = None

    def _chain(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._chain_gm is None else self._chain_gm(x)

    def _columns(self, x: torch.Tensor) -> list[torch.Tensor]:
        # Which input features of the Linear belong to which unit: push unit ids through the chain.
        if self._cols is None:
            # float64 ids: exact for any unit count (a half-precision id would round above 2048).
            ids = torch.arange(self.spec.num_units, dtype=torch.float64, device=x.device)
            assert self.spec.unit_dims is not None
            shape = [1] * x.dim()
            for d, size in zip(self.spec.unit_dims, self.spec.unit_shape):
                shape[d] = size
            idmap = ids.reshape(shape).expand(1, *x.shape[1:])
            flat = self._chain(idmap.contiguous())[0]
            self._cols = [torch.nonzero(flat == j).flatten() for j in range(self.spec.num_units)]
        return self._cols

    def _add_contribution(self, z: torch.Tensor, x: torch.Tensor, h: torch.Tensor, unit: int) -> torch.Tensor:
        """``z`` plus one unit's contribution to the next layer's pre-activation (in place for a Linear)."""
        lin = self.linear
        if isinstance(lin, nn.Linear):
            cols = self._columns(x)[unit].to(h.device)
            return z.addmm_(h.index_select(1, cols), lin.weight.index_select(1, cols).T)
        return z + F.conv2d(x[:, unit : unit + 1], lin.weight[:, unit : unit + 1], None,
                            lin.stride, lin.padding, lin.dilation)

    def scores_of_mask(self, rows: torch.Tensor, mask: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Scores ``(len(rows), H)`` with only the units where ``mask`` is True kept.

        The next layer is computed from the kept units alone (its input columns
        or channels sliced), so a mask keeping k of K units costs about k/K of
        that layer: the sparse masks that refinement and greedy search try are
        cheap. Exact: a masked unit contributes exactly zero.
        """
        out = []
        with preserved_model_state(self.cache.model), torch.inference_mode(), self.post.activated():
            for chunk in rows.split(batch_size):
                z = self.pre_activation(self.cache.frontier_rows(chunk)[0], mask)
                out.append(self.post.suffix([z], [None]))
        return torch.cat(out)

    def toggled_scores(self, rows: torch.Tensor, mask: torch.Tensor, candidates: Sequence[int],
                       budget: int = 1 << 24) -> torch.Tensor:
        """Scores ``(G, len(rows), H)`` of ``mask`` with each candidate unit toggled (dropped if kept, else added).

        The next layer's pre-activation under ``mask`` is computed once per chunk
        of rows; each candidate's own contribution is computed for all candidates
        in one batched product (Linear) or one grouped convolution (Conv2d) and
        subtracted or added, and the network after that layer runs once on all
        G toggled masks stacked. Exact: what greedy elimination and add-back
        score every candidate with, on all of D'_c. ``budget`` bounds the
        floats of the stacked pre-activation per chunk.
        """
        mask = mask.flatten().bool().cpu()
        cands = [int(j) for j in candidates]
        g = len(cands)
        sign = torch.tensor([-1.0 if mask[j] else 1.0 for j in cands])
        out: list[torch.Tensor] = []
        with preserved_model_state(self.cache.model), torch.inference_mode(), self.post.activated():
            for chunk in rows.split(1024):
                x = self.cache.frontier_rows(chunk)[0]
                base = self.pre_activation(x, mask)
                signs = sign.to(base.device, base.dtype).view(-1, *[1] * base.dim())
                step = max(1, budget // (g * max(1, base[0].numel())))
                for lo in range(0, len(chunk), step):
                    b = base[lo : lo + step]
                    z = b.unsqueeze(0) + signs * self._contributions(x[lo : lo + step], cands)
                    scores = self.post.suffix([z.reshape(g * len(b), *b.shape[1:])], [None])
                    out.append(scores.reshape(g, len(b), -1))
        return torch.cat(out, dim=1)

    def unit_contributions(self, rows: torch.Tensor, batch_size: int = 1024) -> torch.Tensor | None:
        """Every unit's contribution to the next ``Linear``'s pre-activation, ``(len(rows), K, O)``.

        Computed once (one pass of that layer), it turns every later toggled
        mask into a subtraction or addition: the caller keeps it while its
        memory is affordable (``SelectionProblem``). None for a ``Conv2d``, whose
        per-unit contributions are whole feature maps.
        """
        lin = self.linear
        if not isinstance(lin, nn.Linear):
            return None
        units = list(range(self.spec.num_units))
        out: torch.Tensor | None = None
        with preserved_model_state(self.cache.model), torch.inference_mode():
            for lo in range(0, len(rows), batch_size):
                part = self._contributions(self.cache.frontier_rows(rows[lo : lo + batch_size])[0], units)
                if out is None:  # written in place: a cat of the parts would copy these GB once more
                    out = part.new_empty(len(rows), part.shape[0], *part.shape[2:])
                out[lo : lo + batch_size] = part.transpose(0, 1)
        return out

    def pre_activation_from_contributions(self, contrib: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """:meth:`pre_activation` of ``mask`` from :meth:`unit_contributions` ``contrib`` ``(B, K, O)``: ``(B, O)``.

        The bias plus the kept units' contributions, summed without another pass of the layer.
        """
        lin = self.linear
        with torch.inference_mode():
            base = contrib.new_zeros(contrib.shape[0], contrib.shape[2])
            if lin.bias is not None:
                base += lin.bias
            for j in torch.nonzero(mask).flatten().tolist():
                base += contrib[:, j]
        return base

    def toggled_from_contributions(self, base: torch.Tensor, contrib: torch.Tensor, sign: torch.Tensor,
                                   budget: int = 1 << 24) -> torch.Tensor:
        """:meth:`toggled_scores` from precomputed parts: scores ``(G, B, H)``.

        ``base`` ``(B, O)``: the mask's pre-activation of the next ``Linear`` on B rows;
        ``contrib`` ``(B, G, O)``: each candidate's :meth:`unit_contributions` on them;
        ``sign`` ``(G,)``: -1 where the candidate is dropped, +1 where it is added.
        """
        g, width = contrib.shape[1], contrib.shape[2]
        step = max(1, budget // (g * width))
        out = []
        with preserved_model_state(self.cache.model), torch.inference_mode(), self.post.activated():
            for lo in range(0, contrib.shape[0], step):
                z = torch.addcmul(base[lo : lo + step].unsqueeze(1), sign.view(1, -1, 1), contrib[lo : lo + step])
                out.append(self.post.suffix([z.reshape(-1, width)], [None]).reshape(len(z), g, -1))
        return torch.cat(out, dim=0).transpose(0, 1)

    def pre_activation(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The next layer's output (pre-activation) for frontier ``x`` with only ``mask``'s units kept."""
        kept = torch.nonzero(mask.flatten().bool()).flatten().tolist()
        lin = self.linear
        if isinstance(lin, nn.Linear):
            h = self._chain(x)
            cols_of = self._columns(x)
            cols = torch.cat([cols_of[j] for j in kept]) if kept else torch.zeros(0, dtype=torch.long)
            cols = cols.to(h.device)
            z = h.index_select(1, cols) @ lin.weight.index_select(1, cols).T
            return z + lin.bias if lin.bias is not None else z
        # No unit kept: one zeroed channel gives the bias-only output with the right shape.
        idx = torch.tensor(kept or [0], dtype=torch.long, device=x.device)
        w = lin.weight.index_select(1, idx) * (1.0 if kept else 0.0)
        return F.conv2d(x.index_select(1, idx), w, lin.bias, lin.stride, lin.padding, lin.dilation)

    def _contributions(self, x: torch.Tensor, cands: list[int]) -> torch.Tensor:
        """Each candidate unit's own contribution to the next layer's pre-activation, ``(G, B, ...)``."""
        lin = self.linear
        g = len(cands)
        if isinstance(lin, nn.Linear):
            h = self._chain(x)
            cols_of = self._columns(x)
            sizes = {cols_of[j].numel() for j in cands}
            if len(sizes) == 1:
                idx = torch.stack([cols_of[j] for j in cands]).to(h.device)  # (G, L)
                hg = h[:, idx].permute(1, 0, 2)  # (G, B, L)
                wg = lin.weight.T[idx]  # (G, L, O)
                return torch.bmm(hg, wg)
            return torch.stack([h[:, cols_of[j].to(h.device)] @ lin.weight[:, cols_of[j].to(h.device)].T
                                for j in cands])
        idx = torch.tensor(cands, dtype=torch.long, device=x.device)
        w = lin.weight.index_select(1, idx).transpose(0, 1).reshape(g * lin.out_channels, 1,
                                                                      *lin.weight.shape[2:])
        c = F.conv2d(x.index_select(1, idx), w, None, lin.stride, lin.padding, lin.dilation, groups=g)
        return c.reshape(x.shape[0], g, lin.out_channels, *c.shape[2:]).transpose(0, 1)

    def scores(self, rows: torch.Tensor, order: torch.Tensor, ks: Sequence[int],
               batch_size: int = 1024) -> dict[int, torch.Tensor]:
        """Scores ``(len(rows), H)`` for each k in ``ks``, keeping units ``order[:k]``.

        The next layer's pre-activation is built upwards from its bias, one
        unit's contribution at a time (in place), so the whole curve costs about
        one pass of that layer plus one pass of the network after it per k.
        (Running several k through the rest of the network as one batch was
        measured slower: the larger tensors fall out of cache.)
        """
        want = set(ks)
        top = max(want)
        order_list = [int(u) for u in order.flatten()[:top].tolist()]
        out: dict[int, list[torch.Tensor]] = {k: [] for k in want}
        lin = self.linear
        with preserved_model_state(self.cache.model), torch.inference_mode(), self.post.activated():
            for chunk in rows.split(batch_size):
                x = self.cache.frontier_rows(chunk)[0]
                h = self._chain(x)
                if isinstance(lin, nn.Linear):
                    bias = lin.bias if lin.bias is not None else h.new_zeros(lin.out_features)
                    z = bias.expand(h.shape[0], -1).clone()
                else:
                    # Bias-only output with the right spatial shape: one zeroed channel.
                    z = F.conv2d(x[:, :1], torch.zeros_like(lin.weight[:, :1]), lin.bias, lin.stride,
                                 lin.padding, lin.dilation)
                for k in range(top + 1):
                    if k > 0:
                        # In place is safe: the suffix copies its input before any in-place op.
                        z = self._add_contribution(z, x, h, order_list[k - 1])
                    if k in want:
                        out[k].append(self.post.suffix([z], [None]))
        return {k: torch.cat(v) for k, v in out.items()}


def build_incremental(cache: ActivationCache, layer: str) -> IncrementalCurve | None:
    """An incremental evaluator for ``layer`` of the cache, or None when it does not apply.

    Built (traced and checked) once per cache and layer; later calls reuse it.
    When it does not apply, the reason is logged once and kept in
    ``cache.fallbacks["incremental:<layer>"]`` (results record it in their settings).
    """
    memo: dict[str, IncrementalCurve | None] = cache.__dict__.setdefault("_incremental_evaluators", {})
    if layer not in memo:
        inc, reason = _build_incremental(cache, layer) if cache.ablation.zero else (
            None, f"{cache.ablation.mode} ablation: a dropped unit leaves its ablation value, not zero")
        memo[layer] = inc
        if inc is None:
            cache.fallbacks[f"incremental:{layer}"] = reason
            log.info("layer %r: masks are evaluated through the whole network (no incremental path): %s",
                     layer, reason)
    return memo[layer]


def _next_linear(cache: ActivationCache, layer: str) -> tuple[list[fx.Node], str, nn.Linear | nn.Conv2d] | str:
    """(shape-op chain, name, module) of the Linear/Conv2d the layer feeds alone, or why there is none."""
    modules = dict(cache.model.named_modules())
    graph = trace_gated(cache.model, {layer})
    node = next(n for n in graph.nodes if n.op == "call_module" and n.target == layer)
    chain: list[fx.Node] = []
    while True:
        users = list(node.users)
        if len(users) != 1:
            return f"{node.name} feeds {len(users)} operations, not one Linear or Conv2d"
        user = users[0]
        module = modules.get(str(user.target)) if user.op == "call_module" else None
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            break
        if not _is_shape_op(user, modules) or user.args[0] is not node:
            return f"{layer} reaches {user.name} before any Linear or Conv2d"
        chain.append(user)
        node = user
    if isinstance(module, nn.Conv2d) and (chain or module.groups != 1 or module.padding_mode != "zeros"):
        return f"the next layer {user.target} is a grouped, padded or reshaped Conv2d"
    return chain, str(user.target), module


def _build_incremental(cache: ActivationCache, layer: str) -> tuple[IncrementalCurve | None, str]:
    """(evaluator, "") or (None, why not)."""
    if cache.gated.engine != "fx" or not cache.cached:
        return None, f"needs the fx engine and cached activations (engine {cache.gated.engine}, cached {cache.cached})"
    if len(cache.specs) != 1 or layer == INPUT or cache.specs[0].name != layer:
        return None, "needs a cache of one hidden layer"
    if cache.specs[0].last_dim:
        return None, "units given as Neurons or Heads (features over all tokens) are judged through the network"
    assert cache.frontier is not None
    if len(cache.frontier) != 1:
        return None, "the layer's frontier holds more than one tensor (a branch around it)"
    spec = cache.specs[0]
    try:
        found = _next_linear(cache, layer)
        if isinstance(found, str):
            return None, found
        chain, name, lin = found
        post = GatedModel(cache.model, [LayerSpec(name, lin)], cache.output_fn, engine="fx")
        probe_rows = torch.arange(len(cache.sample_inputs))
        with preserved_model_state(cache.model):
            post.probe(cache.sample_inputs)
        if len(post._clone_frontier) != 1:
            return None, f"the network after {name} needs more than its output"
        inc = IncrementalCurve(cache, spec, chain, name, lin, post)
        # Check against the direct computation before trusting it.
        order = torch.arange(spec.num_units)
        k = max(spec.num_units // 2, 1)
        got = inc.scores(probe_rows, order, [k])[k]
        mask = torch.zeros(spec.num_units, device=cache.device)
        mask[:k] = 1.0
        ref = dense_masked_scores(cache, probe_rows, [mask])
        if not torch.allclose(got, ref, rtol=1e-4, atol=1e-4):
            return None, "its scores differ from the direct computation on a probe batch"
        return inc, ""
    # Any structure not foreseen (tracing, shapes) means the direct path, which is always right;
    # the error is kept as the reason and logged, so it is never silent.
    except Exception as err:
        log.debug("incremental path for %r failed", layer, exc_info=True)
        return None, f"{type(err).__name__}: {err}"
