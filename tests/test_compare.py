"""compare_methods and its report, on the planted-truth model."""

from __future__ import annotations

import json

import pytest
from planted import PlantedNet, planted_data

from coreunits import ActivationCache
from coreunits.compare import compare_methods, default_methods, headline, write_comparison_report
from coreunits.strategies import GreedyBackwardElimination, HardConcreteL0, MeanActivation, RandomRanking, SwitchGates


def test_compare_judges_every_method_by_one_holding_rate_and_resumes(planted, tmp_path) -> None:
    model, x = planted
    held = planted_data(model, n=600, seed=7)
    methods = [SwitchGates(), HardConcreteL0(), GreedyBackwardElimination(), MeanActivation(), RandomRanking(seed=3)]
    records = compare_methods(model, "feat", [0], x, target=0.99, methods=methods, heldout_data=held,
                              out=tmp_path, progress=False)
    by = {r["method"]: r for r in records}
    assert set(by) == {m.name for m in methods}
    for name in ("switch_gates", "hard_concrete_l0", "greedy_backward"):
        assert by[name]["units"] == PlantedNet.TRUE_UNITS
        assert by[name]["reached"] and by[name]["holding_rate"] >= 0.99
    for r in records:
        assert 0.0 <= r["heldout_holding_rate"] <= 1.0
        assert {"seconds", "evaluations", "dprime_size"} <= set(r)
    # Ranking methods carry a curve: k = 0..8 on the probe.
    assert [p["units"] for p in by["mean_activation"]["curve"]] == list(range(9))
    assert by["switch_gates"]["info"]["target"]["units_after"] == 2

    # A rerun reuses the stored records instead of recomputing them.
    files = sorted(tmp_path.glob("runs/*.json"))
    assert len(files) == len(methods)
    stamps = {f: f.stat().st_mtime_ns for f in files}
    again = compare_methods(model, "feat", [0], x, target=0.99, methods=methods, heldout_data=held,
                            out=tmp_path, progress=False)
    assert [r["seconds"] for r in again] == [r["seconds"] for r in records]
    assert all(f.stat().st_mtime_ns == t for f, t in stamps.items())
    # Reading the stored records only (a report of a sweep cut short) finds the same, computes nothing.
    stored = compare_methods(model, "feat", [0, 1], x, target=0.99, methods=methods, heldout_data=held,
                             out=tmp_path, progress=False, compute=False)
    assert [r["key"] for r in stored] == [r["key"] for r in records]  # class 1 was never run: left out
    assert compare_methods(model, "feat", [0], x, target=0.98, methods=methods, heldout_data=held,
                           out=tmp_path, progress=False, compute=False) == []  # other settings: not these runs

    result = write_comparison_report(tmp_path, records, target=0.99, description="planted", command="test")
    for name in ("report.md", "comparison.json", "table.csv", "summary.csv", "curves.csv"):
        assert (tmp_path / name).is_file()
    summary = {s["method"]: s for s in result["summary"]}
    assert summary["greedy_backward"]["classes_gates_fewer_or_equal"] == 1
    assert summary["switch_gates"]["mean_units"] == 2
    text = (tmp_path / "report.md").read_text()
    assert "| switch_gates | 1 | 2.0 |" in text
    assert "Switch gates (target mode) against the other methods" in text
    assert result["headline"][0]["gates_le_every_ranking"] == 1
    assert json.loads((tmp_path / "comparison.json").read_text())["target"] == 0.99


def _rec(layer: str, c: int, method: str, units: int, seconds: float, held: float = 0.99) -> dict:
    # "reached": headline counts the pairs where gates reached the target (pairs_within_one).
    return {"layer": layer, "target_class": c, "method": method, "num_units": units, "seconds": seconds,
            "heldout_holding_rate": held, "reached": True}


