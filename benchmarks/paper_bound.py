"""The paper reading with masks given up early against judged whole, side by side (exact greedy, target mode).

    python benchmarks/paper_bound.py --data-root ../shared/data --classes 1 6

The paper reading refits ``w_b`` on each mask's scores over all of D'_c, so a
candidate's rate needs every input. But the refit picks ``w_b`` from a fixed
grid, and a candidate that already changed more decisions than the target
allows under every grid ``w_b`` misses whatever the refit picks
(``_core.paper_bound``). This runs exact greedy elimination (``greedy_exact``)
and target mode (``switch_gates`` with the paper's coefficients as its start)
on the CIFAR-10 CNN's max2 at 97% in the paper reading twice per class in one
process: as they run (given up early), and with the bound switched off (every
mask judged on all of D'_c, as before the bound). It checks that both keep the
same units and prints one JSON line per (class, method).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from unittest import mock

import torch

from coreunits import ActivationCache, SelectionProblem
from coreunits._core.paper_bound import PaperMissBound
from coreunits.compare import default_methods
from coreunits.paper import cifar10_data, coefficients, default_checkpoint
from coreunits.train import load_named_or


def _never_given_up(self: PaperMissBound, which: torch.Tensor | None = None) -> torch.Tensor:
    """The bound switched off: no candidate is given up before all of D'_c is judged."""
    rows = self.misses.shape[0] if which is None else len(which)
    return torch.zeros(rows, dtype=torch.long)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None)
    p.add_argument("--layer", default="max2")
    p.add_argument("--classes", type=int, nargs="+", default=[1])
    p.add_argument("--target", type=float, default=0.97)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_named_or(Path(default_checkpoint("cifar10")), "cifar10")
    data, _ = cifar10_data(args.data_root, quick=False)
    cache = ActivationCache(model, args.layer, data, batch_size=1000, progress=False)
    methods = default_methods(0, coefficients("cifar10", [args.layer]), ["greedy_exact", "switch_gates"])
    for c in args.classes:
        for method in methods:
            runs = {}
            for name, patch in (("given_up_early", None), ("judged_whole", _never_given_up)):
                problem = SelectionProblem(cache, args.layer, c, reading="paper")
                with mock.patch.object(PaperMissBound, "least", patch) if patch else contextlib.nullcontext():
                    runs[name] = method.run(problem, args.target)
            early, whole = runs["given_up_early"], runs["judged_whole"]
            print(json.dumps({"layer": args.layer, "class": c, "method": method.name, "target": args.target,
                              "dprime": len(problem.rows), "units": early.num_units,
                              "same_units": early.units == whole.units, "given_up_early_s": round(early.seconds, 1),
                              "judged_whole_s": round(whole.seconds, 1),
                              "speedup": round(whole.seconds / early.seconds, 2)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
