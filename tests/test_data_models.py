"""Fast tests for data loading, the two model definitions and checkpoints."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.fx
from torch.utils.data import TensorDataset

from coreunits import data as data_mod
from coreunits import train as train_mod
from coreunits.data import (
    CIFAR10_CLASSES,
    MnistDownloadError,
    download_mnist,
    get_mnist,
    load_cifar10,
    load_mnist,
    load_mnist_sample,
    mnist_checksum,
    resolve_data_root,
)
from coreunits.models import CifarNet, MnistMLP, MnistNet, build_model
from coreunits.train import evaluate_accuracy, load_model, metadata_path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST_RAW = DATA / "MNIST" / "raw"
CIFAR_JPEG = DATA / "cifar10-jpeg"
SAMPLE = REPO / "src" / "coreunits" / "_assets" / "mnist_sample.npz"
TRAINED = REPO / "checkpoints" / "mnist_cnn.pt"

# Class counts published in the data README.
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

needs_mnist = pytest.mark.skipif(
    not (MNIST_RAW / "t10k-images-idx3-ubyte").is_file(), reason=f"MNIST not found at {MNIST_RAW}"
)
needs_cifar = pytest.mark.skipif(
    not (CIFAR_JPEG / "test").is_dir(), reason=f"CIFAR-10 JPEGs not found at {CIFAR_JPEG}"
)


@pytest.fixture
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No data-root env var and a private cache dir, so tests never touch ~/.cache."""
    monkeypatch.delenv("COREUNITS_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "coreunits"


def _small(ds: TensorDataset, n: int) -> TensorDataset:
    return TensorDataset(*(t[:n] for t in ds.tensors))


# ---------------------------------------------------------------------------
# MNIST
# ---------------------------------------------------------------------------


def test_resolve_data_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("COREUNITS_DATA", raising=False)
    assert resolve_data_root(None) is None
    monkeypatch.setenv("COREUNITS_DATA", str(tmp_path))
    assert resolve_data_root(None) == tmp_path
    assert resolve_data_root("/elsewhere") == Path("/elsewhere")


@needs_mnist
@pytest.mark.parametrize(("train", "counts"), [(True, TRAIN_COUNTS), (False, TEST_COUNTS)])
def test_load_mnist_idx(train: bool, counts: list[int]) -> None:
    ds = load_mnist(DATA, train=train)
    x, y = ds.tensors
    n = sum(counts)
    assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    # Pixels are exactly k / 255.
    assert torch.equal(torch.round(x[:50] * 255) / 255, x[:50])
    assert torch.bincount(y, minlength=10).tolist() == counts


@needs_mnist
def test_load_mnist_accepts_raw_dir_and_gz(tmp_path: Path) -> None:
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / f"{name}.gz").write_bytes(
            gzip.compress((MNIST_RAW / name).read_bytes(), compresslevel=1)
        )
    gz = load_mnist(tmp_path, train=False)
    plain = load_mnist(MNIST_RAW, train=False)  # the raw folder itself as root
    assert torch.equal(gz.tensors[0], plain.tensors[0])
    # The checksum is over decompressed content, so both copies agree.
    assert mnist_checksum(tmp_path, train=False) == mnist_checksum(DATA, train=False)


def test_load_mnist_wrong_root_message(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(missing, train=True)
    message = str(info.value)
    assert str(missing / "MNIST" / "raw") in message
    assert "--data-root" in message and "COREUNITS_DATA" in message and "download" in message


def test_load_mnist_rejects_bad_magic(tmp_path: Path) -> None:
    bad = np.zeros(16 + 28 * 28, dtype=np.uint8)
    bad[:4] = [0, 0, 8, 4]
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(bad.tobytes())
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 1, 3]))
    with pytest.raises(ValueError, match="magic"):
        load_mnist(tmp_path, train=False)


