"""Real MNIST, the paper's classifier (bundled checkpoint), real selection."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import REPO, shared_data_or_skip

from coreunits import ActivationCache, find_core_units, holding_rate
from coreunits.cli import main
from coreunits.data import load_mnist
from coreunits.paper import coefficients
from coreunits.train import load_model

CKPT = REPO / "checkpoints" / "mnist_cnn.pt"


@pytest.fixture(scope="module")
def mnist_model() -> torch.nn.Module:
    if not CKPT.is_file():
        pytest.skip("bundled MNIST checkpoint missing")
    return load_model(CKPT)


@pytest.fixture(scope="module")
def mnist_test() -> torch.utils.data.TensorDataset:
    return load_mnist(shared_data_or_skip(), train=False)


# Slow: 65 s in the final fast run of this session (2 cores, load about 4): 10,000 test digits.
@pytest.mark.slow
def test_max1_class0_on_real_mnist(mnist_model, mnist_test) -> None:
    torch.set_num_threads(2)
    cache = ActivationCache(mnist_model, "max1", mnist_test, batch_size=1000)
    r = find_core_units(mnist_model, "max1", 0, cache, seed=0, progress=False, **coefficients("mnist", ["max1"]))
    assert r.dprime["positives"] > 900  # ~980 zeros in the test set, ~all predicted right
    assert r.holding_rate_strict >= 0.99 and r.holding_rate >= 0.99
    assert 3 <= r.num_units["max1"] <= 20, r.num_units
    # Random subsets of the same size hold clearly less (the paper's comparison).
    g = torch.Generator().manual_seed(0)
    k = r.num_units["max1"]
    rates = []
    for _ in range(5):
        mask = torch.zeros(32, dtype=torch.bool)
        mask[torch.randperm(32, generator=g)[:k]] = True
        rates.append(holding_rate(mnist_model, {"max1": mask}, 0, cache, build_dprime_first=True, seed=0))
    assert sum(rates) / len(rates) < r.holding_rate_strict - 0.01


# Slow: 169 s on 2 busy cores (the whole demo on the bundled sample).
@pytest.mark.slow
def test_demo_command_offline_on_bundled_sample(capsys, monkeypatch, tmp_path: Path) -> None:
    if not CKPT.is_file():
        pytest.skip("bundled MNIST checkpoint missing")
    monkeypatch.delenv("COREUNITS_DATA", raising=False)
    out = tmp_path / "demo.json"
    rc = main(["demo", "--offline", "--no-progress", "--classes", "0", "1", "--threads", "2", "--out", str(out)])
    captured = capsys.readouterr()
    text = captured.out
    assert rc == 0
    assert "embedded sample of 2000 MNIST test digits" in text
    # The fallback says that its answers are not the full data's, and how to get those.
    assert "results differ from the full data" in captured.err and "DATA_ROOT" in captured.err
    assert "2 classes in" in text
    assert "holding (strict)" in text and out.is_file()


def test_cli_reports_unknown_layer(capsys, mnist_test) -> None:
    if not CKPT.is_file():
        pytest.skip("bundled MNIST checkpoint missing")
    rc = main(["find", "--layer", "max3", "--class", "0", "--split", "test", "--no-progress",
               "--data-root", str(shared_data_or_skip())])
    err = capsys.readouterr().err
    assert rc == 2 and "no layer named 'max3'" in err and "'max1'" in err
