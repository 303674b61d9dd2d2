"""Class specialists against the full model, side by side: parameters, FLOPs, CPU latency, held-out holding.

    python benchmarks/specialists.py --data-root ../shared/data --dataset mnist [--out benchmarks/RESULTS.md]
    python benchmarks/specialists.py --data-root ../shared/data --dataset cifar10 --alpha-scale 0.33

For every class: the core units of max1 and max2 selected together on the training split (or a seeded random
``--train-inputs`` of it), in target mode, or with ``--alpha-scale`` one selection at the paper's coefficients
scaled (CIFAR-10: target mode with least-harm drops took 11 min per class here, max1 feeding a local response
norm that has no batched path; gate-order drops on 10,000 images 7.5 min)
(the call ``coreunits find --layer max1 --layer max2 --split train --target T`` makes; stored as
``results/specialists/<dataset>/c<class>.json`` and reused when present), the specialist cut from them
(``coreunits.export_specialist``), written with torch.export and loaded back, then measured against the
full model in one run:

* parameters and FLOPs per input (torch.utils.flop_counter);
* CPU latency of the class-c decision, full model and specialist timed alternately (median of repeats), at
  a batch of 1 and of 256;
* holding rate on held-out data: the share of the test split's D'_c (every test input the full model
  predicts as c plus as many others, seed 0) where the loaded specialist's decision equals the full model's;
* the same channel counts chosen by Torch-Pruning's magnitude importance (``GroupMagnitudeImportance``,
  the L2 norm over each channel's dependency group; all classes alike), cut the same way: same FLOPs, and
  the holding rate that class-blind selection gives.

The table goes into RESULTS.md under its own heading (a rerun replaces it) and every figure into
``results/specialists/<dataset>/specialists.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from run import write_section
from torch import nn

from coreunits import CoreUnits, find_core_units
from coreunits._core.io import atomic_write_text
from coreunits._core.specialist import ClassDetector, count_flops, detector_holding_rate, export_specialist
from coreunits.paper import coefficients, default_checkpoint
from coreunits.train import load_named_or

LAYERS = ["max1", "max2"]


def _data(dataset: str, root: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(training inputs, test inputs) as the model takes them."""
    if dataset == "mnist":
        from coreunits.data import get_mnist

        train, _ = get_mnist(root, train=True, allow_sample=False)
        test, _ = get_mnist(root, train=False, allow_sample=False)
        return train.tensors[0], test.tensors[0]
    from coreunits.paper import cifar10_split

    return cifar10_split(root, train=True).tensors[0], cifar10_split(root, train=False).tensors[0]


def _result(model: nn.Module, train: torch.Tensor, c: int, args: argparse.Namespace, target: float,
            folder: Path) -> CoreUnits:
    """The stored selection of class c, else a new one (saved): target mode, or scaled fixed coefficients."""
    path = folder / f"c{c}.json"
    if path.exists():
        return CoreUnits.load(path)
    coef = coefficients(args.dataset, LAYERS)
    scale = args.alpha_scale or 1.0
    options: dict[str, Any] = {"alpha": {k: v * scale for k, v in coef["alpha"].items()}, "lam": coef["lam"] * scale}
    if args.alpha_scale is None:
        options.update(target_holding_rate=target, drop_order=args.drop_order)
    r = find_core_units(model, LAYERS, c, train, seed=0, progress=False, epochs=int(coef["epochs"]), batch_size=128,
                        **options)
    r.save(path)
    return r


def _latency(full: nn.Module, special: nn.Module, x: torch.Tensor, rounds: int, calls: int = 10) -> tuple[float, float]:
    """Median seconds per call of each model: rounds alternate between them, each round ``calls`` calls in a row.

    Alternating rounds lets both see the same machine; calls in a row measure each model as it runs when deployed
    alone (calls alternating one by one would have the full model evict the small one's weights from the caches).
    """
    times: dict[int, list[float]] = {0: [], 1: []}
    with torch.inference_mode():
        for m in (full, special):
            m(x)  # warm-up
        for _ in range(rounds):
            for i, m in enumerate((full, special)):
                t0 = time.perf_counter()
                for _ in range(calls):
                    m(x)
                times[i].append((time.perf_counter() - t0) / calls)
    return statistics.median(times[0]), statistics.median(times[1])


