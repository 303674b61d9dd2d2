"""The ``coreunits`` command line: demo, find, train, reproduce, compare.

Every subcommand has ``--help``. Data comes from ``--data-root`` or the
``COREUNITS_DATA`` variable; MNIST is downloaded when possible, and the demo
falls back to a sample of 2000 MNIST test digits shipped with the package.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["default_checkpoint", "main"]

_REPO_ROOT = Path(__file__).resolve().parents[2]


def default_checkpoint(model: str = "mnist") -> Path:
    """The bundled checkpoint of the paper's ``model`` ("mnist" or "cifar10").

    Looked up under ``./checkpoints`` first, then next to the source tree.
    """
    name = {"mnist": "mnist_cnn.pt", "cifar10": "cifar10_cnn.pt"}[model]
    for base in (Path.cwd(), _REPO_ROOT):
        path = base / "checkpoints" / name
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"no {model} checkpoint found at ./checkpoints/{name} or {_REPO_ROOT / 'checkpoints' / name}; "
        f"train one with `coreunits train {model}` or pass --checkpoint"
    )


def _threads(n: int | None) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _format_units(units: list[int], limit: int = 24) -> str:
    text = ",".join(str(u) for u in units[:limit])
    return text + (",..." if len(units) > limit else "")


def cmd_demo(args: argparse.Namespace) -> int:
    """Core units of every class in one layer of the paper's MNIST classifier."""
    from coreunits import ActivationCache, find_core_units
    from coreunits.data import get_mnist
    from coreunits.paper import coefficients
    from coreunits.train import load_model

    _threads(args.threads)
    ckpt = Path(args.checkpoint) if args.checkpoint else default_checkpoint("mnist")
    model = load_model(ckpt)
    data, source = get_mnist(args.data_root, train=args.split == "train", allow_download=not args.offline)
    coef = coefficients("mnist", [args.layer])
    alpha = args.alpha if args.alpha is not None else coef["alpha"]
    lam = args.lam if args.lam is not None else coef["lam"]
    epochs = int(coef["epochs"])
    print(f"model: paper's MNIST classifier ({ckpt})")
    print(f"data:  {source}")
    print(f"layer: {args.layer}   alpha={alpha:g} lam={lam:g} seed={args.seed}")
    t0 = time.perf_counter()
    cache = ActivationCache(model, args.layer, data, batch_size=500, progress=not args.no_progress)
    classes = args.classes if args.classes else list(range(cache.num_classes))
    print()
    print(f"{'class':>5}  {'units kept':>10}  {'holding (paper)':>15}  {'holding (strict)':>16}  {'D_c':>6}  units")
    results = []
    for c in classes:
        r = find_core_units(model, args.layer, c, cache, alpha=alpha, lam=lam, epochs=epochs, seed=args.seed,
                            progress=not args.no_progress)
        results.append(r.to_dict())
        n, total = r.num_units[args.layer], r.total_units[args.layer]
        print(
            f"{c:>5}  {n:>5} / {total:<3}  {100 * r.holding_rate:>14.2f}%  {100 * r.holding_rate_strict:>15.2f}%"
            f"  {r.dprime['size']:>6}  [{_format_units(r.units[args.layer])}]",
            flush=True,
        )
    print(f"\n{_plural(len(classes), 'class', 'classes')} in {time.perf_counter() - t0:.1f} s "
          "(holding rates on D'_c with the hard 0/1 mask; 'paper' = center-based classifier, "
          "'strict' = argmax decision unchanged)")
    if args.out:
        from coreunits._core.io import atomic_write_text

        atomic_write_text(args.out, json.dumps({"source": source, "layer": args.layer, "results": results}, indent=1))
        print(f"wrote {args.out}")
    return 0


