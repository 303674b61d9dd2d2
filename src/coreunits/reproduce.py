"""``coreunits reproduce mnist|cifar10``: the paper's experiments as one resumable command.

Plan -> per-(experiment, layer, class, run) work items, each saved as JSON the
moment it finishes (atomically) under ``<out>/runs/``; a rerun skips what is
done and redoes entries that are corrupt or were made with other settings.
Then everything is gathered into ``results.json``, CSVs, figures and
``report.md`` (see :mod:`coreunits.report`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from coreunits._core.cache import ActivationCache
from coreunits._core.dprime import build_dprime
from coreunits._core.evaluation import evaluate_gates, removal_curve
from coreunits._core.io import atomic_write_text, file_digest
from coreunits._core.progress import progress_bar
from coreunits._core.result import CoreUnits, fingerprint_of, read_record
from coreunits._core.selection import DEFAULTS, batch_selections, find_core_units_batched
from coreunits.paper import cifar10_data, coefficients, default_checkpoint

__all__ = ["Work", "paper_data", "plan", "run_dataset"]

RANDOM_SUBSETS = 10
FIG4_RUNS = 5


@dataclass(frozen=True)
class Work:
    """One unit of work of a reproduction, saved as ``runs/<key>.json``."""

    experiment: str  # "table1", "table2", "fig5"
    layers: tuple[str, ...]
    target_class: int
    run: int
    positives_only: bool = False
    random_subsets: bool = False  # also evaluate random unit subsets of the selected size
    curve: bool = False  # also compute the holding-rate-vs-units curve (Fig. 6)

    @property
    def key(self) -> str:
        return f"{self.experiment}_{'+'.join(self.layers)}_c{self.target_class}_r{self.run}"

    @property
    def seed(self) -> int:
        # Run r of every experiment uses seed r - 1: a fresh D'_c draw and permutation per run.
        return self.run - 1


#: What --quick changes in the selections besides the data: mini-batches of 32 instead of 128. The step count
#: is the same (min_steps), so a step costs about a quarter (CIFAR-10 max1, class 1: 24.7 s -> 12.4 s on 2 cores;
#: `reproduce cifar10 --quick`: 123 s -> 69 s).
QUICK_SETTINGS: dict[str, Any] = {"batch_size": 32}


def plan(dataset: str, quick: bool, runs: int) -> list[Work]:
    """The work items of a reproduction.

    MNIST: Table 1 (max1, max2 x 10 classes), Table 2 (both layers, classes
    0, 1, 8), Fig. 4 (5 runs), Fig. 5 (input layer), Fig. 6a (class 0, max1).
    CIFAR-10: Table 3, Table 4 (classes airplane, automobile, bird), Fig. 4-style
    positions over the ``runs`` runs, Fig. 6b (airplane, max1). The paper shows no
    pixel map for CIFAR-10.
    """
    single, double = ("table1", "table2") if dataset == "mnist" else ("table3", "table4")
    classes = [0, 1] if quick else list(range(10))
    # MNIST's Fig. 4 shows 5 runs; CIFAR-10's tables ask 3 and its Fig. 4-style picture uses those.
    t1_runs = 1 if quick else (max(runs, FIG4_RUNS) if dataset == "mnist" else runs)
    works: list[Work] = []
    for layer in ("max1", "max2"):
        for c in classes:
            for r in range(1, t1_runs + 1):
                works.append(Work(single, (layer,), c, r, random_subsets=r == 1,
                                  curve=(layer == "max1" and c == 0 and r == 1)))
    pair_classes = [0, 1, 8] if dataset == "mnist" else [0, 1, 2]
    for c in ([0] if quick else pair_classes):
        for r in range(1, (1 if quick else runs) + 1):
            works.append(Work(double, ("max1", "max2"), c, r))
    if dataset == "mnist":
        for c in classes:
            works.append(Work("fig5", ("input",), c, 1, positives_only=True))
    return works


def _random_subset_rates(cache: ActivationCache, rows: torch.Tensor, k: int, total: int, c: int,
                         seed: int) -> list[dict[str, float]]:
    g = torch.Generator().manual_seed(10_000 + seed)
    out = []
    for _ in range(RANDOM_SUBSETS):
        mask = torch.zeros(total, device=cache.device)
        mask[torch.randperm(total, generator=g)[:k].to(cache.device)] = 1.0
        r = evaluate_gates(cache, rows, [mask], c)
        out.append({"holding_rate": r.paper, "holding_rate_strict": r.strict})
    return out


def _batches(group: list[Work], size: int) -> Iterator[list[Work]]:
    """Consecutive works of one layer group, at most ``size``, sharing their D'_c rule."""
    batch: list[Work] = []
    for w in group:
        if batch and (len(batch) == size or w.positives_only != batch[0].positives_only):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


