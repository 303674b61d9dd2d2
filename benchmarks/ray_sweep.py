"""A sweep in this process against the same sweep on a local Ray with 1 and 2 workers, side by side.

    python benchmarks/ray_sweep.py --data-root ../shared/data [--classes 10] [--out benchmarks/RESULTS.md]

The paper's MNIST classifier, layer max2, one selection per class (the paper's coefficients) on the 10,000
test digits. In process the selections run one after another on ``--threads`` threads; on Ray each worker
has one thread and takes one selection at a time. Every variant writes into a fresh folder (nothing is
reused), the Ray figures include starting and stopping Ray, and the units of every variant are checked to be
those of the in-process run. The table goes into RESULTS.md under its own heading (a rerun replaces it).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from run import write_section

from coreunits.data import get_mnist
from coreunits.paper import coefficients, default_checkpoint
from coreunits.sweep import plan, run_sweep
from coreunits.train import load_model


def _timed_sweep(model: Any, data: Any, classes: int, **kw: Any) -> tuple[float, list[Any]]:
    tasks = plan(["max2"], list(range(classes)), runs=1)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        records = run_sweep(model, data, tasks, out, identity={"benchmark": 1},
                            options=coefficients("mnist", ["max2"]), progress=False, **kw)
        return time.perf_counter() - t0, [r["units"] for r in records]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--threads", type=int, default=2, help="threads of the in-process sweep")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(default_checkpoint("mnist"), "mnist")
    data, _ = get_mnist(args.data_root, train=False)
    seq, units = _timed_sweep(model, data, args.classes)
    rows = [("in process", args.threads, seq)]
    for workers in (1, 2):
        wall, got = _timed_sweep(model, data, args.classes, workers=workers)
        if got != units:
            raise SystemExit(f"Ray with {workers} workers found other units than the in-process sweep")
        rows.append((f"Ray, {workers} worker{'s' if workers > 1 else ''}", workers, wall))
    lines = ["## Sweep in process vs on a local Ray", "",
             f"`python benchmarks/ray_sweep.py --data-root ../shared/data --classes {args.classes}`: MNIST CNN, max2, "
             f"{args.classes} selections (paper coefficients) on 10,000 test digits; {os.cpu_count()} CPUs, load "
             f"average {os.getloadavg()[0]:.1f} at the end; the same units in every row.", "",
             "| how | threads in all | wall s (Ray: start and stop included) | selections per minute |",
             "|---|---|---|---|"]
    lines += [f"| {how} | {threads} | {wall:.1f} | {60 * args.classes / wall:.1f} |" for how, threads, wall in rows]
    print("\n".join(lines))
    if args.out is not None:
        write_section(args.out, "ray sweep", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
