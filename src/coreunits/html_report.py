"""``report.html``: the core units of a results folder as one self-contained page.

Data flows one way: results (:func:`~coreunits._core.selections.read_results`) -> the layer atlases
(:mod:`coreunits._core.atlas`) and, with the model and data, the per-unit views (:mod:`coreunits._core.unit_views`)
-> HTML (:mod:`coreunits._core.html_format`). Images are inline PNG/JPEG data URIs; there is no network access,
no script library, only a few lines of inline JavaScript that sort tables and count images that failed to load.
The atlas is also written as ``atlas.json`` and ``atlas.csv`` beside the page.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from coreunits._core.atlas import LayerAtlas, Selection, build_atlas
from coreunits._core.engine import OutputFn
from coreunits._core.errors import OptionError
from coreunits._core.html_format import render_page
from coreunits._core.io import atomic_write_text
from coreunits._core.layers import INPUT
from coreunits._core.report_data import ClassView, ReportData, UnitView
from coreunits._core.selections import ResultsSource, read_results
from coreunits._core.thumbnails import encode, overlay, tile, to_rgb
from coreunits._core.unit_views import (
    Activations,
    collect_activations,
    dprime_rows,
    gather_inputs,
    layer_outputs,
    necessity,
    top_rows,
)

__all__ = ["atlas_csv", "build_report", "write_html_report"]


def _class_names(source: ResultsSource, given: Sequence[str] | None) -> dict[int, str]:
    names = dict(source.meta.get("class_names") or {})
    if given:
        names.update(dict(enumerate(given)))
    return {int(k): str(v) for k, v in names.items()}


def _first_runs(selections: Sequence[Selection], layer: str) -> list[Selection]:
    return [s for s in selections if s.layer == layer and s.run == 1]


def _layers(selections: Sequence[Selection]) -> list[str]:
    """The layers in order of first appearance, the input (pixel maps, no unit panels) last."""
    names = list(dict.fromkeys(s.layer for s in selections))
    return [n for n in names if n != INPUT] + [n for n in names if n == INPUT]


def _unit_image(maps: dict[int, torch.Tensor], inputs: dict[int, torch.Tensor], u: int, rows: Sequence[list[int]],
                fmt: str) -> bytes:
    """One PNG/JPEG per unit: a row of its top inputs of D'_c, a row of its top inputs of class c, maps overlaid."""
    shown = [maps[r][u] for row in rows for r in row]
    vmax = max((float(m.max()) for m in shown), default=0.0)
    cells = [[overlay(to_rgb(inputs[r]), maps[r][u] if maps[r][u].dim() == 2 else None, vmax) for r in row]
             for row in rows if row]
    return encode(tile(cells), fmt)


def _layer_views(model: nn.Module, data: Any, acts: Activations, atlas: LayerAtlas, reps: list[Selection], *,
                 top_k: int, probe_rows: int | None, output_fn: OutputFn | None, fmt: str) -> list[ClassView]:
    """Per class (its first run): top-k rows per unit, their maps (one small pass), leave-one-out holding rates."""
    layer = atlas.layer
    peaks = acts.peaks[layer]
    nec = necessity(model, layer, data, acts.predictions,
                    [(s.target_class, s.seed, s.positives_only, s.units) for s in reps], probe_rows=probe_rows,
                    output_fn=output_fn)
    tops: list[dict[int, tuple[list[int], list[int]]]] = []
    for s in reps:
        rows = dprime_rows(acts.predictions, s.target_class, s.seed, s.positives_only)
        positives = torch.nonzero(acts.predictions == s.target_class).flatten()
        tops.append({u: (top_rows(peaks[:, u], rows, top_k), top_rows(peaks[:, u], positives, top_k))
                     for u in s.units})
    wanted = sorted({r for t in tops for a, b in t.values() for r in a + b})
    inputs = gather_inputs(data, wanted) if wanted else torch.zeros(0)
    outs = layer_outputs(model, layer, inputs, output_fn=output_fn) if wanted else torch.zeros(0)
    by_row_in = dict(zip(wanted, inputs))
    by_row_out = dict(zip(wanted, outs))
    views = []
    for s, t, n in zip(reps, tops, nec):
        units = [UnitView(u, None if s.gates is None else s.gates[u], n.drop_strict[u], n.drop_paper[u],
                          atlas.sharing[u], list(t[u][0]), list(t[u][1]),
                          _unit_image(by_row_out, by_row_in, u, t[u], fmt)) for u in s.units]
        views.append(ClassView(layer, s.target_class, s, units, n.strict, n.paper, n.rows, n.dprime_size))
    return views


