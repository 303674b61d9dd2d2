"""The ``coreunits`` command line: demo, find, sweep, train, reproduce, compare, report.

Every subcommand has ``--help``. Data comes from ``--data-root`` or the
``COREUNITS_DATA`` variable; MNIST is downloaded when possible, and the demo
falls back to a sample of 2000 MNIST test digits shipped with the package.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coreunits._core.ablation import ABLATIONS
from coreunits._core.errors import CoreUnitsError, OptionError
from coreunits.paper import MODELS

__all__ = ["CHECKPOINT_STEMS", "METHOD_NAMES", "MNIST_LAYERS", "build_parser", "main"]

#: ``coreunits train`` model -> checkpoint file stem.
CHECKPOINT_STEMS = {name: Path(file).stem for name, file in MODELS.items()}

#: What ``coreunits compare --methods`` accepts (captum_conductance runs only when named).
METHOD_NAMES: tuple[str, ...] = (
    "switch_gates", "hard_concrete_l0", "greedy_exact", "greedy_backward", "tmc_shapley",
    "grad_x_activation", "mean_activation", "random", "captum_conductance",
)

#: Layers of the bundled MNIST classifier (``coreunits.models.MnistNet``), in forward order.
MNIST_LAYERS: tuple[str, ...] = (
    "input", "conv1", "relu1", "max1", "conv2", "relu2", "max2", "flatten", "fc1", "relu3", "dropout", "fc2",
)

#: How the embedded sample's answers differ from the full data's (class 0, max1, seed 0): said with every
#: fallback so that nobody takes the sample's numbers for the paper's.
_SAMPLE_NOTE = (
    "note: MNIST was not found, so this runs on the bundled sample of 2,000 test digits; its results differ "
    "from the full data (class 0 keeps 12 units of max1 here, 6 on the full test split). "
    "For the real numbers: make demo DATA_ROOT=/path/to/folder-with-MNIST (or --data-root)."
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


def _check_target(target: float | None) -> None:
    if target is not None and not 0.0 < target <= 1.0:
        raise OptionError(f"--target must be a holding rate in (0, 1], got {target:g}; e.g. --target 0.995")


def _check_classes(classes: Sequence[int] | None, num_classes: int = 10) -> None:
    bad = [c for c in classes or [] if not 0 <= c < num_classes]
    if bad:
        raise OptionError(f"class {bad[0]} is out of range: the model has {num_classes} classes, "
                          f"so use 0..{num_classes - 1}")


def _check_coefficients(args: argparse.Namespace) -> None:
    for name in ("alpha", "lam"):
        value = getattr(args, name, None)
        if value is not None and value < 0:
            raise OptionError(f"--{name} must be >= 0, got {value:g}")
    if getattr(args, "epochs", None) is not None and args.epochs < 0:
        raise OptionError(f"--epochs must be >= 0, got {args.epochs}")
    if getattr(args, "batch_size", None) is not None and args.batch_size < 1:
        raise OptionError(f"--batch-size must be >= 1, got {args.batch_size}")


def _mnist_model(args: argparse.Namespace, layers: Sequence[str]) -> tuple[Any, Path]:
    """The MNIST classifier and its checkpoint, with ``layers`` checked against it (before any data is read)."""
    from coreunits._core.layers import resolve_layers
    from coreunits.paper import default_checkpoint
    from coreunits.train import load_named_or

    ckpt = Path(args.checkpoint) if args.checkpoint else default_checkpoint("mnist")
    model = load_named_or(ckpt, "mnist")
    resolve_layers(model, list(layers))  # an unknown layer fails here, naming the model's layers
    return model, ckpt


def _mnist_data(args: argparse.Namespace, allow_download: bool = True) -> tuple[Any, str]:
    from coreunits.data import get_mnist

    data, source = get_mnist(args.data_root, train=args.split == "train", allow_download=allow_download)
    if source.startswith("embedded sample"):
        print(_SAMPLE_NOTE, file=sys.stderr, flush=True)
    return data, source


def cmd_demo(args: argparse.Namespace) -> int:
    """Core units of every class in one layer of the paper's MNIST classifier."""
    from coreunits import ActivationCache, find_core_units
    from coreunits.paper import coefficients

    # Every option is checked before anything is printed or loaded.
    _check_classes(args.classes)
    _check_coefficients(args)
    _threads(args.threads)
    model, ckpt = _mnist_model(args, [args.layer])
    data, source = _mnist_data(args, allow_download=not args.offline)
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


