"""Finding core units: the paper's binary optimisation with switch gates.

Pipeline: data -> :class:`ActivationCache` (decisions + prefix activations,
once) -> D'_c -> switch gates optimised on the IBP-MAP objective -> rounded
masks -> holding rates on D'_c.

Where this departs from the paper's text, and why (each measured):

* Gates are sampled from the relaxed Bernoulli (concrete) distribution with
  probability ``b = sigmoid(w x)`` during optimisation instead of used as
  deterministic soft values: deterministic soft gates collapse to 0 under the
  std-normalised center classifier (see :class:`SwitchGate`).
* ``lambda`` is ramped in, counted in optimisation steps: on from the first
  step it freezes every gate near 1; ramped over "half the epochs" on small
  data it arrives after a handful of steps and does the same. A minimum
  number of steps (``min_steps``) keeps small D'_c from ending too early.
* ``w_b`` is learned with the gates, then refitted on the hard mask (a 1-D
  search on the same squared error) for the paper's holding rate: the value
  learned beside noisy gates is miscalibrated for the rounded mask.
* The objective is divided by |D'_c|, so ``alpha`` and ``lam`` are
  independent of the data size (paper's alpha = ``alpha * |D'_c|``).
* With a positives-only D'_c (the paper's input-layer setting) ``w_b`` is kept
  fixed: with no negatives, learning it drives it to 0 and every y_hat to 1.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import torch
from torch import nn

from coreunits._core.ablation import check_ablation
from coreunits._core.cache import ActivationCache
from coreunits._core.dprime import DPrime, build_dprime, check_class
from coreunits._core.engine import OutputFn
from coreunits._core.errors import DataError, OptionError
from coreunits._core.evaluation import evaluate_gates
from coreunits._core.gates import HardConcreteGate, SwitchGate
from coreunits._core.guard import preserved_model_state
from coreunits._core.layers import LayerArg, LayerSpec, resolve_layers
from coreunits._core.objective import center_margin, center_score, selection_loss
from coreunits._core.progress import progress_bar
from coreunits._core.result import CoreUnits
from coreunits._core.target import (
    DROP_ORDERS,
    LOOSER_POOLS,
    POOL_COST_SHARE,
    Judge,
    Refinement,
    eliminate_from_pool,
    elimination_steps,
    every_subset_few,
    mask_judge,
    prefer_add_back,
    refine_mask,
    smallest_set,
)

__all__ = ["DEFAULTS", "SelectionConfig", "find_core_units"]

_PROBE_ROWS = 2048
_RELAXATIONS = ("switch", "hard_concrete")
_READINGS = ("strict", "paper")
#: Target mode divides alpha (and lam) by this after a run that misses the target.
_ALPHA_STEP = 3.0

AlphaArg = float | Mapping[str, float]

_P = ParamSpec("_P")
_R = TypeVar("_R")


@dataclass(frozen=True)
class SelectionConfig:
    """Every setting of a selection, in one place: its defaults, its checks, and what a result records.

    The coefficient defaults were chosen on MNIST (see README "Method notes").
    :func:`find_core_units` takes these as keyword arguments or as one
    ``config``; the result's ``settings`` holds them as they were used.

    Attributes:
        alpha: cost of one unit (paper's alpha divided by |D'_c|); a dict prices each layer.
        lam: weight of the relaxation penalty phi (ramped in over the second half).
        epochs: passes over D'_c (at least ``min_steps`` steps are taken).
        batch_size: mini-batch size.
        lr: Adam learning rate for the gate parameters and ``w_b``.
        temperature: temperature of the concrete gate noise.
        gate_slope: the fixed ``w > 0`` in ``b = sigmoid(w x)``.
        init_gate: initial ``b`` of every gate.
        w_b_init: initial center-classifier weight ``w_b``.
        min_steps: minimum number of optimisation steps.
        patience: steps the rounded mask must stay unchanged (second half) to stop early.
        positives_only: D'_c from positives only (the paper's input-layer setting).
        relaxation: ``"switch"`` (the paper's gates + phi) or ``"hard_concrete"`` (L0 gates).
        target_holding_rate: target mode's holding rate on D'_c (None: plain selection).
        reading: the reading the target is judged in, ``"strict"`` or ``"paper"``.
        calibration_runs: most optimisations target mode runs.
        drop_order: how target mode drops units, ``"least_harm"`` or ``"gate"``.
        ablation: what a masked unit becomes, ``"zero"``, ``"mean"`` or ``"resample"``
            (see ``_core.ablation``); None: the cache's (zero when built here).
    """

    alpha: AlphaArg = 2e-3
    lam: float = 1e-2
    epochs: int = 2
    batch_size: int = 128
    lr: float = 0.1
    temperature: float = 0.5
    gate_slope: float = 1.0
    init_gate: float = 0.95
    w_b_init: float = 1.0
    min_steps: int = 150
    patience: int = 25
    positives_only: bool = False
    relaxation: str = "switch"
    target_holding_rate: float | None = None
    reading: str = "strict"
    calibration_runs: int = 4
    drop_order: str = "least_harm"
    ablation: str | None = None

    def check(self) -> SelectionConfig:
        """Raise :class:`OptionError` (one line: the problem and the fix) for a bad setting; return self."""
        alphas = list(self.alpha.values()) if isinstance(self.alpha, Mapping) else [self.alpha]
        if self.lam < 0 or any(a < 0 for a in alphas):
            raise OptionError(f"alpha and lam must be >= 0, got alpha={self.alpha}, lam={self.lam}")
        if self.batch_size < 1 or self.epochs < 0:
            raise OptionError(f"batch_size must be >= 1 and epochs >= 0, got {self.batch_size} and {self.epochs}")
        _check_choice("relaxation", self.relaxation, _RELAXATIONS)
        _check_choice("reading", self.reading, _READINGS)
        _check_choice("drop_order", self.drop_order, DROP_ORDERS)
        if self.ablation is not None:
            check_ablation(self.ablation)
        t = self.target_holding_rate
        if t is not None and not 0.0 < t <= 1.0:
            raise OptionError(f"target_holding_rate must be in (0, 1], got {t}; e.g. 0.995")
        if self.calibration_runs < 1:
            raise OptionError(f"calibration_runs must be >= 1, got {self.calibration_runs}")
        return self

    def with_options(self, **options: Any) -> SelectionConfig:
        """A copy with ``options`` replaced; an unknown name is a TypeError naming the closest setting."""
        known = [f.name for f in dataclasses.fields(self)]
        for name in options:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; settings: {', '.join(known)}"
                raise TypeError(f"find_core_units() got an unexpected keyword argument {name!r}{hint}")
        return dataclasses.replace(self, **options)

    def settings(self) -> dict[str, Any]:
        """The settings a result records (alpha as a plain float or dict)."""
        out = dataclasses.asdict(self)
        out["alpha"] = dict(self.alpha) if isinstance(self.alpha, Mapping) else self.alpha
        return out


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise OptionError(f"{name} must be one of {tuple(choices)}, got {value!r}")


#: The default coefficients and schedule, as a dict (what a reproduction's fingerprint records).
DEFAULTS: dict[str, Any] = {
    k: getattr(SelectionConfig(), k)
    for k in ("alpha", "lam", "epochs", "batch_size", "lr", "temperature", "gate_slope", "init_gate", "w_b_init",
              "min_steps", "patience")
}


def _lambda_ramp(step: int, total: int) -> float:
    """0 for the first half of the steps, then linear to 1 at three quarters."""
    start, length = 0.5 * total, max(1.0, 0.25 * total)
    return min(1.0, max(0.0, (step - start) / length))


def _as_cache(
    model: nn.Module,
    layers: LayerArg | Sequence[LayerArg],
    data: Any,
    batch_size: int,
    output_fn: OutputFn | None,
    unit_dim: int | Sequence[int] | None,
    device: str | torch.device | None,
    engine: str,
    progress: bool,
    ablation: str | None,
) -> ActivationCache:
    if isinstance(data, ActivationCache):
        data.check_model(model)
        data.require_ablation(ablation)
        wanted = [s.name for s in resolve_layers(data.model, layers, unit_dim)]
        if wanted != data.layer_names:
            raise DataError(
                f"the ActivationCache was built for layers {data.layer_names}, not {wanted}; "
                "build one for these layers"
            )
        return data
    return ActivationCache(
        model, layers, data, batch_size=max(batch_size, 256), output_fn=output_fn,
        unit_dim=unit_dim, device=device, engine=engine, progress=progress, ablation=ablation or "zero",
    )


def _grad_enabled(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    # The gates are optimised by autograd even when the caller runs under
    # torch.no_grad() or torch.inference_mode() (common around interpretation code).
    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with torch.inference_mode(False), torch.enable_grad():
            return fn(*args, **kwargs)

    return wrapper


@_grad_enabled
def find_core_units(
    model: nn.Module,
    layers: LayerArg | Sequence[LayerArg],
    target_class: int,
    data: Any,
    config: SelectionConfig | None = None,
    *,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    output_fn: OutputFn | None = None,
    unit_dim: int | Sequence[int] | None = None,
    engine: str = "auto",
    **options: Any,
) -> CoreUnits:
    """Find the core units of ``model`` for ``target_class`` in ``layers``.

    Builds D'_c (every input the model predicts as c, plus as many drawn from
    the rest), attaches a switch gate ``b = sigmoid(w x)`` to every unit of the
    layers, minimises the paper's objective (squared error of the center-based
    binary classifier + ``alpha * sum b`` + ``lam * sum phi(b)``, all divided by
    |D'_c|) by Adam, and rounds the gates at 0.5.

    Args:
        model: a trained classifier returning ``(N, H)`` scores (or use ``output_fn``).
            It is left exactly as it was: parameters, ``requires_grad``, modes, hooks.
        layers: a dotted module name (``"features.3"``), a module of ``model``,
            ``"input"``, or a list of these (selected simultaneously).
        target_class: class c, an index into the scores.
        data: Dataset or DataLoader of inputs or (input, label) pairs (labels
            are ignored: decisions come from the model), a tensor of inputs, or
            an :class:`ActivationCache` built for these layers (fastest when
            selecting many classes/runs).
        config: the selection's settings (:class:`SelectionConfig`; default its defaults).
        seed: seeds D'_c's negatives, its permutation and the gate noise.
        device: where to compute (defaults to the model's device).
        progress: show a progress bar (only when stderr is a terminal).
        output_fn: maps the model's output to ``(N, H)`` scores.
        unit_dim: output dim(s) one gate covers (default: channels of 4-D
            outputs, features of 2-D ones, positions of the input).
        engine: ``"auto"`` (cached prefix via torch.fx, hooks if untraceable, logged),
            ``"fx"`` or ``"hooks"`` (full forward per step).
        **options: any :class:`SelectionConfig` field, replacing ``config``'s:
            ``alpha`` (cost of one unit: the share of D'_c's squared error a unit
            must remove to be kept; a dict ``{layer: alpha}`` prices each layer),
            ``lam``, ``epochs``, ``batch_size``, ``lr``, ``temperature``,
            ``gate_slope``, ``init_gate``, ``w_b_init``, ``min_steps``, ``patience``,
            ``positives_only`` (the paper's input-layer setting; ``w_b`` then stays
            fixed), ``relaxation`` (``"switch"`` or ``"hard_concrete"``: L0 gates
            of Louizos et al. 2018, no phi), ``ablation`` (what a masked unit becomes:
            ``"zero"``, the paper's, ``"mean"`` over the data or ``"resample"`` from another
            input; recorded in ``settings["ablation"]``). Target mode: ``target_holding_rate``
            finds the smallest unit set whose hard-mask holding rate on D'_c (in
            ``reading`` "strict" or "paper") reaches it: alpha is lowered over at
            most ``calibration_runs`` optimisations while the rounded mask misses by
            much, then the mask is refined (add back while missed, then drop in
            ``drop_order`` "least_harm" or "gate" while it holds); before/after
            figures are in ``settings["target"]`` (see ``coreunits._core.target``).

    Returns:
        A :class:`CoreUnits` with units, gates, masks and both holding rates on D'_c;
        ``settings`` records the config, the engine and every fallback with its reason.

    Raises:
        OptionError: a setting out of range or unknown (checked before any data is read).
        LayerNotFoundError: unknown layer (closest names listed), or one that never runs.
        DataError: empty data, class out of range, no input predicted as the class.
        ModelOutputError: the model's output is not ``(N, classes)`` scores.
    """
    t0 = time.perf_counter()
    cfg = (config or SelectionConfig()).with_options(**options).check()
    cache = _as_cache(model, layers, data, cfg.batch_size, output_fn, unit_dim, device, engine, progress,
                      cfg.ablation)
    target_class = check_class(target_class, cache.num_classes)
    if cfg.target_holding_rate is not None:
        return _find_for_target(cache, target_class, cfg, seed, progress, t0)
    return _select(cache, target_class, cfg, seed, progress, t0)


#: How many selections sweep and reproduce optimise together (``find_core_units_batched``); a run
#: stopped mid-batch redoes at most this many.
BATCH_SELECTIONS = 10


@_grad_enabled
def find_core_units_batched(
    model: nn.Module,
    layers: LayerArg | Sequence[LayerArg],
    selections: Sequence[tuple[int, int]],
    data: Any,
    config: SelectionConfig | None = None,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    output_fn: OutputFn | None = None,
    unit_dim: int | Sequence[int] | None = None,
    engine: str = "auto",
    **options: Any,
) -> list[CoreUnits]:
    """Several fixed-coefficient selections at once: one result per ``(target_class, seed)`` in ``selections``.

    The gate sets are optimised in lock step over one cached activation tensor: each
    step runs every set's batch of its own D'_c through the suffix in one pass, while
    each set keeps its generators, optimiser and stopping rule. So each result is the
    one :func:`find_core_units` gives for that class and seed, up to the rounding of
    a larger matrix product (see ``benchmarks/batched.py`` for how often the units
    differ, and the speed). ``seconds`` is the batch's wall time divided by its size;
    ``settings["batched"]`` records the size. Arguments as :func:`find_core_units`;
    target mode (``target_holding_rate``) refines each set alone and is refused here.
    """
    t0 = time.perf_counter()
    cfg = (config or SelectionConfig()).with_options(**options).check()
    if cfg.target_holding_rate is not None:
        raise OptionError("find_core_units_batched runs fixed-coefficient selections; target mode refines each "
                          "set alone: call find_core_units per class for target_holding_rate")
    if not selections:
        raise OptionError("no selections given; pass [(target_class, seed), ...]")
    cache = _as_cache(model, layers, data, cfg.batch_size, output_fn, unit_dim, device, engine, progress,
                      cfg.ablation)
    jobs = [(check_class(int(c), cache.num_classes), int(seed)) for c, seed in selections]
    runs = [(c, _build_gates(cache, c, cfg, seed)) for c, seed in jobs]
    _optimise_together(cache, runs, progress)
    results = [_result(cache, c, run, seed, t0) for (c, run), (_, seed) in zip(runs, jobs)]
    share = (time.perf_counter() - t0) / len(results)
    for r in results:
        r.seconds = share
        r.settings["batched"] = len(results)
    return results


@dataclass
class _Optimisation:
    """The state of one gate optimisation: D'_c, the gates, ``w_b`` and the optimiser."""

    cfg: SelectionConfig
    dprime: DPrime
    gates: list[SwitchGate | HardConcreteGate]
    log_wb: torch.Tensor
    params: list[torch.Tensor]
    alpha: float | torch.Tensor
    total_steps: int
    index_gen: torch.Generator
    noise_gen: torch.Generator
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def w_b(self) -> float:
        return float(self.log_wb.detach().exp())

    def hard(self) -> list[torch.Tensor]:
        return [g.hard() for g in self.gates]


