"""Side-by-side speed benchmark of the selection engine on the paper's MNIST classifier.

Times, in one process, the variants of issue 5 and prints a table plus one
JSON line per measurement. Absolute seconds vary between machines; the ratios
(to the fast path, and to the *floor* = one forward pass of the network after
the gated layer over the same D'_c) are what to compare.

    python benchmarks/run.py --data-root ../shared/data --threads 2 [--out benchmarks/RESULTS.md]
    python benchmarks/run.py --data-root ../shared/data --device cuda --out benchmarks/RESULTS-cuda.md

Each fast selection also reports its *step bound*: the steps it ran times the
time of one step's forward and backward arithmetic alone (measured in the same
run, no sampling, optimiser or bookkeeping). A selection cannot beat it, so
``ratio_to_step_bound`` is the engine's overhead, and ``step_bound_in_floors``
is what the optimisation itself costs in floors (about 2 x epochs).

Variants:
- fast: the default path (prefix cached once per layer and reused across classes,
  no gradients through frozen weights, inference mode for evaluation, early stop).
- naive: the whole model forward per step through hooks, no cache, no early stop.
- budget: the fast engine with a cache budget below what caching needs (the
  prefix is recomputed per batch): it must complete.
- curve: holding rate for every k (masking units by increasing gate value).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from coreunits import ActivationCache, find_core_units, find_core_units_batched
from coreunits._core.dprime import build_dprime
from coreunits._core.evaluation import removal_curve
from coreunits._core.guard import preserved_model_state
from coreunits._core.io import atomic_write_text
from coreunits._core.scoring import dense_masked_scores
from coreunits._core.selection import DEFAULTS, batch_selections
from coreunits.data import get_mnist
from coreunits.paper import coefficients, default_checkpoint
from coreunits.train import load_model


def _sync() -> None:
    # CUDA kernels run asynchronously: without a sync the clock stops before the work does.
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Any) -> tuple[Any, float]:
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - t0


def floor_seconds(cache: ActivationCache, rows: torch.Tensor, repeats: int = 3) -> float:
    """Median time of one gated-suffix forward pass (all gates on) over ``rows``.

    Through the dense path on purpose: the floor is the whole network after the
    layer, not the sparse path a hard mask may take.
    """
    ones = [torch.ones(s.num_units, device=cache.device) for s in cache.specs]
    return statistics.median(_timed(lambda: dense_masked_scores(cache, rows, ones))[1] for _ in range(repeats))


def step_floor_seconds(cache: ActivationCache, rows: torch.Tensor, batch_size: int, repeats: int = 3) -> float:
    """Median time of one optimisation step's arithmetic alone, per row of ``rows``.

    Forward through the gated suffix and backward to per-row gates, in batches
    of ``batch_size`` (as the optimiser does), with no sampling, optimiser or
    bookkeeping: a selection that runs ``steps`` steps cannot take less than
    ``steps * batch_size`` times this.
    """

    def one_pass() -> None:
        with preserved_model_state(cache.model), cache.gated.activated():
            for chunk in rows.split(batch_size):
                gates = [torch.ones(len(chunk), s.num_units, device=cache.device, requires_grad=True)
                         for s in cache.specs]
                scores = cache.gated.suffix(cache.frontier_rows(chunk), gates)
                torch.autograd.grad(scores.sum(), gates)

    return statistics.median(_timed(one_pass)[1] for _ in range(repeats)) / len(rows)


def selections_in_batches(model: torch.nn.Module, layer: str, jobs: list[tuple[int, int]], cache: ActivationCache,
                          size: int, **options: Any) -> list[Any]:
    """``find_core_units_batched`` over consecutive batches of ``size`` (class, seed) jobs, as reproduce runs them."""
    return [res for start in range(0, len(jobs), size)
            for res in find_core_units_batched(model, layer, jobs[start:start + size], cache, progress=False,
                                               **options)]


def write_section(path: Path, label: str, lines: list[str]) -> None:
    """Replace (or append) this device's section of the results file, keeping the others and any prose."""
    begin, end = f"<!-- benchmark: {label} -->", f"<!-- end benchmark: {label} -->"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = "\n".join([begin, *lines, end])
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_text(path, text)  # an interrupted run leaves the old file


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--classes", type=int, nargs="*", default=[0, 1, 8], help="classes timed per layer")
    p.add_argument("--naive-classes", type=int, nargs="*", default=[0], help="classes timed on the naive path")
    p.add_argument("--workload-runs", type=int, default=3, help="runs per class in the Table 1 workload")
    p.add_argument("--skip-workload", action="store_true")
    p.add_argument("--out", default=None, help="also write a markdown table here")
    p.add_argument("--device", default="cpu", help="where selections run, e.g. cuda (default: cpu)")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    torch.set_num_threads(args.threads)
    model = load_model(default_checkpoint("mnist"), "mnist")
    data, source = get_mnist(args.data_root, train=True, allow_sample=False)
    rows_out: list[dict[str, Any]] = []

    def emit(rec: dict[str, Any]) -> None:
        rows_out.append(rec)
        print(json.dumps(rec), flush=True)

    if dev.type == "cuda":
        # The first CUDA selection pays for context creation and kernel loading; keep it out of the timings.
        few = torch.utils.data.TensorDataset(*(t[:2000] for t in data.tensors))
        warm = ActivationCache(model, "max2", few, device=dev)
        find_core_units(model, "max2", 0, warm, seed=0, progress=False, epochs=1)
        del warm
    naive_per_selection: list[float] = []
    fast_per_selection: list[float] = []
    for layer in ("max1", "max2"):
        coef = coefficients("mnist", [layer])
        cache, t_cache = _timed(lambda: ActivationCache(model, layer, data, batch_size=1000, device=dev))
        per_ex = cache.per_example_frontier_bytes()
        emit({"layer": layer, "variant": "cache", "seconds": t_cache, "cache_bytes": cache.frontier_bytes(),
              "bytes_per_input": per_ex, "inputs": len(cache)})
        for c in args.classes:
            rows = build_dprime(cache.predictions, c, generator=torch.Generator().manual_seed(0)).index
            floor = floor_seconds(cache, rows)
            per_row = step_floor_seconds(cache, rows, DEFAULTS["batch_size"])
            res, t_fast = _timed(lambda: find_core_units(model, layer, c, cache, seed=0, progress=False, **coef))
            fast_per_selection.append(t_fast)
            # The arithmetic the optimiser cannot avoid: its steps' forward and backward passes.
            bound = per_row * int(res.settings["steps_run"]) * DEFAULTS["batch_size"]
            emit({"layer": layer, "class": c, "variant": "fast", "seconds": t_fast, "floor_seconds": floor,
                  "ratio_to_floor": t_fast / floor, "ratio_to_fast": 1.0, "units": res.num_units[layer],
                  "holding_rate": res.holding_rate, "steps": res.settings["steps_run"], "dprime": len(rows),
                  "step_bound_seconds": bound, "ratio_to_step_bound": t_fast / bound,
                  "step_bound_in_floors": bound / floor})
            if c in args.naive_classes:
                naive, t_naive = _timed(lambda: find_core_units(
                    model, layer, c, data, seed=0, progress=False, engine="hooks", patience=10**9, device=dev, **coef))
                naive_per_selection.append(t_naive)
                emit({"layer": layer, "class": c, "variant": "naive", "seconds": t_naive, "floor_seconds": floor,
                      "ratio_to_floor": t_naive / floor, "ratio_to_fast": t_naive / t_fast,
                      "units": naive.num_units[layer], "holding_rate": naive.holding_rate,
                      "same_units_as_fast": naive.units == res.units, "steps": naive.settings["steps_run"]})
                small = ActivationCache(model, layer, data, batch_size=1000, cache_budget=per_ex * 100, device=dev)
                b, t_budget = _timed(lambda: find_core_units(model, layer, c, small, seed=0, progress=False, **coef))
                emit({"layer": layer, "class": c, "variant": "budget", "cache_budget": per_ex * 100,
                      "cached": small.cached, "seconds": t_budget, "floor_seconds": floor,
                      "ratio_to_floor": t_budget / floor, "ratio_to_fast": t_budget / t_fast,
                      "same_units_as_fast": b.units == res.units})
                del small
                curve, t_curve = _timed(lambda: removal_curve(cache, rows, layer, res.gates[layer], c))
                emit({"layer": layer, "class": c, "variant": "curve", "points": len(curve), "seconds": t_curve,
                      "floor_seconds": floor, "ratio_to_floor": t_curve / floor})
        del cache

    if not args.skip_workload:
        # The Table 1 workload twice: one selection at a time, then as reproduce runs it (batch_selections
        # optimised together on this device); each timing includes building the layer's cache.
        jobs = [(c, r) for c in range(10) for r in range(args.workload_runs)]
        size = batch_selections(dev)
        units: dict[str, list[int]] = {"alone": [], "batched": []}
        seconds: dict[str, float] = {}
        for mode in ("alone", "batched"):
            t0 = time.perf_counter()
            for layer in ("max1", "max2"):
                coef = coefficients("mnist", [layer])
                cache = ActivationCache(model, layer, data, batch_size=1000, device=dev)
                if mode == "alone":
                    found = [find_core_units(model, layer, c, cache, seed=r, progress=False, **coef) for c, r in jobs]
                else:
                    found = selections_in_batches(model, layer, jobs, cache, size, **coef)
                units[mode] += [res.num_units[layer] for res in found]
                del cache
            seconds[mode] = time.perf_counter() - t0
        n = len(units["alone"])
        naive_extrapolated = statistics.mean(naive_per_selection) * n if naive_per_selection else float("nan")
        emit({"variant": "table1_workload", "selections": n, "seconds": seconds["alone"],
              "naive_extrapolated_seconds": naive_extrapolated,
              "speedup_vs_naive": naive_extrapolated / seconds["alone"]})
        emit({"variant": "table1_workload_batched", "selections": n, "seconds": seconds["batched"],
              "batch": size, "speedup_vs_alone": seconds["alone"] / seconds["batched"],
              "same_units": sum(a == b for a, b in zip(units["alone"], units["batched"])),
              "max_unit_difference": max(abs(a - b) for a, b in zip(units["alone"], units["batched"]))})

    if args.out:
        label = f"CUDA {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else f"CPU, {args.threads} threads"
        lines = [
            f"## {label}", "",
            f"`python benchmarks/run.py --threads {args.threads} --device {args.device}` on {source}; "
            f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}.", "",
            "| layer | class | variant | seconds | floor s | ratio to floor | step bound s | ratio to step bound "
            "| ratio to fast | notes |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        columns = ("floor_seconds", "ratio_to_floor", "step_bound_seconds", "ratio_to_step_bound", "ratio_to_fast")
        for r in rows_out:
            notes = {k: v for k, v in r.items() if k not in ("layer", "class", "variant", "seconds", *columns)}
            cells = " | ".join(f"{r.get(k, float('nan')):.{3 if k == 'floor_seconds' else 2}f}" for k in columns)
            lines.append(f"| {r.get('layer', '')} | {r.get('class', '')} | {r['variant']} | {r['seconds']:.2f} | "
                         f"{cells} | {json.dumps(notes)} |")
        write_section(Path(args.out), label, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