def _pixel_views(acts: Activations | None, atlas: LayerAtlas, reps: list[Selection]) -> list[ClassView]:
    """Input layer: per class, its mean input, how often each pixel was kept, and the two together."""
    views = []
    for s in reps:
        i = atlas.classes.index(s.target_class)
        freq = torch.tensor(atlas.counts[i], dtype=torch.float32) / max(1, atlas.runs[i])
        freq = freq.reshape(atlas.unit_shape if len(atlas.unit_shape) == 2 else (1, -1))
        cells = [to_rgb(freq)]
        if acts is not None and acts.class_means is not None:
            mean = to_rgb(acts.class_means[s.target_class])
            cells = [mean, cells[0], overlay(mean, freq, 1.0)]
        views.append(ClassView(INPUT, s.target_class, s, [], s.holding_rate_strict, s.holding_rate,
                               pixel_map=encode(tile([cells]), "png")))
    return views


def _auto_format(data: Any) -> str:
    """WebP where Pillow can write it (a fifth to a sixth of PNG's bytes here, at no visible loss on 56-px
    thumbnails), else JPEG for colour inputs and PNG for grey ones."""
    from PIL import features

    if features.check("webp"):
        return "webp"
    first = gather_inputs(data, [0])
    return "jpeg" if first.dim() == 4 and first.shape[1] == 3 else "png"


def build_report(source: ResultsSource, *, model: nn.Module | None = None, data: Any = None,
                 class_names: Sequence[str] | None = None, top_k: int = 6, probe_rows: int | None = 1024,
                 output_fn: OutputFn | None = None, image_format: str = "auto",
                 layers: Sequence[str] | None = None) -> ReportData:
    """The atlases of every layer in ``source`` and, given ``model`` and ``data``, every class's unit views."""
    if top_k < 1:
        raise OptionError(f"top_k must be >= 1, got {top_k}")
    if image_format not in ("auto", "png", "jpeg", "webp"):
        raise OptionError(f"image_format must be 'auto', 'png', 'jpeg' or 'webp', got {image_format!r}")
    names = [n for n in _layers(source.selections) if layers is None or n in layers]
    atlases = {n: build_atlas(source.selections, n) for n in names}
    report = ReportData(source, atlases, {}, _class_names(source, class_names), top_k, probe_rows,
                        image_format=image_format)
    if source.multi_layer:
        report.notes.append(f"{source.multi_layer} selections of several layers at once are not in the atlas.")
    acts = None
    if model is not None and data is not None:
        acts = collect_activations(model, names, data, output_fn=output_fn, class_means=INPUT in names)
        if image_format == "auto":
            report.image_format = _auto_format(data)
    else:
        report.notes.append("Per-unit panels are not drawn: they need the model and the data "
                            "(coreunits report finds them for reproduce and sweep folders).")
    for n in names:
        reps = _first_runs(source.selections, n)
        if n == INPUT:
            views = _pixel_views(acts, atlases[n], reps)
        elif acts is not None and model is not None:
            views = _layer_views(model, data, acts, atlases[n], reps, top_k=top_k, probe_rows=probe_rows,
                                 output_fn=output_fn, fmt=report.image_format)
        else:
            views = [ClassView(n, s.target_class, s, [UnitView(u, None if s.gates is None else s.gates[u], None, None,
                                                              atlases[n].sharing[u], [], []) for u in s.units],
                               s.holding_rate_strict, s.holding_rate) for s in reps]
        report.classes.update({(v.layer, v.target_class): v for v in views})
    _check_dprime(report)
    return report


