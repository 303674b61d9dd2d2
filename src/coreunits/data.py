"""MNIST and CIFAR-10 for the paper's experiments, read by torchvision.

torchvision does the reading: ``torchvision.datasets.MNIST`` parses the IDX files
and downloads them, ``torchvision.datasets.CIFAR10`` checks the official python
batches' MD5 before it unpickles them, ``torchvision.datasets.ImageFolder``
lists and decodes a tree of JPEG files. This module keeps only what torchvision
does not do:

* where the data is: ``--data-root`` / ``$COREUNITS_DATA`` (no path is
  hard-wired), MNIST downloaded into a per-user cache when no root is given,
  and the first 2,000 MNIST test digits shipped inside the package so that
  demos and tests run offline; a wrong root is one error line that says where
  it looked and how to fix it;
* the form the package works on: one tensor dataset per split (MNIST as
  float32 ``pixel / 255``, CIFAR-10 as uint8), checked, with a checksum of the
  MNIST files for checkpoint metadata;
* a decode-once cache of a CIFAR-10 JPEG tree (``.npz`` in the cache folder):
  decoding the 60,000 JPEGs takes seconds where loading the decoded arrays
  takes a fraction of one (``benchmarks/decode_cache.py``, RESULTS.md).

Any other torch Dataset needs nothing from here: :class:`coreunits.ActivationCache`
reads datasets whose items are tensors or ``(tensor, label)`` pairs, e.g. a
torchvision dataset given ``transform=ToTensor()``. torchvision is imported
inside the functions that use it, so ``import coreunits`` does not load it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import socket
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from coreunits._core.errors import DataError, MissingDataError, OptionError
from coreunits._core.io import atomic_write
from coreunits._core.progress import progress_bar

__all__ = [
    "CIFAR10_CLASSES",
    "DATA_ENV_VAR",
    "MnistDownloadError",
    "cache_dir",
    "get_mnist",
    "load_cifar10",
    "load_mnist",
    "load_mnist_sample",
    "locate_mnist",
    "mnist_checksum",
    "open_mnist",
    "resolve_data_root",
]

#: Environment variable naming the data root when no argument is given.
DATA_ENV_VAR = "COREUNITS_DATA"

#: CIFAR-10 class names in the official label order (also alphabetical, which is
#: why ImageFolder, which sorts the class folders, yields the official indices).
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

_SAMPLE_ASSET = "mnist_sample.npz"
_DOWNLOAD_TIMEOUT_S = 10.0  # torchvision's urlopen has none: a silent network would hang the demo


class MnistDownloadError(RuntimeError):
    """Raised when torchvision cannot download MNIST (offline, HTTP error or bad checksum)."""


class _NotInFolder(FileNotFoundError):
    """The folder does not hold the four MNIST IDX files (internal: the next layout is tried)."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _split(train: bool) -> str:
    return "train" if train else "test"


# ---------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------


