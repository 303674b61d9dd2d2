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
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar

import torch
from torch import nn

from coreunits._core.cache import ActivationCache
from coreunits._core.config import DEFAULTS, AlphaArg, SelectionConfig
from coreunits._core.dprime import DPrime, build_dprime, check_class
from coreunits._core.engine import OutputFn
from coreunits._core.errors import DataError, OptionError
from coreunits._core.evaluation import evaluate_gates
from coreunits._core.layers import LayerArg, resolve_layers
from coreunits._core.optimise import GateRun, build_run, optimise, optimise_stacked
from coreunits._core.result import CoreUnits
from coreunits._core.target import (
    LOOSER_POOLS,
    POOL_COST_SHARE,
    SEED_POOLS,
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

__all__ = ["DEFAULTS", "SelectionConfig", "batch_selections", "find_core_units", "find_core_units_batched"]

#: Target mode divides alpha (and lam) by this after a run that misses the target.
_ALPHA_STEP = 3.0

_P = ParamSpec("_P")
_R = TypeVar("_R")


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


#: How many selections sweep and reproduce optimise together (``find_core_units_batched``) on a CPU; a run
#: stopped mid-batch redoes at most this many.
BATCH_SELECTIONS = 10
#: The same on a GPU, where a step is launches rather than arithmetic: on an H200, 30 max2 selections of the
#: paper's MNIST net ran 2x as many selections per second in one batch as in batches of 10 (benchmarks/RESULTS.md),
#: and a stopped batch of 30 costs seconds there.
BATCH_SELECTIONS_GPU = 30


def batch_selections(device: torch.device | str) -> int:
    """How many selections to optimise together on ``device`` (sweep, reproduce)."""
    return BATCH_SELECTIONS_GPU if torch.device(device).type == "cuda" else BATCH_SELECTIONS


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
    runs = [(c, build_run(cache, c, cfg, seed)) for c, seed in jobs]
    optimise_stacked(cache, runs, progress)
    results = [_result(cache, c, run, seed, t0) for (c, run), (_, seed) in zip(runs, jobs)]
    share = (time.perf_counter() - t0) / len(results)
    for r in results:
        r.seconds = share
        r.settings["batched"] = len(results)
    return results


def _select(cache: ActivationCache, target_class: int, cfg: SelectionConfig, seed: int, progress: bool,
            t0: float) -> CoreUnits:
    """One plain selection: build the gates, optimise them, round and judge the mask on D'_c."""
    run = build_run(cache, target_class, cfg, seed)
    optimise(cache, target_class, run, progress)
    return _result(cache, target_class, run, seed, t0)


def _result(cache: ActivationCache, target_class: int, run: GateRun, seed: int, t0: float) -> CoreUnits:
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


def _flat_mask(cache: ActivationCache, res: CoreUnits) -> torch.Tensor:
    """A run's bool mask over all the cache's layers' units, concatenated (the masks target mode judges)."""
    return torch.cat([res.masks[s.name].flatten() for s in cache.specs]).bool().cpu()


def _eliminate_from_pools(cache: ActivationCache, target_class: int, cfg: SelectionConfig, seed: int, progress: bool,
                          judge: Judge, factor: float, best: CoreUnits, best_rate: float, refined: Refinement,
                          ) -> tuple[CoreUnits, Refinement, list[dict[str, Any]]]:
    """Exact elimination from the calibrated mask, from looser selections and from another seed's union.

    The pools, in turn: the calibrated mask itself, when it reaches the target (exact elimination
    from it can end smaller than the probe-ranked drops of :func:`refine_mask`), then selections
    with alpha divided by 3, 9 from ``factor`` (:data:`LOOSER_POOLS`), then the smallest set found so
    far joined with a selection at the calibrated alpha from another seed (:data:`SEED_POOLS`), where no
    looser pool was eliminated from. A pool is eliminated from when it reaches the target and its
    elimination fits what is left of the budget (:data:`POOL_COST_SHARE` of exact greedy's evaluations);
    a looser pool that does not fit ends the looser ones, as they are larger. Returns the run and
    refinement with the fewest units that reach the target (the calibrated ones unless a pool ends
    smaller), and what each pool did.
    """
    target = float(cfg.target_holding_rate or 0.0)
    records: list[dict[str, Any]] = []
    budget = POOL_COST_SHARE * elimination_steps(refined.mask.numel(), int(refined.mask.sum()))

    def try_pool(res: CoreUnits, pool: torch.Tensor, known_rate: float | None, record: dict[str, Any]) -> bool:
        """Eliminate from ``pool`` if it reaches the target and fits the budget; whether it fitted."""
        nonlocal budget, best, refined
        reached, rate = (True, known_rate) if known_rate is not None else judge.reaches(pool, target)
        cost = elimination_steps(int(pool.sum()), int(refined.mask.sum()))
        affordable = cost <= budget
        record |= {"units": int(pool.sum()), "reached": reached, "affordable": affordable, "units_after": None,
                   "evaluations": int(known_rate is None)}
        if reached and affordable:
            budget -= cost
            found = eliminate_from_pool(judge, pool, rate, target)
            record["units_after"] = int(found.mask.sum())
            record["evaluations"] += found.evaluations
            if refined.holding_rate < target or int(found.mask.sum()) < int(refined.mask.sum()):
                best, refined = res, found
        return affordable

    for step in range(0 if best_rate >= target else 1, LOOSER_POOLS + 1):
        t0 = time.perf_counter()
        res = best if step == 0 else _plain(cache, target_class, cfg, seed, progress, factor / _ALPHA_STEP ** step)
        record: dict[str, Any] = {"alpha": res.settings["alpha"], "lam": res.settings["lam"], "calibrated": step == 0,
                                  "seed": seed}
        fitted = try_pool(res, _flat_mask(cache, res), best_rate if step == 0 else None, record)
        records.append(record | {"seconds": time.perf_counter() - t0})
        if not fitted:
            break
    looser_ran = any(r["units_after"] is not None for r in records if not r["calibrated"])
    for other_seed in range(seed + 1, seed + 1 + SEED_POOLS):
        if looser_ran or budget < int(refined.mask.sum()) + 1:
            break  # a looser pool already left the calibrated basin, or no budget is left: no optimisation spent
        t0 = time.perf_counter()
        res = _plain(cache, target_class, cfg, other_seed, progress, factor)
        record = {"alpha": res.settings["alpha"], "lam": res.settings["lam"], "calibrated": False, "seed": other_seed}
        # The result keeps the calibrated run's gates and seed; only its mask comes from the union.
        try_pool(best, refined.mask | _flat_mask(cache, res), None, record)
        records.append(record | {"seconds": time.perf_counter() - t0})
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
    mask = _flat_mask(cache, best)
    values = torch.cat([best.gates[s.name].flatten() for s in specs])
    # The best run's rate was measured on this D'_c by the same path: not measured again.
    refined = refine_mask(judge, mask, values, target, cfg.drop_order, rate=best_rate)
    pools: list[dict[str, Any]] = []
    if judge.toggle is not None and judge.batched and cfg.drop_order == "least_harm":
        best, refined, pools = _eliminate_from_pools(cache, target_class, cfg, seed, progress, judge, factor, best,
                                                     best_rate, refined)
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