def _check_dprime(report: ReportData) -> None:
    """Say so where D'_c rebuilt here differs in size from the selection's (other data than it was made on)."""
    off = [(v.layer, v.target_class, v.dprime_size, v.selection.dprime_size) for v in report.classes.values()
           if v.dprime_size is not None and v.selection.dprime_size is not None
           and v.dprime_size != v.selection.dprime_size]
    if off:
        layer, c, here, there = off[0]
        report.notes.append(f"D'_c rebuilt here differs in size from the selections' ({len(off)} cases, e.g. "
                            f"{layer} class {c}: {here} vs {there} inputs): the data are not those the selections "
                            "were made on, so the panels and necessities describe other inputs.")


def atlas_csv(atlases: dict[str, LayerAtlas]) -> str:
    """One line per (layer, class, unit kept in some run): runs keeping it, runs, in the consensus set, classes."""
    lines = ["layer,class,unit,runs_kept,runs,in_core_set,classes_keeping"]
    for a in atlases.values():
        for c, runs, counts, core in zip(a.classes, a.runs, a.counts, a.core):
            kept = set(core)
            lines += [f"{a.layer},{c},{u},{n},{runs},{int(u in kept)},{a.sharing[u]}"
                      for u, n in enumerate(counts) if n]
    return "\n".join(lines) + "\n"


def _views_json(report: ReportData) -> list[dict[str, Any]]:
    return [{"layer": v.layer, "class": v.target_class, "run": v.selection.run, "seed": v.selection.seed,
             "holding_rate_strict_judged": v.strict, "holding_rate_paper_judged": v.paper,
             "judged_rows": v.judged_rows, "dprime_size": v.dprime_size,
             "units": [{"unit": u.unit, "gate": u.gate, "necessity_strict": u.drop_strict,
                        "necessity_paper": u.drop_paper, "classes_keeping": u.classes_keeping,
                        "top_dprime_rows": u.top_dprime, "top_class_rows": u.top_class} for u in v.units]}
            for v in report.classes.values()]


def write_html_report(results: str | Path, out: str | Path | None = None, *, model: nn.Module | None = None,
                      data: Any = None, class_names: Sequence[str] | None = None, top_k: int = 6,
                      probe_rows: int | None = 1024, output_fn: OutputFn | None = None,
                      image_format: str = "auto", title: str | None = None) -> Path:
    """Write ``report.html``, ``atlas.json`` and ``atlas.csv`` for the results under ``results``.

    Args:
        results: a folder written by reproduce, sweep or compare, a find result JSON, or a folder of those.
        out: the page's path (default: ``report.html`` in that folder; beside a find result, its name
            with ``.html``).
        model, data: the model and the data the selections were made on; without them the page has the
            atlas only. The model is left as it was.
        top_k: inputs shown per unit and row.
        probe_rows: necessity is judged on this many inputs of each D'_c (a seeded subset; None: all).
        image_format: ``"png"``, ``"jpeg"``, ``"webp"``, or ``"auto"``: WebP where Pillow writes it, else
            JPEG for colour inputs and PNG for grey ones.

    Returns:
        The path of the page.
    """
    source = read_results(results)
    report = build_report(source, model=model, data=data, class_names=class_names, top_k=top_k,
                          probe_rows=probe_rows, output_fn=output_fn, image_format=image_format)
    base = source.path if source.path.is_dir() else source.path.parent
    page = Path(out) if out is not None else (
        base / "report.html" if source.path.is_dir() else source.path.with_suffix(".html"))
    stem = "atlas" if page.name == "report.html" else page.stem + ".atlas"
    atomic_write_text(page.parent / f"{stem}.json", json.dumps(
        {"layers": {k: a.to_dict() for k, a in report.atlases.items()}, "classes": _views_json(report)}, indent=1))
    atomic_write_text(page.parent / f"{stem}.csv", atlas_csv(report.atlases))
    atomic_write_text(page, render_page(report, title))
    return page
