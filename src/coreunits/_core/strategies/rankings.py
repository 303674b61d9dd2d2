"""Ranking baselines: score every unit once, keep the top-k.

Each strategy here only orders the units; :class:`RankingStrategy` turns the
order into a set (the smallest top-k reaching the target). They are the usual
attribution baselines the switch-gate selection is compared with:

* :class:`RandomRanking`: random subsets of each size (what chance gives).
* :class:`MeanActivation`: units that fire most on the class are kept first.
* :class:`GradientTimesActivation`: first-order Taylor estimate of how much
  zeroing a unit moves the class-c margin (Molchanov et al., 2017).
* :class:`CaptumConductance`: captum's layer conductance (or gradient x
  activation) on the real model, for a check against an outside implementation.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator

import torch

from coreunits._core.cache import ActivationCache
from coreunits._core.engine import check_scores
from coreunits._core.errors import OptionError
from coreunits._core.guard import preserved_model_state
from coreunits._core.layers import INPUT, LayerSpec
from coreunits._core.objective import decision_margin
from coreunits._core.problem import SelectionProblem
from coreunits._core.strategies.base import RankingStrategy

__all__ = [
    "CaptumConductance",
    "GradientTimesActivation",
    "MeanActivation",
    "RandomRanking",
    "positive_rows",
]

_BATCH = 512


def positive_rows(problem: SelectionProblem) -> torch.Tensor:
    """Cache rows of D'_c's positives (the inputs the model predicts as c)."""
    return problem.rows[problem.labels.cpu() > 0.5]


def _per_unit(t: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """``(N, ...)`` layer output -> ``(N, K, M)``: unit k's M elements in row k.

    Units are numbered as a gate of shape ``spec.unit_shape`` flattened
    row-major (how ``engine.apply_gate`` broadcasts a gate), so the result
    lines up with masks and gates.
    """
    assert spec.unit_dims is not None
    group = spec.group_size
    if group > 1:  # a unit is a block of ``group`` adjacent features of its dim (a head): split the dim
        d = spec.unit_dims[-1]
        if t.dim() > d and t.shape[d] % group == 0:
            t = t.unflatten(d, (t.shape[d] // group, group))
    for d, size in zip(spec.unit_dims, spec.unit_shape):
        if t.dim() <= d or t.shape[d] != size:
            raise ValueError(
                f"tensor of shape {tuple(t.shape)} is not layer {spec.name!r}'s output "
                f"(units of shape {spec.unit_shape} on dims {spec.unit_dims})"
            )
    rest = [d for d in range(1, t.dim()) if d not in spec.unit_dims]
    return t.permute(0, *spec.unit_dims, *rest).reshape(t.shape[0], spec.num_units, -1)


def _layer_outputs(cache: ActivationCache, position: int, rows: torch.Tensor,
                   batch_size: int = _BATCH) -> Iterator[torch.Tensor]:
    """The (ungated) output of gated layer ``position`` on ``rows``, batch by batch.

    Must run inside ``preserved_model_state(cache.model)`` (the prefix or the
    model may be run).

    Raises:
        ValueError: the cache keeps neither that output nor the inputs to recompute it.
    """
    spec = cache.specs[position]
    if cache.gated.engine == "fx" and len(cache.specs) == 1:
        # With one gated layer, that layer is a root of the fx suffix and the split
        # appends the roots last in the frontier: frontier[-1] is its output.
        for chunk in rows.split(batch_size):
            yield cache.frontier_rows(chunk)[-1]
        return
    if cache.inputs is None:
        raise ValueError(
            f"cannot read layer {spec.name!r}'s activations: the cache gates {len(cache.specs)} layers and keeps "
            "no inputs; build an ActivationCache for this layer alone"
        )
    for chunk in rows.split(batch_size):
        x = cache.inputs.index_select(0, chunk.to(cache.inputs.device))
        if spec.name == INPUT:
            yield x
            continue
        yield _capture_output(cache, spec, x)


def _capture_output(cache: ActivationCache, spec: LayerSpec, x: torch.Tensor) -> torch.Tensor:
    """The layer's output when the (ungated) model runs on ``x``, read with a temporary hook."""
    seen: list[torch.Tensor] = []
    # Clone: an in-place op after the layer (ReLU(inplace=True)) would
    # otherwise overwrite the captured output with the next op's result.
    handle = spec.register_output_hook(lambda out: seen.append(out.detach().clone()))
    try:
        cache.model(x.clone())  # clone: a forward may modify its input in place
    finally:
        handle.remove()
    return seen[0]


class RandomRanking(RankingStrategy):
    """A random order of the units: the "random subsets of each size" baseline.

    Args:
        seed: seed of the permutation (its own generator; global RNG untouched).
    """

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def rank(self, problem: SelectionProblem) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randperm(problem.num_units, generator=gen).float()

    def __repr__(self) -> str:
        return f"RandomRanking(seed={self.seed})"


class MeanActivation(RankingStrategy):
    """Mean activation of each unit over D'_c's positives (over its feature map for a channel).

    Units are the gated layer's output slices, so for a layer before its
    ReLU the mean is of the pre-activation, as the user chose the layer.
    """

    name = "mean_activation"

    def rank(self, problem: SelectionProblem) -> torch.Tensor:
        cache, spec = problem.cache, problem.spec
        rows = positive_rows(problem)
        total = torch.zeros(problem.num_units, dtype=torch.float64)
        with preserved_model_state(cache.model), torch.no_grad():
            for out in _layer_outputs(cache, problem.position, rows):
                total += _per_unit(out.float(), spec).mean(dim=2).sum(dim=0).double().cpu()
        return (total / max(rows.numel(), 1)).float()