def _magnitude_units(model: nn.Module, example: torch.Tensor, counts: dict[str, int]) -> dict[str, list[int]] | None:
    """Per layer, the ``counts[layer]`` channels Torch-Pruning's magnitude importance ranks highest."""
    try:
        import torch_pruning as tp
    except ImportError:
        print("torch-pruning is not installed (pip install torch-pruning): no magnitude column")
        return None
    producers = {"max1": "conv1", "max2": "conv2"}
    # Magnitude importance reads weights only; Torch-Pruning's group builder does not finish (> 60 s) through the
    # CIFAR-10 net's parameter-free per-image standardisation and local response norms, so they become Identity.
    model = copy.deepcopy(model)
    for name, m in list(model.named_children()):
        if name == "standardize" or isinstance(m, nn.LocalResponseNorm):
            setattr(model, name, nn.Identity())
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    importance = tp.importance.GroupMagnitudeImportance(p=2)
    units = {}
    for layer, n in counts.items():
        conv = model.get_submodule(producers[layer])
        group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=list(range(conv.out_channels)))
        scores = importance(group)
        units[layer] = sorted(scores.argsort(descending=True)[:n].tolist())
    return units


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--dataset", choices=["mnist", "cifar10"], default="mnist")
    p.add_argument("--classes", type=int, nargs="*", default=list(range(10)))
    p.add_argument("--target", type=float, default=None, help="strict holding rate on D'_c (mnist 0.995, cifar10 0.97)")
    p.add_argument("--train-inputs", type=int, default=None,
                   help="select on a seeded random subset of this many training inputs (default: all)")
    p.add_argument("--drop-order", choices=["least_harm", "gate"], default="least_harm",
                   help="target mode's drops (gate: one check per unit; least-harm drops through CIFAR-10's max1, "
                        "which feeds a local response norm, ran over 10 min per class here)")
    p.add_argument("--alpha-scale", type=float, default=None,
                   help="instead of target mode, one selection with the paper's alpha and lam times this")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    target = args.target or (0.995 if args.dataset == "mnist" else 0.97)
    torch.set_num_threads(args.threads)
    model = load_named_or(default_checkpoint(args.dataset), args.dataset).eval()
    train, test = _data(args.dataset, args.data_root)
    if args.train_inputs is not None and args.train_inputs < len(train):
        train = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: args.train_inputs]]
    folder = Path(__file__).resolve().parents[1] / "results" / "specialists" / args.dataset
    full_flops, full_params = count_flops(model, test[:1]), sum(p.numel() for p in model.parameters())
    rows_out = []
    for c in args.classes:
        r = _result(model, train, c, args, target, folder)
        with tempfile.TemporaryDirectory() as tmp:
            spec = export_specialist(model, r, test[:8], Path(tmp) / "d.pt2", check_inputs=test[:1024])
            loaded = torch.export.load(Path(tmp) / "d.pt2").module()
        held = detector_holding_rate(loaded, model, test, c)
        full = ClassDetector(model, c)
        lat1 = _latency(full, loaded, test[:1], args.repeats)
        lat256 = _latency(full, loaded, test[:256], args.repeats, calls=2)
        torch.set_num_threads(1)  # one input on one core: where per-call overhead weighs most
        lat1_one_thread = _latency(full, loaded, test[:1], args.repeats)
        # At a few channels per convolution oneDNN's per-call cost outweighs the arithmetic (torch.profiler: ~45 us
        # per conv at batch 1 whatever the width); PyTorch's own convolution path is what such a model would use.
        with torch.backends.mkldnn.flags(enabled=False):
            lat1_plain = _latency(full, loaded, test[:1], args.repeats)
        torch.set_num_threads(args.threads)
        row: dict[str, Any] = {
            "class": c, "units": r.num_units, "holding_dprime_train": r.holding_rate_strict,
            "holding_heldout": held[0], "heldout_size": held[1],
            "params": sum(p.numel() for p in spec.module.parameters()), "full_params": full_params,
            "flops": count_flops(spec.module, test[:1]), "full_flops": full_flops,
            "latency_b1": lat1, "latency_b256": lat256, "latency_b1_one_thread": lat1_one_thread,
            "latency_b1_one_thread_no_onednn": lat1_plain, "pruned": spec.pruned, "fallback": spec.fallback,
            "stops": [s for cut in spec.cuts for s in cut.stops],
        }
        magnitude = _magnitude_units(model, test[:1], r.num_units)
        if magnitude is not None:
            blind = export_specialist(model, {**magnitude}, test[:8], target_class=c, check_inputs=test[:1024])
            row["magnitude_units"] = magnitude
            row["holding_heldout_magnitude"] = detector_holding_rate(blind.module, model, test, c)[0]
        rows_out.append(row)
        print(f"class {c}: units {r.num_units}, held-out {row['holding_heldout']:.4f} "
              f"(magnitude {row.get('holding_heldout_magnitude', float('nan')):.4f}), "
              f"FLOPs x{full_flops / row['flops']:.1f}, latency b1 x{lat1[0] / lat1[1]:.2f} "
              f"(1 thread x{lat1_one_thread[0] / lat1_one_thread[1]:.2f}, "
              f"without oneDNN x{lat1_plain[0] / lat1_plain[1]:.2f}), "
              f"b256 x{lat256[0] / lat256[1]:.2f}", flush=True)
    atomic_write_text(folder / "specialists.json", json.dumps(rows_out, indent=1))
    if args.out:
        write_section(args.out, f"specialists-{args.dataset}", _table(args, target, rows_out))
    return 0


