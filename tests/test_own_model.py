"""The command line on a user's own model and data: torchvision/timm names, a Python factory, torch.export and
TorchScript files, state_dict and safetensors weights, image folders and torchvision data sets.

The fixture writes what a user would have: a 3-class ImageFolder of 32x32 PNGs (a colour per class, noise on
top) and the state_dict of a torchvision resnet18 (``num_classes=3``) trained on it for a few steps, so that the
model's decisions differ between classes and D'_c has positives and negatives.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import assert_same_state, model_state
from PIL import Image
from test_cli import _assert_one_line_error, _cli

from coreunits import find_core_units
from coreunits._core.errors import MissingDataError, OptionError
from coreunits.cli import main
from coreunits.sources import load_data, load_model, load_weights, model_classes, parse_normalize

torchvision = pytest.importorskip("torchvision")

def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    """The command in this process (``main``, stdout and stderr captured): what a user sees, without the 4 s of
    imports a fresh process pays. test_cli runs the installed command in fresh processes."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return subprocess.CompletedProcess(["coreunits", *argv], code, out.getvalue(), err.getvalue())


CLASSES = ("apple", "banana", "cherry")
COLOURS = ((200, 40, 40), (220, 200, 50), (120, 20, 90))


def _image_folder(root: Path, per_class: int = 24, size: int = 32, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name, colour in zip(CLASSES, COLOURS, strict=True):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = np.clip(np.array(colour) + rng.normal(0, 60, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i:03d}.png")
    return root


def _fit_head(model: torch.nn.Module, folder: Path, steps: int = 300, image_size: int | None = None) -> torch.nn.Module:
    """Train the ResNet's ``fc`` on its (random, frozen) features until it tells the three colours apart.

    A whole-network fit costs minutes on 2 cores; the head alone, on features computed once, takes a second,
    and the model's decisions then differ between classes, which is all D'_c needs. The features of a random
    network change with the image size, so a head fits one size (``image_size``; None: the files' own).
    """
    data = load_data(f"imagefolder:{folder}", image_size=image_size)
    x = torch.stack([data.dataset[i][0] for i in range(len(data.dataset))])
    y = torch.tensor([data.dataset[i][1] for i in range(len(data.dataset))])
    model.eval()
    body = torch.nn.Sequential(*list(model.children())[:-1], torch.nn.Flatten())
    with torch.no_grad():
        features = body(x)
    features = (features - features.mean(0)) / (features.std(0) + 1e-6)
    head = torch.nn.Linear(features.shape[1], 3)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(features), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # fold the standardisation into fc
        raw = body(x)
        mean, std = raw.mean(0), raw.std(0) + 1e-6
        model.fc.weight.copy_(head.weight / std)
        model.fc.bias.copy_(head.bias - (head.weight * mean / std).sum(1))
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy >= 0.95, f"the test model did not learn the colours ({accuracy:.2f})"
    return model


@pytest.fixture(scope="module")
def user_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("own")
    folder = _image_folder(root / "fruit")
    torch.manual_seed(0)
    model = _fit_head(torchvision.models.resnet18(num_classes=3), folder)
    weights = root / "w.pt"
    torch.save(model.state_dict(), weights)
    factory = root / "my_model.py"
    factory.write_text(
        "import torchvision\n\n\ndef build(num_classes=1000):\n"
        "    return torchvision.models.resnet18(num_classes=num_classes)\n"
    )
    return {"root": root, "folder": folder, "weights": weights, "factory": factory}


def _find(user_files: dict[str, Path], *extra: str, model: str = "torchvision:resnet18", out: str = "r.json",
          layer: str = "layer3", setting: tuple[str, str] = ("--target", "0.99"),
          fresh_process: bool = False) -> tuple[Any, dict[str, Any]]:
    path = user_files["root"] / out
    proc = (_cli if fresh_process else _run)("find", "--model", model, "--model-kwargs", '{"num_classes": 3}', "--weights",
                str(user_files["weights"]), "--data", f"imagefolder:{user_files['folder']}", "--normalize", "none",
                "--layer", layer, "--class", "1", *setting, "--out", str(path), "--no-progress", *extra)
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads(path.read_text())


@pytest.fixture(scope="module")
def found_by_name(user_files: dict[str, Path]) -> tuple[Any, dict[str, Any]]:
    return _find(user_files, fresh_process=True)


@pytest.mark.slow
def test_find_on_a_torchvision_resnet_state_dict_and_an_image_folder(user_files: dict[str, Path],
                                                                     found_by_name: tuple[Any, dict[str, Any]]) -> None:
    proc, r = found_by_name
    assert r["total_units"]["layer3"] == 256
    units = r["units"]["layer3"]
    assert 0 < len(units) < 256 and units == sorted(set(units)) and all(0 <= u < 256 for u in units)
    assert r["holding_rate_strict"] >= 0.99 and r["settings"]["target"]["reached"]
    assert r["settings"]["inputs"]["class_name"] == "banana"
    # The result says what it holds, and it holds through the real model: mask the other units of layer3.
    model = load_model("torchvision:resnet18", {"num_classes": 3}, str(user_files["weights"])).model
    data = load_data(f"imagefolder:{user_files['folder']}").dataset
    x = torch.stack([data[i][0] for i in range(len(data))])
    keep = torch.zeros(256)
    keep[units] = 1
    with torch.no_grad():
        before = model(x).argmax(1) == 1
        handle = model.layer3.register_forward_hook(lambda _m, _i, o: o * keep.view(1, -1, 1, 1))
        after = model(x).argmax(1) == 1
        handle.remove()
    # At most 1% of D'_c's decisions flip, and D'_c holds every positive: so do at most that many positives.
    dprime_size = r["dprime"]["size"]
    assert (before & ~after).sum().item() <= 0.01 * dprime_size
    assert "layer3" in proc.stdout and "wrote" in proc.stdout
    # Beside the result, its page: one panel per core unit.
    page = (user_files["root"] / "r.html").read_text()
    assert all(f'alt="unit {u}"' in page for u in units), "a core unit has no panel on the page"


def test_find_with_a_python_factory_gives_the_same_units(user_files: dict[str, Path]) -> None:
    # A plain selection on layer4 (avgpool and fc after it): the two specs must build the same model, which
    # one cheap selection shows as well as layer3's target mode would, at a fraction of its minute.
    plain = ("--alpha", "0.002")
    _, by_name = _find(user_files, "--no-html", out="n4.json", layer="layer4", setting=plain)
    _, by_factory = _find(user_files, "--no-html", model=f"{user_files['factory']}:build", out="f4.json",
                          layer="layer4", setting=plain)
    assert by_factory["units"] == by_name["units"] and 0 < len(by_name["units"]["layer4"]) < 512
    assert by_factory["total_units"]["layer4"] == 512


def test_safetensors_weights_load_like_the_state_dict(user_files: dict[str, Path]) -> None:
    from safetensors.torch import save_file

    sd = torch.load(user_files["weights"], weights_only=True)
    path = user_files["root"] / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    a = load_model("torchvision:resnet18", {"num_classes": 3}, str(path)).model
    b = load_model("torchvision:resnet18", {"num_classes": 3}, str(user_files["weights"])).model
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_dataparallel_prefix_and_wrapped_checkpoints_load(user_files: dict[str, Path]) -> None:
    sd = torch.load(user_files["weights"], weights_only=True)
    path = user_files["root"] / "wrapped.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    model = torchvision.models.resnet18(num_classes=3)
    load_weights(model, path)
    assert torch.equal(model.fc.weight, sd["fc.weight"])


def test_sweep_writes_records_and_resumes(user_files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out = user_files["root"] / "sweep"
    argv = ["sweep", "--model", "torchvision:resnet18", "--model-kwargs", '{"num_classes": 3}', "--weights",
            str(user_files["weights"]), "--data", f"imagefolder:{user_files['folder']}", "--normalize", "none",
            "--layer", "layer4", "--classes", "apple,2", "--runs", "2", "--target", "0.95", "--out", str(out),
            "--no-html", "--no-progress"]
    assert main(argv) == 0
    records = json.loads((out / "sweep.json").read_text())["records"]
    assert [(r["target_class"], r["seed"]) for r in records] == [(0, 0), (0, 1), (2, 0), (2, 1)]
    assert all(r["holding_rate_strict"] >= 0.95 and r["total_units"] == 512 for r in records)
    assert (out / "sweep.csv").read_text().count("\n") == 5
    report = (out / "report.md").read_text()
    assert "## layer4" in report and "apple" in report and "cherry" in report
    # A rerun computes nothing: every record is reused (the files are not rewritten).
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}
    assert len(stamps) == 4
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")} == stamps
    # A record made with other settings is redone; the others stay as they were.
    other = [*argv[:-5], "0.9", "--out", str(out), "--no-html", "--no-progress"]
    other[other.index("apple,2")], other[other.index("--runs") + 1] = "apple", "1"
    assert main(other) == 0
    changed = {p.name for p in (out / "runs").rglob("*.json") if p.stat().st_mtime_ns != stamps[p]}
    assert changed == {"c0-s0.json"}
    assert "--target 0.9" in json.loads((out / "sweep.json").read_text())["command"]
    capsys.readouterr()


@pytest.mark.slow
def test_exported_program_keeps_layer_names(user_files: dict[str, Path]) -> None:
    model = load_model("torchvision:resnet18", {"num_classes": 3}, str(user_files["weights"])).model
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (torch.randn(2, 3, 32, 32),), dynamic_shapes=({0: batch},))
    path = user_files["root"] / "m.pt2"
    torch.export.save(program, str(path))
    loaded = load_model(str(path))
    data = load_data(f"imagefolder:{user_files['folder']}")
    assert model_classes(loaded.model, data.dataset) == 3
    # The unflattened program runs through forward hooks (a full forward per step): one plain selection on 30
    # inputs keeps this test to seconds (target mode's calibration and least-harm ranking took minutes here).
    assert main(["find", "--model", str(path), "--data", f"imagefolder:{user_files['folder']}", "--layer", "layer4",
                 "--class", "1", "--alpha", "0.002", "--max-inputs", "30", "--no-html", "--no-progress",
                 "--out", str(user_files["root"] / "e.json")]) == 0
    r = json.loads((user_files["root"] / "e.json").read_text())
    assert r["total_units"]["layer4"] == 512 and 0 < r["num_units"]["layer4"] < 512
    assert r["settings"]["engine"] == "hooks"


@pytest.mark.slow
def test_torchscript_gates_the_input_only(user_files: dict[str, Path]) -> None:
    import warnings

    # A head fitted at 16x16 (the size the input layer is gated at below), so that class 1 is predicted there.
    torch.manual_seed(0)
    model = _fit_head(torchvision.models.resnet18(num_classes=3), user_files["folder"], image_size=16)
    path = user_files["root"] / "m.ts"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(model).save(str(path))
    proc = _run("find", "--model", str(path), "--data", f"imagefolder:{user_files['folder']}", "--layer", "layer3",
                "--class", "1")
    _assert_one_line_error(proc, "TorchScript", "--layer input")
    # One plain selection (the scripted model runs whole at every step, through hooks): seconds, not a minute.
    out = user_files["root"] / "ts.json"
    assert main(["find", "--model", str(path), "--data", f"imagefolder:{user_files['folder']}", "--image-size", "16",
                 "--layer", "input", "--class", "1", "--alpha", "0.002", "--out", str(out), "--no-html",
                 "--no-progress"]) == 0
    assert json.loads(out.read_text())["total_units"]["input"] == 16 * 16
    loaded = load_model(str(path))
    data = load_data(f"imagefolder:{user_files['folder']}", image_size=16).dataset
    before = model_state(loaded.model)
    r = find_core_units(loaded.model, "input", 1, data, alpha=0.002, progress=False)
    assert loaded.gateable_input_only and 0 < r.num_units["input"] < 16 * 16
    assert_same_state(before, model_state(loaded.model))


# ------------------------------------------------------------------------------------- one-line errors
@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--model", "torchvision:resnet81"], ["resnet18", "closest"]),
        (["--model", "timm:convnext_atoo"], ["convnext_atto"]),
        (["--model", "resnet18"], ["not a model spec", "torchvision:NAME"]),
        (["--model", "torchvision:resnet18", "--model-kwargs", "{num_classes: 3}"], ["--model-kwargs", "JSON"]),
    ],
)
def test_bad_model_specs_get_one_line(argv: list[str], needles: list[str], tmp_path: Path) -> None:
    proc = _run("find", *argv, "--data", f"imagefolder:{tmp_path}", "--layer", "layer3", "--class", "0")
    _assert_one_line_error(proc, *needles)


