"""Greedy backward elimination with lazy re-scoring, on the comparison's problems.

    python benchmarks/lazy_greedy.py --data-root ../shared/data --layer max1 --classes 0 1

Target mode's drops re-score lazily (``coreunits._core.lazy``); ``coreunits
compare`` runs the textbook greedy elimination. This prints, per class, the
lazy greedy's units, seconds and probe evaluations beside the textbook
greedy's record in ``results/compare-mnist`` (same D'_c, probe and target), so
the switch gates' time can also be read against a lazy greedy. With
``--textbook`` the textbook greedy is run again here, side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from coreunits import ActivationCache, SelectionProblem
from coreunits.data import get_mnist
from coreunits.paper import default_checkpoint
from coreunits.strategies import GreedyBackwardElimination
from coreunits.train import load_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None)
    p.add_argument("--layer", default="max1")
    p.add_argument("--classes", type=int, nargs="+", default=[0, 1])
    p.add_argument("--target", type=float, default=0.995)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--textbook", action="store_true", help="also run the textbook greedy here")
    p.add_argument("--records", default="results/compare-mnist/runs")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(default_checkpoint("mnist"), "mnist")
    data, _ = get_mnist(args.data_root, train=True, allow_sample=False)
    cache = ActivationCache(model, args.layer, data, progress=False)
    for c in args.classes:
        row: dict[str, object] = {"layer": args.layer, "class": c}
        variants = [("lazy", True)] + ([("textbook", False)] if args.textbook else [])
        for name, lazy in variants:
            t0 = time.perf_counter()
            r = GreedyBackwardElimination(probe_rows=2048, lazy=lazy).run(
                SelectionProblem(cache, args.layer, c), args.target)
            row[name] = {"units": len(r.units), "seconds": round(time.perf_counter() - t0, 1),
                         "probe_evaluations": r.info["candidate_evaluations"],
                         "verifications": r.info["verifications"]}
        record = Path(args.records) / f"{args.layer}_c{c}_greedy_backward.json"
        if record.exists():
            rec = json.loads(record.read_text())
            row["textbook_record"] = {"units": rec["num_units"], "seconds": round(rec["seconds"], 1),
                                      "probe_evaluations": rec["info"]["candidate_evaluations"]}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
