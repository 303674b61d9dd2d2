"""One step of exact greedy elimination, batched against one mask at a time, side by side.

    python benchmarks/exact_step.py --data-root ../shared/data --layer max2 --classes 0

A step of exact greedy scores every kept unit's removal on all of D'_c.
``SelectionProblem.toggle_rates`` does it in one batched pass through the next
layer (each unit's contribution to a Linear computed once; a grouped
convolution for a Conv2d); the plain way judges each toggled mask on its own
(``SelectionProblem._toggle_rate``, through the sparse-mask path). This times
both on the first step (all units kept, no target, so nothing is given up
early) in one process, checks that they agree, and prints one JSON line per
class. ``--checkpoint`` takes any checkpoint with metadata (e.g. the MNIST MLP,
``--layer relu1``).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from coreunits import ActivationCache, SelectionProblem
from coreunits.data import get_mnist
from coreunits.paper import default_checkpoint
from coreunits.train import load_named_or


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--layer", default="max2")
    p.add_argument("--classes", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ckpt = args.checkpoint or default_checkpoint("mnist")
    model = load_named_or(ckpt, "mnist")
    data, _ = get_mnist(args.data_root, train=True, allow_sample=False)
    cache = ActivationCache(model, args.layer, data, progress=False)
    for c in args.classes:
        problem = SelectionProblem(cache, args.layer, c)
        every = torch.ones(problem.num_units, dtype=torch.bool)
        units = list(range(problem.num_units))
        t0 = time.perf_counter()
        batched = problem.toggle_rates(every, units)
        t_batched = time.perf_counter() - t0
        fresh = SelectionProblem(cache, args.layer, c)  # no remembered scores from the batched run
        t0 = time.perf_counter()
        alone = {j: fresh._toggle_rate(every, j, None) for j in units}
        t_alone = time.perf_counter() - t0
        worst = max(abs(batched[j][0] - alone[j][0]) for j in units)  # type: ignore[index]
        print(json.dumps({"layer": args.layer, "class": c, "dprime": len(problem.rows), "units": len(units),
                          "batched_s": round(t_batched, 2), "one_at_a_time_s": round(t_alone, 2),
                          "speedup": round(t_alone / t_batched, 1), "largest_rate_difference": worst}),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