def test_embedded_sample() -> None:
    assert SAMPLE.is_file() and SAMPLE.stat().st_size < 1_000_000
    ds = load_mnist_sample()
    x, y = ds.tensors
    assert x.shape == (2000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (2000,) and y.dtype == torch.int64
    assert set(y.tolist()) == set(range(10))
    with np.load(SAMPLE) as npz:
        assert len(str(npz["source_sha256"])) == 64


@needs_mnist
def test_embedded_sample_is_test_prefix() -> None:
    test = load_mnist(DATA, train=False)
    sample = load_mnist_sample()
    assert torch.equal(sample.tensors[0], test.tensors[0][:2000])
    assert torch.equal(sample.tensors[1], test.tensors[1][:2000])
    with np.load(SAMPLE) as npz:
        assert str(npz["source_sha256"]).startswith(mnist_checksum(DATA, train=False))


@needs_mnist
def test_get_mnist_explicit_root_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    ds, desc = get_mnist(DATA, train=False, allow_download=False, allow_sample=False)
    assert len(ds) == 10000
    assert desc.startswith("MNIST test (10000) from ") and str(MNIST_RAW) in desc
    monkeypatch.setenv("COREUNITS_DATA", str(DATA))
    ds, desc = get_mnist(None, train=False, allow_download=False)
    assert len(ds) == 10000


def test_get_mnist_wrong_root_does_not_fall_back(isolated_env: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        get_mnist(tmp_path / "nowhere", allow_download=False, allow_sample=True)


def test_get_mnist_sample_fallback(isolated_env: Path) -> None:
    ds, desc = get_mnist(None, allow_download=False, allow_sample=True)
    assert len(ds) == 2000
    assert desc.startswith("embedded sample of 2000 MNIST test digits")
    with pytest.raises(FileNotFoundError, match="COREUNITS_DATA"):
        get_mnist(None, allow_download=False, allow_sample=False)


def _offline(*args: Any, **kwargs: Any) -> Any:
    raise urllib.error.URLError("network unreachable (test)")


def test_download_offline(
    isolated_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", _offline)
    with pytest.raises(MnistDownloadError, match="could not download"):
        download_mnist(tmp_path / "dl")
    ds, desc = get_mnist(None, allow_download=True, allow_sample=True)
    assert len(ds) == 2000 and "download failed" in desc and "unreachable" in desc


@needs_mnist
def test_download_verifies_and_writes_atomically(
    isolated_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    requested: list[str] = []

    def fake_urlopen(url: str, timeout: float) -> io.BytesIO:
        requested.append(url)
        name = url.rsplit("/", 1)[1].removesuffix(".gz")
        return io.BytesIO(gzip.compress((MNIST_RAW / name).read_bytes(), compresslevel=1))

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    ds, desc = get_mnist(None, train=False, allow_download=True, allow_sample=False)
    assert len(ds) == 10000 and str(isolated_env) in desc
    assert len(requested) == 4 and all(u.startswith(data_mod.MNIST_URL) for u in requested)
    raw = isolated_env / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(data_mod.MNIST_MD5)  # no temp files
    # A second call finds the cached copy and downloads nothing.
    requested.clear()
    get_mnist(None, train=True, allow_download=True, allow_sample=False)
    assert requested == []


def test_download_rejects_bad_checksum(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(
        urllib.request, "urlopen", lambda url, timeout: io.BytesIO(gzip.compress(b"junk"))
    )
    with pytest.raises(MnistDownloadError, match="checksum"):
        download_mnist(tmp_path)
    assert not any((tmp_path / "MNIST" / "raw").glob("*"))


# ---------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------


@needs_cifar
def test_load_cifar10_jpeg_subset_and_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = load_cifar10(DATA, train=False, cache=tmp_path, limit=20, progress=False)
    x, y = ds.tensors
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and torch.bincount(y, minlength=10).tolist() == [2] * 10
    assert len(list(tmp_path.glob("*.npy"))) == 2 and len(list(tmp_path.glob("*.json"))) == 1

    def no_decode(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("cache was not used")

    monkeypatch.setattr(data_mod, "_decode_images", no_decode)
    again = load_cifar10(CIFAR_JPEG, train=False, cache=tmp_path, limit=20, progress=False)
    assert torch.equal(again.tensors[0], x) and torch.equal(again.tensors[1], y)


def _write_fake_batch(path: Path, n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).tolist()
    with path.open("wb") as f:
        pickle.dump({b"data": images, b"labels": labels, b"batch_label": b"x"}, f)
    return images, labels


def test_load_cifar10_python_batches(tmp_path: Path) -> None:
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    parts = [_write_fake_batch(batches / f"data_batch_{i}", 4, i) for i in range(1, 6)]
    test_images, test_labels = _write_fake_batch(batches / "test_batch", 3, 9)
    train = load_cifar10(tmp_path, train=True, cache=tmp_path / "c")
    assert train.tensors[0].shape == (20, 3, 32, 32)
    assert train.tensors[1].tolist() == sum((p[1] for p in parts), [])
    test = load_cifar10(tmp_path, train=False, cache=tmp_path / "c")
    assert np.array_equal(test.tensors[0].numpy().reshape(3, -1), test_images)
    assert test.tensors[1].tolist() == test_labels


def test_cifar_batches_refuse_arbitrary_pickles(tmp_path: Path) -> None:
    batches = tmp_path / "cifar-10-batches-py"
    batches.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        # A pickle referencing a global other than numpy's array rebuilders.
        (batches / name).write_bytes(pickle.dumps({b"data": Path("x"), b"labels": []}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_cifar10(tmp_path, train=False)


def test_load_cifar10_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cifar10-jpeg"):
        load_cifar10(tmp_path, train=True)
    assert CIFAR10_CLASSES[0] == "airplane" and len(CIFAR10_CLASSES) == 10


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls", "shape"),
    [("mnist", MnistNet, (2, 1, 28, 28)), ("cifar10", CifarNet, (2, 3, 24, 24))],
)
def test_model_shapes_names_and_fx(name: str, cls: type, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(name).eval()
    assert isinstance(model, cls)
    x = torch.rand(shape)
    out = model(x)
    assert out.shape == (2, 10)
    modules = dict(model.named_modules())
    assert isinstance(modules["max1"], torch.nn.MaxPool2d)
    assert isinstance(modules["max2"], torch.nn.MaxPool2d)
    traced = torch.fx.symbolic_trace(model)
    assert torch.allclose(traced(x), out, atol=1e-6)
    called = [n.target for n in traced.graph.nodes if n.op == "call_module"]
    # Each torch.nn layer is called exactly once, in definition order. fx inlines
    # the custom PerImageStandardize module (not a leaf), so it shows no call.
    assert called == [k for k, _ in model.named_children() if k != "standardize"]


def test_hidden_shapes() -> None:
    mnist, cifar = MnistNet().eval(), CifarNet().eval()
    shapes: dict[str, tuple[int, ...]] = {}
    for prefix, model in (("m", mnist), ("c", cifar)):
        for name in ("max1", "max2"):
            getattr(model, name).register_forward_hook(
                lambda mod, inp, out, key=f"{prefix}.{name}": shapes.__setitem__(
                    key, tuple(out.shape)
                )
            )
    mnist(torch.rand(1, 1, 28, 28))
    cifar(torch.rand(1, 3, 24, 24))
    assert shapes == {
        "m.max1": (1, 32, 14, 14),
        "m.max2": (1, 64, 7, 7),
        "c.max1": (1, 64, 12, 12),
        "c.max2": (1, 64, 6, 6),
    }


def test_standardize_matches_tf_definition() -> None:
    x = torch.rand(3, 3, 24, 24)
    y = CifarNet().standardize(x)
    flat = x.flatten(1)
    std = flat.std(1, unbiased=False).clamp(min=1 / np.sqrt(flat.shape[1]))
    expected = (flat - flat.mean(1, keepdim=True)) / std[:, None]
    assert torch.allclose(y.flatten(1), expected, atol=1e-5)
    flat_image = torch.full((1, 3, 24, 24), 0.5)
    assert torch.equal(CifarNet().standardize(flat_image), torch.zeros_like(flat_image))


def test_mlp_shapes_and_the_incremental_path_on_both_hidden_layers() -> None:
    from coreunits import ActivationCache
    from coreunits._core.incremental import build_incremental

    torch.manual_seed(0)
    model = build_model("mnist_mlp").eval()
    assert isinstance(model, MnistMLP)
    x = torch.rand(64, 1, 28, 28)
    assert model(x).shape == (64, 10)
    for layer, units in (("relu1", 128), ("relu2", 64)):
        cache = ActivationCache(model, layer, x)
        assert cache.specs[0].num_units == units
        # Each hidden layer feeds a Linear: exact greedy's batched drop-one path applies.
        assert build_incremental(cache, layer) is not None


def test_build_model_unknown() -> None:
    with pytest.raises(ValueError, match="mnist"):
        build_model("resnet")


# ---------------------------------------------------------------------------
# Checkpoints and training
# ---------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = MnistNet().eval()
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert set(state) == set(model.state_dict())
    metadata_path(path).write_text(json.dumps({"model": "mnist"}))
    loaded = load_model(path)
    assert not loaded.training
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(loaded(x), model(x))
    assert isinstance(load_model(path, name="mnist"), MnistNet)
    metadata_path(path).unlink()
    with pytest.raises(FileNotFoundError, match="name="):
        load_model(path)
    # The metadata names the model: an MLP checkpoint loads as the MLP.
    mlp = MnistMLP().eval()
    torch.save(mlp.state_dict(), path)
    metadata_path(path).write_text(json.dumps({"model": "mnist_mlp"}))
    assert isinstance(load_model(path), MnistMLP)
    assert torch.equal(load_model(path)(x), mlp(x))


def test_evaluate_accuracy_restores_mode() -> None:
    model = MnistNet().train()
    ds = TensorDataset(torch.rand(30, 1, 28, 28), torch.randint(0, 10, (30,)))
    acc = evaluate_accuracy(model, ds, batch_size=7)
    assert 0.0 <= acc <= 1.0 and model.training


@needs_mnist
def test_train_mnist_tiny_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two tiny epochs; an interrupted run resumed from its state gives the same weights."""
    real_load = train_mod.load_mnist
    monkeypatch.setattr(
        train_mod, "load_mnist", lambda root, train=True: _small(real_load(root, train), 128)
    )
    kwargs: dict[str, Any] = {"epochs": 2, "batch_size": 64, "progress": False, "device": "cpu"}
    meta = train_mod.train_mnist(DATA, out_path=tmp_path / "a.pt", **kwargs)
    assert meta["epochs"] == 2 and meta["complete"] and len(meta["history"]) == 2
    on_disk = json.loads((tmp_path / "a.json").read_text())
    assert on_disk["model"] == "mnist" and on_disk["data_checksum"] == mnist_checksum(DATA)
    assert (tmp_path / "a.pt").stat().st_mode & 0o044  # not left at mkstemp's 0600
    assert not (tmp_path / "a.resume.pt").exists()

    # Interrupt the second run during its second evaluation.
    real_eval = train_mod.evaluate_accuracy
    calls = {"n": 0}

    def flaky_eval(*args: Any, **kw: Any) -> float:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_eval(*args, **kw)

    monkeypatch.setattr(train_mod, "evaluate_accuracy", flaky_eval)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train_mnist(DATA, out_path=tmp_path / "b.pt", **kwargs)
    assert (tmp_path / "b.resume.pt").exists()
    assert json.loads((tmp_path / "b.json").read_text())["epochs"] == 1
    monkeypatch.setattr(train_mod, "evaluate_accuracy", real_eval)
    train_mod.train_mnist(DATA, out_path=tmp_path / "b.pt", resume=True, **kwargs)
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@needs_cifar
def test_train_cifar10_smoke(tmp_path: Path) -> None:
    meta = train_mod.train_cifar10(
        DATA,
        out_path=tmp_path / "c.pt",
        epochs=1,
        batch_size=16,
        progress=False,
        device="cpu",
        cache=tmp_path / "cache",
        limit=40,
    )
    assert meta["model"] == "cifar10" and meta["train_size"] == 40
    model = load_model(tmp_path / "c.pt")
    assert isinstance(model, CifarNet)


def test_cifar_transforms() -> None:
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    out = train_mod.cifar10_train_transform(x, gen)
    assert out.shape == (5, 3, 24, 24) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    center = train_mod.cifar10_eval_transform(x)
    assert torch.equal(center, x[:, :, 4:28, 4:28].float() / 255)


@pytest.mark.skipif(not TRAINED.is_file(), reason="trained checkpoint not produced yet")
def test_trained_mnist_checkpoint() -> None:
    meta = json.loads(metadata_path(TRAINED).read_text())
    assert meta["model"] == "mnist" and meta["test_accuracy"] >= 0.99
    model = load_model(TRAINED)
    # The embedded sample is a slice of the test set, so this is a held-out check.
    assert evaluate_accuracy(model, load_mnist_sample()) >= 0.98
