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

import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from coreunits._core.cache import ActivationCache
from coreunits._core.dprime import build_dprime, check_class
from coreunits._core.engine import OutputFn
from coreunits._core.errors import DataError
from coreunits._core.evaluation import evaluate_gates
from coreunits._core.gates import HardConcreteGate, SwitchGate
from coreunits._core.guard import preserved_model_state
from coreunits._core.layers import LayerArg, resolve_layers
from coreunits._core.objective import center_margin, center_score, selection_loss
from coreunits._core.progress import progress_bar
from coreunits._core.result import CoreUnits
from coreunits._core.target import DROP_ORDERS

__all__ = ["DEFAULTS", "find_core_units"]

#: Default coefficients and schedule (chosen on MNIST, see README "Method notes").
DEFAULTS: dict[str, Any] = {
    "alpha": 2e-3,
    "lam": 1e-2,
    "epochs": 2,
    "batch_size": 128,
    "lr": 0.1,
    "temperature": 0.5,
    "gate_slope": 1.0,
    "init_gate": 0.95,
    "w_b_init": 1.0,
    "min_steps": 150,
    "patience": 25,
}

_PROBE_ROWS = 2048
_RELAXATIONS = {"switch", "hard_concrete"}
#: Target mode divides alpha (and lam) by this after a run that misses the target.
_ALPHA_STEP = 3.0


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
) -> ActivationCache:
    if isinstance(data, ActivationCache):
        data.check_model(model)
        wanted = [s.name for s in resolve_layers(data.model, layers, unit_dim)]
        if wanted != data.layer_names:
            raise DataError(
                f"the ActivationCache was built for layers {data.layer_names}, not {wanted}; "
                "build one for these layers"
            )
        return data
    return ActivationCache(
        model, layers, data, batch_size=max(batch_size, 256), output_fn=output_fn,
        unit_dim=unit_dim, device=device, engine=engine, progress=progress,
    )


def _grad_enabled(fn: Callable[..., CoreUnits]) -> Callable[..., CoreUnits]:
    # The gates are optimised by autograd even when the caller runs under
    # torch.no_grad() or torch.inference_mode() (common around interpretation code).
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> CoreUnits:
        with torch.inference_mode(False), torch.enable_grad():
            return fn(*args, **kwargs)

    return wrapper


