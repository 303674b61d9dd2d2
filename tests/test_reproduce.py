"""`coreunits reproduce mnist --quick` end to end on real MNIST, with resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import REPO, shared_data_or_skip

from coreunits.cli import main


@pytest.mark.slow
def test_reproduce_mnist_quick_end_to_end_and_resume(tmp_path: Path) -> None:
    if not (REPO / "checkpoints" / "mnist_cnn.pt").is_file():
        pytest.skip("bundled MNIST checkpoint missing")
    root = shared_data_or_skip()
    out = tmp_path / "mnist-quick"
    args = ["reproduce", "mnist", "--quick", "--data-root", str(root), "--out", str(out), "--no-progress",
            "--threads", "2"]
    assert main(args) == 0
    for name in ("report.md", "results.json", "table1.csv", "table2.csv", "random_subsets.csv", "fig6a.csv",
                 "fig4_max1.png", "fig4_max2.png", "fig5.png", "fig6a.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    t1 = results["table1"]
    assert {(r["layer"], r["class"]) for r in t1} == {("max1", 0), ("max1", 1), ("max2", 0), ("max2", 1)}
    for r in t1:
        assert 0.9 <= r["holding_rate_strict"] <= 1.0 and 0.9 <= r["holding_rate"] <= 1.0
        assert r["num_units"] == len(r["units"]) and r["run"] == 1
    assert set(results["table2"][0]["num_units"]) == {"max1", "max2"}
    assert results["classifier"]["test_accuracy"] >= 0.99
    report = (out / "report.md").read_text()
    assert "| class | run | paper holding % | paper units | ours holding % (paper)" in report
    assert "![Fig. 6a](fig6a.png)" in report
    page = (out / "report.html").read_text()
    assert "id='atlas-max1'" in page and "id='atlas-input'" in page and "id='class-1'" in page

    # Rerun: everything is resumed, nothing recomputed.
    assert main(args) == 0
    timing = json.loads((out / "timing.json").read_text())
    assert [i["runs_computed"] for i in timing["invocations"]] == [7, 0]  # 4 table1 + 1 table2 + 2 fig5

    # A corrupt record (an interrupted write elsewhere) is detected and redone.
    victim = out / "runs" / "fig5_input_c1_r1.json"
    victim.write_text(victim.read_text()[:100])
    assert main([*args, "--no-html"]) == 0  # the page was checked above (it took 28 s here under load)
    assert json.loads((out / "timing.json").read_text())["invocations"][-1]["runs_computed"] == 1
    assert json.loads(victim.read_text())["key"] == "fig5_input_c1_r1"


@pytest.mark.slow
def test_reproduce_cifar10_quick_end_to_end(tmp_path: Path) -> None:
    if not (REPO / "checkpoints" / "cifar10_cnn.pt").is_file():
        pytest.skip("CIFAR-10 checkpoint not committed yet")
    root = shared_data_or_skip()
    if not (root / "cifar10-jpeg" / "test").is_dir():
        pytest.skip("CIFAR-10 JPEGs missing")
    out = tmp_path / "cifar-quick"
    # --no-html: max1's necessities run the network after it densely (an LRN follows it; the whole
    # results/cifar10 page took 701 s on one thread); the MNIST test above and test_html_report check the page.
    assert main(["reproduce", "cifar10", "--quick", "--data-root", str(root), "--out", str(out),
                 "--no-progress", "--threads", "2", "--no-html"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {(r["layer"], r["class"]) for r in results["table3"]} == {("max1", 0), ("max1", 1), ("max2", 0),
                                                                    ("max2", 1)}
    assert set(results["table4"][0]["num_units"]) == {"max1", "max2"}
    assert results["fig6b"]["num_units"] == results["table3"][0]["num_units"]
    report = (out / "report.md").read_text()
    assert "Table 3(a): max1 (64 units)" in report and "| airplane | 1 |" in report


def test_coefficients_table_and_checkpoint_overrides() -> None:
    from coreunits.paper import COEFFICIENTS, coefficients

    table = COEFFICIENTS[("cifar10", "max2")]
    assert coefficients("cifar10", ["max2"]) == dict(table)
    # A checkpoint tuned on its own carries per-layer settings that replace the table's.
    override = {"max2": {"alpha": 1e-3, "lam": 5e-3, "epochs": 3}}
    assert coefficients("cifar10", ["max2"], override) == override["max2"]
    both = coefficients("cifar10", ["max1", "max2"], override)
    assert both["alpha"] == {"max1": COEFFICIENTS[("cifar10", "max1")]["alpha"], "max2": 1e-3}
    assert both["lam"] == min(COEFFICIENTS[("cifar10", "max1")]["lam"], 5e-3)
    assert both["epochs"] == max(int(COEFFICIENTS[("cifar10", "max1")]["epochs"]), 3)