def resolve_data_root(data_root: str | os.PathLike[str] | None) -> Path | None:
    """Return the data root from the argument, else from ``$COREUNITS_DATA``.

    Args:
        data_root: Explicit data root, or None.

    Returns:
        The expanded path, or None when neither the argument nor the environment
        variable is set (an empty variable counts as unset).
    """
    if data_root is not None:
        return Path(data_root).expanduser()
    env = os.environ.get(DATA_ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    return None


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Return the per-user cache directory used for downloads and decoded arrays.

    Args:
        override: Use this directory instead of the default.

    Returns:
        ``override`` if given, else ``$XDG_CACHE_HOME/coreunits``, else
        ``~/.cache/coreunits``. The directory is not created here.
    """
    if override is not None:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "coreunits"


# ---------------------------------------------------------------------------
# MNIST
# ---------------------------------------------------------------------------


@functools.cache
def _folder_mnist() -> type:
    """torchvision's MNIST reading the IDX files of one given folder (it wants ``root/MNIST/raw``)."""
    from torchvision.datasets import MNIST

    class FolderMNIST(MNIST):
        def __init__(self, folder: str, train: bool) -> None:
            self._folder = folder
            if not self._check_exists():  # torchvision's own test: the four uncompressed files
                raise _NotInFolder(folder)
            super().__init__(folder, train=train, download=False)

        @property
        def raw_folder(self) -> str:
            return self._folder

    return FolderMNIST


def open_mnist(root: str | os.PathLike[str], train: bool = True) -> Any:
    """torchvision's MNIST dataset of one split under ``root``.

    The four uncompressed IDX files (``train-images-idx3-ubyte`` etc.) are read
    from ``root/MNIST/raw`` (torchvision's layout), else ``root/raw``, else
    ``root`` itself: torchvision is pointed at the first folder that holds them.

    Args:
        root: Data root.
        train: The 60000-digit training split if True, else the 10000-digit test split.

    Returns:
        A ``torchvision.datasets.MNIST`` (items are PIL images unless given a
        ``transform``; ``.data`` is the uint8 (N, 28, 28) tensor, ``.targets``
        the labels, ``.raw_folder`` the folder read).

    Raises:
        MissingDataError: No folder holds the files; the one-line message says
            where it looked and how to fix it.
        DataError: The files are there but are not valid MNIST IDX files.
    """
    base = Path(root).expanduser()
    folders = [base / "MNIST" / "raw", base / "raw", base]
    for folder in folders:
        try:
            ds = _folder_mnist()(str(folder), train)
        except _NotInFolder:
            continue
        except (AssertionError, TypeError, ValueError, RuntimeError) as exc:  # what torchvision's reader raises
            raise DataError(
                f"{folder} holds MNIST files torchvision cannot read ({_one_line(exc)}); replace them with the "
                "original uncompressed IDX files (a download into the cache: delete that folder and run again)"
            ) from None
        _check_mnist(ds, folder)
        return ds
    raise MissingDataError(
        f"MNIST IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        f"t10k-labels-idx1-ubyte, uncompressed) not found in {', '.join(str(f) for f in folders)}. "
        f"Point --data-root (or {DATA_ENV_VAR}) at a folder that contains MNIST/raw/, or give no data root "
        "so that coreunits downloads MNIST into its cache (needs internet access)."
    )


def _check_mnist(ds: Any, folder: Path) -> None:
    """What torchvision's reader does not check: 28x28 digits, one label 0-9 per image."""
    images, labels = ds.data, ds.targets
    if tuple(images.shape[1:]) != (28, 28) or images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{folder}: {tuple(images.shape)} images and {tuple(labels.shape)} labels are not MNIST "
            "(N 28x28 digits, N labels); replace the files with the original IDX files"
        )
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) <= 9:
        raise DataError(f"{folder}: MNIST labels must be 0-9, found {int(labels.min())}..{int(labels.max())}")


def _mnist_dataset(images: torch.Tensor, labels: torch.Tensor) -> TensorDataset:
    """uint8 (N, 28, 28) digits and labels -> float32 (N, 1, 28, 28) ``pixel / 255`` and int64 labels."""
    return TensorDataset(images.to(torch.float32).div(255.0).unsqueeze(1), labels.to(torch.int64))


def load_mnist(root: str | os.PathLike[str], train: bool = True) -> TensorDataset:
    """Load one MNIST split as tensors (read by torchvision, see :func:`open_mnist`).

    Args:
        root: Data root.
        train: Load the 60000-image training split if True, else the 10000-image
            test split.

    Returns:
        A dataset of float32 images of shape (N, 1, 28, 28) with values
        ``pixel / 255`` in [0, 1], and int64 labels of shape (N,).

    Raises:
        MissingDataError: The files are not found (a ``FileNotFoundError``).
        DataError: The files are not valid MNIST (a ``ValueError``).
    """
    ds = open_mnist(root, train)
    return _mnist_dataset(ds.data, ds.targets)


