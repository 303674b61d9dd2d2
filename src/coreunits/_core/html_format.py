"""A computed report (:class:`~coreunits._core.report_data.ReportData`) as one self-contained HTML page.

Plain HTML and CSS: the class x unit matrix and the Jaccard heatmap are tables with coloured cells; pictures are
inline data URIs. The inline script only sorts tables by a clicked header and, once the page has loaded, writes
how many images failed to load into ``<body data-broken-images>`` (what the browser test reads).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence

from coreunits._core.atlas import LayerAtlas
from coreunits._core.layers import INPUT
from coreunits._core.report_data import ClassView, ReportData, UnitView

__all__ = ["render_page"]

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1240px;padding:0 16px 40px;
color:#222}
h1{font-size:22px;margin:18px 0 6px}h2{font-size:19px;border-bottom:1px solid #ccc;padding-bottom:3px;margin-top:28px}
h3{font-size:16px;margin:20px 0 6px}h4{font-size:14px;margin:14px 0 4px}
header p{margin:4px 0}code{background:#f3f3f3;padding:1px 4px;border-radius:3px}
.note{color:#8a5300}.muted{color:#666;font-size:12px}nav a{margin-right:8px}
table{border-collapse:collapse;margin:6px 0}td,th{padding:2px 6px;text-align:left;vertical-align:middle}
table.units td,table.units th{border-bottom:1px solid #e4e4e4}th.sort{cursor:pointer;white-space:nowrap}
th.sort:after{content:' \\2195';color:#aaa}
table.grid td{width:15px;height:15px;padding:0;text-align:center;font-size:9px;border:1px solid #f0f0f0}
table.grid th{font-size:9px;font-weight:normal;padding:0 4px 0 0;white-space:nowrap}
table.grid th.col{writing-mode:vertical-rl;transform:rotate(180deg);padding:2px 0;height:auto}
table.heat td{width:34px;height:22px;padding:0;text-align:center;font-size:10px;border:1px solid #fff}
table.heat th{font-size:11px;font-weight:normal;padding:0 4px 0 0;white-space:nowrap}
table.heat th.col{writing-mode:vertical-rl;transform:rotate(180deg);padding:2px 0}
.scroll{overflow-x:auto;max-width:100%}.pix{display:inline-block;margin:0 10px 10px 0;font-size:12px}
.legend span{display:inline-block;width:12px;height:12px;vertical-align:middle;margin:0 3px 0 8px}
"""

_JS = """
document.addEventListener('click',function(e){var th=e.target.closest('th.sort');if(!th)return;
var tb=th.closest('table').tBodies[0],i=th.cellIndex,up=th.dataset.dir!=='up';th.dataset.dir=up?'up':'down';
Array.from(tb.rows).sort(function(a,b){var x=parseFloat(a.cells[i].dataset.v),y=parseFloat(b.cells[i].dataset.v);
x=isNaN(x)?-1e9:x;y=isNaN(y)?-1e9:y;return up?x-y:y-x}).forEach(function(r){tb.appendChild(r)})});
window.addEventListener('load',function(){var n=0;Array.prototype.forEach.call(document.images,function(im){
if(!(im.complete&&im.naturalWidth>0))n++});document.body.setAttribute('data-images',String(document.images.length));
document.body.setAttribute('data-broken-images',String(n))});
"""

_MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def _e(x: object) -> str:
    return html.escape(str(x))


def _img(data: bytes, fmt: str, alt: str) -> str:
    return f'<img src="data:{_MIME[fmt]};base64,{base64.b64encode(data).decode()}" alt="{_e(alt)}">'


def _mix(f: float, rgb: tuple[int, int, int]) -> str:
    """White blended towards ``rgb`` by ``f`` in [0, 1], as a CSS colour."""
    f = min(1.0, max(0.0, f))
    return "#" + "".join(f"{round(255 - f * (255 - v)):02x}" for v in rgb)


def _pct(x: float | None, digits: int = 2) -> str:
    return "" if x is None else f"{100 * x:.{digits}f}%"


def _name(report: ReportData, c: int) -> str:
    name = report.class_names.get(c)
    return f"{c} ({name})" if name and name != str(c) else str(c)