def test_headline_counts_wins_and_ratios_exactly() -> None:
    records = [
        _rec("max1", 0, "switch_gates", 5, 2.0, 0.995), _rec("max1", 0, "greedy_backward", 4, 40.0),
        _rec("max1", 0, "random", 9, 1.0), _rec("max1", 0, "mean_activation", 5, 1.0),
        _rec("max1", 1, "switch_gates", 7, 4.0, 0.985), _rec("max1", 1, "greedy_backward", 8, 20.0),
        _rec("max1", 1, "random", 6, 1.0), _rec("max1", 1, "hard_concrete_l0", 3, 1.0),
        _rec("max2", 0, "switch_gates", 10, 3.0, 0.99), _rec("max2", 0, "grad_x_activation", 12, 1.0),
    ]
    heads = {h["layer"]: h for h in headline(records)}
    assert set(heads) == {"max1", "max2", "all"}
    m1 = heads["max1"]
    # Class 0: 5 <= min(9, 5); class 1: 7 > 6 (random). Hard-concrete is not a ranking.
    assert (m1["gates_le_every_ranking"], m1["pairs_with_rankings"]) == (1, 2)
    assert m1["units_vs_greedy"] == pytest.approx(0.0) and m1["greedy_mean_units"] == 6
    assert m1["greedy_time_ratio"] == pytest.approx(30.0 / 3.0)
    assert m1["gates_mean_heldout"] == pytest.approx(0.99) and m1["gates_lowest_heldout"] == 0.985
    assert m1["gates_mean_units"] == 6 and m1["gates_mean_seconds"] == 3.0
    assert "greedy_time_ratio" not in heads["max2"] and "gates_mean_units" not in heads["max2"]
    assert heads["all"]["pairs"] == 3 and heads["all"]["gates_le_every_ranking"] == 2
    assert heads["all"]["pairs_with_greedy"] == 2


def test_compare_accepts_a_cache_and_rejects_unknown_methods(planted) -> None:
    model, x = planted
    cache = ActivationCache(model, "feat", x)
    records = compare_methods(model, "feat", [0], cache, target=0.99, methods=[MeanActivation()], progress=False,
                              curves=False)
    assert "curve" not in records[0] and "heldout_holding_rate" not in records[0]
    with pytest.raises(ValueError, match="unknown method"):
        default_methods(include=["switch_gates", "magic"])
    assert [m.name for m in default_methods(include=["random", "switch_gates"])] == ["switch_gates", "random"]


@pytest.mark.slow
def test_compare_command_on_mnist(tmp_path) -> None:
    """`coreunits compare` end to end on the bundled MNIST classifier and real MNIST (two cheap methods).

    On a seeded 12,000 of the training digits and with mean ablation: the options reach the records and the
    report's "Produced by" line (a run on all 60,000 took 111 s of the suite's 10 minutes).
    """
    from helpers import shared_data_or_skip

    from coreunits.cli import main

    root = shared_data_or_skip()
    out = tmp_path / "cmp"
    argv = ["compare", "mnist", "--layers", "max2", "--classes", "1", "--methods", "mean_activation",
            "grad_x_activation", "--max-inputs", "12000", "--ablation", "mean",
            "--data-root", str(root), "--out", str(out), "--no-progress",
            "--no-html"]  # the page would add a pass over the 60,000 digits; test_html_report checks pages
    assert main(argv) == 0
    result = json.loads((out / "comparison.json").read_text())
    rows = {r["method"]: r for r in result["records"]}
    assert set(rows) == {"mean_activation", "grad_x_activation"}
    for r in rows.values():
        assert r["reached"] and r["holding_rate"] >= 0.995 and 0 < r["num_units"] <= 64
        assert r["heldout_holding_rate"] > 0.9 and r["ablation"] == "mean"
        assert 1000 < r["dprime_size"] < 4000  # digit 1 is about 11% of the 12,000: D'_c is twice its count
    text = (out / "report.md").read_text()
    assert "coreunits compare mnist --layers max2 --classes 1 --target 0.995 --ablation mean --max-inputs 12000" in text
    assert "a random 12000 of them (seed 0)" in text and "mean ablation" in text
    assert (out / "comparison.png").is_file()
    # --report-only says how many of the planned runs its records cover, and only then how to finish them.
    assert main([*argv, "--report-only"]) == 0
    assert "all 2 (layer, class, method) runs are done." in (out / "report.md").read_text()
    assert main([*argv[:5], "1", "2", *argv[6:], "--report-only"]) == 0
    text = (out / "report.md").read_text()
    assert "2 of 4 (layer, class, method) runs are done; the same command without --report-only" in text