def _alpha_vector(alpha: AlphaArg, specs: Sequence[LayerSpec], dev: torch.device) -> float | torch.Tensor:
    """alpha as one float, or one entry per unit for a per-layer dict (which must name exactly the layers)."""
    if not isinstance(alpha, Mapping):
        return float(alpha)
    names = [s.name for s in specs]
    if set(alpha) != set(names):
        raise OptionError(f"alpha dict must give exactly the layers {names}, got {list(alpha)}")
    return torch.cat([torch.full((s.num_units,), float(alpha[s.name]), device=dev) for s in specs])


def _build_gates(cache: ActivationCache, target_class: int, cfg: SelectionConfig, seed: int) -> _Optimisation:
    """D'_c, one gate per unit, ``w_b`` and Adam, seeded (the order of the draws fixes the result)."""
    dev = cache.device
    index_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator(device=dev).manual_seed(seed + 1)
    dprime = build_dprime(cache.predictions, target_class, generator=index_gen, positives_only=cfg.positives_only)
    steps_per_epoch = math.ceil(len(dprime) / cfg.batch_size)
    alpha = _alpha_vector(cfg.alpha, cache.specs, dev)
    gates: list[SwitchGate | HardConcreteGate]
    if cfg.relaxation == "switch":
        gates = [SwitchGate(s.num_units, cfg.gate_slope, cfg.init_gate).to(dev) for s in cache.specs]
    else:  # hard concrete gates are pushed to 0/1 by their own stretch: no phi penalty
        gates = [HardConcreteGate(s.num_units, cfg.init_gate).to(dev) for s in cache.specs]
        cfg = dataclasses.replace(cfg, lam=0.0)
    learn_wb = dprime.num_negative > 0
    log_wb = torch.tensor(math.log(cfg.w_b_init), device=dev, requires_grad=learn_wb)
    params = [g.x for g in gates] + ([log_wb] if learn_wb else [])
    return _Optimisation(cfg, dprime, gates, log_wb, params, alpha, max(cfg.epochs * steps_per_epoch, cfg.min_steps),
                         index_gen, noise_gen)


