"""Resolving the layers a user names into gateable units.

A *layer* is given as a dotted name from ``model.named_modules()``, the module
object itself, or the string ``"input"``. A *unit* is a slice of that layer's
output along its unit dimensions: a channel (dim 1) of a 4-D ``(N, C, H, W)``
output, a feature (last dim) of a 2-D output, and, for ``"input"``, one
position of the input (every spatial position of an image, shared across its
channels, or every feature of a flat input).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from coreunits._core.errors import LayerNotFoundError

__all__ = ["INPUT", "LayerArg", "LayerSpec", "close_names", "default_unit_dims", "resolve_layers"]

INPUT = "input"

LayerArg = str | nn.Module


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
    """

    name: str
    module: nn.Module | None
    unit_dims: tuple[int, ...] | None = None
    unit_shape: tuple[int, ...] = ()
    output_ndim: int = 0

    @property
    def num_units(self) -> int:
        """Number of gates (units) of this layer."""
        return math.prod(self.unit_shape) if self.unit_shape else 0

    def bind(self, output_shape: Sequence[int]) -> None:
        """Fix the unit layout from one observed output shape ``(N, ...)``."""
        ndim = len(output_shape)
        if ndim < 2:
            raise LayerNotFoundError(
                f"layer {self.name!r} outputs a tensor of shape {tuple(output_shape)}; "
                "coreunits needs a batch dimension plus at least one unit dimension"
            )
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
    items: list[LayerArg] = [layers] if isinstance(layers, (str, nn.Module)) else list(layers)
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
            if item == INPUT:
                specs.append(LayerSpec(INPUT, None, dims))
                continue
            if item not in named or item == "":
                close = close_names(item, names)
                hint = f" Closest names: {', '.join(repr(c) for c in close)}." if close else _listing(names)
                raise LayerNotFoundError(
                    f"model has no layer named {item!r}.{hint} "
                    "Use a name from model.named_modules(), a module object, or 'input'."
                )
            specs.append(LayerSpec(item, named[item], dims))
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


def check_dtype_floating(t: torch.Tensor, what: str) -> None:
    """Raise a clear error when ``t`` is not a floating tensor (gates multiply it)."""
    if not t.is_floating_point():
        raise LayerNotFoundError(
            f"{what} has dtype {t.dtype}; switch gates multiply it, so it must be floating point"
        )
