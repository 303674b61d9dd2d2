"""Sweeps: core units of many (layer, class, run) selections of one model, resumable per record.

Each selection is one JSON record under ``out/runs/`` written atomically as soon as it is done, stamped with a
fingerprint of everything that shapes it (model, weights, data, settings, layer, class, seed); a rerun keeps the
records whose fingerprint matches and computes the rest. The activations of a layer are cached once and shared
by all of its classes and runs. At the end ``sweep.json``, ``sweep.csv`` and ``report.md`` summarise them.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from coreunits._core.cache import ActivationCache
from coreunits._core.errors import DataError
from coreunits._core.io import atomic_write_text
from coreunits._core.progress import progress_bar
from coreunits._core.result import fingerprint_of, read_record
from coreunits._core.selection import batch_selections, find_core_units, find_core_units_batched
from coreunits.report import csv_text

__all__ = ["SweepTask", "plan", "run_sweep", "select_task", "write_sweep_report"]

logger = logging.getLogger(__name__)

_COLUMNS = ["layer", "target_class", "class_name", "seed", "num_units", "total_units", "holding_rate",
            "holding_rate_strict", "reached", "dprime_size", "seconds", "units", "skipped"]


@dataclass(frozen=True)
class SweepTask:
    """One selection of a sweep: a layer, a class and a seed (the run)."""

    layer: str
    target_class: int
    seed: int

    @property
    def key(self) -> str:
        """File name of the task's record (layer names may hold dots and colons)."""
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", self.layer)
        return f"{safe}/c{self.target_class}-s{self.seed}.json"


def plan(layers: Sequence[str], classes: Sequence[int], runs: int, seed: int = 0) -> list[SweepTask]:
    """Every (layer, class, run) of a sweep, layer by layer so that one activation cache serves a layer's tasks."""
    return [SweepTask(layer, c, seed + r) for layer in layers for c in classes for r in range(runs)]


def _record(task: SweepTask, result: Any, fingerprint: str, class_name: str | None) -> dict[str, Any]:
    layer = task.layer
    target = result.settings.get("target") or {}
    return {
        "fingerprint": fingerprint, "layer": layer, "target_class": task.target_class, "class_name": class_name,
        "seed": task.seed, "num_units": result.num_units[layer], "total_units": result.total_units[layer],
        "units": result.units[layer], "holding_rate": result.holding_rate,
        "holding_rate_strict": result.holding_rate_strict, "reached": target.get("reached"),
        "dprime_size": result.dprime.get("size"), "seconds": result.seconds, "result": result.to_dict(),
    }


def _skipped(task: SweepTask, fingerprint: str, class_name: str | None, reason: str) -> dict[str, Any]:
    # Stored like a finished record (a rerun does not retry it): the data decide it, not chance.
    return {"fingerprint": fingerprint, "layer": task.layer, "target_class": task.target_class,
            "class_name": class_name, "seed": task.seed, "holding_rate": None, "skipped": reason}


def select_task(cache: ActivationCache, task: SweepTask, options: dict[str, Any], fingerprint: str,
                class_name: str | None) -> dict[str, Any]:
    """One task's record: its selection on ``cache``, or a skipped record where the data rule the class out."""
    try:
        result = find_core_units(cache.user_model, task.layer, task.target_class, cache, seed=task.seed,
                                 progress=False, **options)
        return _record(task, result, fingerprint, class_name)
    except DataError as err:
        logger.warning("layer %s class %d skipped: %s", task.layer, task.target_class, err)
        return _skipped(task, fingerprint, class_name, str(err))


def select_tasks(cache: ActivationCache, items: Sequence[tuple[SweepTask, str, str | None]],
                 options: dict[str, Any]) -> list[dict[str, Any]]:
    """The records of tasks of one layer: fixed-coefficient selections optimised together, else one at a time.

    Target mode refines each set alone; a class the data rule out (DataError) is found
    one task at a time, so it is recorded as skipped and the others still run.
    """
    if len(items) > 1 and options.get("target_holding_rate") is None:
        tasks = [task for task, _, _ in items]
        try:
            results = find_core_units_batched(cache.user_model, tasks[0].layer,
                                              [(t.target_class, t.seed) for t in tasks], cache, progress=False,
                                              **options)
        except DataError:
            pass
        else:
            return [_record(t, r, fp, name) for (t, fp, name), r in zip(items, results)]
    return [select_task(cache, task, options, fp, name) for task, fp, name in items]