def _print_found(r: Any, source: str) -> None:
    print(f"data: {source}")
    if "target" in r.settings:
        t = r.settings["target"]
        if t["drop_order"] == "exhaustive":
            how = (f"no gates optimised: exact greedy elimination from all {t['units_before']} units"
                   + (", and no smaller set reaches it: " if t["smallest"] else ": "))
        elif t["drop_order"] == "exact":  # a pool's exact elimination ended smallest (settings["target"]["pools"])
            how = f"exact elimination from a pool of {t['units_before']} units ({t['holding_rate_before']:.2%}), "
        else:
            how = f"{t['units_before']} units before refinement ({t['holding_rate_before']:.2%}), "
        print(f"target {t['target_holding_rate']:.2%} ({t['reading']} reading): {how}"
              f"{t['units_after']} after ({t['holding_rate_after']:.2%})" + ("" if t["reached"] else "; NOT reached"))
    for layer in r.layers:
        print(f"{layer}: {r.num_units[layer]} / {r.total_units[layer]} units: {r.units[layer]}")
    print(f"holding rate on D'_c: {100 * r.holding_rate:.2f}% (paper reading), "
          f"{100 * r.holding_rate_strict:.2f}% (strict)")


def _report_found(r: Any, source: str, out: str | None, html: tuple[Any, Any, Any] | None = None) -> int:
    """Print the result; with --out save it, and (``html`` = model, data, class names) its report page beside it."""
    _print_found(r, source)
    if out:
        r.save(out)
        print(f"wrote {out}")
        if html is not None:
            _write_html(out, *html)
    return 0


def _write_html(results: str | Path, model: Any, data: Any, class_names: Sequence[str] | None = None,
                **kwargs: Any) -> None:
    """report.html for results a command just wrote; data that cannot make the panels only costs a note."""
    from coreunits.html_report import write_html_report

    try:
        page = write_html_report(results, model=model, data=data, class_names=class_names, **kwargs)
    except CoreUnitsError as err:
        print(f"note: no HTML report: {_one_line(err)}", file=sys.stderr)
        return
    print(f"wrote {page}")


def cmd_find(args: argparse.Namespace) -> int:
    """Core units of one class in one or more layers of a model: the paper's MNIST classifier by default, or any
    model given with --model (torchvision:NAME, timm:NAME, file.py:FACTORY, file.pt2, file.ts) and --data."""
    from coreunits import find_core_units
    from coreunits.paper import coefficients

    _check_target(args.target)
    _check_coefficients(args)
    _threads(args.threads)
    if args.model is not None or args.data is not None:
        return _find_user(args)
    target_class = _class_index(args.target_class, None, 10)
    model, _ = _mnist_model(args, args.layer)
    data, source = _mnist_data(args)
    coef = coefficients("mnist", args.layer)
    r = find_core_units(
        model, args.layer if len(args.layer) > 1 else args.layer[0], target_class, data,
        alpha=args.alpha if args.alpha is not None else coef["alpha"],
        lam=args.lam if args.lam is not None else coef["lam"],
        epochs=args.epochs if args.epochs is not None else int(coef["epochs"]),
        batch_size=args.batch_size, seed=args.seed,
        positives_only=args.positives_only, progress=not args.no_progress,
        target_holding_rate=args.target, reading=args.reading, drop_order=args.drop_order, ablation=args.ablation,
    )
    return _report_found(r, source, args.out, None if args.no_html else (model, data, None))


#: Target mode's holding rate for models other than the paper's, whose fixed coefficients do not transfer.
DEFAULT_TARGET = 0.99


def _model_kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as err:
        raise OptionError(f"--model-kwargs is not JSON ({err}); e.g. --model-kwargs '{{\"num_classes\": 3}}'") from None
    if not isinstance(value, dict):
        raise OptionError("--model-kwargs must be a JSON object, e.g. '{\"num_classes\": 3}'")
    return value


def _class_index(text: str, names: Sequence[str] | None, num_classes: int) -> int:
    """``--class``: an index, or one of the data's class names (an image folder's folder names)."""
    if names and text in names and not text.isdigit():
        return list(names).index(text)
    try:
        c = int(text)
    except ValueError:
        known = f" its classes: {', '.join(names[:12])}" if names else " the data has no class names"
        raise OptionError(f"--class {text!r} is neither a class index nor a class name of the data;{known}") from None
    _check_classes([c], num_classes)
    return c