@dataclass
class _Stepping:
    """One optimisation's place in the loop: its optimiser, batch order, epoch sums and stopping state."""

    target_class: int
    run: _Optimisation
    opt: torch.optim.Optimizer
    labels: torch.Tensor
    probe_rows: torch.Tensor
    perm: torch.Tensor
    last_mask: torch.Tensor
    step: int = 0
    stable: int = 0
    epoch_loss: float = 0.0
    epoch_sq: float = 0.0
    epoch_n: int = 0
    done: bool = False

    @classmethod
    def start(cls, cache: ActivationCache, target_class: int, run: _Optimisation) -> _Stepping:
        n = len(run.dprime)
        return cls(target_class, run, torch.optim.Adam(run.params, lr=run.cfg.lr),
                   run.dprime.labels.to(cache.device), run.dprime.index[: min(n, _PROBE_ROWS)],
                   torch.randperm(n, generator=run.index_gen), torch.cat(run.hard()))

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.run.dprime) / self.run.cfg.batch_size)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """This step's positions in D'_c, their cache rows and their sampled gates (the runs' own generators)."""
        run, k = self.run, self.step % self.steps_per_epoch
        if k == 0 and self.step > 0:
            self.perm = torch.randperm(len(run.dprime), generator=run.index_gen)
        batch = self.perm[k * run.cfg.batch_size : (k + 1) * run.cfg.batch_size]
        idx = run.dprime.index.index_select(0, batch)
        return batch, idx, [g.sample(idx.numel(), run.cfg.temperature, run.noise_gen) for g in run.gates]