def mnist_checksum(root: str | os.PathLike[str], train: bool = True) -> str:
    """Return a short sha256 identifying the MNIST split found under ``root``.

    The hash covers the image file followed by the label file, as read by
    :func:`open_mnist`; checkpoint metadata records it.

    Args:
        root: Data root (same lookup as :func:`open_mnist`).
        train: Which split.

    Returns:
        The first 16 hex digits of the sha256.
    """
    folder = Path(open_mnist(root, train).raw_folder)
    prefix = "train" if train else "t10k"
    h = hashlib.sha256()
    for name in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        h.update((folder / name).read_bytes())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _download_mnist(root: Path) -> None:
    """Download MNIST into ``root/MNIST/raw`` through torchvision (MD5-checked; a no-op when it is there)."""
    from torchvision.datasets import MNIST

    try:
        with _socket_timeout(_DOWNLOAD_TIMEOUT_S):
            MNIST(str(root), train=True, download=True)
    except (RuntimeError, OSError) as exc:  # torchvision: RuntimeError after every mirror failed
        raise MnistDownloadError(f"could not download MNIST into {root / 'MNIST' / 'raw'}: {_one_line(exc)}") from None


def _find_mnist(data_root: str | os.PathLike[str] | None, train: bool, allow_download: bool) -> tuple[Any, str]:
    """``(torchvision MNIST, "")`` from the root or the cache, else ``(None, why not)``; a wrong root raises."""
    root = resolve_data_root(data_root)
    if root is not None:
        return open_mnist(root, train), ""  # a wrong path is never silently replaced
    cached = cache_dir()
    with contextlib.suppress(MissingDataError):
        return open_mnist(cached, train), ""
    if not allow_download:
        return None, "no data root given and download disabled"
    try:
        _download_mnist(cached)
    except MnistDownloadError as exc:
        return None, f"no data root given and download failed: {exc}"
    return open_mnist(cached, train), ""


def _unavailable(reason: str) -> MissingDataError:
    return MissingDataError(
        f"MNIST is not available ({reason}). Pass --data-root (data_root=...) or set {DATA_ENV_VAR} "
        "to a folder containing MNIST/raw/."
    )


def locate_mnist(data_root: str | os.PathLike[str] | None = None, allow_download: bool = True) -> Path:
    """The data root MNIST is read from.

    The explicit root (argument or ``$COREUNITS_DATA``) if one is given: it must
    hold MNIST. Otherwise the per-user cache (:func:`cache_dir`), where
    torchvision downloads MNIST if it is not there yet and ``allow_download``.

    Raises:
        MissingDataError: The explicit root holds no MNIST, or there is no root
            and the cache neither holds MNIST nor could get it (the message says why).
    """
    ds, reason = _find_mnist(data_root, False, allow_download)
    if ds is None:
        raise _unavailable(reason)
    return resolve_data_root(data_root) or cache_dir()


def _sample_resource() -> Any:
    # importlib.resources works for installed wheels and zipped packages alike.
    # Chained joinpath: multi-argument joinpath needs Python >= 3.12 for namespace packages.
    return resources.files(__package__ or "coreunits").joinpath("_assets").joinpath(_SAMPLE_ASSET)


def load_mnist_sample() -> TensorDataset:
    """Load the embedded sample: the first 2000 digits of the MNIST test set.

    It exists so that demos and tests run without any download. It is a *test-set*
    sample, so never report accuracy of a model trained on it.

    Returns:
        A dataset like :func:`load_mnist`: float32 images (2000, 1, 28, 28) in
        [0, 1] and int64 labels.
    """
    with resources.as_file(_sample_resource()) as path, np.load(path, allow_pickle=False) as npz:
        images = torch.from_numpy(npz["images"])
        labels = torch.from_numpy(npz["labels"])
    return _mnist_dataset(images, labels)