def _selection_options(args: argparse.Namespace) -> dict[str, Any]:
    """find_core_units settings for a user's model: target mode unless --alpha asks for fixed coefficients."""
    options: dict[str, Any] = {"batch_size": args.batch_size, "reading": args.reading,
                               "drop_order": args.drop_order, "positives_only": args.positives_only}
    if args.ablation != "zero":  # absent for zero, so records stored before ablations existed stay valid
        options["ablation"] = args.ablation
    for name in ("alpha", "lam", "epochs"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    target = args.target if args.target is not None else (None if args.alpha is not None else DEFAULT_TARGET)
    if target is not None:
        options["target_holding_rate"] = target
    return options


def _weights(args: argparse.Namespace) -> str | None:
    """--weights, or for the bundled model (no --model) its --checkpoint."""
    return args.weights or (args.checkpoint if args.model is None else None)


def _user_inputs(args: argparse.Namespace, layers: Sequence[str]) -> tuple[Any, Any, int]:
    """(LoadedModel, LoadedData, number of classes) for --model/--data, every option checked before the data loads."""
    from coreunits._core.layers import INPUT, resolve_layers
    from coreunits.sources import load_data, load_model, model_classes, parse_normalize

    parse_normalize(args.normalize, None)  # a malformed --normalize fails before anything loads
    spec = args.model or "coreunits:mnist"
    loaded = load_model(spec, _model_kwargs(args.model_kwargs), _weights(args))
    if loaded.gateable_input_only and any(layer != INPUT for layer in layers):
        raise OptionError(f"{spec} is TorchScript, whose layers take no hooks: only --layer input can be gated; "
                          "give the model as file.py:FACTORY or as a torch.export .pt2 file to gate its layers")
    resolve_layers(loaded.model, list(layers))  # an unknown layer fails here, naming the model's layers
    if args.data is None:
        if not spec.startswith("coreunits:mnist"):
            raise OptionError(f"--model {spec} needs --data (imagefolder:DIR, mnist:ROOT, cifar10:ROOT or "
                              "torchvision:CLASS:ROOT)")
        from coreunits.sources import LoadedData

        dataset, source = _mnist_data(args)
        return loaded, LoadedData(dataset, source, [str(d) for d in range(10)]), 10
    data = load_data(args.data, split=args.split, image_size=args.image_size,
                     normalization=parse_normalize(args.normalize, loaded.normalization),
                     max_inputs=args.max_inputs, seed=args.seed)
    return loaded, data, model_classes(loaded.model, data.dataset)


def _find_user(args: argparse.Namespace) -> int:
    from coreunits import find_core_units

    loaded, data, num_classes = _user_inputs(args, args.layer)
    c = _class_index(args.target_class, data.class_names, num_classes)
    options = _selection_options(args)
    print(f"model: {loaded.description}")
    if "target_holding_rate" in options and args.target is None:
        print(f"target mode at {DEFAULT_TARGET} ({args.reading} reading), the default for models other than the "
              "paper's; --target sets another rate, --alpha fixed coefficients instead")
    r = find_core_units(loaded.model, args.layer if len(args.layer) > 1 else args.layer[0], c, data.dataset,
                        seed=args.seed, progress=not args.no_progress, **options)
    r.settings["inputs"] = {"model": loaded.description, "data": data.description,
                            "class_name": data.class_names[c] if data.class_names else None}
    html = None if args.no_html else (loaded.model, data.dataset, data.class_names)
    return _report_found(r, data.description, args.out, html)


def _sweep_classes(text: str, names: Sequence[str] | None, num_classes: int) -> list[int]:
    if text == "all":
        return list(range(num_classes))
    return [_class_index(t, names, num_classes) for t in text.replace(",", " ").split()]


def cmd_sweep(args: argparse.Namespace) -> int:
    """Core units of many classes x layers x runs of one model, resumable per record, with JSON, CSV and a report."""
    from coreunits._core.io import file_digest
    from coreunits.sweep import plan, run_sweep, write_sweep_report

    _check_target(args.target)
    _check_coefficients(args)
    if args.runs < 1:
        raise OptionError(f"--runs must be >= 1, got {args.runs}")
    if args.workers < 1:
        raise OptionError(f"--workers must be >= 1, got {args.workers}")
    _threads(args.threads)
    t0 = time.perf_counter()
    loaded, data, num_classes = _user_inputs(args, args.layer)
    classes = _sweep_classes(args.classes, data.class_names, num_classes)
    options = _selection_options(args)
    spec = args.model or "coreunits:mnist"
    out = Path(args.out) if args.out else Path("results") / ("sweep-" + _slug(spec))
    identity = {"model": spec, "model_kwargs": _model_kwargs(args.model_kwargs),
                "weights": file_digest(weights) if (weights := _weights(args)) else None, "data": data.description,
                "image_size": args.image_size, "normalize": args.normalize}
    tasks = plan(args.layer, classes, args.runs, args.seed)
    print(f"model: {loaded.description}\ndata:  {data.description}\n{len(tasks)} selections "
          f"({len(args.layer)} layers x {len(classes)} classes x {args.runs} runs) -> {out}", flush=True)
    stamps = _stamps(out / "runs")
    records = run_sweep(loaded.model, data.dataset, tasks, out, identity=identity, options=options,
                        class_names=data.class_names, progress=not args.no_progress, workers=args.workers,
                        ray_address=args.ray)
    computed = _stamps(out / "runs") != stamps
    description = (f"Model {loaded.description}; data {data.description}; settings "
                   + ", ".join(f"{k}={v}" for k, v in options.items()) + f"; seeds {args.seed}..{args.seed + args.runs - 1}.")
    write_sweep_report(out, records, description=description, command=args.command_line,
                       wall=time.perf_counter() - t0)
    # A rerun that computed nothing keeps its page (`coreunits report DIR` redraws it on demand).
    if not args.no_html and any(r.get("holding_rate") is not None for r in records) \
            and (computed or not (out / "report.html").is_file()):
        _write_html(out, loaded.model, data.dataset, data.class_names)
    skipped = sum(1 for r in records if r.get("holding_rate") is None)
    print(f"{len(records) - skipped} selections done" + (f", {skipped} skipped (see report)" if skipped else "")
          + f"; wrote {out / 'report.md'}, sweep.json and sweep.csv")
    return 0


def _stamps(folder: Path) -> dict[Path, int]:
    """Modification times of a sweep's records: what a run wrote shows as a change."""
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*.json")} if folder.is_dir() else {}


def _slug(spec: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9]+", "-", Path(spec).name).strip("-")


def cmd_train(args: argparse.Namespace) -> int:
    """Train the paper's MNIST or CIFAR-10 classifier."""
    from coreunits import train

    _threads(args.threads)
    out = args.out or f"checkpoints/{CHECKPOINT_STEMS[args.model]}.pt"
    kwargs: dict[str, Any] = {"data_root": args.data_root, "out_path": out, "seed": args.seed,
                              "progress": not args.no_progress}
    if args.epochs is not None:
        kwargs["epochs"] = args.epochs
    if args.model != "mnist":
        kwargs["model_name"] = args.model
    fn = train.train_cifar10 if args.model.startswith("cifar10") else train.train_mnist
    meta = fn(**kwargs)
    print(f"test accuracy {100 * meta['test_accuracy']:.2f}% after {meta['epochs']} epochs; wrote {out}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    """Reproduce the paper's experiments with a report."""
    from coreunits.reproduce import run_dataset

    _threads(args.threads)
    out = Path(args.out) if args.out else Path("results") / (args.dataset + ("-quick" if args.quick else ""))
    run_dataset(args.dataset, out, args.data_root, args.checkpoint, args.runs, args.quick,
                progress=not args.no_progress, device=args.device, html=not args.no_html)
    print(f"wrote {out / 'report.md'}, {out / 'results.json'}" + ("" if args.no_html else ", report.html")
          + " and CSV/PNG files")
    return 0


def _compare_data(dataset: str, data_root: str | None) -> tuple[Any, str, Any, str]:
    """(D'_c data, its description, held-out data, its description) for ``compare``."""
    from coreunits.data import get_mnist
    from coreunits.paper import cifar10_data

    if dataset == "mnist":
        data, source = get_mnist(data_root, train=True, allow_sample=False)
        heldout, held_source = get_mnist(data_root, train=False, allow_sample=False)
    else:
        data, source = cifar10_data(data_root, quick=False)
        heldout, held_source = cifar10_data(data_root, quick=True)
    return data, source, heldout, held_source


def cmd_compare(args: argparse.Namespace) -> int:
    """Compare unit-selection methods (switch gates, L0, greedy, Shapley, rankings, random) at a target."""
    import torch

    from coreunits._core.io import file_digest
    from coreunits.compare import compare_methods, default_methods, write_comparison_report
    from coreunits.paper import coefficients, default_checkpoint
    from coreunits.sources import random_subset
    from coreunits.train import load_named_or

    _check_target(args.target)
    _check_classes(args.classes)
    _threads(args.threads)
    torch.manual_seed(0)
    dataset = args.dataset
    ckpt = Path(args.checkpoint) if args.checkpoint else default_checkpoint(dataset)
    model = load_named_or(ckpt, dataset)
    data, source, heldout, held_source = _compare_data(dataset, args.data_root)
    data, kept = random_subset(data, args.max_inputs, args.seed)
    source += kept
    out = Path(args.out) if args.out else Path("results") / (
        f"compare-{dataset}" + ("" if args.ablation == "zero" else f"-{args.ablation}-ablation"))
    tag = file_digest(ckpt) + f"/{len(data)}"
    records = []
    for layer in args.layers:
        methods = default_methods(args.seed, coefficients(dataset, [layer]), args.methods)
        records += compare_methods(model, layer, args.classes, data, target=args.target, methods=methods,
                                   reading=args.reading, seed=args.seed, heldout_data=heldout, out=out,
                                   progress=not args.no_progress, tag=tag, compute=not args.report_only,
                                   ablation=args.ablation)
    description = (f"Classifier {ckpt.name}; D'_c from {source}; held-out D'_c from {held_source}; "
                   f"{args.reading} holding rate; {args.ablation} ablation; seed {args.seed}; "
                   f"{torch.get_num_threads()} CPU threads.")
    # Every option that changes a record, so the line reproduces the report (data and threads aside).
    command = ("coreunits compare " + dataset + (f" --checkpoint {args.checkpoint}" if args.checkpoint else "")
               + " --layers " + " ".join(args.layers) + " --classes " + " ".join(map(str, args.classes))
               + f" --target {args.target}" + (f" --reading {args.reading}" if args.reading != "strict" else "")
               + (f" --ablation {args.ablation}" if args.ablation != "zero" else "")
               + (f" --seed {args.seed}" if args.seed else "")
               + (f" --max-inputs {args.max_inputs}" if args.max_inputs is not None else "")
               + (" --methods " + " ".join(args.methods) if args.methods else "")
               + (f" --out {args.out}" if args.out else ""))
    if args.report_only:
        planned = len(args.layers) * len(args.classes) * len(methods)  # compare_methods stores no others
        done = (f"all {planned} (layer, class, method) runs are done." if len(records) == planned else
                f"{len(records)} of {planned} (layer, class, method) runs are done; "
                "the same command without --report-only completes the rest.")
        description += f" Report of the stored records only: {done}"
    write_comparison_report(out, records, target=args.target, description=description, command=command)
    print(f"wrote {out / 'report.md'} (and comparison.json, CSVs, PNG)")
    if not args.no_html and records:
        from coreunits.report import SPECS

        _write_html(out, model, data, SPECS[dataset]["class_names"])
    return 0


def _paper_inputs(args: argparse.Namespace, dataset: str, recorded: str | None) -> tuple[Any, Path]:
    """The paper's classifier for a reproduce/compare folder (checked against the digest it recorded)."""
    from coreunits._core.io import file_digest
    from coreunits.paper import default_checkpoint
    from coreunits.train import load_named_or

    ckpt = Path(args.checkpoint) if args.checkpoint else default_checkpoint(dataset)
    if recorded and file_digest(ckpt) != recorded:
        raise OptionError(f"the results were made with a checkpoint of sha256 {recorded}..., not {ckpt} "
                          f"({file_digest(ckpt)}...); pass that checkpoint with --checkpoint, or --no-panels")
    return load_named_or(ckpt, dataset), ckpt


def _report_inputs(args: argparse.Namespace, source: Any) -> tuple[Any, Any, Sequence[str] | None]:
    """(model, data, class names) the results were made with, rebuilt from what the folder records."""
    from coreunits.report import SPECS

    if source.kind == "reproduce":
        from coreunits.reproduce import paper_data

        dataset = source.meta["dataset"]
        model, _ = _paper_inputs(args, dataset, source.meta.get("checkpoint_sha256"))
        data, _ = paper_data(dataset, args.data_root, source.meta["quick"])
        return model, data, SPECS[dataset]["class_names"]
    if source.kind == "compare" and source.meta.get("dataset") in SPECS:
        dataset = source.meta["dataset"]
        model, _ = _paper_inputs(args, dataset, None)
        return model, _compare_data(dataset, args.data_root)[0], SPECS[dataset]["class_names"]
    if source.kind == "sweep" and source.command.startswith("coreunits sweep "):
        import shlex

        sweep = build_parser().parse_args(shlex.split(source.command)[1:])
        if args.data_root is not None:
            sweep.data_root = args.data_root
        layers = sorted({s.layer for s in source.selections})
        loaded, data, _ = _user_inputs(sweep, layers)
        return loaded.model, data.dataset, data.class_names
    raise OptionError(f"{source.path} does not record the model and data it was made with (a {source.kind} "
                      "result); the command that made it writes its report.html, or use --no-panels for the atlas")


def cmd_report(args: argparse.Namespace) -> int:
    """Write report.html (layer atlas and per-unit panels), atlas.json and atlas.csv for the results in DIR: a
    folder written by reproduce, sweep or compare, or a find result. The model and data are found again from
    what the folder records (--data-root, --checkpoint where they moved)."""
    from coreunits._core.selections import read_results
    from coreunits.html_report import write_html_report

    if args.top_k < 1:
        raise OptionError(f"--top-k must be >= 1, got {args.top_k}")
    if args.probe_rows is not None and args.probe_rows < 1:
        raise OptionError(f"--probe-rows must be >= 1, got {args.probe_rows}")
    _threads(args.threads)
    source = read_results(args.dir)
    model, data, names = (None, None, None) if args.no_panels else _report_inputs(args, source)
    title = args.title
    if title is None and source.kind == "reproduce":
        from coreunits.report import SPECS

        title = f"Core units of the paper's {SPECS[source.meta['dataset']]['title']} classifier"
    page = write_html_report(args.dir, args.out, model=model, data=data, class_names=names, top_k=args.top_k,
                             probe_rows=args.probe_rows, image_format=args.image_format, title=title)
    size = page.stat().st_size
    print(f"wrote {page} ({size / 1e6:.1f} MB) and the atlas as JSON and CSV beside it")
    return 0


def _specialist_inputs(args: argparse.Namespace, layers: Sequence[str]) -> tuple[Any, Any, str]:
    """(model, data, description of the data) for export: --model/--data, else the paper's net of --checkpoint."""
    from coreunits.models import CifarNet
    from coreunits.paper import cifar10_split, default_checkpoint
    from coreunits.train import load_named_or

    if args.model is not None or args.data is not None:
        loaded, data, _ = _user_inputs(args, layers)
        return loaded.model, data.dataset, data.description
    ckpt = Path(args.checkpoint) if args.checkpoint else default_checkpoint("mnist")
    model = load_named_or(ckpt, "mnist")
    if isinstance(model, CifarNet):
        data = cifar10_split(args.data_root, train=args.split == "train")
        return model, data, f"CIFAR-10 {args.split} ({len(data)})"
    data, source = _mnist_data(args)
    return model, data, source


def cmd_export(args: argparse.Namespace) -> int:
    """A class-c detector cut down to a result's core units (other channels of each gated conv, and the matching
    inputs of the next layer, removed), written with torch.export; its parameters, FLOPs and holding rate on the
    data's D'_c (default: the test split) against the full model."""
    import json

    import torch

    from coreunits import CoreUnits
    from coreunits._core.cache import iter_input_batches
    from coreunits._core.io import atomic_write_text
    from coreunits._core.specialist import count_flops, detector_holding_rate, export_specialist

    out = Path(args.out)
    if out.suffix != ".pt2":
        raise OptionError(f"--out {args.out!r} must end in .pt2 (a torch.export program)")
    try:
        result = CoreUnits.load(args.result)
    except (KeyError, TypeError, ValueError) as err:
        raise OptionError(f"--result {args.result} is not a coreunits result ({_one_line(err)}); "
                          "`coreunits find ... --out r.json` writes one") from None
    _threads(args.threads)
    model, data, source = _specialist_inputs(args, result.layers)
    inputs = next(iter_input_batches(data, 1024))
    specialist = export_specialist(model, result, inputs[:8], out, check_inputs=inputs)
    held, size = detector_holding_rate(specialist.module, model, data, result.target_class, seed=args.seed)
    flops, full_flops = count_flops(specialist.module, inputs[:1]), count_flops(model, inputs[:1])
    params = sum(p.numel() for p in specialist.module.parameters())
    full_params = sum(p.numel() for p in model.parameters())
    record = {**specialist.to_dict(), "flops": flops, "full_flops": full_flops, "params": params,
              "full_params": full_params, "holding_rate_strict": held, "dprime_size": size, "data": source,
              "result": str(args.result), "torch": torch.__version__}
    atomic_write_text(out.with_suffix(".json"), json.dumps(record, indent=1))
    for cut in specialist.cuts:
        what = [f"{cut.producer} output" if cut.producer else "", *[f"{c} input" for c in cut.consumers]]
        print(f"{cut.layer}: {len(cut.kept)} of {cut.total} units; cut: {', '.join(w for w in what if w) or 'nothing'}")
        for stop in cut.stops:
            print(f"  {stop}")
    if specialist.fallback:
        print(f"not cut: {specialist.fallback}")
    print(f"parameters {params:,} of {full_params:,} ({full_params / params:.1f}x fewer); FLOPs per input "
          f"{flops:,} of {full_flops:,} ({full_flops / flops:.1f}x fewer)")
    print(f"holding rate (strict, argmax == {result.target_class}) on D'_c of {source}: {held:.2%} of {size} inputs")
    print(f"wrote {out} (torch.export), {out}.state_dict.pt and {out.with_suffix('.json')}")
    return 0


_SEED_HELP = "seed of D'_c's random negatives, its order and the gate noise (default 0)"
_SPLIT_HELP = ("MNIST split D'_c is drawn from (default test: the split the bundled sample comes from, "
               "so a fallback run matches it; the paper optimises on train)")
_LAYER_NAMES = ", ".join(MNIST_LAYERS)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default=None,
                   help="folder with the dataset (MNIST/raw/ or CIFAR-10); default $COREUNITS_DATA, "
                        "else download (MNIST), else the bundled sample (demo, find)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true",
                   help="hide progress bars (they are hidden anyway when stderr is not a terminal)")


def _add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--alpha", type=float, default=None, help="cost of a unit (default: the paper setting)")
    p.add_argument("--lam", type=float, default=None, help="phi penalty weight (default: the paper setting)")
    p.add_argument("--seed", type=int, default=0, help=_SEED_HELP)


def _add_ablation(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ablation", choices=list(ABLATIONS), default="zero",
                   help="what a masked unit becomes: zero (the paper), its mean over the data (per position), or "
                   "its value on another input of the data (resample) (default: zero)")


def _add_no_html(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-html", action="store_true",
                   help="do not write report.html (the atlas and per-unit panels; one more pass over the data)")


def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="core units of every MNIST class in one layer of the paper's classifier",
                       description=cmd_demo.__doc__)
    _add_common(p)
    p.add_argument("--checkpoint", default=None, help="MNIST checkpoint (default: the bundled one)")
    p.add_argument("--layer", default="max1", help=f"layer to explain (default: max1); one of {_LAYER_NAMES}")
    p.add_argument("--split", choices=["train", "test"], default="test", help=_SPLIT_HELP)
    p.add_argument("--classes", type=int, nargs="*", default=None, help="classes 0..9 (default: all)")
    _add_selection(p)
    p.add_argument("--offline", action="store_true", help="do not try to download MNIST")
    p.add_argument("--out", default=None, help="also write every result as JSON here")
    p.set_defaults(func=cmd_demo)