def _optimise(cache: ActivationCache, target_class: int, run: _Optimisation, progress: bool) -> None:
    """Adam on the objective until ``total_steps`` or settled; one history record per epoch."""
    _optimise_together(cache, [(target_class, run)], progress)


def _optimise_together(cache: ActivationCache, jobs: Sequence[tuple[int, _Optimisation]], progress: bool) -> None:
    """Optimise several gate sets in lock step: each step runs all their batches through the suffix at once.

    Each set keeps its own D'_c, generators, optimiser and stopping rule, so it takes
    the steps it would take alone; only the suffix passes are shared (one launch for
    S batches: what pays where a step is overhead, not arithmetic). With one job this
    is the plain optimisation.
    """
    states = [_Stepping.start(cache, c, run) for c, run in jobs]
    desc = f"class {jobs[0][0]}" if len(jobs) == 1 else f"{len(jobs)} selections"
    bar = progress_bar(enabled=progress, total=sum(run.total_steps for _, run in jobs), desc=desc, unit="step",
                       leave=False)
    with bar, preserved_model_state(cache.model), cache.gated.activated():
        while live := [st for st in states if not st.done]:
            batches = [st.batch() for st in live]
            rows = torch.cat([idx for _, idx, _ in batches]) if len(batches) > 1 else batches[0][1]
            gates = [torch.cat(layer) if len(batches) > 1 else layer[0]
                     for layer in zip(*(sampled for _, _, sampled in batches))]
            all_scores = cache.suffix_scores(rows, gates).split([idx.numel() for _, idx, _ in batches])
            losses = []
            for st, (batch, idx, _), scores in zip(live, batches, all_scores):
                run = st.run
                y_hat = center_score(center_margin(scores, st.target_class), run.log_wb.exp())
                probs = torch.cat([g.probs() for g in run.gates])
                lam_t = run.cfg.lam * _lambda_ramp(st.step, run.total_steps)
                loss, sq = selection_loss(y_hat, st.labels.index_select(0, batch.to(cache.device)), probs, run.alpha,
                                          lam_t)
                losses.append((loss, sq, probs, lam_t))
                st.epoch_loss += float(loss.detach()) * idx.numel()
                st.epoch_sq += float(sq.detach()) * idx.numel()
                st.epoch_n += idx.numel()
            params = [p for st in live for p in st.run.params]
            # Each loss depends on its own set's parameters only: one backward gives every set its own gradient.
            total = losses[0][0] if len(losses) == 1 else torch.stack([loss for loss, *_ in losses]).sum()
            for p, g in zip(params, torch.autograd.grad(total, params)):
                p.grad = g
            for st, (_, _, probs, lam_t) in zip(live, losses):
                st.opt.step()
                _after_step(cache, st, probs, lam_t, bar)


