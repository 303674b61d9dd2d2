"""The command line as a new user meets it: one-line usage errors before any work, and honest help."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from archs import ControlFlowNet, spread_classes, tabular_data
from helpers import REPO
from planted import PlantedNet

from coreunits import ActivationCache, find_core_units
from coreunits._core.errors import CoreUnitsError, MissingDataError, OptionError
from coreunits._core.evaluation import removal_curve
from coreunits._core.progress import progress_wanted
from coreunits._core.selection import DEFAULTS, SelectionConfig
from coreunits.cli import METHOD_NAMES, MNIST_LAYERS, _plural, build_parser, main
from coreunits.models import build_model

CKPT = REPO / "checkpoints" / "mnist_cnn.pt"
needs_checkpoint = pytest.mark.skipif(not CKPT.is_file(), reason="bundled MNIST checkpoint missing")


def _cli(*args: str, data_root: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The installed command in a fresh process, with no MNIST anywhere it could find one."""
    env = dict(os.environ, COREUNITS_DATA=str(data_root) if data_root else "", XDG_CACHE_HOME=str(data_root or ""))
    return subprocess.run([sys.executable, "-m", "coreunits.cli", *args], check=False, capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=300)


def _assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(err.splitlines()) == 1, err
    assert err.startswith("coreunits: error: ")
    for needle in needles:
        assert needle in err, err
    return err


@needs_checkpoint
def test_find_with_a_target_above_one_fails_first_in_one_line(tmp_path: Path) -> None:
    # The data root is empty: had MNIST been looked for first, the error would be about the data.
    proc = _cli("find", "--layer", "max1", "--class", "0", "--target", "1.5", data_root=tmp_path)
    _assert_one_line_error(proc, "--target", "(0, 1]")
    assert proc.stdout == ""