def _select(works: list[Work], model: torch.nn.Module, cache: ActivationCache, model_name: str,
            overrides: dict[str, Any] | None = None, quick: bool = False) -> list[CoreUnits]:
    """The selections of works that share their layers and D'_c rule, optimised together."""
    first = works[0]
    coef = coefficients(model_name, list(first.layers), overrides) | (QUICK_SETTINGS if quick else {})
    layers = list(first.layers) if len(first.layers) > 1 else first.layers[0]
    return find_core_units_batched(model, layers, [(w.target_class, w.seed) for w in works], cache, progress=False,
                                   positives_only=first.positives_only, **coef)


def _do(work: Work, res: CoreUnits, cache: ActivationCache, fingerprint: str) -> dict[str, Any]:
    """A work's record: its selection, and the random subsets and curve it asks for."""
    record: dict[str, Any] = {"key": work.key, "fingerprint": fingerprint, "work": asdict(work)}
    record.update(res.to_dict())
    t0 = time.perf_counter()
    if work.random_subsets or work.curve:
        layer = work.layers[0]
        gen = torch.Generator().manual_seed(work.seed)
        rows = build_dprime(cache.predictions, work.target_class, generator=gen,
                            positives_only=work.positives_only).index
        if work.random_subsets:
            record["random_subsets"] = _random_subset_rates(
                cache, rows, res.num_units[layer], res.total_units[layer], work.target_class, work.seed)
        if work.curve:
            k = res.num_units[layer]
            ks = list(range(min(res.total_units[layer], k + 6), -1, -1))
            record["curve"] = removal_curve(cache, rows, layer, res.gates[layer], work.target_class, ks)
    record["evaluation_seconds"] = time.perf_counter() - t0
    return record


def _groups(works: list[Work]) -> Iterator[tuple[tuple[str, ...], list[Work]]]:
    order: dict[tuple[str, ...], list[Work]] = {}
    for w in works:
        order.setdefault(w.layers, []).append(w)
    yield from order.items()


def paper_data(dataset: str, data_root: str | None, quick: bool) -> tuple[Any, str]:
    """The data a reproduction selects on, and its description (also what ``coreunits report`` reloads)."""
    from coreunits.data import get_mnist

    # The paper optimises on the training data; --quick uses the (smaller) test split.
    if dataset != "mnist":
        return cifar10_data(data_root, quick)
    data, source = get_mnist(data_root, train=not quick, allow_sample=quick)
    if quick and len(data) > 3000:
        data = torch.utils.data.TensorDataset(*(t[:3000] for t in data.tensors))
        source += ", first 3000"
    return data, source


