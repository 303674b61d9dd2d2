"""Cached activations: the model's decisions and prefix activations, computed once.

One pass over the data gives, for every input, the unmasked model's scores
(hence its decisions, which define D'_c for every class) and the frontier
tensors the gated suffix starts from. Selections for every class, run and
coefficient setting then only run the suffix. When the frontier of all the
data would exceed the memory budget, only the inputs are kept and the prefix
is recomputed per batch (slower, same numbers).
"""

from __future__ import annotations

import copy
import itertools
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from coreunits._core.ablation import Ablation, check_ablation
from coreunits._core.engine import GatedModel, OutputFn, slice_frontier
from coreunits._core.errors import DataError, OptionError
from coreunits._core.guard import preserved_model_state
from coreunits._core.io import model_device
from coreunits._core.layers import LayerArg, LayerSpec, resolve_layers
from coreunits._core.progress import progress_bar

__all__ = ["DEFAULT_CACHE_BUDGET", "ActivationCache", "iter_input_batches"]

#: Default memory budget for cached frontier activations (bytes); override with
#: the ``cache_budget`` argument or the ``COREUNITS_CACHE_BUDGET`` variable.
DEFAULT_CACHE_BUDGET = int(os.environ.get("COREUNITS_CACHE_BUDGET", str(2 * 1024**3)))


