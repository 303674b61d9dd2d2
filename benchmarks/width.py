"""Cost against width: target mode, exact greedy and the rankings on hidden layers of 192, 768 and 1536 neurons.

    python benchmarks/width.py --data-root ../shared/data --out benchmarks/RESULTS.md

Three one-hidden-layer MLPs (784-W-10, ReLU) are trained here on MNIST train (seeded, a few epochs, test
accuracy printed); for each width and class the hidden neurons (the ReLU's output) are chosen at 99.5%
strict by every method on the same D'_c (``compare_methods``, one run, same threads), and the seconds and
units of each are tabled. Exact greedy scores every kept unit on all of D'_c at every step, so its work
grows about as K^2 (K units); the question is how the gates' time grows.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from run import write_section
from torch import nn

from coreunits import ActivationCache
from coreunits._core.strategies import ExactGreedyElimination, GradientTimesActivation, MeanActivation, SwitchGates
from coreunits.compare import compare_methods
from coreunits.data import get_mnist


class WideMLP(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(784, width), nn.ReLU(), nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x.flatten(1))))


def _train(width: int, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> WideMLP:
    torch.manual_seed(seed)
    model = WideMLP(width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(128):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None)
    p.add_argument("--widths", type=int, nargs="+", default=[192, 768, 1536])
    p.add_argument("--classes", type=int, nargs="+", default=[0, 8])
    p.add_argument("--target", type=float, default=0.995)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="results file to write the table into")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    train, _ = get_mnist(args.data_root, train=True, allow_sample=False)
    test, _ = get_mnist(args.data_root, train=False, allow_sample=False)
    (x, y), (xt, yt) = train.tensors, test.tensors
    rows: list[dict[str, Any]] = []
    for width in args.widths:
        model = _train(width, x, y, args.epochs, seed=0)
        accuracy = _accuracy(model, xt, yt)
        print(json.dumps({"width": width, "test_accuracy": round(accuracy, 4)}), flush=True)
        t0 = time.perf_counter()
        cache = ActivationCache(model, "act", x, progress=False)
        cache_s = time.perf_counter() - t0
        methods = [SwitchGates(), ExactGreedyElimination(), GradientTimesActivation(), MeanActivation()]
        with tempfile.TemporaryDirectory() as tmp:
            records = compare_methods(model, "act", args.classes, cache, target=args.target, methods=methods,
                                      out=tmp, curves=False, progress=False)
        for r in records:
            row = {"width": width, "test_accuracy": accuracy, "cache_s": cache_s, "class": r["target_class"],
                   "method": r["method"], "units": r["num_units"], "seconds": r["seconds"], "reached": r["reached"],
                   "evaluations": r.get("evaluations")}
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        write_section(args.out, "width", _table(args, rows))
    return 0


def _table(args: argparse.Namespace, rows: list[dict[str, Any]]) -> list[str]:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [f"## Cost against width: hidden neurons of MNIST MLPs (784-W-10), {args.target:.1%} strict", "",
             f"`python benchmarks/width.py --data-root DIR --widths {' '.join(map(str, args.widths))} --classes "
             f"{' '.join(map(str, args.classes))}` ({args.threads} threads, 2 CPUs; each MLP trained here for "
             f"{args.epochs} epochs, seed 0; D'_c from MNIST train; one run, the methods one after another). "
             "Per width: mean seconds per class, mean units (of W).", "",
             "| width | test accuracy | " + " | ".join(f"{m} s | {m} units" for m in methods)
             + " | exact greedy / gates time |",
             "|---|---|" + "---|---|" * len(methods) + "---|"]
    for width in args.widths:
        mine = [r for r in rows if r["width"] == width]
        cells = []
        mean: dict[str, float] = {}
        for m in methods:
            rs = [r for r in mine if r["method"] == m]
            mean[m] = sum(r["seconds"] for r in rs) / len(rs)
            units = sum(r["units"] for r in rs) / len(rs)
            cells.append(f"{mean[m]:.1f} | {units:.1f}" + ("" if all(r["reached"] for r in rs) else " (not reached)"))
        ratio = mean.get("greedy_exact", float("nan")) / mean.get("switch_gates", float("nan"))
        lines.append(f"| {width} | {mine[0]['test_accuracy']:.2%} | " + " | ".join(cells) + f" | {ratio:.1f}x |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