def _add_model_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("your own model and data (default: the paper's MNIST classifier and MNIST)")
    g.add_argument("--model", default=None,
                   help="torchvision:NAME, timm:NAME, path/to/file.py:FACTORY, file.pt2 (torch.export), "
                        "file.ts (TorchScript; --layer input only) or coreunits:" + "|".join(MODELS))
    g.add_argument("--model-kwargs", default=None, metavar="JSON",
                   help="keyword arguments of the model's builder, e.g. '{\"num_classes\": 3}'")
    g.add_argument("--weights", default=None, metavar="FILE",
                   help="state_dict (.pt, .pth, .bin or .safetensors) loaded strictly into the model; default: "
                        "torchvision's/timm's pretrained weights (from the local cache: they cannot be fetched offline)")
    g.add_argument("--data", default=None, metavar="SPEC",
                   help="imagefolder:DIR, mnist:ROOT, cifar10:ROOT or torchvision:CLASS:ROOT (labels are not used: "
                        "D'_c comes from the model's predictions)")
    g.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="resize the shorter side to N and centre-crop NxN (default: keep the images' size)")
    g.add_argument("--normalize", default=None, metavar="imagenet|none|MEAN,STD",
                   help="input normalisation (default: the preset of the model's pretrained weights where torchvision "
                        "or timm has one, else none)")
    g.add_argument("--max-inputs", type=int, default=None, metavar="N",
                   help="use a random N of the data's inputs (seeded by --seed; default: all)")
    g.add_argument("--checkpoint", default=None, help="checkpoint of the paper's net (.pt with its .json metadata)")