def _append_timing(out: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Add one invocation's timing to ``out/timing.json`` (kept across resumed runs); returns all of it."""
    timing_path = out / "timing.json"
    try:
        timing = json.loads(timing_path.read_text())
    except (OSError, ValueError):
        timing = {"invocations": []}
    timing["invocations"].append(entry)
    atomic_write_text(timing_path, json.dumps(timing, indent=1))
    return timing


def run_dataset(
    dataset: str,
    out: Path,
    data_root: str | None = None,
    checkpoint: str | None = None,
    runs: int = 3,
    quick: bool = False,
    progress: bool = True,
    device: str | None = None,
    html: bool = True,
) -> dict[str, Any]:
    """Run (or resume) the reproduction of ``dataset`` ("mnist" or "cifar10") into ``out``.

    Args:
        out: output folder.
        data_root: data root (default ``$COREUNITS_DATA``; MNIST is downloaded when
            possible and ``quick`` also accepts the bundled sample).
        checkpoint: the paper's classifier (default: the bundled checkpoint).
        runs: optimisations per (layer, class) for Tables 1 and 2 (Fig. 4 uses 5).
        quick: classes 0 and 1, one run, D'_c from (part of) the test split, and ``QUICK_SETTINGS``: a smoke
            test of the pipeline, whose numbers are not the paper's setting.
        progress: progress bars.
        device: where to select (e.g. ``"cuda"``); default the checkpoint's (CPU).
            The checkpoint's metadata may carry per-layer ``"coefficients"``
            that replace the paper's settings for that classifier.
        html: also write ``report.html`` (atlas and per-unit panels; one more pass over the data), unless
            this call computed nothing and the page is there.

    Returns:
        The gathered results (also written to ``out/results.json``).
    """
    from coreunits import __version__
    from coreunits.report import write_report
    from coreunits.train import load_model, read_metadata

    t_start = time.perf_counter()
    ckpt = Path(checkpoint) if checkpoint else default_checkpoint(dataset)
    model = load_model(ckpt, dataset)
    meta = read_metadata(ckpt)
    overrides = meta.get("coefficients")
    data, source = paper_data(dataset, data_root, quick)
    settings = {
        "checkpoint_sha256": file_digest(ckpt),
        "data": source.split(" from ")[0].split(" (")[0] + f" n={len(data)}",
        "coefficients": {k: coefficients(dataset, [k], overrides) for k in ("max1", "max2", "input")},
        "quick": quick,
        "quick_settings": QUICK_SETTINGS if quick else None,
        # Results made by another version or other selection defaults are redone.
        "version": __version__,
        "defaults": DEFAULTS,
    }
    fingerprint = fingerprint_of(settings)
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    works = plan(dataset, quick, runs)
    records: dict[str, dict[str, Any]] = {}
    todo = []
    for w in works:
        done = read_record(runs_dir / f"{w.key}.json", fingerprint)
        if done is not None:
            records[w.key] = done
        else:
            todo.append(w)
    cache_seconds = 0.0
    bar = progress_bar(enabled=progress, total=len(works), initial=len(works) - len(todo),
                       desc=f"reproduce {dataset}", unit="run")
    try:
        for layers, group in _groups(todo):
            t0 = time.perf_counter()
            cache = ActivationCache(model, list(layers), data, batch_size=1000, progress=progress, device=device)
            cache_seconds += time.perf_counter() - t0
            for batch in _batches(group, batch_selections(cache.device)):
                bar.set_postfix_str(batch[0].key + ("" if len(batch) == 1 else f" +{len(batch) - 1}"))
                for w, res in zip(batch, _select(batch, model, cache, dataset, overrides, quick)):
                    record = _do(w, res, cache, fingerprint)
                    atomic_write_text(runs_dir / f"{w.key}.json", json.dumps(record))
                    records[w.key] = record
                    bar.update(1)
            del cache
    finally:
        bar.close()
    timing = _append_timing(out, {
        "wall_seconds": time.perf_counter() - t_start, "cache_seconds": cache_seconds, "runs_computed": len(todo),
        "threads": torch.get_num_threads(), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })
    results = write_report(
        out, [records[w.key] for w in works], dataset=dataset, settings=settings, source=source, timing=timing,
        classifier={"checkpoint": ckpt.name, "test_accuracy": meta.get("test_accuracy"),
                    "epochs": meta.get("epochs"), "seed": meta.get("seed")},
        runs=1 if quick else runs, quick=quick,
    )
    # A rerun that computed nothing keeps its page (`coreunits report DIR` redraws it on demand).
    if html and (todo or not (out / "report.html").is_file()):
        from coreunits.html_report import write_html_report
        from coreunits.report import SPECS

        write_html_report(out, model=model, data=data, class_names=SPECS[dataset]["class_names"],
                          title=f"Core units of the paper's {SPECS[dataset]['title']} classifier")
    return results
