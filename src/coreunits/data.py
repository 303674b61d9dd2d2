"""Dataset loading for MNIST and CIFAR-10 without torchvision.

MNIST is read straight from the standard IDX files (plain or gzip-compressed).
CIFAR-10 is read either from the official python pickles (``cifar-10-batches-py``)
or from an ImageFolder-style tree of JPEG files, which is decoded once with Pillow
and cached as ``.npy`` arrays.

No path is hard-wired: callers pass a data root, or set the environment variable
``COREUNITS_DATA``. When neither is given, :func:`get_mnist` tries to download MNIST
into a per-user cache directory and, failing that, falls back to a small sample of
MNIST test digits shipped inside the package.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import pickle
import urllib.request
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import TensorDataset

from coreunits._core.errors import MissingDataError
from coreunits._core.io import atomic_write, atomic_write_bytes
from coreunits._core.progress import progress_bar

__all__ = [
    "CIFAR10_CLASSES",
    "DATA_ENV_VAR",
    "MNIST_FILES",
    "MNIST_MD5",
    "MNIST_URL",
    "MnistDownloadError",
    "cache_dir",
    "download_mnist",
    "get_mnist",
    "load_cifar10",
    "load_mnist",
    "load_mnist_sample",
    "mnist_checksum",
    "resolve_data_root",
]

#: Environment variable naming the data root when no argument is given.
DATA_ENV_VAR = "COREUNITS_DATA"

#: Base URL of the MNIST mirror (the original yann.lecun.com host is unreliable).
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"

#: IDX file names per split: (images, labels).
MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

#: Published MD5 checksums of the *uncompressed* MNIST files.
MNIST_MD5: dict[str, str] = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

_MNIST_SIZES = {"train": 60000, "test": 10000}
_IDX_IMAGES_MAGIC = 0x00000803  # uint8 data, 3 dims
_IDX_LABELS_MAGIC = 0x00000801  # uint8 data, 1 dim

#: CIFAR-10 class names in the official label order (also alphabetical, which is
#: why an ImageFolder tree sorted by folder name yields the official indices).
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
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class MnistDownloadError(RuntimeError):
    """Raised when MNIST cannot be downloaded (offline, HTTP error or bad checksum)."""


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


def _split(train: bool) -> str:
    return "train" if train else "test"


def _mnist_search_dirs(root: Path) -> list[Path]:
    # Accept the torchvision layout (root/MNIST/raw), a bare raw folder, or the
    # folder holding the files itself.
    return [root / "MNIST" / "raw", root / "raw", root]


def _find_idx_file(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _find_mnist_files(root: Path, train: bool) -> tuple[Path, Path]:
    """Locate the image and label IDX files of one split under ``root``."""
    images_name, labels_name = MNIST_FILES[_split(train)]
    searched = _mnist_search_dirs(root)
    for directory in searched:
        images = _find_idx_file(directory, images_name)
        labels = _find_idx_file(directory, labels_name)
        if images is not None and labels is not None:
            return images, labels
    looked = ", ".join(str(d) for d in searched)
    # One line, and only what both a CLI user and a Python caller can act on.
    raise MissingDataError(
        f"MNIST {_split(train)} files ({images_name}[.gz], {labels_name}[.gz]) not found "
        f"(looked in {looked}). Point --data-root (or {DATA_ENV_VAR}) at a folder that contains MNIST/raw/, "
        f"or give no data root so that coreunits downloads MNIST into its cache (needs internet access)."
    )


def _read_maybe_gz(path: Path) -> bytes:
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as f:
            return f.read()
    return path.read_bytes()


def _parse_idx(data: bytes, expected_magic: int, source: str | Path) -> np.ndarray:
    """Parse an IDX byte string into a uint8 array, validating magic and size."""
    if len(data) < 8:
        raise ValueError(f"{source}: too short to be an IDX file ({len(data)} bytes)")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise ValueError(
            f"{source}: bad IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x}"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{source}: truncated IDX header")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise ValueError(
            f"{source}: size {len(data)} bytes does not match header dims {dims} "
            f"(expected {expected} bytes)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _read_mnist_arrays(root: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Read and validate one MNIST split as uint8 arrays (N, 28, 28) and (N,)."""
    images_path, labels_path = _find_mnist_files(root, train)
    images = _parse_idx(_read_maybe_gz(images_path), _IDX_IMAGES_MAGIC, images_path)
    labels = _parse_idx(_read_maybe_gz(labels_path), _IDX_LABELS_MAGIC, labels_path)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{images_path}: expected 28x28 images, got {images.shape[1:]}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has "
            f"{labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) > 9:
        raise ValueError(f"{labels_path}: labels must be 0-9, found {int(labels.max())}")
    return images, labels