@_grad_enabled
def find_core_units(
    model: nn.Module,
    layers: LayerArg | Sequence[LayerArg],
    target_class: int,
    data: Any,
    *,
    alpha: float | Mapping[str, float] = DEFAULTS["alpha"],
    lam: float = DEFAULTS["lam"],
    epochs: int = DEFAULTS["epochs"],
    batch_size: int = DEFAULTS["batch_size"],
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    lr: float = DEFAULTS["lr"],
    temperature: float = DEFAULTS["temperature"],
    gate_slope: float = DEFAULTS["gate_slope"],
    init_gate: float = DEFAULTS["init_gate"],
    w_b_init: float = DEFAULTS["w_b_init"],
    min_steps: int = DEFAULTS["min_steps"],
    patience: int = DEFAULTS["patience"],
    positives_only: bool = False,
    output_fn: OutputFn | None = None,
    unit_dim: int | Sequence[int] | None = None,
    engine: str = "auto",
    relaxation: str = "switch",
    target_holding_rate: float | None = None,
    reading: str = "strict",
    calibration_runs: int = 4,
    drop_order: str = "least_harm",
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
        alpha: cost of one unit: the share of D'_c's squared error a unit must
            remove to be kept (paper's alpha divided by |D'_c|). A dict
            ``{layer: alpha}`` prices each layer's units separately.
        lam: weight of the relaxation penalty phi (ramped in over the second half).
        epochs: passes over D'_c (at least ``min_steps`` steps are taken).
        batch_size: mini-batch size.
        seed: seeds D'_c's negatives, its permutation and the gate noise.
        device: where to compute (defaults to the model's device).
        progress: show a progress bar.
        lr: Adam learning rate for the gate parameters and ``w_b``.
        temperature: temperature of the concrete gate noise.
        gate_slope: the fixed ``w > 0`` in ``b = sigmoid(w x)``.
        init_gate: initial ``b`` of every gate.
        w_b_init: initial center-classifier weight ``w_b``.
        min_steps: minimum number of optimisation steps.
        patience: stop early once the rounded mask has not changed for this many
            steps in the second half and every gate is within 0.1 of 0 or 1.
        positives_only: build D'_c from positives only (the paper's input-layer
            setting); ``w_b`` then stays at ``w_b_init``.
        output_fn: maps the model's output to ``(N, H)`` scores.
        unit_dim: output dim(s) one gate covers (default: channels of 4-D
            outputs, features of 2-D ones, positions of the input).
        engine: ``"auto"`` (cached prefix via torch.fx, hooks if untraceable),
            ``"fx"`` or ``"hooks"`` (full forward per step).
        relaxation: ``"switch"`` (the paper's ``sigmoid(w x)`` gates + phi penalty,
            sampled as concrete variables) or ``"hard_concrete"`` (L0 gates of
            Louizos et al. 2018; phi is not used).
        target_holding_rate: target mode: instead of reporting whatever the
            coefficients give, find the smallest unit set whose hard-mask holding
            rate on D'_c reaches this value. alpha is lowered automatically while
            the rounded mask misses the target by much (``alpha`` is the first
            try), then the mask is refined (add back the most useful unit while
            the target is missed, then drop units while it holds). Before/after
            figures are in ``settings["target"]``. See ``coreunits._core.target``.
        reading: the holding-rate reading the target is judged in: ``"strict"``
            (argmax decision unchanged) or ``"paper"`` (center classifier).
        calibration_runs: most optimisations target mode runs (a mask that
            misses the target by little is completed by adding units back instead).
        drop_order: how target mode drops units: ``"least_harm"`` (greedy
            backward elimination within the calibrated set, candidates ranked on
            a probe of D'_c, each drop verified on all of it) or ``"gate"``
            (lowest gate first, one pass). See ``coreunits._core.target``.

    Returns:
        A :class:`CoreUnits` with units, gates, masks and both holding rates on D'_c.

    Raises:
        LayerNotFoundError: unknown layer (closest names listed), or one that never runs.
        DataError: empty data, class out of range, no input predicted as the class.
        ModelOutputError: the model's output is not ``(N, classes)`` scores.
    """
    t0 = time.perf_counter()
    alphas = dict(alpha) if isinstance(alpha, Mapping) else None
    if lam < 0 or any(a < 0 for a in (alphas.values() if alphas else [alpha])):  # type: ignore[operator]
        raise ValueError(f"alpha and lam must be >= 0, got alpha={alpha}, lam={lam}")
    if batch_size < 1 or epochs < 0:
        raise ValueError(f"batch_size must be >= 1 and epochs >= 0, got {batch_size} and {epochs}")
    if relaxation not in _RELAXATIONS:
        raise ValueError(f"relaxation must be one of {sorted(_RELAXATIONS)}, got {relaxation!r}")
    if reading not in ("strict", "paper"):
        raise ValueError(f"reading must be 'strict' or 'paper', got {reading!r}")
    if target_holding_rate is not None and not 0.0 < target_holding_rate <= 1.0:
        raise ValueError(f"target_holding_rate must be in (0, 1], got {target_holding_rate}")
    if drop_order not in DROP_ORDERS:
        raise ValueError(f"drop_order must be one of {DROP_ORDERS}, got {drop_order!r}")
    cache = _as_cache(model, layers, data, batch_size, output_fn, unit_dim, device, engine, progress)
    target_class = check_class(target_class, cache.num_classes)
    if target_holding_rate is not None:
        options = {
            "lam": lam, "epochs": epochs, "batch_size": batch_size, "seed": seed, "progress": progress, "lr": lr,
            "temperature": temperature, "gate_slope": gate_slope, "init_gate": init_gate, "w_b_init": w_b_init,
            "min_steps": min_steps, "patience": patience, "positives_only": positives_only,
            "relaxation": relaxation,
        }
        return _find_for_target(model, layers, target_class, cache, alpha, options, float(target_holding_rate),
                                reading, calibration_runs, drop_order, t0)
    dev = cache.device
    index_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator(device=dev).manual_seed(seed + 1)
    dprime = build_dprime(cache.predictions, target_class, generator=index_gen, positives_only=positives_only)
    rows, labels = dprime.index, dprime.labels.to(dev)
    n = len(dprime)
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = max(epochs * steps_per_epoch, min_steps)

    specs = cache.specs
    if alphas is not None:
        missing = [s.name for s in specs if s.name not in alphas]
        if missing or set(alphas) - {s.name for s in specs}:
            raise ValueError(f"alpha dict must give exactly the layers {[s.name for s in specs]}, got {list(alphas)}")
        alpha_vec: float | torch.Tensor = torch.cat(
            [torch.full((s.num_units,), float(alphas[s.name]), device=dev) for s in specs]
        )
    else:
        alpha_vec = float(alpha)  # type: ignore[arg-type]
    if relaxation == "switch":
        gates: list[SwitchGate | HardConcreteGate] = [
            SwitchGate(s.num_units, gate_slope, init_gate).to(dev) for s in specs
        ]
    else:  # hard concrete gates are pushed to 0/1 by their own stretch: no phi penalty
        gates = [HardConcreteGate(s.num_units, init_gate).to(dev) for s in specs]
        lam = 0.0
    learn_wb = dprime.num_negative > 0
    log_wb = torch.tensor(math.log(w_b_init), device=dev, requires_grad=learn_wb)
    params = [g.x for g in gates] + ([log_wb] if learn_wb else [])
    opt = torch.optim.Adam(params, lr=lr)
    probe_rows = rows[: min(n, _PROBE_ROWS)]

    history: list[dict[str, float]] = []
    last_mask = torch.cat([g.hard() for g in gates])
    stable = 0
    epoch_loss, epoch_sq, epoch_n = 0.0, 0.0, 0
    perm = torch.randperm(n, generator=index_gen)

    bar = progress_bar(enabled=progress, total=total_steps, desc=f"class {target_class}", unit="step", leave=False)
    try:
        with preserved_model_state(cache.model), cache.gated.activated():
            for step in range(total_steps):
                k = step % steps_per_epoch
                if k == 0 and step > 0:
                    perm = torch.randperm(n, generator=index_gen)
                batch = perm[k * batch_size : (k + 1) * batch_size]
                idx = rows.index_select(0, batch)
                front = cache.frontier_rows(idx)
                sampled = [g.sample(idx.numel(), temperature, noise_gen) for g in gates]
                scores = cache.gated.suffix(front, sampled)
                y_hat = center_score(center_margin(scores, target_class), log_wb.exp())
                probs = torch.cat([g.probs() for g in gates])
                lam_t = lam * _lambda_ramp(step, total_steps)
                loss, sq = selection_loss(y_hat, labels.index_select(0, batch.to(dev)), probs, alpha_vec, lam_t)
                grads = torch.autograd.grad(loss, params)
                for p, g in zip(params, grads):
                    p.grad = g
                opt.step()
                epoch_loss += float(loss.detach()) * idx.numel()
                epoch_sq += float(sq.detach()) * idx.numel()
                epoch_n += idx.numel()

                mask = torch.cat([g.hard() for g in gates])
                stable = stable + 1 if torch.equal(mask, last_mask) else 0
                last_mask = mask
                bar.update(1)
                settled = bool(
                    step >= total_steps // 2
                    and stable >= patience
                    and float(torch.minimum(probs, 1 - probs).detach().max()) < 0.1
                )
                if k == steps_per_epoch - 1 or step == total_steps - 1 or settled:
                    probe_gates = [g.hard().float() for g in gates]
                    rates = evaluate_gates(cache, probe_rows, probe_gates, target_class, w_b=float(log_wb.detach().exp()))
                    history.append(
                        {
                            "step": step + 1,
                            "loss": epoch_loss / epoch_n,
                            "squared_error": epoch_sq / epoch_n,
                            "soft_units": float(probs.detach().sum()),
                            "hard_units": int(mask.sum()),
                            "holding_rate_probe": rates.strict,
                            "w_b": float(log_wb.detach().exp()),
                            "lambda": lam_t,
                        }
                    )
                    epoch_loss, epoch_sq, epoch_n = 0.0, 0.0, 0
                    bar.set_postfix(units=int(mask.sum()), holding=f"{rates.strict:.3f}")
                if settled:
                    break
    finally:
        bar.close()

    hard = [g.hard() for g in gates]
    final = evaluate_gates(cache, rows, [h.float() for h in hard], target_class)
    units: dict[str, list[int]] = {}
    gate_vals: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for spec, g, h in zip(specs, gates, hard):
        units[spec.name] = torch.nonzero(h).flatten().tolist()
        gate_vals[spec.name] = g.probs().detach().cpu().reshape(spec.unit_shape)
        masks[spec.name] = h.cpu().reshape(spec.unit_shape)
    settings = {
        "alpha": alphas if alphas is not None else alpha, "lam": lam, "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "temperature": temperature, "gate_slope": gate_slope, "init_gate": init_gate,
        "w_b_init": w_b_init, "min_steps": min_steps, "patience": patience,
        "positives_only": positives_only, "relaxation": relaxation, "steps_run": len(history) and history[-1]["step"],
        "total_steps": total_steps, "engine": cache.gated.engine, "prefix_cached": cache.cached,
    }
    return CoreUnits(
        target_class=target_class,
        units=units,
        gates=gate_vals,
        masks=masks,
        num_units={k: len(v) for k, v in units.items()},
        total_units={s.name: s.num_units for s in specs},
        holding_rate=final.paper,
        holding_rate_strict=final.strict,
        history=history,
        settings=settings,
        seed=seed,
        dprime={"size": n, "positives": dprime.num_positive, "negatives": dprime.num_negative, "note": dprime.note},
        w_b={"learned": float(log_wb.detach().exp()), "refit": final.w_b},
        seconds=time.perf_counter() - t0,
    )


def _scaled(alpha: float | Mapping[str, float], factor: float) -> float | dict[str, float]:
    if isinstance(alpha, Mapping):
        return {k: float(v) * factor for k, v in alpha.items()}
    return float(alpha) * factor


def _find_for_target(
    model: nn.Module,
    layers: LayerArg | Sequence[LayerArg],
    target_class: int,
    cache: ActivationCache,
    alpha: float | Mapping[str, float],
    options: dict[str, Any],
    target: float,
    reading: str,
    calibration_runs: int,
    drop_order: str,
    t0: float,
) -> CoreUnits:
    """Target mode: calibrate alpha downwards until the target is met or nearly, then refine (see ``_core.target``)."""
    from coreunits._core.target import mask_judge, prefer_add_back, refine_mask

    if calibration_runs < 1:
        raise ValueError(f"calibration_runs must be >= 1, got {calibration_runs}")
    lam0 = float(options["lam"])
    attempts: list[dict[str, Any]] = []
    best: CoreUnits | None = None
    best_rate = -1.0
    for attempt in range(calibration_runs):
        factor = _ALPHA_STEP ** -attempt
        opts = dict(options, lam=lam0 * factor)
        res = find_core_units(model, layers, target_class, cache, alpha=_scaled(alpha, factor), **opts)
        rate = res.holding_rate_strict if reading == "strict" else res.holding_rate
        attempts.append({"alpha": _scaled(alpha, factor), "lam": lam0 * factor,
                         "units": sum(res.num_units.values()), "holding_rate": rate, "seconds": res.seconds})
        # Keep the run that holds best; the first that reaches the target ends the search,
        # and so does one close enough that adding back a few units is cheaper.
        if rate > best_rate or rate >= target:
            best, best_rate = res, rate
        rows_run = int(res.settings["total_steps"]) * int(options["batch_size"])
        if rate >= target or prefer_add_back(rate, target, sum(res.num_units.values()),
                                             sum(res.total_units.values()), rows_run):
            break
    assert best is not None
    gen = torch.Generator().manual_seed(options["seed"])
    dprime = build_dprime(cache.predictions, target_class, generator=gen, positives_only=options["positives_only"])
    judge = mask_judge(cache, dprime, target_class, reading, seed=options["seed"])
    specs = cache.specs
    mask = torch.cat([best.masks[s.name].flatten() for s in specs])
    values = torch.cat([best.gates[s.name].flatten() for s in specs])
    # The best run's rate was measured on this D'_c by the same path: not measured again.
    refined = refine_mask(judge, mask, values, target, drop_order, rate=best_rate)
    pieces = refined.mask.split([s.num_units for s in specs])
    # The refined mask was usually just verified on D'_c: the judge answers from those scores.
    assert judge.rates is not None
    final = judge.rates(refined.mask)
    units = {s.name: torch.nonzero(p).flatten().tolist() for s, p in zip(specs, pieces)}
    settings = dict(best.settings)
    settings["target"] = {
        "target_holding_rate": target, "reading": reading, "reached": refined.holding_rate >= target,
        "calibration": attempts, **refined.to_dict(),
    }
    return CoreUnits(
        target_class=target_class,
        units=units,
        gates=best.gates,
        masks={s.name: p.reshape(s.unit_shape) for s, p in zip(specs, pieces)},
        num_units={k: len(v) for k, v in units.items()},
        total_units=best.total_units,
        holding_rate=final.paper,
        holding_rate_strict=final.strict,
        history=best.history,
        settings=settings,
        seed=best.seed,
        dprime=best.dprime,
        w_b={"learned": best.w_b["learned"], "refit": final.w_b},
        seconds=time.perf_counter() - t0,
    )
