"""Target mode against exact greedy elimination, side by side in one process: units and seconds per class.

    python benchmarks/greedy_ratio.py --data-root ../shared/data --dataset mnist --layer max2 --classes 0 4 9

The time bar of issue 14 (exact greedy's seconds >= 3x target mode's) is a ratio
of two runs; a committed comparison may hold records measured months and code
versions apart (``compare`` reuses stored records). This measures both methods
on each class one after the other, on one cache and one D'_c, so the ratio is
of the code as it is, on the machine as it is. Prints one JSON line per class
and the totals.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from coreunits import ActivationCache, SelectionProblem
from coreunits.cli import _compare_data
from coreunits.compare import default_methods
from coreunits.paper import coefficients, default_checkpoint
from coreunits.train import load_named_or


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None)
    p.add_argument("--dataset", choices=["mnist", "cifar10"], default="mnist")
    p.add_argument("--checkpoint", default=None, help="default: the dataset's committed CNN")
    p.add_argument("--layer", default="max2")
    p.add_argument("--classes", type=int, nargs="+", default=[0, 4, 9])
    p.add_argument("--target", type=float, default=0.995)
    p.add_argument("--reading", choices=["strict", "paper"], default="strict")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ckpt = Path(args.checkpoint) if args.checkpoint else default_checkpoint(args.dataset)
    model = load_named_or(ckpt, args.dataset)
    data = _compare_data(args.dataset, args.data_root)[0]  # D'_c's data exactly as `coreunits compare` takes it
    cache = ActivationCache(model, args.layer, data, batch_size=1000)
    methods = default_methods(0, coefficients(args.dataset, [args.layer]), ["switch_gates", "greedy_exact"])
    totals = {m.name: [0, 0.0] for m in methods}
    for c in args.classes:
        line: dict[str, object] = {"class": c}
        for method in methods:
            problem = SelectionProblem(cache, args.layer, c, seed=0, reading=args.reading)
            res = method.run(problem, args.target)
            units = res.num_units or 0
            reached = res.holding_rate is not None and res.holding_rate >= args.target
            line[method.name] = {"units": units, "seconds": round(res.seconds, 2), "reached": reached}
            totals[method.name][0] += units
            totals[method.name][1] += res.seconds
        print(json.dumps(line), flush=True)
    gates, greedy = totals["switch_gates"], totals["greedy_exact"]
    print(json.dumps({"layer": args.layer, "classes": len(args.classes),
                      "switch_gates": {"mean_units": gates[0] / len(args.classes), "seconds": round(gates[1], 1)},
                      "greedy_exact": {"mean_units": greedy[0] / len(args.classes), "seconds": round(greedy[1], 1)},
                      "greedy_over_gates_time": round(greedy[1] / gates[1], 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
