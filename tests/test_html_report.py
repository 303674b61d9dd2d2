"""report.html: the atlas as data, the page from a tiny fixture (model untouched), the CLI, and a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_untouched, snapshot
from torch import nn

from coreunits import CoreUnits
from coreunits._core.atlas import Selection, average_linkage_order, build_atlas, jaccard
from coreunits.cli import main
from coreunits.html_report import write_html_report


class Tiny(nn.Module):
    """conv (4 channels) -> relu -> pool -> flatten -> linear (3 classes), on 3x8x8 (colour) inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.relu(self.conv(x)))))


def _result(layer: str, c: int, seed: int, units: list[int], shape: tuple[int, ...]) -> CoreUnits:
    total = int(np.prod(shape))
    mask = torch.zeros(total, dtype=torch.bool)
    mask[units] = True
    gates = torch.where(mask, 0.9, 0.1).reshape(shape)
    return CoreUnits(target_class=c, units={layer: units}, gates={layer: gates}, masks={layer: mask.reshape(shape)},
                     num_units={layer: len(units)}, total_units={layer: total}, holding_rate=0.99,
                     holding_rate_strict=0.98, seed=seed)


@pytest.fixture()
def fixture_dir(tmp_path: Path) -> tuple[Path, nn.Module, torch.utils.data.TensorDataset]:
    """Selections of a tiny model (hand-made: the page does not care how they were found), its model and data."""
    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.rand(90, 3, 8, 8)
    data = torch.utils.data.TensorDataset(x, torch.zeros(90, dtype=torch.long))
    with torch.no_grad():  # centre the scores so that every class is predicted for some inputs
        model.fc.bias -= model(x).median(0).values
    preds = model(x).argmax(1)
    folder = tmp_path / "found"
    for c in sorted(set(preds.tolist())):
        for seed, units in ((0, [0, c % 4]), (1, [0, (c + 1) % 4])):
            _result("pool", c, seed, sorted(set(units)), (4,)).save(folder / f"pool_c{c}_s{seed}.json")
        _result("input", c, 0, [9 + c, 20, 30], (8, 8)).save(folder / f"input_c{c}.json")
    return folder, model, data


def test_jaccard_and_clustering_order() -> None:
    assert jaccard([1, 2], [2, 3]) == pytest.approx(1 / 3) and jaccard([], []) == 1.0
    # Two tight groups {0, 2} and {1, 3}, far apart: average linkage puts each group's members side by side.
    d = np.array([[0, 9, 1, 9], [9, 0, 9, 2], [1, 9, 0, 9], [9, 2, 9, 0]], dtype=float)
    order = average_linkage_order(d)
    assert sorted(order) == [0, 1, 2, 3]
    pos = {v: i for i, v in enumerate(order)}
    assert abs(pos[0] - pos[2]) == 1 and abs(pos[1] - pos[3]) == 1


def test_atlas_counts_consensus_and_sharing() -> None:
    sels = [Selection("l", 0, 1, 0, (0, 1), 4), Selection("l", 0, 2, 1, (0, 2), 4),
            Selection("l", 1, 1, 0, (0, 3), 4), Selection("l", 2, 1, 0, (3,), 4)]
    a = build_atlas(sels, "l")
    row = dict(zip(a.classes, a.counts))
    assert row[0] == [2, 1, 1, 0] and a.runs[a.classes.index(0)] == 2
    core = dict(zip(a.classes, a.core))
    assert core == {0: [0, 1, 2], 1: [0, 3], 2: [3]}  # kept in at least half of the runs
    assert a.sharing == [2, 1, 1, 2] and a.shared_units() == [0, 3]
    assert a.specific_units() == {0: [1, 2], 1: [], 2: []}
    j = {(c, d): a.jaccard[i][k] for i, c in enumerate(a.classes) for k, d in enumerate(a.classes)}
    assert j[(1, 2)] == pytest.approx(0.5) and j[(0, 1)] == pytest.approx(0.25)