def _after_step(cache: ActivationCache, st: _Stepping, probs: torch.Tensor, lam_t: float, bar: Any) -> None:
    """Count the step, write the epoch's history record, and stop the set once it is done or settled."""
    run, cfg = st.run, st.run.cfg
    mask = torch.cat(run.hard())
    st.stable = st.stable + 1 if torch.equal(mask, st.last_mask) else 0
    st.last_mask = mask
    bar.update(1)
    settled = bool(
        st.step >= run.total_steps // 2
        and st.stable >= cfg.patience
        and float(torch.minimum(probs, 1 - probs).detach().max()) < 0.1
    )
    last = st.step == run.total_steps - 1
    if st.step % st.steps_per_epoch == st.steps_per_epoch - 1 or last or settled:
        rates = evaluate_gates(cache, st.probe_rows, [h.float() for h in run.hard()], st.target_class, w_b=run.w_b)
        run.history.append({
            "step": st.step + 1, "loss": st.epoch_loss / st.epoch_n, "squared_error": st.epoch_sq / st.epoch_n,
            "soft_units": float(probs.detach().sum()), "hard_units": int(mask.sum()),
            "holding_rate_probe": rates.strict, "w_b": run.w_b, "lambda": lam_t,
        })
        st.epoch_loss, st.epoch_sq, st.epoch_n = 0.0, 0.0, 0
        bar.set_postfix(units=int(mask.sum()), holding=f"{rates.strict:.3f}")
    st.step += 1
    st.done = settled or last


