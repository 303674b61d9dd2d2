"""Heads of every block in one selection against one selection per block (issue 18, item 4), on the MNIST ViT.

    python benchmarks/vit_heads.py --data-root ../shared/data --compare results/compare-mnist-vit \\
        --out benchmarks/RESULTS.md

Per-block sets are those ``coreunits compare`` chose (``switch_gates`` records of ``--compare``, made with
``--max-inputs`` of the training split, seed 0): each was found with every other block fully on. Here, on
the same D'_c (the same inputs and seed), for each class:

* joint: one target-mode selection with gates on the heads of all blocks at once (one budget, as circuit
  tools select), at the same target;
* per-block union: every block's own set applied at once, which is what "the circuit" made of per-block
  answers would be: its holding rate says whether per-block sets compose.

Units are counted over all blocks; holding rates are strict, on D'_c and on the test split's D'_c.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from run import write_section

from coreunits import ActivationCache, find_core_units, holding_rate
from coreunits.compare import record_file
from coreunits.data import get_mnist
from coreunits.sources import random_subset
from coreunits.train import load_model


def _per_block_units(folder: Path, layers: list[str], c: int) -> dict[str, list[int]] | None:
    units = {}
    for layer in layers:
        path = folder / "runs" / record_file(f"{layer}_c{c}_switch_gates")
        if not path.is_file():
            return None
        units[layer] = json.loads(path.read_text())["units"]
    return units


def _masks(units: dict[str, list[int]], total: int) -> dict[str, torch.Tensor]:
    out = {}
    for layer, kept in units.items():
        m = torch.zeros(total, dtype=torch.bool)
        m[kept] = True
        out[layer] = m
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=None)
    p.add_argument("--checkpoint", default="checkpoints/mnist_vit.pt")
    p.add_argument("--compare", default="results/compare-mnist-vit", help="folder of the per-block compare run")
    p.add_argument("--max-inputs", type=int, default=5000, help="as given to that compare run")
    p.add_argument("--target", type=float, default=0.99)
    p.add_argument("--classes", type=int, nargs="+", default=list(range(10)))
    p.add_argument("--out", default=None, help="RESULTS.md to write the table into")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = load_model(args.checkpoint)
    blocks = len(model.blocks)  # type: ignore[arg-type]
    layers = [f"heads:blocks.{i}.attn" for i in range(blocks)]
    heads = model.blocks[0].attn.num_heads  # type: ignore[index]
    train, _ = get_mnist(args.data_root, train=True, allow_sample=False)
    data, _ = random_subset(train, args.max_inputs, 0)
    test, _ = get_mnist(args.data_root, train=False, allow_sample=False)
    cache = ActivationCache(model, layers, data, batch_size=1000)
    held = ActivationCache(model, layers, test, batch_size=1000)
    rows: list[dict[str, Any]] = []
    for c in args.classes:
        per_block = _per_block_units(Path(args.compare), layers, c)
        if per_block is None:
            print(f"class {c}: the per-block records are missing in {args.compare}; run its compare first")
            return 1
        t0 = time.perf_counter()
        joint = find_core_units(model, layers, c, cache, target_holding_rate=args.target, seed=0, progress=False)
        seconds = time.perf_counter() - t0
        union = _masks(per_block, heads)
        row = {
            "class": c, "joint": [joint.num_units[name] for name in layers],
            "joint_holding": joint.holding_rate_strict,
            "joint_heldout": holding_rate(model, joint.masks, c, held, build_dprime_first=True),
            "joint_seconds": seconds,
            "per_block": [len(per_block[name]) for name in layers],
            "union_holding": holding_rate(model, union, c, cache, build_dprime_first=True),
            "union_heldout": holding_rate(model, union, c, held, build_dprime_first=True),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = _table(rows, args, blocks, heads)
    print("\n".join(lines))
    if args.out:
        write_section(Path(args.out), "vit-heads", lines)
    return 0


def _table(rows: list[dict[str, Any]], args: argparse.Namespace, blocks: int, heads: int) -> list[str]:
    def mean(key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)

    lines = [
        f"## Heads of all {blocks} blocks in one selection against one selection per block (MNIST ViT)",
        "",
        f"`python benchmarks/vit_heads.py --data-root ... --compare {args.compare} --max-inputs {args.max_inputs}` "
        f"({torch.get_num_threads()} threads). Target {args.target} strict; {heads} heads a block; per-block sets "
        f"from `{args.compare}` (switch gates, each block alone); holding rates strict, on D'_c and on the test "
        "split's D'_c (held out).",
        "",
        "| class | joint heads per block | joint total | joint holding (held out) | joint s "
        "| per-block heads | per-block total | per-block sets applied together: holding (held out) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['class']} | {' '.join(map(str, r['joint']))} | {sum(r['joint'])} | "
            f"{100 * r['joint_holding']:.2f}% ({100 * r['joint_heldout']:.2f}%) | {r['joint_seconds']:.1f} | "
            f"{' '.join(map(str, r['per_block']))} | {sum(r['per_block'])} | "
            f"{100 * r['union_holding']:.2f}% ({100 * r['union_heldout']:.2f}%) |"
        )
    joint_total = sum(sum(r["joint"]) for r in rows) / len(rows)
    block_total = sum(sum(r["per_block"]) for r in rows) / len(rows)
    lines += [
        f"| mean | | {joint_total:.1f} | {100 * mean('joint_holding'):.2f}% ({100 * mean('joint_heldout'):.2f}%) "
        f"| {mean('joint_seconds'):.1f} | | {block_total:.1f} | "
        f"{100 * mean('union_holding'):.2f}% ({100 * mean('union_heldout'):.2f}%) |",
    ]
    return lines


if __name__ == "__main__":
    sys.exit(main())