def test_page_is_self_contained_and_leaves_the_model_untouched(fixture_dir) -> None:  # type: ignore[no-untyped-def]
    folder, model, data = fixture_dir
    model.train()  # a mode the report must restore
    model.conv.register_forward_hook(lambda *a: None)
    model.fc.weight.requires_grad_(False)
    snap = snapshot(model)
    page = write_html_report(folder, model=model, data=data, top_k=3, probe_rows=None)
    assert_untouched(model, snap)
    text = page.read_text()
    assert page == folder / "report.html" and "id='atlas'" in text
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", text) and "<link" not in text  # nothing fetched
    images = re.findall(r"<img src=\"([^\"]+)\"", text)
    assert images and all(re.match(r"data:image/(png|webp|jpeg);base64,", src) for src in images)
    atlas = json.loads((folder / "atlas.json").read_text())
    assert set(atlas["layers"]) == {"pool", "input"}
    pool = [v for v in atlas["classes"] if v["layer"] == "pool"]
    assert pool and all(v["judged_rows"] == v["dprime_size"] for v in pool)  # probe_rows=None: all of D'_c
    for v in pool:
        for u in v["units"]:
            assert -1.0 <= u["necessity_strict"] <= 1.0 and 1 <= len(u["top_dprime_rows"]) <= 3
    # One panel image per core unit of every class's first run, one pixel map per class.
    units = sum(len(v["units"]) for v in pool)
    assert len(images) == units + len(atlas["layers"]["input"]["classes"])
    assert (folder / "atlas.csv").read_text().startswith("layer,class,unit,runs_kept")


def test_cli_report_atlas_only_and_one_line_errors(fixture_dir, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    folder, _, _ = fixture_dir
    assert main(["report", str(folder), "--no-panels", "--out", str(tmp_path / "a.html")]) == 0
    assert "Per-unit panels are not drawn" in (tmp_path / "a.html").read_text()
    capsys.readouterr()
    assert main(["report", str(folder)]) == 2  # find results do not record their model and data
    assert main(["report", str(tmp_path / "nothing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("coreunits: error: ") for line in err)
    assert "--no-panels" in err[0] and "does not exist" in err[1] and "no single-layer selection" in err[2]


def _chromium() -> str | None:
    import os

    for name in (os.environ.get("COREUNITS_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def test_report_opens_in_a_browser(fixture_dir, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Headless Chromium loads the page: every image decodes, the atlas is there, the screenshot is not blank."""
    from PIL import Image

    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium not found (apt-get install chromium; .ci/run installs it): the browser test needs it")
    folder, model, data = fixture_dir
    page = write_html_report(folder, model=model, data=data, top_k=3)
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([*base, "--dump-dom", page.as_uri()], check=False, capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body is not None, dom.stdout[:500]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))
    assert attrs.get("data-broken-images") == "0", attrs  # the load handler ran and found no broken image
    assert int(attrs["data-images"]) > 0
    assert 'id="atlas"' in dom.stdout and 'class="layer-atlas"' in dom.stdout
    shot = tmp_path / "shot.png"
    run = subprocess.run([*base, f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri()],
                         check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    im = Image.open(shot).convert("RGB")
    assert im.size == (1280, 2000)
    colours = im.getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 20, "the screenshot is (nearly) one flat colour"
    # Not just a background: a real share of the pixels is not the page's white.
    white = sum(n for n, c in (colours or []) if c == (255, 255, 255))
    assert colours is None or white < 0.97 * im.size[0] * im.size[1]


def test_results_folders_read_as_selections() -> None:
    """The committed reproduce and compare folders: every single-layer selection, runs numbered by seed."""
    from helpers import REPO

    from coreunits._core.selections import read_results

    mnist = read_results(REPO / "results" / "mnist")
    assert mnist.kind == "reproduce" and mnist.meta["dataset"] == "mnist" and not mnist.meta["quick"]
    by_layer = {layer: [s for s in mnist.selections if s.layer == layer] for layer in ("max1", "max2", "input")}
    assert len(by_layer["max1"]) == 50 and len(by_layer["max2"]) == 50 and len(by_layer["input"]) == 10
    assert sorted(s.run for s in by_layer["max1"] if s.target_class == 3) == [1, 2, 3, 4, 5]
    assert all(s.positives_only and s.unit_shape == (28, 28) for s in by_layer["input"])
    assert mnist.multi_layer == 9  # Table 2's max1 + max2 selections
    compare = read_results(REPO / "results" / "compare-mnist")
    assert compare.kind == "compare" and compare.meta["method"] == "switch_gates"
    assert {s.source for s in compare.selections} == {"compare:switch_gates"} and compare.meta["dataset"] == "mnist"
    assert {s.seed for s in compare.selections} == {0}  # from its description