def _select(cache: ActivationCache, target_class: int, cfg: SelectionConfig, seed: int, progress: bool,
            t0: float) -> CoreUnits:
    """One plain selection: build the gates, optimise them, round and judge the mask on D'_c."""
    run = _build_gates(cache, target_class, cfg, seed)
    _optimise(cache, target_class, run, progress)
    return _result(cache, target_class, run, seed, t0)


def _result(cache: ActivationCache, target_class: int, run: _Optimisation, seed: int, t0: float) -> CoreUnits:
    """An optimised run's rounded mask, judged on all of its D'_c, as a result."""
    hard = run.hard()
    final = evaluate_gates(cache, run.dprime.index, [h.float() for h in hard], target_class)
    specs = cache.specs
    units = {s.name: torch.nonzero(h).flatten().tolist() for s, h in zip(specs, hard)}
    settings = _run_settings(cache, run.cfg) | {
        "steps_run": len(run.history) and run.history[-1]["step"], "total_steps": run.total_steps,
    }
    return CoreUnits(
        target_class=target_class,
        units=units,
        gates={s.name: g.probs().detach().cpu().reshape(s.unit_shape) for s, g in zip(specs, run.gates)},
        masks={s.name: h.cpu().reshape(s.unit_shape) for s, h in zip(specs, hard)},
        num_units={k: len(v) for k, v in units.items()},
        total_units={s.name: s.num_units for s in specs},
        holding_rate=final.paper,
        holding_rate_strict=final.strict,
        history=run.history,
        settings=settings,
        seed=seed,
        dprime=run.dprime.sizes(),
        w_b={"learned": run.w_b, "refit": final.w_b},
        seconds=time.perf_counter() - t0,
    )


def _run_settings(cache: ActivationCache, cfg: SelectionConfig) -> dict[str, Any]:
    """The settings every result records: the config, the engine, its fallbacks and the ablation."""
    return cfg.settings() | {"engine": cache.gated.engine, "prefix_cached": cache.cached,
                             "fallbacks": dict(cache.fallbacks), "ablation": cache.ablation.mode}


def _scaled(alpha: AlphaArg, factor: float) -> float | dict[str, float]:
    if isinstance(alpha, Mapping):
        return {k: float(v) * factor for k, v in alpha.items()}
    return float(alpha) * factor


