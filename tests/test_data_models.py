"""Fast tests for data loading (through torchvision), the two model definitions and checkpoints."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.fx
from torch.utils.data import TensorDataset

from coreunits import ActivationCache, DataError, MissingDataError
from coreunits import data as data_mod
from coreunits import train as train_mod
from coreunits._core.dprime import build_dprime
from coreunits.data import (
    CIFAR10_CLASSES,
    MnistDownloadError,
    get_mnist,
    load_cifar10,
    load_mnist,
    load_mnist_sample,
    mnist_checksum,
    resolve_data_root,
)
from coreunits.models import CifarNet, CifarViT, MnistMLP, MnistNet, build_model
from coreunits.train import evaluate_accuracy, load_model, load_named_or, metadata_path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST_RAW = DATA / "MNIST" / "raw"
CIFAR_JPEG = DATA / "cifar10-jpeg"
SAMPLE = REPO / "src" / "coreunits" / "_assets" / "mnist_sample.npz"
TRAINED = REPO / "checkpoints" / "mnist_cnn.pt"
MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]

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


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------
# MNIST
# ---------------------------------------------------------------------------


def test_resolve_data_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("COREUNITS_DATA", raising=False)
    assert resolve_data_root(None) is None
    monkeypatch.setenv("COREUNITS_DATA", str(tmp_path))
    assert resolve_data_root(None) == tmp_path
    assert resolve_data_root("/elsewhere") == Path("/elsewhere")


def test_importing_the_package_does_not_import_torchvision() -> None:
    code = "import sys, coreunits, coreunits.data, coreunits.train; print('torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"


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


def _old_mnist_test() -> tuple[torch.Tensor, torch.Tensor]:
    """The test split exactly as the hand-written IDX reader built it, from the bytes, with numpy alone."""
    images = np.frombuffer((MNIST_RAW / "t10k-images-idx3-ubyte").read_bytes(), dtype=np.uint8, offset=16)
    labels = np.frombuffer((MNIST_RAW / "t10k-labels-idx1-ubyte").read_bytes(), dtype=np.uint8, offset=8)
    x = torch.from_numpy(images.reshape(-1, 28, 28).astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


@needs_mnist
@pytest.mark.skipif(not TRAINED.is_file(), reason="bundled MNIST checkpoint missing")
def test_torchvision_mnist_gives_the_old_pixels_labels_and_dprime() -> None:
    from torchvision.datasets import MNIST
    from torchvision.transforms import ToTensor

    x_old, y_old = _old_mnist_test()
    new, source = get_mnist(DATA, train=False, allow_download=False, allow_sample=False)
    assert torch.equal(new.tensors[0], x_old) and torch.equal(new.tensors[1], y_old)
    assert source == f"MNIST test (10000) from {MNIST_RAW}"
    # torchvision's own dataset, handed to the package as it is (items: ToTensor of the PIL digit), agrees.
    direct = MNIST(str(DATA), train=False, transform=ToTensor())
    assert torch.equal(torch.stack([direct[i][0] for i in range(1000)]), x_old[:1000])
    # D'_c of the bundled classifier for two classes on the first 1000 test digits: old arrays vs load_mnist.
    model = load_named_or(TRAINED, "mnist")
    caches = [ActivationCache(model, "max1", x_old[:1000]), ActivationCache(model, "max1", _small(new, 1000))]
    for c in (0, 7):
        old, now = (build_dprime(k.predictions, c, generator=torch.Generator().manual_seed(0)) for k in caches)
        assert old.num_positive > 50
        assert torch.equal(now.index, old.index) and torch.equal(now.labels, old.labels)


def _link_mnist(folder: Path, names: list[str] = MNIST_FILES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).symlink_to(MNIST_RAW / name)
    return folder


@needs_mnist
def test_load_mnist_points_torchvision_at_a_bare_folder(tmp_path: Path) -> None:
    reference = load_mnist(DATA, train=False)
    bare, raw = _link_mnist(tmp_path / "bare"), _link_mnist(tmp_path / "m" / "raw")
    for root, read in ((bare, bare), (tmp_path / "m", raw)):  # the files themselves; <root>/raw
        ds, source = get_mnist(root, train=False, allow_download=False, allow_sample=False)
        assert torch.equal(ds.tensors[0], reference.tensors[0]) and source.endswith(str(read))
        assert mnist_checksum(root, train=False) == mnist_checksum(DATA, train=False)
    # Compressed files alone are not read (torchvision reads the uncompressed IDX files).
    gz = tmp_path / "gz" / "MNIST" / "raw"
    gz.mkdir(parents=True)
    for name in MNIST_FILES:
        (gz / f"{name}.gz").write_bytes(gzip.compress(b"", mtime=0))
    with pytest.raises(MissingDataError, match="uncompressed"):
        load_mnist(tmp_path / "gz", train=False)


def test_load_mnist_wrong_root_message(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(missing, train=True)
    message = _one_line(info)
    assert isinstance(info.value, MissingDataError)
    assert str(missing / "MNIST" / "raw") in message
    assert "--data-root" in message and "COREUNITS_DATA" in message and "download" in message


def test_load_mnist_unreadable_files_are_one_clear_error(tmp_path: Path) -> None:
    bad = np.zeros(16 + 28 * 28, dtype=np.uint8)
    bad[:4] = [0, 0, 8, 4]  # magic of a 4-dimensional array: not MNIST
    for name in MNIST_FILES:
        (tmp_path / name).write_bytes(bad.tobytes())
    with pytest.raises(DataError, match="cannot read") as info:
        load_mnist(tmp_path, train=False)
    assert str(tmp_path) in _one_line(info) and "original uncompressed IDX files" in str(info.value)


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


def test_torchvision_download_offline_is_our_clear_error(isolated_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", _offline)
    with pytest.raises(MnistDownloadError, match="could not download MNIST") as info:
        data_mod._download_mnist(isolated_env)
    assert "unreachable" in _one_line(info)
    ds, desc = get_mnist(None, allow_download=True, allow_sample=True)
    assert len(ds) == 2000 and "download failed" in desc and "unreachable" in desc
    with pytest.raises(MissingDataError, match="download failed") as missing:
        get_mnist(None, allow_download=True, allow_sample=False)
    assert "--data-root" in _one_line(missing)


class _Response(io.BytesIO):
    """What torchvision's downloader reads from ``urllib.request.urlopen``."""

    def __init__(self, url: str, body: bytes) -> None:
        super().__init__(body)
        self.url, self.length = url, len(body)