def _add_target_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=None, help="default: the paper setting for the layer")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--positives-only", action="store_true", help="D'_c from positives only (paper: input layer)")
    p.add_argument("--target", type=float, default=None,
                   help="target mode: the fewest units whose holding rate on D'_c reaches this (in (0, 1], "
                        f"e.g. 0.995); default with --model: {DEFAULT_TARGET} unless --alpha is given")
    p.add_argument("--reading", choices=["strict", "paper"], default="strict",
                   help="holding-rate reading the target is judged in (default: strict)")
    _add_ablation(p)
    p.add_argument("--drop-order", choices=["least_harm", "gate"], default="least_harm",
                   help="how --target drops units after calibration (default: least harm on a probe)")


def _add_find(sub: Any) -> None:
    p = sub.add_parser("find", help="core units of one class of the paper's classifier or of your own model",
                       description=cmd_find.__doc__)
    _add_common(p)
    _add_model_data(p)
    p.add_argument("--layer", action="append", required=True,
                   help=f"layer name (repeat for simultaneous selection), or heads:NAME[:H] / neurons:NAME for a "
                   f"transformer's attention heads / MLP neurons; the bundled model's layers: {_LAYER_NAMES}")
    p.add_argument("--class", dest="target_class", required=True,
                   help="class of interest: an index of the model's output, or a class (folder) name of the data")
    p.add_argument("--split", choices=["train", "test"], default="test", help=_SPLIT_HELP)
    _add_selection(p)
    _add_target_options(p)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    _add_no_html(p)
    p.set_defaults(func=cmd_find)