def _plain(cache: ActivationCache, target_class: int, cfg: SelectionConfig, seed: int, progress: bool,
           factor: float) -> CoreUnits:
    """One plain selection with alpha and lam multiplied by ``factor`` (a step of target mode's ladder)."""
    plain = dataclasses.replace(cfg, alpha=_scaled(cfg.alpha, factor), lam=cfg.lam * factor, target_holding_rate=None)
    return _select(cache, target_class, plain, seed, progress, time.perf_counter())


def _calibrate(cache: ActivationCache, target_class: int, cfg: SelectionConfig, seed: int,
               progress: bool) -> tuple[CoreUnits, float, float, list[dict[str, Any]]]:
    """Plain selections with alpha (and lam) divided by 3 each time, until one holds well enough.

    Returns the best run, its holding rate in the target's reading, the factor its alpha was
    multiplied by, and every attempt.
    """
    assert cfg.target_holding_rate is not None
    target = float(cfg.target_holding_rate)
    attempts: list[dict[str, Any]] = []
    best: CoreUnits | None = None
    best_rate, best_factor = -1.0, 1.0
    for attempt in range(cfg.calibration_runs):
        factor = _ALPHA_STEP ** -attempt
        res = _plain(cache, target_class, cfg, seed, progress, factor)
        rate = res.holding_rate_strict if cfg.reading == "strict" else res.holding_rate
        attempts.append({"alpha": res.settings["alpha"], "lam": res.settings["lam"],
                         "units": sum(res.num_units.values()), "holding_rate": rate, "seconds": res.seconds})
        # Keep the run that holds best; the first that reaches the target ends the search,
        # and so does one close enough that adding back a few units is cheaper.
        if rate > best_rate or rate >= target:
            best, best_rate, best_factor = res, rate, factor
        rows_run = int(res.settings["total_steps"]) * cfg.batch_size
        if rate >= target or prefer_add_back(rate, target, sum(res.num_units.values()),
                                             sum(res.total_units.values()), rows_run):
            break
    assert best is not None
    return best, best_rate, best_factor, attempts


def _looser_pools(cache: ActivationCache, target_class: int, cfg: SelectionConfig, seed: int, progress: bool,
                  judge: Judge, factor: float, best: CoreUnits, best_rate: float, refined: Refinement,
                  ) -> tuple[CoreUnits, Refinement, list[dict[str, Any]]]:
    """Exact elimination from the calibrated mask and from looser selections (see :data:`LOOSER_POOLS`).

    The pools, in turn: the calibrated mask itself, when it reaches the target (exact elimination
    from it can end smaller than the probe-ranked drops of :func:`refine_mask`), then selections
    with alpha divided by 3, 9 from ``factor``. A pool is eliminated from when it reaches the target
    and its elimination fits what is left of the budget (:data:`POOL_COST_SHARE` of exact greedy's
    evaluations); a pool that does not fit ends the search, as looser ones are larger. Returns the run and refinement with the fewest units that
    reach the target (the calibrated ones unless a pool ends smaller), and what each pool did.
    """
    target = float(cfg.target_holding_rate or 0.0)
    specs = cache.specs
    records: list[dict[str, Any]] = []
    budget = POOL_COST_SHARE * elimination_steps(refined.mask.numel(), int(refined.mask.sum()))
    for step in range(0 if best_rate >= target else 1, LOOSER_POOLS + 1):
        t0 = time.perf_counter()
        res = best if step == 0 else _plain(cache, target_class, cfg, seed, progress, factor / _ALPHA_STEP ** step)
        pool = torch.cat([res.masks[s.name].flatten() for s in specs]).bool().cpu()
        reached, rate = (True, best_rate) if step == 0 else judge.reaches(pool, target)
        cost = elimination_steps(int(pool.sum()), int(refined.mask.sum()))
        affordable = cost <= budget
        record: dict[str, Any] = {"alpha": res.settings["alpha"], "lam": res.settings["lam"], "calibrated": step == 0,
                                  "units": int(pool.sum()), "reached": reached, "affordable": affordable,
                                  "units_after": None, "evaluations": int(step > 0)}
        if reached and affordable:
            budget -= cost
            found = eliminate_from_pool(judge, pool, rate, target)
            record["units_after"] = int(found.mask.sum())
            record["evaluations"] += found.evaluations
            if refined.holding_rate < target or int(found.mask.sum()) < int(refined.mask.sum()):
                best, refined = res, found
        records.append(record | {"seconds": time.perf_counter() - t0})
        if not affordable:
            break
    return best, refined, records


