"""``coreunits compare``: every way of choosing units, judged by the same holding rate.

For a model, a layer and classes, each strategy (switch gates in target mode,
hard-concrete L0 gates, greedy backward elimination, truncated Monte Carlo
Shapley values, gradient x activation, mean activation, random) answers the
same :class:`SelectionProblem`; we record the units it needs to reach the
target holding rate on D'_c, the holding rate of that set on a held-out D'_c
(another split), its wall time, and, for methods that rank units, the curve of
holding rate versus the top-k kept (on a probe of D'_c, for the picture).

Each (layer, class, method) is written to ``<out>/runs/`` as soon as it is
done (atomically); a rerun skips what is done, so a long comparison resumes.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence, Sized
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from coreunits._core.ablation import check_ablation
from coreunits._core.cache import ActivationCache
from coreunits._core.errors import DataError, OptionError
from coreunits._core.io import atomic_write_text, save_figure
from coreunits._core.problem import SelectionProblem
from coreunits._core.progress import progress_bar
from coreunits._core.result import fingerprint_of, read_record
from coreunits._core.strategies import Strategy
from coreunits.report import csv_text

__all__ = ["compare_methods", "default_methods", "headline", "summarize", "write_comparison_report"]

#: Rows of D'_c the plotted curves are measured on (the k each method needs is exact, on all of D'_c).
CURVE_PROBE_ROWS = 2048
#: Layers up to this wide get a curve point at every k; wider ones at every k up to CURVE_DENSE_K and at
#: CURVE_SPARSE_POINTS evenly spaced k above (192 MLP neurons: 65 passes through the network, not 193).
CURVE_EVERY_K_UP_TO = 128
CURVE_DENSE_K = 32
CURVE_SPARSE_POINTS = 32
#: Rows of D'_c greedy backward elimination scores candidates on in ``compare`` (drops verified on all of D'_c).
GREEDY_PROBE_ROWS = 2048


def default_methods(seed: int = 0, gate_options: dict[str, Any] | None = None,
                    include: Sequence[str] | None = None) -> list[Strategy]:
    """The strategies ``compare`` runs (captum's conductance only when named in ``include``).

    Args:
        seed: seed of the random baseline and the Monte Carlo methods.
        gate_options: keyword arguments for the gate methods (alpha, lam, epochs...).
        include: names to keep (default: all available).
    """
    from coreunits._core.strategies import (
        ExactGreedyElimination,
        GradientTimesActivation,
        GreedyBackwardElimination,
        HardConcreteL0,
        MeanActivation,
        RandomRanking,
        SwitchGates,
        TruncatedMonteCarloShapley,
    )

    opts = gate_options or {}
    wanted = set(include) if include is not None else set()
    methods: list[Strategy] = [
        # greedy_exact is the reference every bar is judged against: every candidate on all of D'_c.
        SwitchGates(**opts), HardConcreteL0(**opts), ExactGreedyElimination(),
        GreedyBackwardElimination(probe_rows=GREEDY_PROBE_ROWS, seed=seed),
        TruncatedMonteCarloShapley(seed=seed), GradientTimesActivation(), MeanActivation(), RandomRanking(seed=seed),
    ]
    # Captum's conductance integrates gradients through the whole model (20 steps per input):
    # by far the slowest ranking, so it runs only when asked for by name.
    if "captum_conductance" in wanted:
        from coreunits._core.strategies import CaptumConductance

        methods.append(CaptumConductance())
    if include is not None:
        known = {m.name for m in methods}
        unknown = set(include) - known
        if unknown:
            raise OptionError(f"unknown method(s) {sorted(unknown)}; available: {sorted(known)}")
        methods = [m for m in methods if m.name in include]
    return methods


def record_file(key: str) -> str:
    """The file name of a record: its key, with the ':' of ``heads:``/``neurons:`` layers (not allowed on Windows) as '-'."""
    return key.replace(":", "-") + ".json"


def curve_ks(total: int) -> list[int]:
    """The numbers of kept units a holding-rate curve is measured at, for a layer of ``total`` units."""
    if total <= CURVE_EVERY_K_UP_TO:
        return list(range(total + 1))
    step = (total - CURVE_DENSE_K) / CURVE_SPARSE_POINTS
    return list(range(CURVE_DENSE_K)) + [CURVE_DENSE_K + round(i * step) for i in range(CURVE_SPARSE_POINTS + 1)]


def _probe_curve(problem: SelectionProblem, ranking: torch.Tensor) -> list[dict[str, float]]:
    rows = problem.rows[:CURVE_PROBE_ROWS]
    order = torch.argsort(ranking.flatten().float(), descending=True, stable=True)
    out = []
    for k in curve_ks(problem.num_units):
        mask = torch.zeros(problem.num_units, dtype=torch.bool)
        mask[order[:k]] = True
        r = problem.rates(mask, rows)
        out.append({"units": k, "holding_rate_strict": r.strict, "holding_rate": r.paper})
    return out


def _num_inputs(data: Any) -> int:
    """How many inputs ``data`` holds (a DataLoader's ``len`` counts batches)."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    if not isinstance(dataset, Sized):
        raise DataError(f"compare needs data of known size (a Dataset, DataLoader over one, or tensor), "
                        f"got {type(dataset).__name__}")
    return len(dataset)


def _run_method(method: Strategy, problem: SelectionProblem, target: float, held: ActivationCache | None,
                curves: bool) -> dict[str, Any]:
    """One method on one problem: its set, holding rates (D'_c and held out), time and curve, as a record."""
    res = method.run(problem, target)
    assert res.mask is not None
    record = {
        "layer": problem.layer, "target_class": problem.target_class,
        "method": method.name, "target": target, "reading": problem.reading,
        "units": res.units, "num_units": res.num_units, "total_units": problem.num_units,
        "holding_rate": res.holding_rate, "reached": (res.holding_rate or 0.0) >= target,
        "ablation": problem.cache.ablation.mode,
        "seconds": res.seconds, "evaluations": res.evaluations,
        "dprime_size": len(problem.rows), "info": res.info,
    }
    if held is not None:
        hp = SelectionProblem(held, problem.layer, problem.target_class, seed=problem.seed, reading=problem.reading)
        record["heldout_holding_rate"] = hp.holding(res.mask)
        record["heldout_dprime_size"] = len(hp.rows)
    if curves and res.ranking is not None:
        record["curve"] = _probe_curve(problem, res.ranking)
    return record


def compare_methods(
    model: nn.Module,
    layer: str,
    classes: Sequence[int],
    data: Any,
    *,
    target: float = 0.995,
    methods: Sequence[Strategy] | None = None,
    reading: str = "strict",
    seed: int = 0,
    heldout_data: Any = None,
    out: str | Path | None = None,
    curves: bool = True,
    progress: bool = True,
    tag: str = "",
    compute: bool = True,
    ablation: str | None = None,
) -> list[dict[str, Any]]:
    """Run every method on every class of one layer and judge them by the same holding rate.

    Args:
        model: the classifier (left unchanged).
        layer: the layer whose units are chosen.
        classes: the classes c.
        data: data for D'_c (Dataset, DataLoader, tensor) or an :class:`ActivationCache` for ``layer``.
        target: the holding rate every method must reach on D'_c.
        methods: strategies (default :func:`default_methods`).
        reading: ``"strict"`` or ``"paper"`` holding rate.
        seed: seed of D'_c's negatives (same D'_c for every method).
        heldout_data: a second split: the chosen sets' holding rate on its D'_c is reported.
        out: folder for per-(layer, class, method) records; done records are reused.
        curves: also measure holding rate vs top-k for methods that rank units (probe of D'_c).
        progress: progress bar.
        tag: what the model and data are (part of each record's fingerprint).
        compute: False: only gather the records stored in ``out`` (a report of a
            sweep still running or cut short); nothing is computed.
        ablation: what a masked unit becomes (``"zero"``, ``"mean"``, ``"resample"``; see
            ``coreunits._core.ablation``); None: the cache's, zero otherwise. The held-out
            holding rate ablates with the held-out data's values.

    Returns:
        One record per (class, method): units, holding rate, held-out holding rate, seconds, curve.
    """
    from coreunits import __version__

    methods = list(methods) if methods is not None else default_methods(seed)
    held_n = heldout_data is not None and _num_inputs(heldout_data)
    if isinstance(data, ActivationCache):
        data.require_ablation(ablation)
    mode = data.ablation.mode if isinstance(data, ActivationCache) else check_ablation(ablation or "zero")

    def identity(c: int, method: Strategy) -> tuple[str, str]:
        # A stored record is reused only when everything that made it is the same. Zero ablation
        # adds nothing to the key, so records stored before ablations existed stay valid.
        key = f"{layer}_c{c}_{method.name}" + ("" if mode == "zero" else f"_{mode}")
        return key, fingerprint_of([__version__, tag, repr(method), target, reading, seed, key, _num_inputs(data), held_n])

    if not compute:
        if out is None:
            raise OptionError("compute=False reads stored records: give out")
        stored = (read_record(Path(out) / "runs" / record_file(key), fp)
                  for key, fp in (identity(c, m) for c in classes for m in methods))
        return [r for r in stored if r is not None]
    needs_inputs = any(m.name.startswith("captum") for m in methods)
    cache = data if isinstance(data, ActivationCache) else ActivationCache(
        model, layer, data, batch_size=1000, keep_inputs=needs_inputs, ablation=mode)
    held = None
    if heldout_data is not None:
        held = heldout_data if isinstance(heldout_data, ActivationCache) else ActivationCache(
            model, layer, heldout_data, batch_size=1000, ablation=mode)
        held.require_ablation(mode)
    runs_dir = Path(out) / "runs" if out is not None else None
    if runs_dir is not None:
        runs_dir.mkdir(parents=True, exist_ok=True)
    records = []
    bar = progress_bar(enabled=progress, total=len(classes) * len(methods), desc=f"compare {layer}", unit="method")
    try:
        for c in classes:
            problem = SelectionProblem(cache, layer, c, seed=seed, reading=reading)
            for method in methods:
                key, fingerprint = identity(c, method)
                path = runs_dir / record_file(key) if runs_dir is not None else None
                record = read_record(path, fingerprint) if path is not None else None
                if record is None:
                    bar.set_postfix_str(key)
                    record = {"key": key, "fingerprint": fingerprint} | _run_method(
                        method, problem, target, held, curves)
                    if path is not None:
                        atomic_write_text(path, json.dumps(record, default=str))
                records.append(record)
                bar.update(1)
    finally:
        bar.close()
    return records


# ------------------------------------------------------------------ report
def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (layer, method): mean units, holding rates and time, and the bar's comparisons."""
    out = []
    layers = sorted({r["layer"] for r in records})
    for layer in layers:
        rows = [r for r in records if r["layer"] == layer]
        gates = {r["target_class"]: r for r in rows if r["method"] == "switch_gates"}
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == method]
            s: dict[str, Any] = {
                "layer": layer, "method": method, "classes": len(mine),
                "mean_units": statistics.mean(r["num_units"] for r in mine),
                "mean_holding_rate": statistics.mean(r["holding_rate"] for r in mine),
                "min_holding_rate": min(r["holding_rate"] for r in mine),
                "reached": sum(bool(r["reached"]) for r in mine),
                "mean_seconds": statistics.mean(r["seconds"] for r in mine),
                "total_seconds": sum(r["seconds"] for r in mine),
            }
            if all("heldout_holding_rate" in r for r in mine):
                s["mean_heldout_holding_rate"] = statistics.mean(r["heldout_holding_rate"] for r in mine)
            if gates and method != "switch_gates":
                both = [r for r in mine if r["target_class"] in gates]
                s["classes_gates_fewer_or_equal"] = sum(
                    gates[r["target_class"]]["num_units"] <= r["num_units"] for r in both)
            out.append(s)
    return out


#: Methods that choose a set directly; every other method is a ranking (its set is a top-k).
SET_METHODS = ("switch_gates", "hard_concrete_l0", "greedy_backward", "greedy_exact")


def headline(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Switch gates against the rest, per layer and over all layers (``layer="all"``).

    Counted over the (layer, class) pairs where switch gates ran: in how many
    they need no more units than every ranking method, and their held-out
    holding rate. Units and wall time beside greedy backward elimination are
    averaged over the pairs where both ran, so a sweep cut short compares like
    with like.
    """
    out = []
    layers = sorted({r["layer"] for r in records})
    for layer in [*layers, "all"]:
        rows = [r for r in records if layer in ("all", r["layer"])]
        gates = {(r["layer"], r["target_class"]): r for r in rows if r["method"] == "switch_gates"}
        if not gates:
            continue
        # The reference is exact greedy where it ran (every candidate on all of D'_c), else the probe greedy.
        reference = "greedy_exact" if any(r["method"] == "greedy_exact" for r in rows) else "greedy_backward"
        greedy = {(r["layer"], r["target_class"]): r for r in rows if r["method"] == reference}
        rankings: dict[tuple[str, int], list[int]] = {}
        for r in rows:
            if r["method"] not in SET_METHODS:
                rankings.setdefault((r["layer"], r["target_class"]), []).append(r["num_units"])
        ranked = [k for k in gates if k in rankings]
        h: dict[str, Any] = {
            "layer": layer, "pairs": len(gates),
            "gates_le_every_ranking": sum(gates[k]["num_units"] <= min(rankings[k]) for k in ranked),
            "pairs_with_rankings": len(ranked),
        }
        held = [g["heldout_holding_rate"] for g in gates.values() if "heldout_holding_rate" in g]
        if held:
            h["gates_mean_heldout"], h["gates_lowest_heldout"] = statistics.mean(held), min(held)
        paired = [k for k in gates if k in greedy]
        if paired:
            gu = statistics.mean(gates[k]["num_units"] for k in paired)
            ru = statistics.mean(greedy[k]["num_units"] for k in paired)
            gs = statistics.mean(gates[k]["seconds"] for k in paired)
            rs = statistics.mean(greedy[k]["seconds"] for k in paired)
            h |= {"reference": reference,
                  "pairs_within_one": sum(bool(gates[k]["reached"]) and gates[k]["num_units"] <= greedy[k]["num_units"] + 1
                                          for k in paired),
                  "pairs_with_greedy": len(paired), "gates_mean_units": gu, "greedy_mean_units": ru,
                  "units_vs_greedy": gu - ru, "gates_mean_seconds": gs, "greedy_mean_seconds": rs,
                  "greedy_time_ratio": rs / gs}
        out.append(h)
    return out


def _plot(records: list[dict[str, Any]], path: Path, target: float) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    layers = sorted({r["layer"] for r in records})
    fig, axes = plt.subplots(2, len(layers), figsize=(6.5 * len(layers), 8.5), squeeze=False)
    for col, layer in enumerate(layers):
        rows = [r for r in records if r["layer"] == layer]
        ax = axes[0][col]
        for method in dict.fromkeys(r["method"] for r in rows):
            cs = [r["curve"] for r in rows if r["method"] == method and r.get("curve")]
            if not cs:
                continue
            ks = [p["units"] for p in cs[0]]
            key = "holding_rate_strict" if rows[0]["reading"] == "strict" else "holding_rate"
            mean = [statistics.mean(c[i][key] for c in cs) for i in range(len(ks))]
            ax.plot(ks, mean, label=method)
        ax.axhline(target, color="k", lw=0.8, ls="--")
        ax.set_ylim(0.5, 1.005)
        ax.set_xlabel("units kept (top-k of the method's ranking)")
        ax.set_ylabel(f"holding rate (mean over classes, {CURVE_PROBE_ROWS}-input probe)")
        ax.set_title(f"{layer}: holding rate vs units")
        ax.legend(fontsize=8)
        ax = axes[1][col]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        classes = sorted({r["target_class"] for r in rows})
        width = 0.8 / max(1, len(methods))
        for i, method in enumerate(methods):
            by = {r["target_class"]: r["num_units"] for r in rows if r["method"] == method}
            ax.bar([c + i * width for c in classes], [by.get(c, 0) for c in classes], width, label=method)
        ax.set_xticks([c + 0.4 - width / 2 for c in classes], [str(c) for c in classes])
        ax.set_xlabel("class")
        ax.set_ylabel(f"units needed for {target:.1%}")
        ax.set_title(f"{layer}: units each method needs")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
    plt.close(fig)
    return True


def _reference_note(heads: list[dict[str, Any]]) -> str:
    """Which greedy each layer's row is judged against (exact greedy where it ran, else the probe greedy)."""
    names = {"greedy_exact": "exact greedy backward elimination (`greedy_exact`: every candidate on all of D'_c)",
             "greedy_backward": "greedy backward elimination ranked on a probe (`greedy_backward`)"}
    layers: dict[str, list[str]] = {}
    for h in heads:
        if h["layer"] != "all" and "reference" in h:
            layers.setdefault(h["reference"], []).append(h["layer"])
    parts = [f"{names[ref]} in {', '.join(sorted(ls))}" for ref, ls in sorted(layers.items(), reverse=True)]
    return ("Greedy is " + "; ".join(parts) + ".") if parts else ""


def write_comparison_report(out: str | Path, records: list[dict[str, Any]], *, target: float,
                            description: str, command: str) -> dict[str, Any]:
    """Write comparison.json, table.csv, summary.csv, curves.csv, comparison.png and report.md to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(records)
    heads = headline(records)
    result = {"target": target, "description": description, "command": command, "summary": summary,
              "headline": heads, "records": [{k: v for k, v in r.items() if k != "curve"} for r in records]}
    atomic_write_text(out / "comparison.json", json.dumps(result, indent=1, default=str))
    fields = ["layer", "target_class", "method", "num_units", "total_units", "holding_rate",
              "heldout_holding_rate", "reached", "seconds", "evaluations", "units"]
    atomic_write_text(out / "table.csv", csv_text(records, fields))
    sfields = ["layer", "method", "classes", "mean_units", "mean_holding_rate", "min_holding_rate", "reached",
               "mean_heldout_holding_rate", "mean_seconds", "total_seconds", "classes_gates_fewer_or_equal"]
    atomic_write_text(out / "summary.csv", csv_text(summary, sfields))
    curve_rows = [{"layer": r["layer"], "target_class": r["target_class"], "method": r["method"]} | p
                  for r in records for p in r.get("curve") or []]
    atomic_write_text(out / "curves.csv", csv_text(curve_rows, ["layer", "target_class", "method", "units",
                                                            "holding_rate_strict", "holding_rate"]))
    plotted = _plot(records, out / "comparison.png", target)

    lines = [f"# Unit-selection methods compared at a {target:.1%} holding-rate target", "",
             f"{description}", "", f"Produced by: `{command}`", ""]
    if heads:
        lines += ["## Switch gates (target mode) against the other methods", "",
                  "| layer | gates <= every ranking | gates held-out mean (lowest) | pairs with greedy | "
                  "gates mean units | greedy mean units | difference | gates <= greedy + 1 and reached | gates s | greedy s | "
                  "greedy / gates time |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for h in heads:
            held = (f"{h['gates_mean_heldout']:.2%} ({h['gates_lowest_heldout']:.2%})"
                    if "gates_mean_heldout" in h else "-")
            vs = "0 | - | - | - | - | - | - | -"
            if "pairs_with_greedy" in h:
                vs = (f"{h['pairs_with_greedy']} | {h['gates_mean_units']:.2f} | {h['greedy_mean_units']:.2f} | "
                      f"{h['units_vs_greedy']:+.2f} | {h['pairs_within_one']}/{h['pairs_with_greedy']} | {h['gates_mean_seconds']:.1f} | {h['greedy_mean_seconds']:.1f} | "
                      f"{h['greedy_time_ratio']:.1f}x")
            lines.append(f"| {h['layer']} | {h['gates_le_every_ranking']}/{h['pairs_with_rankings']} | {held} | {vs} |")
        ranking_methods = sorted({r["method"] for r in records} - set(SET_METHODS))
        lines += ["", ("Rankings are " + ", ".join(ranking_methods)
                       + "; their set is the smallest top-k reaching the target." if ranking_methods
                       else "No ranking method ran (the ranking column is 0/0).") + " " + _reference_note(heads)
                  + " Times are wall seconds per (layer, class), as each record measured them (a resumed"
                  " sweep mixes runs).", ""]
    for layer in sorted({s["layer"] for s in summary}):
        lines += [f"## {layer}", "",
                  "| method | classes | mean units | mean holding (D'_c) | lowest | reached | "
                  "mean held-out holding | mean seconds | gates need <= units |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s in (s for s in summary if s["layer"] == layer):
            held = f"{s['mean_heldout_holding_rate']:.2%}" if "mean_heldout_holding_rate" in s else "-"
            cmp_ = s.get("classes_gates_fewer_or_equal")
            fewer = "-" if cmp_ is None else f"{cmp_}/{s['classes']}"
            lines.append(
                f"| {s['method']} | {s['classes']} | {s['mean_units']:.1f} | {s['mean_holding_rate']:.2%} | "
                f"{s['min_holding_rate']:.2%} | {s['reached']}/{s['classes']} | {held} | {s['mean_seconds']:.1f} | "
                f"{fewer} |")
        rows = [r for r in records if r["layer"] == layer]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        lines += ["", "Units needed per class:", "", "| class | " + " | ".join(methods) + " |",
                  "|---" * (len(methods) + 1) + "|"]
        for c in sorted({r["target_class"] for r in rows}):
            by = {r["method"]: r for r in rows if r["target_class"] == c}
            cells = [f"{by[m]['num_units']}" + ("" if by[m]["reached"] else "*") if m in by else "-"
                     for m in methods]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines += ["", "`*` = the target was not reached (all units kept or the best found).", ""]
    if plotted:
        lines += ["![curves and units](comparison.png)", ""]
    lines += ["Files: comparison.json (all records), table.csv, summary.csv, curves.csv.", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    return result
