"""Reading the results that find, sweep, reproduce and compare write into one list of selections.

A *results source* is a folder written by ``coreunits reproduce`` (``results.json`` + ``runs/``), ``sweep``
(``sweep.json``), ``compare`` (``comparison.json``), or a ``CoreUnits`` JSON file written by ``find`` (or a folder
of them). Each single-layer selection becomes one :class:`~coreunits._core.atlas.Selection`; selections of several
layers at once are counted and left out (the atlas is per layer).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coreunits._core.atlas import Selection
from coreunits._core.errors import DataError, MissingDataError

__all__ = ["ResultsSource", "read_results"]


@dataclass
class ResultsSource:
    """The selections of a results folder and what it says about how they were made.

    Attributes:
        kind: ``reproduce``, ``sweep``, ``compare`` or ``find``.
        path: the folder (or file) read.
        selections: single-layer selections, runs numbered per (layer, class) by seed.
        multi_layer: selections of several layers at once, left out.
        description: the source's own description (data, classifier, settings).
        command: the command that made it, where recorded.
        meta: kind-specific facts (``dataset``, ``quick``, ``checkpoint_sha256``, ``method``, class names).
    """

    kind: str
    path: Path
    selections: list[Selection]
    multi_layer: int = 0
    description: str = ""
    command: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {path}: {err}") from None


def _shape(gates: Any, total: int) -> tuple[int, ...]:
    shape = tuple(np.shape(gates)) if gates is not None else ()
    return shape if shape and int(np.prod(shape)) == total else (total,)


def _from_result(d: dict[str, Any], source: str, seed: int | None = None,
                 positives_only: bool | None = None) -> list[Selection]:
    """The selection of a ``CoreUnits.to_dict()`` (empty when it gated several layers)."""
    layers = list(d["units"])
    if len(layers) != 1:
        return []
    layer = layers[0]
    total = int(d["total_units"][layer])
    gates = (d.get("gates") or {}).get(layer)
    settings = d.get("settings") or {}
    return [Selection(
        layer=layer, target_class=int(d["target_class"]), run=0, seed=int(d.get("seed", 0) if seed is None else seed),
        units=tuple(int(u) for u in d["units"][layer]), total_units=total, unit_shape=_shape(gates, total),
        gates=None if gates is None else tuple(float(g) for g in np.ravel(gates)),
        holding_rate_strict=d.get("holding_rate_strict"), holding_rate=d.get("holding_rate"),
        positives_only=bool(settings.get("positives_only", False) if positives_only is None else positives_only),
        source=source, dprime_size=(d.get("dprime") or {}).get("size"),
    )]


def _numbered(selections: list[Selection]) -> list[Selection]:
    """Runs numbered 1, 2, ... per (layer, class) in seed order."""
    from dataclasses import replace

    out = []
    for key in sorted({(s.layer, s.target_class) for s in selections}):
        mine = sorted((s for s in selections if (s.layer, s.target_class) == key), key=lambda s: (s.seed, s.source))
        out += [replace(s, run=i + 1) for i, s in enumerate(mine)]
    return out


def _reproduce(folder: Path) -> ResultsSource:
    results = _load(folder / "results.json")
    sels: list[Selection] = []
    multi = 0
    for path in sorted((folder / "runs").glob("*.json")):
        rec = _load(path)
        if not isinstance(rec, dict) or "work" not in rec:
            continue
        found = _from_result(rec, rec["work"]["experiment"], positives_only=rec["work"].get("positives_only"))
        multi += not found
        sels += found
    single = "table1" if "table1" in results else "table3"
    settings = results.get("settings", {})
    meta = {"dataset": "mnist" if single == "table1" else "cifar10", "quick": bool(settings.get("quick")),
            "checkpoint_sha256": settings.get("checkpoint_sha256"), "classifier": results.get("classifier", {})}
    clf = results.get("classifier", {})
    acc = clf.get("test_accuracy")
    description = (f"The paper's {meta['dataset']} classifier ({clf.get('checkpoint')}"
                   + (f", test accuracy {100 * acc:.2f}%" if acc is not None else "") + f"); D'_c from {results.get('data')}.")
    return ResultsSource("reproduce", folder, _numbered(sels), multi, description,
                         f"coreunits reproduce {meta['dataset']}" + (" --quick" if meta["quick"] else ""), meta)


def _sweep(folder: Path) -> ResultsSource:
    doc = _load(folder / "sweep.json")
    sels: list[Selection] = []
    names: dict[int, str] = {}
    for rec in doc.get("records", []):
        if rec.get("class_name") is not None:
            names[int(rec["target_class"])] = str(rec["class_name"])
        if "result" in rec:
            sels += _from_result(rec["result"], "sweep")
    return ResultsSource("sweep", folder, _numbered(sels), 0, doc.get("description", ""), doc.get("command", ""),
                         {"class_names": names})


def _compare(folder: Path) -> ResultsSource:
    doc = _load(folder / "comparison.json")
    records = [r for r in doc.get("records", []) if r.get("units") is not None]
    methods = sorted({r["method"] for r in records})
    method = "switch_gates" if "switch_gates" in methods else (methods[0] if methods else "")
    # compare draws every D'_c with its one --seed, which its description states ("...; seed 0; ...").
    said = re.search(r"\bseed (\d+)", doc.get("description", ""))
    seed = int(said.group(1)) if said else 0
    sels = [Selection(layer=r["layer"], target_class=int(r["target_class"]), run=1, seed=seed,
                      units=tuple(int(u) for u in r["units"]), total_units=int(r["total_units"]),
                      holding_rate_strict=r.get("holding_rate") if r.get("reading", "strict") == "strict" else None,
                      holding_rate=r.get("holding_rate") if r.get("reading") == "paper" else None,
                      source=f"compare:{method}", dprime_size=r.get("dprime_size"))
            for r in records if r["method"] == method]
    command = doc.get("command", "")
    words = command.split()
    dataset = words[2] if len(words) > 2 and words[1] == "compare" else ""
    return ResultsSource("compare", folder, _numbered(sels), 0, doc.get("description", ""), command,
                         {"method": method, "methods": methods, "dataset": dataset})


def _find(files: list[Path], where: Path) -> ResultsSource:
    sels: list[Selection] = []
    multi = 0
    described = ""
    for path in files:
        d = _load(path)
        if not (isinstance(d, dict) and {"target_class", "units", "total_units"} <= set(d)
                and isinstance(d["units"], dict)):
            continue
        found = _from_result(d, "find")
        multi += not found
        sels += found
        inputs = (d.get("settings") or {}).get("inputs") or {}
        described = described or (f"{inputs['model']}; D'_c from {inputs['data']}." if inputs.get("model") else "")
    return ResultsSource("find", where, _numbered(sels), multi, described, "coreunits find", {})


def read_results(path: str | Path) -> ResultsSource:
    """The selections under ``path``: a reproduce, sweep or compare folder, a find result, or a folder of them.

    Raises:
        MissingDataError: nothing there.
        DataError: no single-layer selection in it.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingDataError(f"{p} does not exist; give the folder a find, sweep, reproduce or compare wrote")
    if p.is_file():
        source = _find([p], p)
    elif (p / "results.json").is_file() and (p / "runs").is_dir():
        source = _reproduce(p)
    elif (p / "sweep.json").is_file():
        source = _sweep(p)
    elif (p / "comparison.json").is_file():
        source = _compare(p)
    else:
        source = _find(sorted(p.glob("*.json")), p)
    if not source.selections:
        raise DataError(f"{p} holds no single-layer selection: expected results.json + runs/ (reproduce), sweep.json, "
                        f"comparison.json, or CoreUnits JSON files (find --out)")
    return source