def _find_for_target(cache: ActivationCache, target_class: int, cfg: SelectionConfig, seed: int, progress: bool,
                     t0: float) -> CoreUnits:
    """Target mode: calibrate alpha downwards until the target is met or nearly, then refine (see ``_core.target``).

    Where every smaller set can be tried (a few units, such as a block's heads), they are, and no gates are
    optimised: the result is a smallest set, found for less than one optimisation costs.
    """
    assert cfg.target_holding_rate is not None
    target = float(cfg.target_holding_rate)
    gen = torch.Generator().manual_seed(seed)
    dprime = build_dprime(cache.predictions, target_class, generator=gen, positives_only=cfg.positives_only)
    specs = cache.specs
    num_units = sum(s.num_units for s in specs)
    if every_subset_few(num_units):
        judge = mask_judge(cache, dprime, target_class, cfg.reading, seed=seed)
        refined = smallest_set(judge, num_units, target)
        return _refined_result(cache, _unoptimised(cache, target_class, cfg, seed, dprime, refined.mask), judge,
                               refined, target, cfg, [], t0)
    best, best_rate, factor, attempts = _calibrate(cache, target_class, cfg, seed, progress)
    judge = mask_judge(cache, dprime, target_class, cfg.reading, seed=seed)
    mask = torch.cat([best.masks[s.name].flatten() for s in specs])
    values = torch.cat([best.gates[s.name].flatten() for s in specs])
    # The best run's rate was measured on this D'_c by the same path: not measured again.
    refined = refine_mask(judge, mask, values, target, cfg.drop_order, rate=best_rate)
    pools: list[dict[str, Any]] = []
    if judge.toggle is not None and judge.batched and cfg.drop_order == "least_harm":
        best, refined, pools = _looser_pools(cache, target_class, cfg, seed, progress, judge, factor, best, best_rate,
                                             refined)
    return _refined_result(cache, best, judge, refined, target, cfg, attempts, t0, pools)


def _unoptimised(cache: ActivationCache, target_class: int, cfg: SelectionConfig, seed: int, dprime: DPrime,
                 mask: torch.Tensor) -> CoreUnits:
    """The start of a result whose units were found without gates: its gate values are the mask, no history."""
    specs = cache.specs
    pieces = mask.split([s.num_units for s in specs])
    return CoreUnits(
        target_class=target_class, units={}, masks={}, num_units={},
        gates={s.name: p.float().reshape(s.unit_shape) for s, p in zip(specs, pieces)},
        total_units={s.name: s.num_units for s in specs}, holding_rate=1.0, holding_rate_strict=1.0,
        settings=_run_settings(cache, cfg), seed=seed, dprime=dprime.sizes(), w_b={"learned": None},
    )


def _refined_result(cache: ActivationCache, base: CoreUnits, judge: Judge, refined: Refinement, target: float,
                    cfg: SelectionConfig, attempts: list[dict[str, Any]], t0: float,
                    pools: list[dict[str, Any]] | None = None) -> CoreUnits:
    """``base`` (the calibrated run, or an unoptimised start) with target mode's refined mask and its figures."""
    specs = list(base.total_units.items())
    shapes = {name: base.gates[name].shape for name, _ in specs}
    pieces = refined.mask.split([total for _, total in specs])
    # The refined mask was usually just verified on D'_c: the judge answers from those scores.
    assert judge.rates is not None
    final = judge.rates(refined.mask)
    units = {name: torch.nonzero(p).flatten().tolist() for (name, _), p in zip(specs, pieces)}
    settings = base.settings | {"target_holding_rate": target}
    settings["target"] = {
        "target_holding_rate": target, "reading": cfg.reading, "reached": refined.holding_rate >= target,
        "calibration": attempts, "pools": pools or [], **refined.to_dict(),
    }
    settings["fallbacks"] = dict(cache.fallbacks)
    return dataclasses.replace(
        base,
        units=units,
        masks={name: p.reshape(shapes[name]) for (name, _), p in zip(specs, pieces)},
        num_units={k: len(v) for k, v in units.items()},
        holding_rate=final.paper,
        holding_rate_strict=final.strict,
        settings=settings,
        w_b={"learned": base.w_b["learned"], "refit": final.w_b},
        seconds=time.perf_counter() - t0,
    )
