"""The heads of ``torch.nn.MultiheadAttention``, as a gateable tensor.

torchvision's ViT (``vit_b_16`` ...), ``nn.TransformerEncoderLayer`` and many
hand-written transformers attend with ``nn.MultiheadAttention``, which
computes every head, concatenates them and applies ``out_proj`` inside one
functional call: no module ever outputs the per-head values that
:class:`~coreunits.Heads` gates. So a forward hook on the attention module
recomputes them (:func:`head_outputs`, the same in-projection, masks and
scaled dot-product attention as torch's own path) and corrects the module's
output by what the closed heads contributed through ``out_proj``::

    out' = out - out_proj_weight @ (heads - gated_heads)

With every gate open the correction is exactly zero, so the model's own
output (torch's fused fast path included) passes through bit for bit.

The fx engine does the same in the graph (:func:`expose_heads`): the heads
become a node of their own, cached like any layer output, and the suffix
applies the correction.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["HEADS_META", "batch_major", "check_supported", "corrected_output", "expose_heads", "head_outputs",
           "register_heads_hook", "traced_heads", "ungated"]

HEADS_META = "coreunits_heads"  # fx node meta: the attention module whose heads the node computes

HeadsFn = Callable[[torch.Tensor], "torch.Tensor | None"]

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def check_supported(module: nn.MultiheadAttention, name: str) -> str | None:
    """Why the heads of ``module`` cannot be gated (one line), or None when they can."""
    if module.bias_k is not None or module.add_zero_attn:
        return (f"Heads({name!r}): this nn.MultiheadAttention has add_bias_kv or add_zero_attn, whose extra "
                "key/value slot coreunits does not model; gate the module after it instead")
    return None


def _arguments(args: tuple[Any, ...], kwargs: dict[str, Any], module: nn.Module) -> dict[str, Any]:
    bound = _SIGNATURE.bind(module, *args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """MultiheadAttention's mask convention (bool True = may not attend) as an additive float mask."""
    if mask is None or mask.is_floating_point():
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


def head_outputs(module: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The heads' outputs side by side, ``(N, L, embed_dim)`` batch first, before ``out_proj``.

    ``args``/``kwargs`` are the module's call arguments, as a forward hook sees them.
    """
    a = _arguments(args, kwargs, module)
    query, key, value = a["query"], a["key"], a["value"]
    if query.dim() != 3:
        raise ValueError("an nn.MultiheadAttention's heads are gated on batched (3-D) inputs only")
    if module.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    length, batch, dim = query.shape
    heads = module.num_heads
    head_dim = dim // heads
    bias = module.in_proj_bias
    b_q, b_k, b_v = bias.chunk(3) if bias is not None else (None, None, None)
    if module._qkv_same_embed_dim:
        w_q, w_k, w_v = module.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def split(t: torch.Tensor) -> torch.Tensor:  # (S, N, E) -> (N, H, S, head_dim)
        return t.reshape(t.shape[0], batch, heads, head_dim).permute(1, 2, 0, 3)

    q, k, v = split(q), split(k), split(v)
    source = k.shape[2]
    mask = _additive(a["attn_mask"], q.dtype)
    if mask is not None:
        # (L, S) or (1, L, S) for every input and head, else (N * H, L, S)
        whole = mask.dim() == 2 or mask.shape[0] == 1
        mask = mask.reshape(1, 1, length, source) if whole else mask.reshape(batch, heads, length, source)
    padding = _additive(a["key_padding_mask"], q.dtype)
    if padding is not None:
        padding = padding.reshape(batch, 1, 1, source)
        mask = padding if mask is None else mask + padding
    dropout = module.dropout if module.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    return out.permute(0, 2, 1, 3).reshape(batch, length, dim)


def batch_major(module: nn.MultiheadAttention, out: torch.Tensor) -> torch.Tensor:
    """The module's attention output with the batch first (as coreunits caches every tensor)."""
    return out if module.batch_first else out.transpose(0, 1)


def corrected_output(module: nn.MultiheadAttention, out: torch.Tensor, heads: torch.Tensor,
                     new: torch.Tensor) -> torch.Tensor:
    """The attention output (``out`` batch first) with its heads changed from ``heads`` to ``new``, in the module's layout."""
    # What the changed heads no longer send through out_proj (no bias: it is added once, heads or not).
    fixed = out - F.linear(heads - new, module.out_proj.weight)
    return fixed if module.batch_first else fixed.transpose(0, 1)


def register_heads_hook(module: nn.MultiheadAttention, fn: HeadsFn) -> RemovableHandle:
    """Call ``fn`` with the heads' outputs each time ``module`` runs; a tensor it returns replaces them."""

    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        assert isinstance(mod, nn.MultiheadAttention)
        heads = head_outputs(mod, args, kwargs)
        new = fn(heads)
        if new is None:
            return None
        out, weights = output
        return corrected_output(mod, batch_major(mod, out), heads, new), weights

    return module.register_forward_hook(hook, with_kwargs=True)


def ungated(heads: torch.Tensor) -> torch.Tensor:
    """Marks, in an fx graph, where the heads' outputs are read before their gates (the engine maps it)."""
    return heads


def traced_heads(module: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """:func:`head_outputs` as an fx node's target (the call's arguments as the graph holds them)."""
    return head_outputs(module, tuple(args), dict(kwargs))


def expose_heads(graph: fx.Graph, path: str) -> fx.Node:
    """Give the heads of the attention module ``path`` a node of their own in ``graph``; return it.

    The module's call stays (its output is the reference); the users of its
    attention output read ``corrected_output(module, batch_major(module, out), ungated(heads), heads)``
    instead, which is ``out`` exactly until the heads node is gated.
    """
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == path]
    if len(calls) != 1:
        raise RuntimeError(f"{path} appears {len(calls)} times in the traced graph")
    call = calls[0]
    outs = [u for u in call.users if u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0]
    if len(outs) != 1 or any(u.op != "call_function" or u.target is not operator.getitem for u in call.users):
        raise RuntimeError(f"the output of {path} is not read as (attn_output, weights)")
    out = outs[0]
    with graph.inserting_after(out):
        module = graph.get_attr(path)
    with graph.inserting_after(module):
        heads = graph.call_function(traced_heads, (module, call.args, call.kwargs))
        heads.meta[HEADS_META] = path
    with graph.inserting_after(heads):
        raw = graph.call_function(ungated, (heads,))
    with graph.inserting_after(raw):
        major = graph.call_function(batch_major, (module, out))
    with graph.inserting_after(major):
        fixed = graph.call_function(corrected_output, (module, major, raw, heads))
    out.replace_all_uses_with(fixed, delete_user_cb=lambda user: user is not major)
    return heads
