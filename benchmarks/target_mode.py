"""Target mode per class on the paper's MNIST classifier: units, seconds, calibration runs, refinement.

    python benchmarks/target_mode.py --data-root ../shared/data --layer max2 --classes 0 1 2 3 4 5 6 7 8 9

Prints one JSON line per class and a total. Used to measure changes to target
mode's calibration and refinement: run it on two commits, one after the other
on an otherwise idle machine (two jobs on 2 cores distort each other's times).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from coreunits import ActivationCache, find_core_units
from coreunits.data import get_mnist
from coreunits.paper import coefficients, default_checkpoint
from coreunits.train import load_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None)
    p.add_argument("--layer", default="max2")
    p.add_argument("--classes", type=int, nargs="+", default=list(range(10)))
    p.add_argument("--target", type=float, default=0.995)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(default_checkpoint("mnist"), "mnist")
    data, _ = get_mnist(args.data_root, train=True, allow_sample=False)
    cache = ActivationCache(model, args.layer, data)
    seconds = units = 0.0
    for c in args.classes:
        t0 = time.perf_counter()
        r = find_core_units(model, args.layer, c, cache, target_holding_rate=args.target, progress=False,
                            **coefficients("mnist", [args.layer]))
        dt = time.perf_counter() - t0
        t = r.settings["target"]
        print(json.dumps({
            "class": c, "units": r.num_units[args.layer], "seconds": round(dt, 2),
            "holding_rate_strict": r.holding_rate_strict,
            "calibration": [(a["units"], round(a["holding_rate"], 4), round(a["seconds"], 2)) for a in t["calibration"]],
            "units_before": t["units_before"], "added": t["added"], "dropped": t["dropped"],
            "evaluations": t["evaluations"], "probe_evaluations": t["probe_evaluations"],
        }), flush=True)
        seconds += dt
        units += r.num_units[args.layer]
    print(json.dumps({"layer": args.layer, "classes": len(args.classes), "seconds": round(seconds, 1),
                      "mean_units": units / len(args.classes)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