def _header(report: ReportData, title: str | None) -> list[str]:
    src = report.source
    layers = ", ".join(f"<code>{_e(k)}</code> ({a.total_units} units)" for k, a in report.atlases.items())
    runs = max((s.run for s in src.selections), default=0)
    out = [f"<header><h1>{_e(title or 'Core units: ' + src.path.name)}</h1>",
           (f"<p><b>Run</b>: <code>{_e(src.command or src.kind)}</code> &mdash; {len(src.selections)} single-layer "
           f"selections from <code>{_e(src.path)}</code> ({_e(src.kind)}), up to {runs} run(s) per class.</p>")]
    if src.description:
        out.append(f"<p><b>On</b>: {_e(src.description)}</p>")
    out.append(f"<p><b>Layers</b>: {layers}.</p>")
    if any(u.image for v in report.classes.values() for u in v.units):
        probe = "all of D'_c" if report.probe_rows is None else f"a seeded probe of up to {report.probe_rows} inputs of D'_c"
        out.append(f"<p class='muted'>Per unit: the top {report.top_k} inputs of D'_c by the unit's peak response "
                   f"(upper row) and the top {report.top_k} inputs predicted as the class (lower row), the unit's "
                   "activation map overlaid (red = weak, yellow = strong, one scale per unit); necessity = holding "
                   f"rate of the core set minus that without the unit, judged on {probe} (negative: the set holds "
                   "better without it); classes keeping = classes whose core set (units kept in at least half of "
                   "their runs) has the unit. Panels show each class's first run (lowest seed).</p>")
    out += [f"<p class='note'>{_e(n)}</p>" for n in report.notes]
    classes = sorted({c for _, c in report.classes})
    out.append("<nav><a href='#atlas'>Atlas</a>" + "".join(f"<a href='#class-{c}'>{_e(_name(report, c))}</a>"
                                                            for c in classes) + "</nav></header>")
    return out


def _matrix(report: ReportData, a: LayerAtlas) -> list[str]:
    used = [u for u in range(a.total_units) if any(row[u] for row in a.counts)]
    if len(used) > 400:
        return [f"<p class='muted'>{len(used)} units are kept by some class: too many for a matrix; see atlas.csv.</p>"]
    head = "".join(f"<th class='col'>{u}</th>" for u in used)
    rows = []
    for c, runs, counts in zip(a.classes, a.runs, a.counts):
        cells = "".join(
            f"<td style='background:{_mix(counts[u] / runs, (253, 141, 60))}' title='unit {u}: {counts[u]}/{runs} runs'>"
            f"{counts[u] if counts[u] and runs > 1 else ''}</td>" for u in used)
        rows.append(f"<tr><th>{_e(_name(report, c))}</th>{cells}</tr>")
    share = "".join(f"<td title='{a.sharing[u]} classes keep unit {u}'>{a.sharing[u] or ''}</td>" for u in used)
    legend = ("<p class='legend muted'>Cell: share of the class's runs that kept the unit (number = runs, when more "
              "than one)<span style='background:#fd8d3c'></span>every run<span style='background:#fec69d'></span>"
              "half. Last row: classes whose core set (units kept in at least half of the runs) has the unit.</p>")
    return ["<div class='scroll'><table class='grid matrix'>", f"<tr><th></th>{head}</tr>", *rows,
            f"<tr><th>classes</th>{share}</tr>", "</table></div>", legend]


def _heatmap(report: ReportData, a: LayerAtlas) -> list[str]:
    head = "".join(f"<th class='col'>{_e(report.class_names.get(c, c))}</th>" for c in a.classes)
    rows = [f"<tr><th>{_e(_name(report, c))}</th>" + "".join(
        f"<td style='background:{_mix(v, (49, 130, 189))};color:{'#fff' if v > 0.6 else '#222'}'>{v:.2f}</td>"
        for v in row) + "</tr>" for c, row in zip(a.classes, a.jaccard)]
    return ["<h4>Jaccard similarity of the classes' core sets</h4>",
            ("<p class='muted'>Classes ordered by average-linkage clustering on 1 - Jaccard: similar classes are "
            "neighbours.</p>"), "<div class='scroll'><table class='heat'>", f"<tr><th></th>{head}</tr>", *rows,
            "</table></div>"]