@needs_checkpoint
def test_unknown_layer_without_a_close_match_lists_the_layers(tmp_path: Path, capsys) -> None:
    rc = main(["find", "--layer", "pool1", "--class", "0", "--data-root", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "'pool1'" in err and "'max1'" in err and "'fc2'" in err


@needs_checkpoint
@pytest.mark.parametrize("args", [["--layer", "max9"], ["--classes", "12"], ["--classes", "0", "-1"],
                                  ["--alpha", "-1"]])
def test_demo_rejects_bad_options_before_printing_anything(args: list[str], capsys) -> None:
    rc = main(["demo", "--offline", "--no-progress", *args])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.out == ""  # no made-up coefficients, no table header
    assert len(captured.err.strip().splitlines()) == 1 and captured.err.startswith("coreunits: error: ")


@needs_checkpoint
def test_missing_mnist_message_is_one_line_for_the_cli(tmp_path: Path) -> None:
    proc = _cli("find", "--layer", "max1", "--class", "0", "--data-root", str(tmp_path / "nowhere"))
    err = _assert_one_line_error(proc, "--data-root", "COREUNITS_DATA")
    assert "allow_download" not in err


def test_missing_data_and_option_errors_keep_their_builtin_bases() -> None:
    assert issubclass(MissingDataError, FileNotFoundError) and issubclass(MissingDataError, CoreUnitsError)
    assert issubclass(OptionError, ValueError) and issubclass(OptionError, CoreUnitsError)


def test_library_rejects_bad_options_before_reading_data() -> None:
    model = PlantedNet()
    with pytest.raises(OptionError, match="target_holding_rate"):
        find_core_units(model, "feat", 0, None, target_holding_rate=1.5)
    with pytest.raises(OptionError, match="reading"):
        find_core_units(model, "feat", 0, None, target_holding_rate=0.9, reading="loose")
    with pytest.raises(TypeError, match="did you mean 'alpha'"):
        find_core_units(model, "feat", 0, None, alpah=0.1)


def test_selection_config_is_the_one_place_for_defaults() -> None:
    cfg = SelectionConfig()
    assert all(getattr(cfg, k) == v for k, v in DEFAULTS.items())
    assert set(DEFAULTS) < set(cfg.settings())
    with pytest.raises(OptionError, match="calibration_runs"):
        SelectionConfig(calibration_runs=0).check()


def test_help_names_layers_methods_and_split() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices  # type: ignore[union-attr]
    find_help = sub["find"].format_help()
    assert "max1" in find_help and "fc2" in find_help and "--split" in find_help
    compare_help = " ".join(sub["compare"].format_help().split())
    for name in METHOD_NAMES:
        assert name in compare_help
    for name, cmd in sub.items():
        for action in cmd._actions:
            if {"--seed", "--split", "--layers", "--layer", "--methods"} & set(action.option_strings):
                assert action.help, f"{name} {action.option_strings[0]} has no help"
    # find and demo draw D'_c from the same split unless told otherwise.
    find_args = parser.parse_args(["find", "--layer", "max1", "--class", "0"])
    demo_args = parser.parse_args(["demo"])
    assert find_args.split == demo_args.split == "test"


def test_cli_names_match_the_library() -> None:
    from coreunits.compare import default_methods

    assert {m.name for m in default_methods(include=list(METHOD_NAMES))} == set(METHOD_NAMES)
    assert list(MNIST_LAYERS) == ["input"] + [n for n, _ in build_model("mnist").named_modules() if n]


def test_compare_rejects_unknown_methods_in_argparse(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["compare", "mnist", "--methods", "gready"])
    assert info.value.code == 2 and "switch_gates" in capsys.readouterr().err


def test_plural_and_quiet_progress(monkeypatch) -> None:
    assert _plural(1, "class", "classes") == "1 class" and _plural(2, "class", "classes") == "2 classes"
    monkeypatch.delenv("COREUNITS_PROGRESS", raising=False)
    # Under pytest stderr is captured, not a terminal: no bar redraws in logs.
    assert not progress_wanted(True)
    monkeypatch.setenv("COREUNITS_PROGRESS", "1")
    assert progress_wanted(True) and not progress_wanted(False)


def test_fallbacks_are_logged_and_recorded(caplog) -> None:
    model = ControlFlowNet()
    x = tabular_data(200, 12, seed=5)
    spread_classes(model, x, model.fc2)
    c = int(torch.bincount(model(x).argmax(1)).argmax())
    with caplog.at_level(logging.WARNING, logger="coreunits"):
        r = find_core_units(model, "fc1", c, x, seed=1, epochs=1, min_steps=10, progress=False)
    assert any("forward hooks" in rec.getMessage() for rec in caplog.records)
    assert "hooks" in r.settings["fallbacks"]["engine"]
    # The incremental path needs the fx split: the reason is kept, not swallowed.
    cache = ActivationCache(model, "fc1", x)
    removal_curve(cache, torch.arange(len(cache)), "fc1", torch.rand(16), c, ks=[4])
    assert "fx engine" in cache.fallbacks["incremental:fc1"]


def test_planted_fast_path_records_no_fallback(planted) -> None:
    model, x = planted
    r = find_core_units(model, "feat", 0, x, progress=False, epochs=1, min_steps=10)
    assert r.settings["engine"] == "fx" and "engine" not in r.settings["fallbacks"]
    assert r.settings["target_holding_rate"] is None and r.settings["alpha"] == DEFAULTS["alpha"]


def test_sample_fallback_says_its_results_differ(monkeypatch, tmp_path: Path, capsys) -> None:
    import argparse

    from coreunits.cli import _mnist_data

    monkeypatch.delenv("COREUNITS_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    data, source = _mnist_data(argparse.Namespace(data_root=None, split="test"), allow_download=False)
    err = capsys.readouterr().err
    assert len(data) == 2000 and source.startswith("embedded sample")
    assert "results differ from the full data" in err and "make demo DATA_ROOT=" in err