class GradientTimesActivation(RankingStrategy):
    """First-order Taylor importance of each unit for class c.

    Per unit j, the mean over D'_c's positives of
    ``|sum_{e in unit j} a_e * d m / d a_e|`` with ``m = s_c - max_{i != c} s_i``
    (:func:`~coreunits._core.objective.decision_margin`): the linear estimate of how much zeroing the unit
    moves the margin that decides "is it c?". (Under mean or resample ablation ``a_e`` is the unit's
    difference from its ablation value, as the gate's gradient is: attribution patching.) It is computed as the gradient
    of ``m`` w.r.t. a per-example gate of ones on the layer (at ``g = 1``,
    ``dm/dg_j`` is exactly that sum), so it works wherever the gated model runs,
    and autograd differentiates w.r.t. the gate only: the model's parameters
    get no ``.grad``.

    Args:
        batch_size: rows per backward pass.
    """

    name = "grad_x_activation"

    def __init__(self, batch_size: int = _BATCH) -> None:
        self.batch_size = batch_size

    def rank(self, problem: SelectionProblem) -> torch.Tensor:
        cache = problem.cache
        rows = positive_rows(problem)
        k = problem.num_units
        # inference_mode(False)/enable_grad: callers often wrap interpretation code in no_grad
        # or inference_mode. The accumulator is made inside too: an inference tensor cannot be
        # updated in place outside inference mode.
        with preserved_model_state(cache.model), cache.gated.activated(), torch.inference_mode(False), \
                torch.enable_grad():
            total = torch.zeros(k, dtype=torch.float64)
            for chunk in rows.split(self.batch_size):
                gate = torch.ones(chunk.numel(), k, device=cache.device, requires_grad=True)
                gates: list[torch.Tensor | None] = [None] * len(cache.specs)
                gates[problem.position] = gate
                # Not center_margin (max(s) - s_c): it is 0 with zero gradient wherever c is the argmax.
                margin = decision_margin(cache.suffix_scores(chunk, gates), problem.target_class)
                # Examples are independent (eval mode), so the gradient of the sum
                # gives each example's own gradient in its row of the (B, K) gate.
                (grad,) = torch.autograd.grad(margin.sum(), gate)
                total += grad.abs().sum(dim=0).double().cpu()
        return (total / max(rows.numel(), 1)).float()


class CaptumConductance(RankingStrategy):
    """Captum's layer attribution of class c, per unit, on the real model.

    Per unit, the mean over D'_c's positives of ``|sum over the unit's
    elements of the attribution|`` to the class-c score. Needs ``captum``
    (``pip install captum``) and an :class:`ActivationCache` that keeps the
    inputs (``keep_inputs=True``, ``engine="hooks"`` or ``cache_budget=0``): captum runs the model
    from its inputs.

    Args:
        method: ``"conductance"`` (``LayerConductance``, all-zero input baseline)
            or ``"grad_x_activation"`` (``LayerGradientXActivation``).
        n_steps: integration steps of conductance.
        batch_size: inputs per captum call.
    """

    name = "captum_conductance"

    def __init__(self, method: str = "conductance", n_steps: int = 20, batch_size: int = 64) -> None:
        if method not in ("conductance", "grad_x_activation"):
            raise OptionError(f"method must be 'conductance' or 'grad_x_activation', got {method!r}")
        self.method, self.n_steps, self.batch_size = method, n_steps, batch_size

    def rank(self, problem: SelectionProblem) -> torch.Tensor:
        try:
            # Imported by name: captum ships no type information, and it is an optional extra.
            attr = importlib.import_module("captum.attr")
        except ImportError as err:
            raise ImportError("CaptumConductance needs captum: pip install captum") from err
        LayerConductance, LayerGradientXActivation = attr.LayerConductance, attr.LayerGradientXActivation
        cache, spec = problem.cache, problem.spec
        if spec.module is None:
            raise ValueError("captum's layer attributions need a module; use it on a hidden layer, not 'input'")
        if spec.attention:
            raise ValueError("captum's layer attributions see a module's output, and the heads of an "
                             "nn.MultiheadAttention are not one; use grad_x_activation for them")
        if cache.inputs is None:
            raise ValueError(
                "captum needs the model's inputs, and this ActivationCache keeps only activations; "
                "build it with engine='hooks' or cache_budget=0"
            )
        model, output_fn = cache.model, cache.output_fn

        def forward(x: torch.Tensor) -> torch.Tensor:
            return check_scores(model(x), x.shape[0], output_fn)

        rows = positive_rows(problem)
        with preserved_model_state(model), torch.inference_mode(False), torch.enable_grad():
            total = torch.zeros(problem.num_units, dtype=torch.float64)
            if self.method == "conductance":
                attr = LayerConductance(forward, spec.module)
            else:
                attr = LayerGradientXActivation(forward, spec.module)
            for chunk in rows.split(self.batch_size):
                x = cache.inputs.index_select(0, chunk.to(cache.inputs.device)).clone()
                kwargs = {"n_steps": self.n_steps} if self.method == "conductance" else {}
                a = attr.attribute(x, target=problem.target_class, **kwargs)
                total += _per_unit(a.detach().float(), spec).sum(dim=2).abs().sum(dim=0).double().cpu()
        return (total / max(rows.numel(), 1)).float()

    def __repr__(self) -> str:
        return f"CaptumConductance(method={self.method!r}, n_steps={self.n_steps})"