def run_sweep(model: nn.Module, data: Any, tasks: Sequence[SweepTask], out: str | Path, *,
              identity: dict[str, Any], options: dict[str, Any], class_names: Sequence[str] | None = None,
              progress: bool = True, batch_size: int = 256, workers: int = 1,
              ray_address: str | None = None) -> list[dict[str, Any]]:
    """Run (or resume) ``tasks`` on ``model`` and ``data``; one record per task, written to ``out/runs/``.

    Args:
        identity: what the records must match to be reused (model spec, weights hash, data, preprocessing).
        options: keyword settings of :func:`~coreunits.find_core_units` (e.g. ``target_holding_rate``).
        class_names: names of the classes, recorded beside the indices.
        workers: above 1, the tasks run on a local Ray with that many workers (see :mod:`coreunits._core.ray_sweep`).
        ray_address: run on this Ray cluster instead (e.g. ``"auto"`` or ``"ray://head:10001"``).
    """
    runs_dir = Path(out) / "runs"
    records: dict[SweepTask, dict[str, Any]] = {}
    todo: list[tuple[SweepTask, str, str | None]] = []
    for task in tasks:
        name = class_names[task.target_class] if class_names and task.target_class < len(class_names) else None
        fingerprint = fingerprint_of({"identity": identity, "options": options, "task": task.__dict__})
        record = read_record(runs_dir / task.key, fingerprint, required="layer")
        if record is None:
            todo.append((task, fingerprint, name))
        else:
            records[task] = record
    bar = progress_bar(total=len(tasks), initial=len(records), enabled=progress, desc="sweep", unit="selection")

    def save(task: SweepTask, record: dict[str, Any]) -> None:
        # Written as each task finishes: an interrupted sweep keeps every finished record.
        path = runs_dir / task.key
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, _json(record))
        records[task] = record
        bar.update(1)

    with bar:
        for layer in dict.fromkeys(t.layer for t, _, _ in todo):  # one layer's activations at a time
            group = [item for item in todo if item[0].layer == layer]
            cache = ActivationCache(model, layer, data, batch_size=batch_size, progress=progress,
                                    ablation=options.get("ablation") or "zero")
            size = batch_selections(cache.device)
            batches = [group[start:start + size] for start in range(0, len(group), size)]
            if workers > 1 or ray_address is not None:
                from coreunits._core.ray_sweep import run_on_ray

                run_on_ray(cache, batches, select_tasks, options, save, workers=workers, address=ray_address)
            else:
                for batch in batches:
                    for task, record in zip((t for t, _, _ in batch), select_tasks(cache, batch, options)):
                        save(task, record)
            del cache
    return [records[t] for t in tasks]


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=1)


def _layer_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (layer, class): means over its runs."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["layer"], r["target_class"]), []).append(r)
    rows = []
    for (layer, c), recs in groups.items():
        done = [r for r in recs if r.get("holding_rate") is not None]
        row: dict[str, Any] = {"layer": layer, "target_class": c, "class_name": recs[0].get("class_name"),
                               "runs": len(done), "skipped": next((r["skipped"] for r in recs if "skipped" in r), "")}
        if done:
            units = [r["num_units"] for r in done]
            row.update(units_mean=statistics.fmean(units), units_min=min(units), units_max=max(units),
                       total_units=done[0]["total_units"],
                       strict_mean=statistics.fmean(r["holding_rate_strict"] for r in done),
                       paper_mean=statistics.fmean(r["holding_rate"] for r in done),
                       reached=all(r.get("reached") is not False for r in done),
                       seconds_mean=statistics.fmean(r["seconds"] for r in done))
        rows.append(row)
    return rows


def _markdown(rows: list[dict[str, Any]], description: str, command: str, wall: float) -> str:
    lines = ["# coreunits sweep", "", description, "", f"Command: `{command}`", "",
             (f"{len(rows)} (layer, class) pairs; report written {time.strftime('%Y-%m-%d %H:%M')} "
              f"after {wall:.1f} s of this invocation (stored records are reused, not recomputed)."), ""]
    for layer in dict.fromkeys(r["layer"] for r in rows):
        mine = [r for r in rows if r["layer"] == layer]
        done = [r for r in mine if r["runs"]]
        lines += [f"## {layer}", ""]
        if done:
            units = statistics.fmean(r["units_mean"] for r in done)
            strict = statistics.fmean(r["strict_mean"] for r in done)
            lines += [f"Mean {units:.1f} of {done[0]['total_units']} units kept; mean strict holding {100 * strict:.2f}%.",
                      ""]
        lines += ["| class | name | runs | units (mean) | min-max | holding strict | holding paper | reached | s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in mine:
            if not r["runs"]:
                lines.append(f"| {r['target_class']} | {r['class_name'] or ''} | 0 | skipped: {r['skipped'][:80]} "
                             "| | | | | |")
                continue
            lines.append(
                f"| {r['target_class']} | {r['class_name'] or ''} | {r['runs']} | {r['units_mean']:.1f} / "
                f"{r['total_units']} | {r['units_min']}-{r['units_max']} | {100 * r['strict_mean']:.2f}% | "
                f"{100 * r['paper_mean']:.2f}% | {'yes' if r['reached'] else 'NO'} | {r['seconds_mean']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def write_sweep_report(out: str | Path, records: list[dict[str, Any]], *, description: str, command: str,
                       wall: float = 0.0) -> None:
    """``sweep.json`` (every record), ``sweep.csv`` (one line per selection) and ``report.md`` (per layer and class)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    slim = [{k: v for k, v in r.items() if k != "result"} for r in records]
    atomic_write_text(out / "sweep.json", _json({"description": description, "command": command, "records": records}))
    atomic_write_text(out / "sweep.csv", csv_text(slim, _COLUMNS))
    atomic_write_text(out / "report.md", _markdown(_layer_rows(records), description, command, wall))