def get_mnist(
    data_root: str | os.PathLike[str] | None = None,
    train: bool = True,
    allow_download: bool = True,
    allow_sample: bool = True,
) -> tuple[TensorDataset, str]:
    """Get MNIST from the best available source.

    Order: explicit ``data_root`` or ``$COREUNITS_DATA`` -> a copy in the cache
    directory (see :func:`cache_dir`), downloaded there by torchvision if
    ``allow_download`` -> the embedded 2000-digit test sample if ``allow_sample``.

    Args:
        data_root: Data root, or None to use the environment variable / fallbacks.
        train: Which split to load from a real data root.
        allow_download: Try downloading into the cache directory.
        allow_sample: Fall back to :func:`load_mnist_sample`.

    Returns:
        ``(dataset, description)``, where the description is human-readable, e.g.
        ``"MNIST train (60000) from /data/MNIST/raw"``.

    Raises:
        MissingDataError: An explicit root holds no MNIST, or nothing is
            available and ``allow_sample`` is False.
    """
    ds, reason = _find_mnist(data_root, train, allow_download)
    if ds is not None:
        return _mnist_dataset(ds.data, ds.targets), f"MNIST {_split(train)} ({len(ds)}) from {ds.raw_folder}"
    if not allow_sample:
        raise _unavailable(reason)
    dataset = load_mnist_sample()
    return dataset, f"embedded sample of {len(dataset)} MNIST test digits ({reason})"


# ---------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------