def _add_sweep(sub: Any) -> None:
    p = sub.add_parser("sweep", help="core units of many classes x layers x runs of a model, resumable, with a report",
                       description=cmd_sweep.__doc__)
    _add_common(p)
    _add_model_data(p)
    p.add_argument("--layer", action="append", required=True, help="layer name, or heads:NAME[:H] / neurons:NAME; "
                   "repeat for more layers (one selection per layer)")
    p.add_argument("--classes", default="all", help="all, or a list of indices or class names (default: all)")
    p.add_argument("--runs", type=int, default=1, help="selections per (layer, class), seeds --seed, --seed+1, ...")
    p.add_argument("--split", choices=["train", "test"], default="test", help=_SPLIT_HELP)
    _add_selection(p)
    _add_target_options(p)
    p.add_argument("--out", default=None, help="output folder (default: results/sweep-<model>)")
    p.add_argument("--workers", type=int, default=1, help="run the selections on a local Ray with this many "
                   "workers (one thread each; needs coreunits[ray]); default 1: in this process")
    p.add_argument("--ray", default=None, metavar="ADDRESS", help="run on this Ray cluster instead (e.g. auto, "
                   "ray://HEAD:10001); records are written here as tasks finish")
    _add_no_html(p)
    p.set_defaults(func=cmd_sweep)


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train the paper's MNIST or CIFAR-10 classifier",
                       description=cmd_train.__doc__)
    _add_common(p)
    p.add_argument("model", choices=list(CHECKPOINT_STEMS),
                   help="the paper's CNNs (mnist, cifar10), a two-hidden-layer MLP (mnist_mlp), a small "
                   "ViT on MNIST (mnist_vit) or on CIFAR-10 (cifar10_vit)")
    p.add_argument("--out", default=None,
                   help="checkpoint path (default: checkpoints/<the model's file>: "
                   + ", ".join(MODELS.values()) + ")")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batch order (default 0)")
    p.set_defaults(func=cmd_train)