def _mnist_to_dataset(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return TensorDataset(x, y)


def load_mnist(root: str | os.PathLike[str], train: bool = True) -> TensorDataset:
    """Load one MNIST split from IDX files.

    The files (``train-images-idx3-ubyte`` etc., optionally ``.gz``) are looked up in
    ``root/MNIST/raw``, ``root/raw`` and ``root``, in that order.

    Args:
        root: Data root.
        train: Load the 60000-image training split if True, else the 10000-image
            test split.

    Returns:
        A dataset of float32 images of shape (N, 1, 28, 28) with values
        ``pixel / 255`` in [0, 1], and int64 labels of shape (N,).

    Raises:
        FileNotFoundError: If the files are not found; the message lists where it
            looked and how to fix it.
        ValueError: If a file is not a valid MNIST IDX file.
    """
    images, labels = _read_mnist_arrays(Path(root).expanduser(), train)
    return _mnist_to_dataset(images, labels)


def mnist_checksum(root: str | os.PathLike[str], train: bool = True) -> str:
    """Return a short sha256 identifying the MNIST split found under ``root``.

    The hash covers the *decompressed* image file followed by the label file, so a
    gzip-compressed copy and a plain copy of the same data hash alike.

    Args:
        root: Data root (same lookup as :func:`load_mnist`).
        train: Which split.

    Returns:
        The first 16 hex digits of the sha256.
    """
    h = hashlib.sha256()
    for path in _find_mnist_files(Path(root).expanduser(), train):
        h.update(_read_maybe_gz(path))
    return h.hexdigest()[:16]


def _download_bytes(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def download_mnist(root: str | os.PathLike[str], timeout: float = 10.0) -> Path:
    """Download MNIST into ``root/MNIST/raw`` and verify it.

    Each of the four ``.gz`` files is fetched from :data:`MNIST_URL`, decompressed,
    checked against the published MD5 of the uncompressed file and written
    atomically (temp file + ``os.replace``) as a plain IDX file. Files already
    present with the right checksum are not fetched again.

    Args:
        root: Data root; the files end up in ``root/MNIST/raw``.
        timeout: Socket timeout in seconds for each request.

    Returns:
        The ``MNIST/raw`` directory.

    Raises:
        MnistDownloadError: If a file cannot be fetched (e.g. no internet access)
            or its checksum does not match.
    """
    raw = Path(root).expanduser() / "MNIST" / "raw"
    for name, md5 in MNIST_MD5.items():
        target = raw / name
        if target.is_file() and hashlib.md5(target.read_bytes()).hexdigest() == md5:
            continue
        url = f"{MNIST_URL}{name}.gz"
        try:
            compressed = _download_bytes(url, timeout)
        except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
            raise MnistDownloadError(
                f"could not download {url}: {exc}. If this machine is offline, copy the "
                f"MNIST IDX files into <data root>/MNIST/raw and pass --data-root or set "
                f"{DATA_ENV_VAR}."
            ) from exc
        try:
            data = gzip.decompress(compressed)
        except (OSError, EOFError) as exc:
            raise MnistDownloadError(f"{url} is not a valid gzip file: {exc}") from exc
        digest = hashlib.md5(data).hexdigest()
        if digest != md5:
            raise MnistDownloadError(
                f"checksum mismatch for {url}: MD5 {digest} of the decompressed file, "
                f"expected {md5}"
            )
        atomic_write_bytes(target, data)
    return raw


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
        images = npz["images"]
        labels = npz["labels"]
    return _mnist_to_dataset(images, labels)


def _locate_mnist(
    data_root: str | os.PathLike[str] | None,
    train: bool,
    allow_download: bool,
    cache: str | os.PathLike[str] | None = None,
) -> tuple[Path | None, str]:
    """Find a root holding the MNIST split, downloading it into the cache if allowed.

    Returns:
        ``(root, "")`` on success, or ``(None, reason)`` when no root was given and
        the cache/download route failed.

    Raises:
        FileNotFoundError: If an explicit root (argument or environment variable) is
            given but holds no MNIST; a wrong path should not be silently replaced.
    """
    root = resolve_data_root(data_root)
    if root is not None:
        _find_mnist_files(root, train)  # raises with a helpful message
        return root, ""
    cached = cache_dir(cache)
    try:
        _find_mnist_files(cached, train)
        return cached, ""
    except FileNotFoundError:
        pass
    if not allow_download:
        return None, "no data root given and download disabled"
    try:
        download_mnist(cached)
    except MnistDownloadError as exc:
        return None, f"no data root given and download failed: {exc}"
    return cached, ""


def get_mnist(
    data_root: str | os.PathLike[str] | None = None,
    train: bool = True,
    allow_download: bool = True,
    allow_sample: bool = True,
) -> tuple[TensorDataset, str]:
    """Get MNIST from the best available source.

    Order: explicit ``data_root`` or ``$COREUNITS_DATA`` -> a copy in the cache
    directory (see :func:`cache_dir`), downloaded there if ``allow_download`` ->
    the embedded 2000-digit test sample if ``allow_sample``.

    Args:
        data_root: Data root, or None to use the environment variable / fallbacks.
        train: Which split to load from a real data root.
        allow_download: Try downloading into the cache directory.
        allow_sample: Fall back to :func:`load_mnist_sample`.

    Returns:
        ``(dataset, description)``, where the description is human-readable, e.g.
        ``"MNIST train (60000) from /data"``.

    Raises:
        FileNotFoundError: If an explicit root holds no MNIST, or if nothing is
            available and ``allow_sample`` is False.
    """
    root, reason = _locate_mnist(data_root, train, allow_download)
    if root is not None:
        dataset = load_mnist(root, train)
        images_path, _ = _find_mnist_files(root, train)
        return dataset, f"MNIST {_split(train)} ({len(dataset)}) from {images_path.parent}"
    if not allow_sample:
        raise MissingDataError(
            f"MNIST is not available ({reason}). Pass --data-root (data_root=...) or set "
            f"{DATA_ENV_VAR} to a folder containing MNIST/raw/."
        )
    dataset = load_mnist_sample()
    return dataset, f"embedded sample of {len(dataset)} MNIST test digits ({reason})"


# ---------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays, lists, dicts and scalars.

    The official CIFAR-10 python batches are pickles, and unpickling runs arbitrary
    code; restricting the globals makes a tampered file fail instead of executing.
    """

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with path.open("rb") as f:
        # encoding="bytes" is required for the official batches (pickled by Python 2).
        batch = _CifarUnpickler(f, encoding="bytes").load()
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.shape[0] != labels.shape[0]:
        raise ValueError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    return data, labels


def _find_cifar_pickles(root: Path) -> Path | None:
    for directory in (root / "cifar-10-batches-py", root):
        if (directory / "data_batch_1").is_file() and (directory / "test_batch").is_file():
            return directory
    return None


def _find_cifar_folder(root: Path, split: str) -> Path | None:
    for directory in (root / "cifar10-jpeg" / split, root / split):
        if directory.is_dir():
            return directory
    return None


def _list_image_folder(folder: Path, limit: int | None) -> tuple[list[Path], np.ndarray]:
    """List images of an ImageFolder tree in (class, file name) order."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if tuple(classes) != CIFAR10_CLASSES:
        raise ValueError(
            f"{folder}: expected class folders {list(CIFAR10_CLASSES)}, found {classes}"
        )
    per_class = None if limit is None else -(-limit // len(classes))  # ceil
    files: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        class_files = sorted(
            p for p in (folder / name).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES
        )
        if per_class is not None:
            class_files = class_files[:per_class]
        files.extend(class_files)
        labels.extend([index] * len(class_files))
    if limit is not None:
        files, labels = files[:limit], labels[:limit]
    return files, np.asarray(labels, dtype=np.int64)


def _file_list_checksum(folder: Path, files: Sequence[Path]) -> str:
    # Relative names and sizes identify the tree cheaply; hashing 60000 files'
    # contents would cost nearly as much as decoding them.
    h = hashlib.sha256()
    for path in files:
        h.update(f"{path.relative_to(folder).as_posix()}\t{path.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def _decode_images(files: Sequence[Path], progress: bool, desc: str) -> np.ndarray:
    from PIL import Image  # optional dependency, only needed for the JPEG layout

    out = np.empty((len(files), 3, 32, 32), dtype=np.uint8)
    iterator: Iterable[tuple[int, Path]] = progress_bar(enumerate(files), enabled=progress, total=len(files),
                                                        desc=desc, unit="img")
    for i, path in iterator:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"))
        if array.shape != (32, 32, 3):
            raise ValueError(f"{path}: expected a 32x32 RGB image, got shape {array.shape}")
        out[i] = array.transpose(2, 0, 1)
    return out


def _load_cifar_folder(
    folder: Path, split: str, cache: Path, limit: int | None, progress: bool
) -> tuple[np.ndarray, np.ndarray]:
    files, labels = _list_image_folder(folder, limit)
    if not files:
        raise MissingDataError(f"{folder}: no images found")
    checksum = _file_list_checksum(folder, files)
    stem = f"cifar10-{split}-{len(files)}-{checksum}"
    images_npy = cache / f"{stem}-images.npy"
    labels_npy = cache / f"{stem}-labels.npy"
    meta_json = cache / f"{stem}.json"
    # The JSON is written last, so its presence (with a matching checksum) means
    # both arrays were completely written.
    if meta_json.is_file():
        try:
            meta = json.loads(meta_json.read_text())
            if meta.get("checksum") == checksum:
                images = np.load(images_npy, allow_pickle=False)
                cached_labels = np.load(labels_npy, allow_pickle=False)
                if images.shape == (len(files), 3, 32, 32) and np.array_equal(
                    cached_labels, labels
                ):
                    return images, cached_labels
        except (OSError, ValueError):
            pass  # corrupt or partial cache: decode again
    images = _decode_images(files, progress, desc=f"decoding CIFAR-10 {split}")
    atomic_write(images_npy, lambda f: np.save(f, images, allow_pickle=False))
    atomic_write(labels_npy, lambda f: np.save(f, labels, allow_pickle=False))
    meta = {"checksum": checksum, "source": str(folder), "count": len(files), "split": split}
    atomic_write_bytes(meta_json, json.dumps(meta, indent=2).encode())
    return images, labels


def load_cifar10(
    root: str | os.PathLike[str],
    train: bool = True,
    cache: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> TensorDataset:
    """Load one CIFAR-10 split as uint8 images.

    Two layouts are accepted:

    * the official python batches, ``root/cifar-10-batches-py/{data_batch_1..5,
      test_batch}`` (or those files directly in ``root``);
    * an ImageFolder tree ``root/cifar10-jpeg/{train,test}/<class>/*.jpg`` or
      ``root/{train,test}/<class>/*.jpg``. The images are decoded once with Pillow
      and cached as ``.npy`` files in ``cache`` keyed by a checksum of the file
      names and sizes, so later loads take a fraction of a second.

    Args:
        root: Data root.
        train: Load the 50000-image training split if True, else the 10000-image
            test split.
        cache: Cache directory for decoded arrays; default :func:`cache_dir`.
        limit: Keep at most this many images (for quick tests). For the ImageFolder
            layout the first ``ceil(limit / 10)`` files of each class are taken, so
            the subset stays balanced; for the pickles it is the first ``limit``.
        progress: Show a tqdm progress bar while decoding JPEGs.

    Returns:
        A dataset of uint8 images of shape (N, 3, 32, 32) and int64 labels (N,),
        with labels indexing :data:`CIFAR10_CLASSES`.

    Raises:
        FileNotFoundError: If neither layout is found under ``root``.
        ValueError: If the files are malformed.
    """
    root_path = Path(root).expanduser()
    split = _split(train)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    pickles = _find_cifar_pickles(root_path)
    if pickles is not None:
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        parts = [_load_cifar_batch(pickles / name) for name in names]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
    else:
        folder = _find_cifar_folder(root_path, split)
        if folder is None:
            looked = [
                root_path / "cifar-10-batches-py",
                root_path / "cifar10-jpeg" / split,
                root_path / split,
            ]
            listing = "\n".join(f"  - {d}" for d in looked)
            raise MissingDataError(
                f"CIFAR-10 {split} data not found. Looked for:\n{listing}\n"
                f"Fix: pass --data-root (data_root=...) or set {DATA_ENV_VAR} to a folder "
                f"containing cifar-10-batches-py/ or cifar10-jpeg/{{train,test}}/<class>/."
            )
        images, labels = _load_cifar_folder(folder, split, cache_dir(cache), limit, progress)
    return TensorDataset(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels))

