"""Leaving the user's model exactly as it was.

Selection runs the model in eval mode and adds hooks for a while. This guard
records every module's training flag and hook tables on entry and restores
them on exit, whether the body returned, raised, or was interrupted
(``KeyboardInterrupt`` runs ``finally`` too). Parameters, buffers and
``requires_grad`` are never written to by coreunits: gradients are taken with
``torch.autograd.grad`` w.r.t. the gates only, so nothing accumulates in
``param.grad`` either.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["preserved_model_state"]

_HOOK_TABLES = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


@contextmanager
def preserved_model_state(model: nn.Module, eval_mode: bool = True) -> Iterator[nn.Module]:
    """Run a block with ``model`` in eval mode and restore its modes and hooks after.

    Args:
        model: the user's model.
        eval_mode: put the model in eval mode for the block (no dropout, BatchNorm
            uses running statistics and does not update them).

    Yields:
        The same model.
    """
    modules = list(model.modules())
    training = [m.training for m in modules]
    hooks = [
        {t: set(getattr(m, t).keys()) for t in _HOOK_TABLES if isinstance(getattr(m, t, None), dict)}
        for m in modules
    ]
    try:
        if eval_mode:
            model.eval()
        yield model
    finally:
        for m, flag, tables in zip(modules, training, hooks):
            m.training = flag
            # Our hooks are removed through their handles; this only catches a
            # hook that a failure left behind, never one the user registered.
            for t, keys in tables.items():
                table = getattr(m, t)
                for k in [k for k in table if k not in keys]:
                    del table[k]