def _table(args: argparse.Namespace, target: float, rows: list[dict[str, Any]]) -> list[str]:
    cmd = f"python benchmarks/specialists.py --data-root ../shared/data --dataset {args.dataset} --target {target}"
    if args.train_inputs is not None:
        cmd += f" --train-inputs {args.train_inputs}"
    if args.drop_order != "least_harm":
        cmd += f" --drop-order {args.drop_order}"
    if args.alpha_scale is not None:
        cmd += f" --alpha-scale {args.alpha_scale}"
    how = (f"at {target:.1%} strict on train D'_c" if args.alpha_scale is None
           else f"the paper's coefficients x {args.alpha_scale}")
    lines = [f"## Class specialists, {args.dataset} (max1 + max2 core units, {how})", "",
             f"`{cmd}` ({args.threads} threads, {os.cpu_count()} CPUs; latency: the median per call over {args.repeats} "
             "alternating rounds of the full model's and the loaded torch.export specialist's class-c decision, each "
             "round 10 calls in a row at batch 1 and 2 at batch 256; \"without oneDNN\": both models under "
             "`torch.backends.mkldnn.flags(enabled=False)`). Held-out: the "
             "test split's D'_c. Magnitude: the same channel counts ranked by Torch-Pruning's "
             "GroupMagnitudeImportance (p=2), cut the same way.", "",
             "| class | max1 | max2 | held-out holding | magnitude's held-out holding | params ratio | FLOPs ratio "
             "| latency ratio, batch 1, 1 thread | latency ratio, batch 1, 1 thread, without oneDNN "
             f"| latency ratio, batch 1, {args.threads} threads "
             f"| latency ratio, batch 256, {args.threads} threads |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mag = r.get("holding_heldout_magnitude")
        lines.append(
            f"| {r['class']} | {r['units']['max1']} | {r['units']['max2']} | {r['holding_heldout']:.2%} | "
            f"{'' if mag is None else f'{mag:.2%}'} | {r['full_params'] / r['params']:.1f}x | "
            f"{r['full_flops'] / r['flops']:.1f}x | "
            f"{r['latency_b1_one_thread'][0] / r['latency_b1_one_thread'][1]:.2f}x | "
            f"{r['latency_b1_one_thread_no_onednn'][0] / r['latency_b1_one_thread_no_onednn'][1]:.2f}x | "
            f"{r['latency_b1'][0] / r['latency_b1'][1]:.2f}x | "
            f"{r['latency_b256'][0] / r['latency_b256'][1]:.2f}x |")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
