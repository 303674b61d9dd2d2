"""Selections per second: one at a time against optimised together (find_core_units_batched).

    python benchmarks/batched.py --data-root ../shared/data [--runs 1] [--device cuda] [--batch 10 30]
                                 [--out benchmarks/RESULTS.md]

The Table 1 workload of the paper's MNIST classifier (max1 and max2, classes 0-9, ``--runs`` seeds each, the
paper's coefficients, D'_c from the training split), on one cache per layer: first every selection alone with
``find_core_units``, then the same (class, seed) pairs in batches of each ``--batch`` size (default: what sweep
and reproduce run on that device, ``batch_selections``), side by side in one process. Prints one JSON line per layer and mode and, with ``--out``, puts
the table in RESULTS.md under its own heading (a rerun replaces it). A benchmark measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from run import selections_in_batches, write_section

from coreunits import ActivationCache, find_core_units, find_core_units_batched
from coreunits._core.selection import BATCH_SELECTIONS, BATCH_SELECTIONS_GPU, batch_selections
from coreunits.data import get_mnist
from coreunits.paper import coefficients, default_checkpoint
from coreunits.train import load_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=1, help="seeds per class")
    p.add_argument("--layers", nargs="+", default=["max2", "max1"])
    p.add_argument("--device", default="cpu", help="cpu or cuda (the cache and the gates live there)")
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="selections optimised together (each size timed against the same one-at-a-time run)")
    p.add_argument("--out", type=Path, default=None, help="RESULTS.md to put the table in")
    args = p.parse_args(argv)
    args.batch = args.batch or [batch_selections(args.device)]
    torch.set_num_threads(args.threads)
    model = load_model(default_checkpoint("mnist"), "mnist")
    data, source = get_mnist(args.data_root, train=True, allow_sample=False)
    if args.device.startswith("cuda"):
        # The first CUDA selection pays for context creation and kernel loading; keep it out of the timings.
        few = torch.utils.data.TensorDataset(*(t[:2000] for t in data.tensors))
        warm = ActivationCache(model, "max2", few, device=args.device, progress=False)
        find_core_units_batched(model, "max2", [(0, 0), (1, 0)], warm, progress=False, epochs=1)
        find_core_units(model, "max2", 0, warm, seed=0, progress=False, epochs=1)
        del warm
    jobs = [(c, seed) for c in range(10) for seed in range(args.runs)]
    rows: list[dict[str, Any]] = []
    for layer in args.layers:
        coef = coefficients("mnist", [layer])
        cache = ActivationCache(model, layer, data, batch_size=1000, progress=False, device=args.device)
        t0 = time.perf_counter()
        alone = [find_core_units(model, layer, c, cache, seed=seed, progress=False, **coef) for c, seed in jobs]
        t_alone = time.perf_counter() - t0
        for size in args.batch:
            t0 = time.perf_counter()
            together = selections_in_batches(model, layer, jobs, cache, size, **coef)
            t_together = time.perf_counter() - t0
            diffs = [abs(a.num_units[layer] - b.num_units[layer]) for a, b in zip(alone, together)]
            row = {
                "layer": layer, "selections": len(jobs), "batch": size, "seconds_alone": round(t_alone, 1),
                "seconds_together": round(t_together, 1), "speedup": round(t_alone / t_together, 3),
                "selections_per_s_alone": round(len(jobs) / t_alone, 3),
                "selections_per_s_together": round(len(jobs) / t_together, 3),
                "same_units": sum(a.units == b.units for a, b in zip(alone, together)),
                "max_unit_difference": max(diffs),
                "same_strict_holding": sum(a.holding_rate_strict == b.holding_rate_strict
                                           for a, b in zip(alone, together)),
                "mean_units": round(sum(r.num_units[layer] for r in alone) / len(alone), 2),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        del cache
    if args.out:
        where = (f"CUDA {torch.cuda.get_device_name(args.device)}" if args.device.startswith("cuda")
                 else f"CPU, {args.threads} threads")
        lines = [
            f"## Selections one at a time against optimised together ({where})", "",
            f"`python benchmarks/batched.py --data-root ../shared/data --runs {args.runs} --device {args.device} "
            f"--threads {args.threads} --batch {' '.join(map(str, args.batch))} --out benchmarks/RESULTS.md`"
            f" on {source}; torch {torch.__version__}, {time.strftime('%Y-%m-%d')}. The Table 1 workload (classes "
            f"0-9 x {args.runs} seed(s), the paper's coefficients), one at a time, then in batches of "
            f"{' or '.join(map(str, args.batch))} (sweep and reproduce run {BATCH_SELECTIONS} on a CPU, {BATCH_SELECTIONS_GPU} on a GPU) on the same cache.", "",
            "| layer | selections | batch | s one at a time | s together | speed-up | selections/s alone | selections/s "
            "together | same units | largest unit difference | same strict holding | mean units |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [f"| {r['layer']} | {r['selections']} | {r['batch']} | {r['seconds_alone']} | "
                  f"{r['seconds_together']} | {r['speedup']:.2f}x | {r['selections_per_s_alone']} | {r['selections_per_s_together']} | "
                  f"{r['same_units']}/{r['selections']} | {r['max_unit_difference']} | "
                  f"{r['same_strict_holding']}/{r['selections']} | {r['mean_units']} |" for r in rows]
        write_section(args.out, f"batched selections {where}", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
