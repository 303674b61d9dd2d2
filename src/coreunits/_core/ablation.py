"""What a masked unit becomes: zero (the paper), its mean over the data, or its value on another input.

A gate ``g`` in [0, 1] turns a layer's output ``x`` into ``x * g + a * (1 - g)``,
where ``a`` is the ablation value of that output:

* ``"zero"``: ``a = 0``, the paper's switch gates (and the only choice before);
* ``"mean"``: ``a`` is the output's mean over every input of the data, per
  position (spatial position, token), as mean-ablation in circuit discovery;
* ``"resample"``: ``a`` is the output on another input of the data, drawn once
  per input (a seeded permutation without fixed points): resample ablation, or
  activation patching from a random other input.

The values come from the clean (unmasked) model on the data the cache is built
on: a holding rate measured on held-out data uses that data's mean and pairs.
Circuit-discovery results swing with this choice (ACDC reports an edge AUC of
0.883 under random ablation and 0.276 under zero ablation on one task), so
every result records the ablation it was found with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from coreunits._core.errors import DataError, OptionError
from coreunits._core.layers import INPUT, LayerSpec

__all__ = ["ABLATIONS", "Ablation", "check_ablation"]

#: The ablations a masked unit can get.
ABLATIONS = ("zero", "mean", "resample")


def check_ablation(ablation: str) -> str:
    """``ablation`` if it is one of :data:`ABLATIONS`, else an :class:`OptionError` naming them."""
    if ablation not in ABLATIONS:
        raise OptionError(f"ablation must be one of {', '.join(repr(a) for a in ABLATIONS)}, got {ablation!r}")
    return ablation


class Ablation:
    """The ablation values of every gated layer of a cache, recorded in its one pass over the data.

    Args:
        mode: one of :data:`ABLATIONS`.
        specs: the gated layers.
        seed: seeds the resample pairing.
    """

    def __init__(self, mode: str, specs: Sequence[LayerSpec], seed: int = 0) -> None:
        self.mode = check_ablation(mode)
        self.specs = list(specs)
        self.seed = seed
        self._sums: list[torch.Tensor | None] = [None] * len(self.specs)
        self._parts: list[list[torch.Tensor]] = [[] for _ in self.specs]
        self.count = 0
        #: Per layer: the mean (1, ...) for "mean", every input's output (N, ...) for "resample".
        self.values: list[torch.Tensor] = []
        #: Resample: the input whose value each input receives.
        self.partner: torch.Tensor | None = None

    @property
    def zero(self) -> bool:
        return self.mode == "zero"

    @contextmanager
    def recording(self) -> Iterator[Callable[[torch.Tensor], None]]:
        """Hooks that record each gated layer's clean output while the block runs the data through the model.

        Yields a function to call with each batch of inputs (the input layer is
        recorded from it, not from a hook).
        """
        if self.zero:
            yield lambda _x: None
            return
        handles = []

        def recorder(i: int) -> Callable[[torch.Tensor], None]:
            def hook(out: torch.Tensor) -> None:
                self._observe(i, out)

            return hook

        def on_inputs(x: torch.Tensor) -> None:
            for i, spec in enumerate(self.specs):
                if spec.name == INPUT:
                    self._observe(i, x)
            self.count += x.shape[0]

        try:
            for i, spec in enumerate(self.specs):
                if spec.name != INPUT:
                    handles.append(spec.register_output_hook(recorder(i)))
            yield on_inputs
        finally:
            for h in handles:
                h.remove()

    def _observe(self, i: int, out: torch.Tensor) -> None:
        out = out.detach()
        if self.mode == "mean":
            s = out.double().sum(dim=0, keepdim=True)
            prev = self._sums[i]
            self._sums[i] = s if prev is None else prev + s
        else:
            self._parts[i].append(out.clone())

    def finish(self, budget: int) -> None:
        """Turn what was recorded into the ablation values (resample: within ``budget`` bytes)."""
        if self.zero:
            return
        if self.mode == "mean":
            assert all(s is not None for s in self._sums)  # every gated layer runs once per forward
            self.values = [s.div(self.count).float() for s in self._sums if s is not None]
            self._sums = []
            return
        size = sum(p.numel() * p.element_size() for parts in self._parts for p in parts)
        if size > budget:
            raise DataError(
                f"resample ablation keeps every input's output of the gated layers ({size / 2**30:.2f} GiB), "
                f"more than the cache budget ({budget / 2**30:.2f} GiB); raise cache_budget or use fewer inputs"
            )
        n = self.count
        if n < 2:
            raise DataError("resample ablation needs at least 2 inputs, to take each unit's value from another one")
        self.values = [torch.cat(parts) for parts in self._parts]
        self._parts = []
        gen = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(n, generator=gen)
        # No input is its own partner: swap each fixed point with its neighbour.
        for i in (perm == torch.arange(n)).nonzero().flatten().tolist():
            if perm[i] == i:
                j = (i + 1) % n
                perm[i], perm[j] = perm[j].clone(), perm[i].clone()
        self.partner = perm

    def rows(self, rows: torch.Tensor) -> list[torch.Tensor | None]:
        """The ablation value of each gated layer for cache rows ``rows`` (None: zero)."""
        if self.zero:
            return [None] * len(self.specs)
        if self.mode == "mean":
            return list(self.values)
        assert self.partner is not None
        index = self.partner[rows.cpu()]
        return [v.index_select(0, index.to(v.device)) for v in self.values]