def _first_tensor(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise DataError(
        f"data yielded a {type(batch).__name__}; coreunits needs batches that are an input tensor "
        "or an (input, label) pair whose first element is the input tensor"
    )


def iter_input_batches(data: Any, batch_size: int) -> Iterator[torch.Tensor]:
    """Input tensors of ``data`` in batches (labels, if any, are dropped).

    ``data`` is a DataLoader (used as it is), a Dataset (read in order), a
    tensor of inputs, or any iterable of batches.
    """
    if isinstance(data, torch.Tensor):
        yield from data.split(batch_size)
        return
    if isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        loader: Iterable[Any] = DataLoader(data, batch_size=batch_size, shuffle=False)
    elif isinstance(data, (DataLoader, Iterable)):
        loader = data
    else:
        raise DataError(
            f"data must be a torch Dataset, DataLoader or tensor of inputs, got {type(data).__name__}"
        )
    for batch in loader:
        yield _first_tensor(batch)


def _fingerprint(model: nn.Module) -> tuple[int, ...]:
    # In-place changes to parameters/buffers bump their version counters.
    return tuple(t._version for t in list(model.parameters()) + list(model.buffers()))


class ActivationCache:
    """The model's decisions and prefix activations over some data, computed once.

    Pass it as ``data`` to :func:`find_core_units` or :func:`holding_rate` to
    reuse one forward pass over the data across classes, runs and coefficient
    settings for the same model and layers.

    Args:
        model: the classifier (left unchanged).
        layers: the layers that will be gated (see :func:`find_core_units`).
        data: Dataset, DataLoader or tensor of inputs.
        batch_size: batch size for the pass over the data.
        output_fn: maps the model's output to ``(N, H)`` scores.
        unit_dim: unit dims override (see :func:`find_core_units`).
        device: where to compute; defaults to the model's device. A model on
            another device is copied there (the user's model is never moved).
        engine: ``"auto"``, ``"fx"`` or ``"hooks"`` (see :class:`GatedModel`).
        cache_budget: bytes of frontier activations to keep; above it the
            prefix is recomputed per batch.
        keep_inputs: keep the inputs too, even when the activations are cached
            (for methods that run the whole model, e.g. captum's attributions).
        progress: show a progress bar.
        ablation: what a masked unit becomes: ``"zero"`` (the paper), ``"mean"`` (its
            mean over this data, per position) or ``"resample"`` (its value on another
            input of this data); see ``coreunits._core.ablation``. Every selection and
            holding rate on this cache uses it.
        ablation_seed: seeds the resample pairing.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerArg | Sequence[LayerArg],
        data: Any,
        *,
        batch_size: int = 256,
        output_fn: OutputFn | None = None,
        unit_dim: int | Sequence[int] | None = None,
        device: str | torch.device | None = None,
        engine: str = "auto",
        cache_budget: int | None = None,
        progress: bool = False,
        keep_inputs: bool = False,
        ablation: str = "zero",
        ablation_seed: int = 0,
    ) -> None:
        self.user_model = model
        target = torch.device(device) if device is not None else model_device(model)
        self.device = target
        # Never move the user's model: work on a copy when another device is asked for.
        self.model = model if model_device(model) == target else copy.deepcopy(model).to(target)
        self.specs: list[LayerSpec] = resolve_layers(self.model, layers, unit_dim)
        self.ablation = Ablation(ablation, self.specs, ablation_seed)
        self.output_fn = output_fn
        self.batch_size = batch_size
        self.budget = DEFAULT_CACHE_BUDGET if cache_budget is None else int(cache_budget)
        self.gated = GatedModel(self.model, self.specs, output_fn, engine)
        self._fingerprint = _fingerprint(model)
        #: Where a faster path was not available, and why ("engine", "incremental:<layer>").
        self.fallbacks: dict[str, str] = {}

        inputs: list[torch.Tensor] = []
        fronts: list[list[torch.Tensor]] = []
        scores: list[torch.Tensor] = []
        keep_front = True
        total = None
        try:
            total = len(data)  # type: ignore[arg-type]
        except TypeError:
            pass
        bar = progress_bar(enabled=progress, total=total, desc="caching activations", unit="input", leave=False)
        batches = (x for x in iter_input_batches(data, batch_size) if x.dim() > 0 and x.shape[0] > 0)
        with bar, preserved_model_state(self.model):
            first = next(batches, None)
            if first is None:
                raise DataError("data is empty: it yielded no inputs; pass a Dataset or DataLoader with inputs")
            self.gated.probe(first.to(self.device))
            if self.gated.fallback_reason is not None:
                self.fallbacks["engine"] = f"forward hooks instead of the fx split: {self.gated.fallback_reason}"
            # A few real inputs, kept for building further splits of the model later.
            self.sample_inputs = first[:64].detach().to(self.device).clone()
            with self.gated.activated(), self.ablation.recording() as record_inputs:
                for x in itertools.chain([first], batches):
                    x = x.to(self.device).detach()
                    record_inputs(x)
                    front = self.gated.prefix(x)
                    with torch.no_grad():
                        s = self.gated.suffix(front, [None] * len(self.specs))
                    if not torch.isfinite(s).all():
                        raise DataError(
                            "the model produced NaN or infinite scores on the data; check the inputs "
                            "(normalisation, NaNs) and the model's weights"
                        )
                    scores.append(s)
                    inputs.append(x)
                    if keep_front and self.gated.engine == "fx":
                        fronts.append([f.detach() for f in front])
                        if total is not None and len(fronts) == 1:
                            per_ex = sum(f[0].numel() * f.element_size() for f in front)
                            keep_front = per_ex * total <= self.budget
                            if not keep_front:
                                fronts = []
                    bar.update(x.shape[0])
        self.ablation.finish(self.budget)
        self.scores = torch.cat(scores)
        self.predictions = self.scores.argmax(dim=1)
        self.num_classes = int(self.scores.shape[1])
        self.frontier: list[torch.Tensor] | None = None
        self.inputs: torch.Tensor | None = torch.cat(inputs)
        if keep_front and fronts:
            self.frontier = [torch.cat(parts) for parts in zip(*fronts)]
            if self.frontier_bytes() > self.budget:
                self.frontier = None
            elif not self._needs_inputs() and not keep_inputs:
                self.inputs = None

    def _needs_inputs(self) -> bool:
        return self.frontier is None

    def __getstate__(self) -> dict[str, Any]:
        # The gated model holds traced graphs that do not unpickle (fx re-traces the gate's control flow):
        # ship the model, the layers and the cached tensors, and split the model again where it lands.
        state = self.__dict__.copy()
        state["gated"] = (self.gated.engine, self.gated.fallback_reason)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        engine, reason = state.pop("gated")
        self.__dict__.update(state)
        self.gated = GatedModel(self.model, self.specs, self.output_fn, engine)
        with preserved_model_state(self.model):
            self.gated.probe(self.sample_inputs)
        self.gated.fallback_reason = reason
        # Version counters start again at 0 in an unpickled model.
        self._fingerprint = _fingerprint(self.user_model)

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @property
    def layer_names(self) -> list[str]:
        """Names of the gated layers."""
        return [s.name for s in self.specs]

    def frontier_bytes(self) -> int:
        """Bytes held by cached frontier activations (0 when not cached)."""
        if self.frontier is None:
            return 0
        return sum(f.numel() * f.element_size() for f in self.frontier)

    def per_example_frontier_bytes(self) -> int:
        """Bytes of frontier activations per input (what caching would cost per input)."""
        if self.frontier is not None:
            return math.ceil(self.frontier_bytes() / len(self))
        assert self.inputs is not None
        with preserved_model_state(self.model):
            front = self.gated.prefix(self.inputs[:1])
        return sum(f.numel() * f.element_size() for f in front)

    @property
    def cached(self) -> bool:
        """Whether the prefix activations are cached (else recomputed per batch)."""
        return self.frontier is not None

    def check_model(self, model: nn.Module) -> None:
        """Raise if ``model`` is not the model (unchanged) this cache was built from."""
        if model is not self.user_model:
            raise DataError("this ActivationCache was built for a different model; build one for this model")
        if _fingerprint(model) != self._fingerprint:
            raise DataError(
                "the model's parameters changed since this ActivationCache was built; build a new one"
            )

    def suffix_scores(self, rows: torch.Tensor, gates: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Scores of the gated model on cache ``rows``, masked units ablated as this cache's ``ablation`` says.

        Run inside ``self.gated.activated()``; the one way every selection and holding rate runs the suffix.
        """
        return self.gated.suffix(self.frontier_rows(rows), gates, self.ablation.rows(rows))

    def require_ablation(self, ablation: str | None) -> None:
        """Raise unless this cache ablates as ``ablation`` asks (None: any)."""
        if ablation is not None and check_ablation(ablation) != self.ablation.mode:
            raise OptionError(
                f"the ActivationCache was built with ablation={self.ablation.mode!r}, not {ablation!r}; "
                f"build one with ActivationCache(..., ablation={ablation!r})"
            )

    def frontier_rows(self, index: torch.Tensor) -> list[torch.Tensor]:
        """Frontier tensors for the given rows (sliced from the cache or recomputed)."""
        if self.frontier is not None:
            return slice_frontier(self.frontier, index)
        assert self.inputs is not None
        return list(self.gated.prefix(self.inputs.index_select(0, index.to(self.inputs.device))))
