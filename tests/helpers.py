"""Helpers shared by the tests (imported as ``helpers``: pytest puts tests/ on the path, see pyproject)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

__all__ = ["REPO", "SHARED_DATA", "assert_same_state", "model_state", "shared_data_or_skip"]

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


def shared_data_or_skip() -> Path:
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"MNIST not found at {SHARED_DATA}/MNIST/raw")
    return SHARED_DATA