def _add_reproduce(sub: Any) -> None:
    p = sub.add_parser("reproduce", help="reproduce the paper's tables and figures with a report",
                       description=cmd_reproduce.__doc__)
    _add_common(p)
    p.add_argument("dataset", choices=["mnist", "cifar10"])
    p.add_argument("--out", default=None, help="output folder (default: results/<dataset>)")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--runs", type=int, default=3, help="optimisations per (layer, class)")
    p.add_argument("--quick", action="store_true", help="a small subset, for smoke tests")
    p.add_argument("--device", default=None, help="where to select, e.g. cuda (default: cpu)")
    _add_no_html(p)
    p.set_defaults(func=cmd_reproduce)


def _add_compare(sub: Any) -> None:
    p = sub.add_parser("compare", help="compare unit-selection methods at a target holding rate, with a report",
                       description=cmd_compare.__doc__)
    _add_common(p)
    p.add_argument("dataset", choices=["mnist", "cifar10"])
    p.add_argument("--layers", nargs="+", default=["max1", "max2"],
                   help="layers whose units are chosen, one comparison each (default: max1 max2)")
    p.add_argument("--classes", type=int, nargs="+", default=list(range(10)), help="classes (default: 0..9)")
    p.add_argument("--target", type=float, default=0.995, help="holding rate to reach, in (0, 1] (default 0.995)")
    p.add_argument("--reading", choices=["strict", "paper"], default="strict")
    _add_ablation(p)
    p.add_argument("--max-inputs", type=int, default=None, metavar="N",
                   help="D'_c from a seeded random N of the training split (default: all of it)")
    p.add_argument("--methods", nargs="+", default=None, choices=METHOD_NAMES, metavar="METHOD",
                   help="methods to run (default: all but captum_conductance): " + ", ".join(METHOD_NAMES))
    p.add_argument("--seed", type=int, default=0, help=_SEED_HELP)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--out", default=None, help="output folder (default: results/compare-<dataset>)")
    p.add_argument("--report-only", action="store_true",
                   help="write the report from the runs stored in --out, computing nothing")
    _add_no_html(p)
    p.set_defaults(func=cmd_compare)