def cmd_find(args: argparse.Namespace) -> int:
    """Core units of one class in one or more layers of the paper's MNIST classifier (or a checkpoint of it)."""
    from coreunits import find_core_units
    from coreunits.data import get_mnist
    from coreunits.paper import coefficients
    from coreunits.train import load_model

    _threads(args.threads)
    ckpt = Path(args.checkpoint) if args.checkpoint else default_checkpoint("mnist")
    model = load_model(ckpt, "mnist")
    data, source = get_mnist(args.data_root, train=args.split == "train")
    coef = coefficients("mnist", args.layer)
    r = find_core_units(
        model, args.layer if len(args.layer) > 1 else args.layer[0], args.target_class, data,
        alpha=args.alpha if args.alpha is not None else coef["alpha"],
        lam=args.lam if args.lam is not None else coef["lam"],
        epochs=args.epochs if args.epochs is not None else int(coef["epochs"]),
        batch_size=args.batch_size, seed=args.seed,
        positives_only=args.positives_only, progress=not args.no_progress,
        target_holding_rate=args.target, reading=args.reading, drop_order=args.drop_order,
    )
    print(f"data: {source}")
    if "target" in r.settings:
        t = r.settings["target"]
        print(f"target {t['target_holding_rate']:.2%} ({t['reading']} reading): "
              f"{t['units_before']} units before refinement ({t['holding_rate_before']:.2%}), "
              f"{t['units_after']} after ({t['holding_rate_after']:.2%})"
              + ("" if t["reached"] else "; NOT reached"))
    for layer in r.layers:
        print(f"{layer}: {r.num_units[layer]} / {r.total_units[layer]} units: {r.units[layer]}")
    print(f"holding rate on D'_c: {100 * r.holding_rate:.2f}% (paper reading), "
          f"{100 * r.holding_rate_strict:.2f}% (strict)")
    if args.out:
        r.save(args.out)
        print(f"wrote {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train the paper's MNIST or CIFAR-10 classifier."""
    from coreunits import train

    _threads(args.threads)
    out = args.out or f"checkpoints/{'mnist_cnn' if args.model == 'mnist' else 'cifar10_cnn'}.pt"
    kwargs: dict[str, Any] = {"data_root": args.data_root, "out_path": out, "seed": args.seed,
                              "progress": not args.no_progress}
    if args.epochs is not None:
        kwargs["epochs"] = args.epochs
    fn = train.train_mnist if args.model == "mnist" else train.train_cifar10
    meta = fn(**kwargs)
    print(f"test accuracy {100 * meta['test_accuracy']:.2f}% after {meta['epochs']} epochs; wrote {out}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    """Reproduce the paper's experiments with a report."""
    from coreunits import reproduce

    _threads(args.threads)
    return reproduce.run(args)


def cmd_compare(args: argparse.Namespace) -> int:
    """Compare unit-selection methods (switch gates, L0, greedy, Shapley, rankings, random) at a target."""
    from coreunits import compare

    _threads(args.threads)
    return compare.run(args)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default=None,
                   help="folder with the dataset (MNIST/raw/ or CIFAR-10); default $COREUNITS_DATA, "
                        "else download (MNIST), else the bundled sample (demo)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--alpha", type=float, default=None, help="cost of a unit (default: the paper setting)")
    p.add_argument("--lam", type=float, default=None, help="phi penalty weight (default: the paper setting)")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``coreunits`` command."""
    parser = argparse.ArgumentParser(
        prog="coreunits",
        description="Find the core units of a trained classifier (switch gates + IBP-MAP objective).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="core units of every MNIST class in one layer of the paper's classifier",
                       description=cmd_demo.__doc__)
    _add_common(p)
    p.add_argument("--checkpoint", default=None, help="MNIST checkpoint (default: the bundled one)")
    p.add_argument("--layer", default="max1", help="layer to explain (default: max1)")
    p.add_argument("--split", choices=["train", "test"], default="test", help="MNIST split used for D'_c")
    p.add_argument("--classes", type=int, nargs="*", default=None, help="classes (default: all)")
    _add_selection(p)
    p.add_argument("--offline", action="store_true", help="do not try to download MNIST")
    p.add_argument("--out", default=None, help="also write every result as JSON here")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("find", help="core units of one class of a bundled or checkpointed model",
                       description=cmd_find.__doc__)
    _add_common(p)
    p.add_argument("--checkpoint", default=None, help="checkpoint (.pt with its .json metadata)")
    p.add_argument("--layer", action="append", required=True,
                   help="layer name (repeat for simultaneous selection; 'input' for pixels)")
    p.add_argument("--class", dest="target_class", type=int, required=True, help="class of interest")
    p.add_argument("--split", choices=["train", "test"], default="train")
    _add_selection(p)
    p.add_argument("--epochs", type=int, default=None, help="default: the paper setting for the layer")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--positives-only", action="store_true", help="D'_c from positives only (paper: input layer)")
    p.add_argument("--target", type=float, default=None,
                   help="target mode: the fewest units whose holding rate on D'_c reaches this (e.g. 0.995)")
    p.add_argument("--reading", choices=["strict", "paper"], default="strict",
                   help="holding-rate reading the target is judged in (default: strict)")
    p.add_argument("--drop-order", choices=["least_harm", "gate"], default="least_harm",
                   help="how --target drops units after calibration (default: least harm on a probe)")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    p.set_defaults(func=cmd_find)

    p = sub.add_parser("train", help="train the paper's MNIST or CIFAR-10 classifier",
                       description=cmd_train.__doc__)
    _add_common(p)
    p.add_argument("model", choices=["mnist", "cifar10"])
    p.add_argument("--out", default=None, help="checkpoint path (default: checkpoints/<model>_cnn.pt)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("reproduce", help="reproduce the paper's tables and figures with a report",
                       description=cmd_reproduce.__doc__)
    _add_common(p)
    p.add_argument("dataset", choices=["mnist", "cifar10"])
    p.add_argument("--out", default=None, help="output folder (default: results/<dataset>)")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--runs", type=int, default=3, help="optimisations per (layer, class)")
    p.add_argument("--quick", action="store_true", help="a small subset, for smoke tests")
    p.add_argument("--device", default=None, help="where to select, e.g. cuda (default: cpu)")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("compare", help="compare unit-selection methods at a target holding rate, with a report",
                       description=cmd_compare.__doc__)
    _add_common(p)
    p.add_argument("dataset", choices=["mnist", "cifar10"])
    p.add_argument("--layers", nargs="+", default=["max1", "max2"])
    p.add_argument("--classes", type=int, nargs="+", default=list(range(10)))
    p.add_argument("--target", type=float, default=0.995, help="holding rate to reach (default 0.995)")
    p.add_argument("--reading", choices=["strict", "paper"], default="strict")
    p.add_argument("--methods", nargs="+", default=None, help="method names (default: all available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--out", default=None, help="output folder (default: results/compare-<dataset>)")
    p.add_argument("--report-only", action="store_true",
                   help="write the report from the runs stored in --out, computing nothing")
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``coreunits`` command."""
    from coreunits._core.errors import CoreUnitsError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (CoreUnitsError, FileNotFoundError) as err:
        print(f"coreunits: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