def _cifar_batches(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The official python batches under ``root/cifar-10-batches-py``, through torchvision."""
    from torchvision.datasets import CIFAR10

    try:
        ds = CIFAR10(str(root), train=train, download=False)
    except RuntimeError as exc:
        raise MissingDataError(
            f"{root / 'cifar-10-batches-py'}: {_one_line(exc).split('.')[0]}; it needs the five data_batch_* files, "
            "test_batch and batches.meta exactly as in cifar-10-python.tar.gz (torchvision checks their MD5)"
        ) from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # HWC -> CHW
    return images, torch.tensor(ds.targets, dtype=torch.int64)


def _image_folder(folder: Path) -> Any:
    """torchvision's ImageFolder over a CIFAR-10 tree, items ``(uint8 (3, H, W) tensor, label)``."""
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import pil_to_tensor

    try:
        ds = ImageFolder(str(folder), transform=pil_to_tensor)
    except FileNotFoundError as exc:
        raise MissingDataError(f"{folder}: {_one_line(exc)}; it needs one folder per CIFAR-10 class") from None
    if tuple(ds.classes) != CIFAR10_CLASSES:
        raise DataError(f"{folder}: expected the class folders {list(CIFAR10_CLASSES)}, found {ds.classes}")
    return ds


def _balanced(targets: Sequence[int], limit: int | None) -> list[int]:
    """All indices, or the first ``ceil(limit / 10)`` of each class (class order) cut to ``limit``."""
    if limit is None:
        return list(range(len(targets)))
    per_class = -(-limit // len(CIFAR10_CLASSES))
    taken: list[int] = []
    for c in range(len(CIFAR10_CLASSES)):
        taken.extend([i for i, t in enumerate(targets) if t == c][:per_class])
    return taken[:limit]


def _decode(ds: Any, indices: Sequence[int], progress: bool, desc: str) -> torch.Tensor:
    """Decode ``ds[i]`` for each index (ImageFolder: Pillow, RGB) into one uint8 (N, 3, 32, 32) tensor."""
    out = torch.empty((len(indices), 3, 32, 32), dtype=torch.uint8)
    for k, i in enumerate(progress_bar(indices, enabled=progress, desc=desc, unit="img")):
        image, _ = ds[i]
        if tuple(image.shape) != (3, 32, 32):
            raise DataError(f"{ds.samples[i][0]}: expected a 32x32 RGB image, got shape {tuple(image.shape)}")
        out[k] = image
    return out


def _tree_key(folder: Path, files: Sequence[str]) -> str:
    # Relative names and sizes identify the tree cheaply; hashing 60000 files'
    # contents would cost nearly as much as decoding them.
    h = hashlib.sha256()
    for name in files:
        path = Path(name)
        h.update(f"{path.relative_to(folder).as_posix()}\t{path.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def _cifar_jpeg(
    folder: Path, split: str, cache: Path, limit: int | None, progress: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """A CIFAR-10 JPEG tree through ImageFolder, decoded once and then read from ``cache``."""
    ds = _image_folder(folder)
    indices = _balanced(ds.targets, limit)
    labels = torch.tensor([ds.targets[i] for i in indices], dtype=torch.int64)
    path = cache / f"cifar10-{split}-{len(indices)}-{_tree_key(folder, [ds.samples[i][0] for i in indices])}.npz"
    try:
        with np.load(path, allow_pickle=False) as npz:
            images = torch.from_numpy(npz["images"])
            if tuple(images.shape) == (len(indices), 3, 32, 32) and np.array_equal(npz["labels"], labels.numpy()):
                return images, labels
    except (OSError, ValueError, KeyError):
        pass  # no cache yet, or an unreadable one: decode again
    images = _decode(ds, indices, progress, desc=f"decoding CIFAR-10 {split}")
    atomic_write(path, lambda f: np.savez(f, images=images.numpy(), labels=labels.numpy()))
    return images, labels


def load_cifar10(
    root: str | os.PathLike[str],
    train: bool = True,
    cache: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> TensorDataset:
    """Load one CIFAR-10 split as uint8 images (never downloaded).

    Two layouts are accepted:

    * the official python batches, ``root/cifar-10-batches-py/`` (read by
      ``torchvision.datasets.CIFAR10``, which checks their MD5 first);
    * a tree ``root/cifar10-jpeg/{train,test}/<class>/*.jpg`` or
      ``root/{train,test}/<class>/*.jpg`` (read by ``torchvision.datasets.ImageFolder``).
      It is decoded once and kept as a ``.npz`` in ``cache``, keyed by the file
      names and sizes, so later loads take a fraction of a second.

    Args:
        root: Data root.
        train: Load the 50000-image training split if True, else the 10000-image
            test split.
        cache: Cache directory for decoded arrays; default :func:`cache_dir`.
        limit: Keep at most this many images (for quick tests). For the JPEG
            tree the first ``ceil(limit / 10)`` files of each class are taken, so
            the subset stays balanced; for the batches it is the first ``limit``.
        progress: Show a progress bar while decoding JPEGs.

    Returns:
        A dataset of uint8 images of shape (N, 3, 32, 32) and int64 labels (N,),
        with labels indexing :data:`CIFAR10_CLASSES`.

    Raises:
        MissingDataError: Neither layout is found under ``root`` (a ``FileNotFoundError``).
        DataError: The files are not CIFAR-10.
    """
    root_path = Path(root).expanduser()
    split = _split(train)
    if limit is not None and limit < 1:
        raise OptionError(f"limit must be positive, got {limit}")
    if (root_path / "cifar-10-batches-py").is_dir():
        images, labels = _cifar_batches(root_path, train)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        return TensorDataset(images, labels)
    folders = [root_path / "cifar10-jpeg" / split, root_path / split]
    folder = next((f for f in folders if f.is_dir()), None)
    if folder is None:
        raise MissingDataError(
            f"CIFAR-10 {split} data not found (looked for {root_path / 'cifar-10-batches-py'}, "
            f"{', '.join(str(f) for f in folders)}). Pass --data-root (data_root=...) or set {DATA_ENV_VAR} to a "
            "folder containing cifar-10-batches-py/ or cifar10-jpeg/{train,test}/<class>/."
        )
    return TensorDataset(*_cifar_jpeg(folder, split, cache_dir(cache), limit, progress))
