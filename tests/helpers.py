"""Helpers shared by the tests (imported as ``helpers``: pytest puts tests/ on the path, see pyproject)."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from coreunits import mask_units

__all__ = [
    "REPO",
    "SHARED_DATA",
    "Snapshot",
    "assert_same_state",
    "assert_untouched",
    "direct_strict_rate",
    "load_script",
    "model_state",
    "predicted",
    "shared_data_or_skip",
    "snapshot",
    "state_bytes",
]

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def model_state(model: nn.Module) -> dict[str, Any]:
    """Everything coreunits promises to leave unchanged, in comparable form."""
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "buffers": {k: v.detach().clone() for k, v in model.named_buffers()},
        "requires_grad": {k: v.requires_grad for k, v in model.named_parameters()},
        "grads": {k: None if v.grad is None else v.grad.clone() for k, v in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "hooks": {
            k: {t: list(getattr(m, t).keys()) for t in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")}
            for k, m in model.named_modules()
        },
    }


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    for part in ("requires_grad", "training", "hooks"):
        assert before[part] == after[part], part
    for part in ("params", "buffers"):
        assert before[part].keys() == after[part].keys()
        for k in before[part]:
            assert torch.equal(before[part][k], after[part][k]), f"{part} {k} changed"
    for k, g in before["grads"].items():
        h = after["grads"][k]
        assert (g is None and h is None) or (g is not None and h is not None and torch.equal(g, h)), f"grad {k}"


Snapshot = tuple[dict[str, Any], bytes, dict[str, torch.dtype]]


def state_bytes(model: nn.Module) -> bytes:
    """The serialised state dict: equal bytes = parameters and buffers bit-identical."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


def snapshot(model: nn.Module) -> Snapshot:
    """:func:`model_state`, the serialised state dict and its dtypes, for :func:`assert_untouched`."""
    return model_state(model), state_bytes(model), {k: v.dtype for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, snap: Snapshot) -> None:
    """The model is as :func:`snapshot` saw it: values, dtypes, modes, hooks, grads, bytes."""
    before, raw, dtypes = snap
    assert_same_state(before, model_state(model))
    assert {k: v.dtype for k, v in model.state_dict().items()} == dtypes
    assert state_bytes(model) == raw, "serialised state dict changed"


def predicted(model: nn.Module, x: torch.Tensor, output_fn: Callable[[Any], torch.Tensor] | None = None) -> torch.Tensor:
    """The model's eval-mode class decisions on ``x`` (its training flag is restored)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        model.train(was)
    return (output_fn(out) if output_fn else out).argmax(1)


def direct_strict_rate(
    model: nn.Module, masks: dict[str, torch.Tensor], c: int, x: torch.Tensor,
    unit_dim: int | Sequence[int] | None = None,
) -> float:
    """Strict holding rate on all of ``x``, computed by masking the real modules with hooks."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            orig = model(x).argmax(1) == c
            with mask_units(model, masks, unit_dim=unit_dim):
                new = model(x).argmax(1) == c
    finally:
        model.train(was)
    return float((orig == new).float().mean())


def shared_data_or_skip() -> Path:
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"MNIST not found at {SHARED_DATA}/MNIST/raw")
    return SHARED_DATA


def load_script(name: str):  # type: ignore[no-untyped-def]
    """A file of scripts/ imported as a module (scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def signed_tokens(n: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """``(n, tokens, 2)`` inputs whose class is the sign of feature 0 (feature 1 is noise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, tokens, 2, generator=g)
    sign = torch.where(torch.rand(n, 1, generator=g) < 0.5, -1.0, 1.0)
    x[..., 0] = sign * (1.0 + 0.1 * x[..., 0].abs())
    return x


def plant_carrier_head(net: nn.Module, qkv_weight: torch.Tensor, proj_weight: torch.Tensor, heads: int,
                       carrier: int, noise: float) -> None:
    """Zero ``net`` (embed -> attention -> fc -> act -> out on signed_tokens) so that only head ``carrier`` sees the class.

    Head ``carrier``'s values are input feature 0 (the class), every other head's ``noise`` x feature 1;
    queries and keys stay 0, so attention is uniform; ``qkv_weight`` is laid out [q; k; v].
    """
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.embed.weight[0, 0] = 1.0  # embedding dim 0: the signal
        net.embed.weight[1, 1] = 1.0  # embedding dim 1: noise
        dim = proj_weight.shape[0]
        hd = dim // heads
        values = qkv_weight[2 * dim:]
        for h in range(heads):
            values[h * hd, 0 if h == carrier else 1] = 1.0 if h == carrier else noise
        proj_weight.copy_(torch.eye(dim))
        net.fc.weight[0] = 1.0  # the sum of all heads' first features, and its negation
        net.fc.weight[1] = -1.0
        net.out.weight[1, 0], net.out.weight[1, 1] = 1.0, -1.0
        net.out.weight[0, 0], net.out.weight[0, 1] = -1.0, 1.0