@needs_mnist
def test_get_mnist_downloads_through_torchvision_into_the_cache(
    isolated_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision.datasets import MNIST

    served = {f"{n}.gz": gzip.compress((MNIST_RAW / n).read_bytes(), compresslevel=1, mtime=0) for n in MNIST_FILES}
    # torchvision checks each file against the published MD5 of the original .gz; ours are recompressed.
    monkeypatch.setattr(MNIST, "resources", [(k, hashlib.md5(v).hexdigest()) for k, v in served.items()])
    requested: list[str] = []

    def fake_urlopen(request: urllib.request.Request, *args: Any, **kwargs: Any) -> _Response:
        requested.append(request.full_url)
        return _Response(request.full_url, served[request.full_url.rsplit("/", 1)[1]])

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    ds, desc = get_mnist(None, train=False, allow_download=True, allow_sample=False)
    assert len(ds) == 10000 and desc.endswith(str(isolated_env / "MNIST" / "raw"))
    assert {u.rsplit("/", 1)[1] for u in requested} == set(served)
    assert torch.equal(ds.tensors[0], load_mnist(DATA, train=False).tensors[0])
    requested.clear()  # a second call finds the cached copy and downloads nothing
    assert len(get_mnist(None, train=True, allow_download=True, allow_sample=False)[0]) == 60000
    assert requested == []


# ---------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------


@needs_cifar
def test_imagefolder_cifar10_gives_the_old_pixels(tmp_path: Path) -> None:
    from PIL import Image

    ds = load_cifar10(DATA, train=False, cache=tmp_path, limit=300, progress=False)
    # The old loader: per class (sorted = official order) the first 30 files by name, decoded by Pillow.
    expected = [
        np.asarray(Image.open(CIFAR_JPEG / "test" / name / f"{j:04d}.jpg").convert("RGB")).transpose(2, 0, 1)
        for name in CIFAR10_CLASSES
        for j in range(30)
    ]
    assert torch.equal(ds.tensors[0], torch.from_numpy(np.stack(expected)))
    assert ds.tensors[1].tolist() == [c for c in range(10) for _ in range(30)]


@needs_cifar
def test_load_cifar10_jpeg_subset_and_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = load_cifar10(DATA, train=False, cache=tmp_path, limit=20, progress=False)
    x, y = ds.tensors
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and torch.bincount(y, minlength=10).tolist() == [2] * 10
    assert [p.suffix for p in tmp_path.iterdir()] == [".npz"]  # one file, no temp file left

    def no_decode(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("cache was not used")

    monkeypatch.setattr(data_mod, "_decode", no_decode)
    again = load_cifar10(CIFAR_JPEG, train=False, cache=tmp_path, limit=20, progress=False)
    assert torch.equal(again.tensors[0], x) and torch.equal(again.tensors[1], y)


def _write_fake_batch(path: Path, n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).tolist()
    with path.open("wb") as f:
        pickle.dump({"data": images, "labels": labels, "batch_label": "x"}, f)  # the official files hold str keys
    return images, labels


def _fake_batches(root: Path) -> tuple[list[tuple[np.ndarray, list[int]]], tuple[np.ndarray, list[int]]]:
    batches = root / "cifar-10-batches-py"
    batches.mkdir()
    parts = [_write_fake_batch(batches / f"data_batch_{i}", 4, i) for i in range(1, 6)]
    test = _write_fake_batch(batches / "test_batch", 3, 9)
    with (batches / "batches.meta").open("wb") as f:
        pickle.dump({"label_names": list(CIFAR10_CLASSES)}, f)
    return parts, test


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_load_cifar10_python_batches_through_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import CIFAR10

    parts, (test_images, test_labels) = _fake_batches(tmp_path)
    batches = tmp_path / "cifar-10-batches-py"
    # torchvision accepts only files with the official MD5s: give it those of the fakes.
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", _md5(batches / f"data_batch_{i}")] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", _md5(batches / "test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": _md5(batches / "batches.meta")})
    train = load_cifar10(tmp_path, train=True, cache=tmp_path / "c")
    assert train.tensors[0].shape == (20, 3, 32, 32) and train.tensors[0].dtype == torch.uint8
    assert train.tensors[1].tolist() == sum((p[1] for p in parts), [])
    test = load_cifar10(tmp_path, train=False, cache=tmp_path / "c")
    assert np.array_equal(test.tensors[0].numpy().reshape(3, -1), test_images)
    assert test.tensors[1].tolist() == test_labels
    assert not (tmp_path / "c").exists()  # the batches are never cached


def test_cifar_batches_that_are_not_the_official_files_are_refused(tmp_path: Path) -> None:
    _fake_batches(tmp_path)  # torchvision checks the MD5s before it unpickles anything
    with pytest.raises(MissingDataError, match="MD5") as info:
        load_cifar10(tmp_path, train=False)
    assert str(tmp_path / "cifar-10-batches-py") in _one_line(info)


def test_load_cifar10_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cifar10-jpeg") as info:
        load_cifar10(tmp_path, train=True)
    assert "--data-root" in _one_line(info)
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


@needs_mnist
def test_the_bundled_vit_reaches_its_recorded_test_accuracy() -> None:
    path = REPO / "checkpoints" / "mnist_vit.pt"
    meta = json.loads(metadata_path(path).read_text())
    assert meta["model"] == "mnist_vit" and meta["complete"]
    test, _ = get_mnist(DATA, train=False, allow_download=False, allow_sample=False)
    assert evaluate_accuracy(load_model(path), test) == pytest.approx(meta["test_accuracy"], abs=1e-4)


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
    vit = train_mod.train_cifar10(DATA, out_path=tmp_path / "v.pt", epochs=1, batch_size=16, progress=False,
                                  device="cpu", cache=tmp_path / "cache", limit=40, model_name="cifar10_vit")
    assert vit["model"] == "cifar10_vit" and vit["optimizer"] == "AdamW-onecycle" and vit["weight_decay"] == 0.05
    assert isinstance(load_model(tmp_path / "v.pt"), CifarViT)


@needs_cifar
def test_the_bundled_cifar10_vit_reaches_its_recorded_test_accuracy() -> None:
    from coreunits.paper import cifar10_split

    path = REPO / "checkpoints" / "cifar10_vit.pt"
    meta = json.loads(metadata_path(path).read_text())
    assert meta["model"] == "cifar10_vit" and meta["complete"]
    test = cifar10_split(DATA, train=False)
    assert evaluate_accuracy(load_model(path), test) == pytest.approx(meta["test_accuracy"], abs=1e-4)


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