def _add_report(sub: Any) -> None:
    p = sub.add_parser("report", help="report.html: the layer atlas and what each core unit responds to",
                       description=cmd_report.__doc__)
    _add_common(p)
    p.add_argument("dir", help="results folder (reproduce, sweep or compare) or a find result JSON")
    p.add_argument("--out", default=None, help="the page's path (default: DIR/report.html)")
    p.add_argument("--checkpoint", default=None, help="the classifier, where a reproduce/compare folder's moved")
    p.add_argument("--top-k", type=int, default=6, help="inputs shown per unit and row (default 6)")
    p.add_argument("--probe-rows", type=int, default=1024,
                   help="inputs of D'_c that judge each unit's necessity (a seeded subset; default 1024)")
    p.add_argument("--image-format", choices=["auto", "png", "jpeg", "webp"], default="auto",
                   help="thumbnails' format (default auto: WebP where Pillow writes it, else JPEG for colour "
                        "inputs and PNG for grey ones)")
    p.add_argument("--no-panels", action="store_true", help="the atlas only: no model, no data, no pass over them")
    p.add_argument("--title", default=None, help="the page's title")
    p.set_defaults(func=cmd_report)


def _add_export(sub: Any) -> None:
    p = sub.add_parser("export", help="a class-c detector physically cut down to a result's core units "
                       "(torch.export), with its FLOPs and holding rate", description=cmd_export.__doc__)
    _add_common(p)
    p.add_argument("--result", required=True, help="a result JSON written by `coreunits find --out`")
    p.add_argument("--out", required=True, help="the detector's torch.export file (.pt2); its state_dict and a JSON "
                   "record go beside it")
    p.add_argument("--split", choices=["train", "test"], default="test",
                   help="split whose D'_c judges the detector (default test: held out from the selection)")
    p.add_argument("--seed", type=int, default=0, help="seed of D'_c's random negatives (default 0)")
    _add_model_data(p)
    p.set_defaults(func=cmd_export)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``coreunits`` command."""
    parser = argparse.ArgumentParser(
        prog="coreunits",
        description="Find the core units of a trained classifier (switch gates + IBP-MAP objective).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_demo, _add_find, _add_sweep, _add_train, _add_reproduce, _add_compare, _add_report,
                _add_export):
        add(sub)
    return parser


def _one_line(err: BaseException) -> str:
    # A usage error is one line: multi-line messages (paths searched) are joined.
    return " ".join(str(err).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``coreunits`` command.

    Usage errors (bad options, unknown layers, missing data or checkpoints)
    print one line ``coreunits: error: ...`` on stderr and return 2, as
    argparse does for its own; anything else is a bug and keeps its traceback.
    """
    import shlex

    words = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(words)
    args.command_line = "coreunits " + " ".join(shlex.quote(w) for w in words)  # what reports say was run
    logging.basicConfig(level=logging.WARNING, format="coreunits: %(levelname)s: %(message)s")
    try:
        return int(args.func(args))
    except (CoreUnitsError, FileNotFoundError) as err:
        print(f"coreunits: error: {_one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