def test_weights_that_do_not_fit_name_the_keys(user_files: dict[str, Path]) -> None:
    proc = _run("find", "--model", "torchvision:resnet18", "--weights", str(user_files["weights"]), "--data",
                f"imagefolder:{user_files['folder']}", "--layer", "layer3", "--class", "0")
    _assert_one_line_error(proc, "do not fit", "fc.weight", "(3, 512)", "(1000, 512)", "--model-kwargs")
    proc = _run("find", "--model", "torchvision:resnet34", "--model-kwargs", '{"num_classes": 3}', "--weights",
                str(user_files["weights"]), "--data", f"imagefolder:{user_files['folder']}", "--layer", "layer3",
                "--class", "0")
    _assert_one_line_error(proc, "missing keys", "layer1.2")


def test_pretrained_weights_that_cannot_be_fetched_say_to_pass_weights(user_files: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = dict(os.environ, TORCH_HOME=str(tmp_path), HF_HUB_OFFLINE="1", https_proxy="http://127.0.0.1:9",
               http_proxy="http://127.0.0.1:9")
    for model in ("torchvision:resnet18", "timm:resnet18"):
        proc = subprocess.run([sys.executable, "-m", "coreunits.cli", "find", "--model", model, "--data",
                               f"imagefolder:{user_files['folder']}", "--layer", "layer3", "--class", "0"],
                              capture_output=True, text=True, env=env, timeout=120, check=False)
        _assert_one_line_error(proc, "--weights")


def test_an_empty_data_folder_and_an_unknown_layer_get_one_line(user_files: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "empty" / "a").mkdir(parents=True)
    base = ["--model", "torchvision:resnet18", "--model-kwargs", '{"num_classes": 3}', "--weights",
            str(user_files["weights"])]
    proc = _run("find", *base, "--data", f"imagefolder:{tmp_path / 'empty'}", "--layer", "layer3", "--class", "0")
    _assert_one_line_error(proc, "no images", str(tmp_path / "empty"))
    proc = _run("find", *base, "--data", f"imagefolder:{user_files['folder']}", "--layer", "layer9", "--class", "0")
    _assert_one_line_error(proc, "'layer9'", "'layer1'")
    proc = _run("find", *base, "--data", f"imagefolder:{user_files['folder']}", "--layer", "layer3", "--class", "kiwi")
    _assert_one_line_error(proc, "kiwi", "apple")
    proc = _run("find", *base, "--data", f"imagefolder:{user_files['folder']}", "--layer", "layer3", "--class", "3")
    _assert_one_line_error(proc, "3 classes")


def test_data_that_does_not_suit_the_model_gets_one_line(user_files: dict[str, Path]) -> None:
    folder = f"imagefolder:{user_files['folder']}"
    # The paper's MNIST net takes 1x28x28 digits, not 3x32x32 photos.
    proc = _run("find", "--model", "coreunits:mnist", "--data", folder, "--layer", "max1", "--class", "0")
    _assert_one_line_error(proc, "fails on the data", "(3, 32, 32)", "--image-size")
    # Four channels' normalisation for RGB images.
    proc = _run("find", "--model", "coreunits:mnist", "--data", folder, "--normalize", "0.5,0.5,0.5,0.5,1,1,1,1",
                "--layer", "max1", "--class", "0")
    _assert_one_line_error(proc, "cannot be prepared", "--normalize")


def test_normalize_parsing() -> None:
    assert parse_normalize(None, ((0.5,), (0.2,))) == ((0.5,), (0.2,))
    assert parse_normalize("none", ((0.5,), (0.2,))) is None
    assert parse_normalize("imagenet", None) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert parse_normalize("0.1,0.2,0.3,1,2,3", None) == ((0.1, 0.2, 0.3), (1.0, 2.0, 3.0))
    for bad in ("0.5", "a,b", "0.5,0"):
        with pytest.raises(OptionError, match="--normalize"):
            parse_normalize(bad, None)


def test_the_default_normalization_is_the_weights_preset(user_files: dict[str, Path]) -> None:
    from coreunits.sources import IMAGENET_NORMALIZATION

    loaded = load_model("torchvision:resnet18", {"num_classes": 3}, str(user_files["weights"]))
    assert loaded.normalization == IMAGENET_NORMALIZATION
    assert load_model(f"{user_files['factory']}:build", {"num_classes": 3}).normalization is None


def test_a_torchvision_data_set_by_class_name(tmp_path: Path) -> None:
    from helpers import SHARED_DATA

    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip("MNIST not in ../shared/data")
    data = load_data(f"torchvision:MNIST:{SHARED_DATA}", split="test", max_inputs=50, seed=1)
    x, _ = data.dataset[0]
    assert x.shape == (1, 28, 28) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert len(data.dataset) == 50 and data.class_names and len(data.class_names) == 10
    with pytest.raises(MissingDataError, match="torchvision.datasets.MNIST"):
        load_data(f"torchvision:MNIST:{tmp_path}")
    with pytest.raises(OptionError, match="FashionMNIST"):
        load_data(f"torchvision:FashionMNSIT:{tmp_path}")
