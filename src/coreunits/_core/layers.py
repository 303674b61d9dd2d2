"""Resolving the layers a user names into gateable units.

A *layer* is given as a dotted name from ``model.named_modules()``, the module
object itself, or the string ``"input"``. A *unit* is a slice of that layer's
output along its unit dimensions: a channel (dim 1) of a 4-D ``(N, C, H, W)``
output, a feature (last dim) of a 2-D output, and, for ``"input"``, one
position of the input (every spatial position of an image, shared across its
channels, or every feature of a flat input).

Two wrappers name other units: :class:`Neurons` (the last dim's features, one
unit over all tokens or positions: a transformer MLP's hidden neurons) and
:class:`Heads` (an attention module's heads: the per-head slices of the
concatenated head outputs before the output projection, one unit over all
tokens), for timm's ``Attention`` and for ``torch.nn.MultiheadAttention``
(torchvision's ViT, ``nn.TransformerEncoderLayer``: see ``_core.mha``). A group
of features gated as one unit is how heads are declared for any other model:
``Heads("name", num_heads=H)`` on a module whose output's last dim is the H
heads' outputs side by side.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from coreunits._core import mha
from coreunits._core.errors import LayerNotFoundError

__all__ = ["INPUT", "Heads", "LayerArg", "LayerSpec", "Neurons", "close_names", "default_unit_dims",
           "parse_layer", "resolve_layers"]

INPUT = "input"
NEURONS_PREFIX = "neurons:"
HEADS_PREFIX = "heads:"


@dataclass(frozen=True)
class Neurons:
    """The features of a layer's last output dim, each one unit over all tokens/positions.

    ``Neurons("blocks.3.mlp.act")``: the hidden neurons of a ViT block's MLP
    (output ``(N, tokens, features)``), where the default would gate tokens.
    Results are keyed by ``"neurons:<name>"``, which names it wherever a layer
    name is accepted (``--layer neurons:NAME`` on the command line).
    """

    name: str

    @property
    def key(self) -> str:
        return f"{NEURONS_PREFIX}{self.name}"


@dataclass(frozen=True)
class Heads:
    """The attention heads of a module, each one unit over all tokens.

    ``name`` is a timm ``Attention`` (ViT, DeiT, ...: its heads are gated where
    they are concatenated, before ``proj``), a ``torch.nn.MultiheadAttention``
    (torchvision's ViTs: the same point, before ``out_proj``; see ``_core.mha``),
    or any module whose output's last dim is ``num_heads`` head outputs side by
    side (then ``num_heads`` is required): that is how heads are declared for
    other models. Results are keyed by ``"heads:<name>"``
    (``"heads:<name>:<num_heads>"`` when given), which names it wherever a
    layer name is accepted.
    """

    name: str
    num_heads: int | None = None

    @property
    def key(self) -> str:
        return f"{HEADS_PREFIX}{self.name}" + (f":{self.num_heads}" if self.num_heads is not None else "")


LayerArg = str | nn.Module | Neurons | Heads


@dataclass
class LayerSpec:
    """One gated layer.

    Attributes:
        name: dotted module name, or ``"input"``.
        module: the module (``None`` for the input).
        unit_dims: output dims (batch excluded, so 1 = channels) one gate covers;
            ``None`` until the output's rank is known.
        unit_shape: sizes of those dims; the gate tensor has this shape.
        output_ndim: rank of the layer's output (batch included).
        path: the module's name in ``model.named_modules()`` where it differs
            from ``name`` (heads of a timm ``Attention`` are gated at its ``norm``).
        last_dim: units along the output's last dim (:class:`Neurons`, :class:`Heads`).
        groups: with ``last_dim``, that many units, each a block of adjacent
            features (heads); None = one unit per feature.
        attention: ``module`` is an ``nn.MultiheadAttention`` and the gated
            tensor is its heads' outputs, which no module returns (``_core.mha``).
    """

    name: str
    module: nn.Module | None
    unit_dims: tuple[int, ...] | None = None
    unit_shape: tuple[int, ...] = ()
    output_ndim: int = 0
    path: str | None = None
    last_dim: bool = False
    groups: int | None = None
    features: int = 0
    attention: bool = False

    @property
    def module_path(self) -> str:
        """The gated module's name in ``model.named_modules()``."""
        return self.path or self.name

    @property
    def group_size(self) -> int:
        """Features per unit along the unit dim (1 unless units are heads)."""
        return self.features // self.groups if self.groups else 1

    @property
    def num_units(self) -> int:
        """Number of gates (units) of this layer."""
        return math.prod(self.unit_shape) if self.unit_shape else 0

    def register_output_hook(self, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> RemovableHandle:
        """Call ``fn`` with the gated tensor each time the layer runs; a tensor it returns replaces it.

        The one way every part of coreunits reads or gates a hidden layer through hooks.
        """
        assert self.module is not None, "the input has no module to hook"
        if self.attention:
            assert isinstance(self.module, nn.MultiheadAttention)
            return mha.register_heads_hook(self.module, fn)
        return self.module.register_forward_hook(lambda _m, _i, out: fn(out))

    def bind(self, output_shape: Sequence[int]) -> None:
        """Fix the unit layout from one observed output shape ``(N, ...)``."""
        ndim = len(output_shape)
        if ndim < 2:
            raise LayerNotFoundError(
                f"layer {self.name!r} outputs a tensor of shape {tuple(output_shape)}; "
                "coreunits needs a batch dimension plus at least one unit dimension"
            )
        if self.last_dim:
            dims: Sequence[int] = (ndim - 1,)
        else:
            dims = self.unit_dims if self.unit_dims is not None else default_unit_dims(self.name, ndim)
        for d in dims:
            if not 1 <= d < ndim:
                raise LayerNotFoundError(
                    f"unit_dim {d} is out of range for layer {self.name!r} with output shape "
                    f"{tuple(output_shape)}; use a dim between 1 and {ndim - 1}"
                )
        self.unit_dims = tuple(sorted(dims))
        self.unit_shape = tuple(int(output_shape[d]) for d in self.unit_dims)
        self.output_ndim = ndim
        self.features = self.unit_shape[-1]
        if self.groups:
            if self.features % self.groups:
                raise LayerNotFoundError(
                    f"{self.name!r} outputs {self.features} features in its last dim, which do not split into "
                    f"{self.groups} heads; pass num_heads that divides it"
                )
            self.unit_shape = (self.groups,)


def default_unit_dims(name: str, ndim: int) -> tuple[int, ...]:
    """The unit dims used when the caller gives none.

    Hidden layers: channels of a 4-D (or any >= 3-D) output, the last dim of a
    2-D one. The input: every position (all dims after the channel dim) of an
    image-like input, every feature of a flat one.
    """
    if name == INPUT:
        return (1,) if ndim == 2 else tuple(range(2, ndim))
    return (ndim - 1,) if ndim == 2 else (1,)


def close_names(name: str, names: Sequence[str]) -> list[str]:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    # Also offer names that share the last component ("max1" -> "features.max1").
    tail = name.rsplit(".", 1)[-1]
    close += [n for n in names if n.rsplit(".", 1)[-1] == tail and n not in close]
    return close[:6]


def _listing(names: Sequence[str], limit: int = 40) -> str:
    """The model's layer names, for an unknown name with no close match (the user needs the list then)."""
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f" Its layers: {shown}{more}, and 'input'."


def resolve_layers(
    model: nn.Module,
    layers: LayerArg | Sequence[LayerArg],
    unit_dim: int | Sequence[int] | None = None,
) -> list[LayerSpec]:
    """Turn the user's ``layers`` argument into :class:`LayerSpec` objects.

    Args:
        model: the classifier.
        layers: a dotted name, a module of ``model``, ``"input"``, or a list of these.
        unit_dim: output dim(s) a gate covers, overriding :func:`default_unit_dims`
            for every layer.

    Raises:
        LayerNotFoundError: unknown name (with the closest names), a module that
            is not part of ``model``, the model itself, or a layer given twice.
    """
    items: list[LayerArg] = [layers] if isinstance(layers, (str, nn.Module, Neurons, Heads)) else list(layers)
    if not items:
        raise LayerNotFoundError("no layer given; pass a module name such as 'features.3', a module, or 'input'")
    named = dict(model.named_modules())
    names = [n for n in named if n]
    by_id: dict[int, list[str]] = {}
    for n, m in named.items():
        if n:
            by_id.setdefault(id(m), []).append(n)
    dims = None if unit_dim is None else ((unit_dim,) if isinstance(unit_dim, int) else tuple(unit_dim))
    specs: list[LayerSpec] = []
    for item in items:
        if isinstance(item, str):
            item = parse_layer(item)
        if isinstance(item, (Neurons, Heads)):
            specs.append(_unit_wrapper(item, named, names))
            continue
        if isinstance(item, str):
            if item == INPUT:
                specs.append(LayerSpec(INPUT, None, dims))
                continue
            specs.append(LayerSpec(item, _named_module(item, named, names), dims))
        elif isinstance(item, nn.Module):
            if item is model:
                raise LayerNotFoundError(
                    "the model itself was given as a layer; pass one of its submodules "
                    "(its output is what the gates act on) or 'input'"
                )
            found = by_id.get(id(item))
            if not found:
                raise LayerNotFoundError(
                    f"the {type(item).__name__} module passed as a layer is not a submodule of the model; "
                    "pass a module reachable from model.named_modules()"
                )
            if len(found) > 1:
                raise LayerNotFoundError(
                    f"the {type(item).__name__} module is registered under several names ({', '.join(found)}), "
                    "so its units are ambiguous; pass the name instead"
                )
            specs.append(LayerSpec(found[0], item, dims))
        else:
            raise LayerNotFoundError(
                f"layers must be names, modules or 'input', got {type(item).__name__}"
            )
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise LayerNotFoundError(f"layer {s.name!r} is given twice; give each layer once")
        seen.add(s.name)
    return specs


def parse_layer(text: str) -> str | Neurons | Heads:
    """``"neurons:NAME"`` -> :class:`Neurons`, ``"heads:NAME[:H]"`` -> :class:`Heads`, any other name as it is."""
    if text.startswith(NEURONS_PREFIX):
        return Neurons(text[len(NEURONS_PREFIX):])
    if text.startswith(HEADS_PREFIX):
        name, _, count = text[len(HEADS_PREFIX):].partition(":")
        if count and not count.isdigit():
            raise LayerNotFoundError(f"{text!r}: the number of heads after the second ':' must be a whole number")
        return Heads(name, int(count) if count else None)
    return text


def _named_module(name: str, named: dict[str, nn.Module], names: Sequence[str]) -> nn.Module:
    if name not in named or name == "":
        close = close_names(name, names)
        hint = f" Closest names: {', '.join(repr(c) for c in close)}." if close else _listing(names)
        raise LayerNotFoundError(
            f"model has no layer named {name!r}.{hint} "
            "Use a name from model.named_modules(), a module object, or 'input'."
        )
    return named[name]


def _unit_wrapper(item: Neurons | Heads, named: dict[str, nn.Module], names: Sequence[str]) -> LayerSpec:
    """The spec of ``Neurons(name)`` or ``Heads(name, num_heads)``."""
    module = _named_module(item.name, named, names)
    if isinstance(item, Neurons):
        return LayerSpec(item.key, module, path=item.name, last_dim=True)
    heads = item.num_heads
    path = item.name
    if isinstance(module, nn.MultiheadAttention):
        if heads is not None and heads != module.num_heads:
            raise LayerNotFoundError(
                f"Heads({item.name!r}): this nn.MultiheadAttention has {module.num_heads} heads, not {heads}; "
                "leave num_heads out"
            )
        why = mha.check_supported(module, item.name)
        if why is not None:
            raise LayerNotFoundError(why)
        return LayerSpec(item.key, module, path=path, last_dim=True, groups=module.num_heads, attention=True)
    # timm's Attention concatenates its heads, applies ``norm`` (an Identity unless scale_norm) and then ``proj``:
    # gating the output of ``norm`` gates each head's slice before the heads are mixed.
    if heads is None and all(hasattr(module, a) for a in ("num_heads", "norm", "proj", "qkv")):
        heads, path = int(module.num_heads), f"{item.name}.norm"  # type: ignore[arg-type]
        module = module.norm  # type: ignore[assignment]
    if heads is None:
        raise LayerNotFoundError(
            f"Heads({item.name!r}): a {type(module).__name__} is not an attention module coreunits knows "
            "(timm's Attention, nn.MultiheadAttention); give num_heads, with a module whose output's last dim "
            "is the heads side by side"
        )
    if heads < 1:
        raise LayerNotFoundError(f"Heads({item.name!r}): num_heads must be >= 1, got {heads}")
    return LayerSpec(item.key, module, path=path, last_dim=True, groups=heads)


def check_dtype_floating(t: torch.Tensor, what: str) -> None:
    """Raise a clear error when ``t`` is not a floating tensor (gates multiply it)."""
    if not t.is_floating_point():
        raise LayerNotFoundError(
            f"{what} has dtype {t.dtype}; switch gates multiply it, so it must be floating point"
        )
