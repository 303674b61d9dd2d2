"""compare_methods and its report, on the planted-truth model."""

from __future__ import annotations

import json

import pytest
from planted import PlantedNet, planted_data

from coreunits import ActivationCache
from coreunits.compare import compare_methods, default_methods, write_comparison_report
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

    result = write_comparison_report(tmp_path, records, target=0.99, description="planted", command="test")
    for name in ("report.md", "comparison.json", "table.csv", "summary.csv", "curves.csv"):
        assert (tmp_path / name).is_file()
    summary = {s["method"]: s for s in result["summary"]}
    assert summary["greedy_backward"]["classes_gates_fewer_or_equal"] == 1
    assert summary["switch_gates"]["mean_units"] == 2
    text = (tmp_path / "report.md").read_text()
    assert "| switch_gates | 1 | 2.0 |" in text
    assert json.loads((tmp_path / "comparison.json").read_text())["target"] == 0.99


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
    """`coreunits compare` end to end on the bundled MNIST classifier and real MNIST (two cheap methods)."""
    from conftest import shared_data_or_skip

    from coreunits.cli import main

    root = shared_data_or_skip()
    out = tmp_path / "cmp"
    argv = ["compare", "mnist", "--layers", "max2", "--classes", "1", "--methods", "mean_activation",
            "grad_x_activation", "--data-root", str(root), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    result = json.loads((out / "comparison.json").read_text())
    rows = {r["method"]: r for r in result["records"]}
    assert set(rows) == {"mean_activation", "grad_x_activation"}
    for r in rows.values():
        assert r["reached"] and r["holding_rate"] >= 0.995 and 0 < r["num_units"] <= 64
        assert r["heldout_holding_rate"] > 0.9 and r["dprime_size"] > 10_000  # D'_c from the 60k training digits
    text = (out / "report.md").read_text()
    assert "coreunits compare mnist --layers max2 --classes 1 --target 0.995" in text
    assert (out / "comparison.png").is_file()