def _sharing(report: ReportData, a: LayerAtlas) -> list[str]:
    shared = a.shared_units()
    specific = {c: u for c, u in a.specific_units().items() if u}
    sizes = [len(c) for c in a.core]
    need = max(2, (len(a.classes) + 1) // 2)
    spec_text = "; ".join(f"{_e(_name(report, c))}: {', '.join(map(str, u))}" for c, u in specific.items())
    return [f"<p>Core sets of {min(sizes)}-{max(sizes)} units (mean {sum(sizes) / len(sizes):.1f}) of "
            f"{a.total_units}. Kept by at least {need} classes: {len(shared)} units"
            + (f" ({', '.join(map(str, shared[:40]))}{', ...' if len(shared) > 40 else ''})" if shared else "")
            + f". Kept by one class only: {sum(len(u) for u in specific.values())} units"
            + (f" ({spec_text})" if spec_text and len(spec_text) < 300 else "") + ".</p>"]


def _pixels(report: ReportData, a: LayerAtlas) -> list[str]:
    out = [("<p class='muted'>Per class: its mean input (inputs predicted as the class), the share of runs that kept "
           "each pixel, and the two overlaid.</p><div>")]
    for c in a.classes:
        v = report.classes.get((a.layer, c))
        if v is not None and v.pixel_map is not None:
            out.append(f"<div class='pix'>{_img(v.pixel_map, 'png', f'pixel map of class {c}')}<br>"
                       f"{_e(_name(report, c))}: {len(v.selection.units)} px</div>")
    return [*out, "</div>"]


def _atlas(report: ReportData) -> list[str]:
    out = ["<section id='atlas'><h2>Layer atlas</h2>"]
    for layer, a in report.atlases.items():
        out += [f"<div class='layer-atlas' id='atlas-{_e(layer)}'><h3>{_e(layer)}</h3>", *_sharing(report, a)]
        if layer == INPUT or (len(a.unit_shape) == 2 and a.total_units > 400):
            out += _pixels(report, a)
        else:
            out += _matrix(report, a)
        out += [*_heatmap(report, a), "</div>"]
    return [*out, "</section>"]


def _unit_row(report: ReportData, u: UnitView) -> str:
    img = _img(u.image, report.image_format, f"unit {u.unit}") if u.image else ""
    return (f"<tr><td data-v='{u.unit}'>{u.unit}</td><td data-v='{'' if u.gate is None else u.gate}'>"
            f"{'' if u.gate is None else f'{u.gate:.3f}'}</td>"
            f"<td data-v='{'' if u.drop_strict is None else u.drop_strict}'>{_pct(u.drop_strict)}</td>"
            f"<td data-v='{'' if u.drop_paper is None else u.drop_paper}'>{_pct(u.drop_paper)}</td>"
            f"<td data-v='{u.classes_keeping}'>{u.classes_keeping}</td><td>{img}</td></tr>")


def _class_layer(report: ReportData, v: ClassView) -> list[str]:
    s = v.selection
    total = report.atlases[v.layer].total_units
    rec = f"recorded strict holding {_pct(s.holding_rate_strict)}" if s.holding_rate_strict is not None else ""
    judged = (f"; judged here: {_pct(v.strict)} strict, {_pct(v.paper)} paper reading on {v.judged_rows} of "
              f"{v.dprime_size} inputs of D'_c" if v.judged_rows else "")
    out = [(f"<h4>{_e(v.layer)}: {len(s.units)} of {total} units (run {s.run}, seed {s.seed}"
           f"{', positives-only D&#x27;_c' if s.positives_only else ''})</h4>"), f"<p class='muted'>{rec}{judged}</p>"]
    if v.layer == INPUT:
        return [*out, f"<p class='muted'>Its pixel map is in the <a href='#atlas-{_e(v.layer)}'>atlas</a>.</p>"]
    if not v.units:
        return out
    heads = ["unit", "gate", "necessity (strict)", "necessity (paper)", "classes keeping"]
    th = "".join(f"<th class='sort'>{h}</th>" for h in heads)
    return [*out, f"<table class='units'><thead><tr>{th}<th>top inputs: D'_c / class</th></tr></thead><tbody>",
            *(_unit_row(report, u) for u in v.units), "</tbody></table>"]


def _classes(report: ReportData) -> list[str]:
    out = ["<section id='classes'><h2>Per class</h2>"]
    layers: Sequence[str] = list(report.atlases)
    for c in sorted({c for _, c in report.classes}):
        out.append(f"<section class='class' id='class-{c}'><h3>Class {_e(_name(report, c))}</h3>")
        for layer in layers:
            v = report.classes.get((layer, c))
            if v is not None:
                out += _class_layer(report, v)
        out.append("</section>")
    return [*out, "</section>"]


def render_page(report: ReportData, title: str | None = None) -> str:
    """The whole page as a string."""
    body = [*_header(report, title), *_atlas(report), *_classes(report),
            ("<footer class='muted'><p>Written by coreunits (coreunits report). Data: atlas.json "
            "(every number here), atlas.csv (class x unit).</p></footer>")]
    t = _e(title or f"Core units: {report.source.path.name}")
    return ("<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{t}</title><style>{_CSS}</style></head>\n<body data-broken-images='pending'>\n"
            + "\n".join(body) + f"\n<script>{_JS}</script>\n</body></html>\n")
