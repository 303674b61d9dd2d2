"""Files and devices: the one atomic writer, and where a model lives.

Every file coreunits writes (results, resumable sweep records, checkpoints,
decoded data sets, figures) goes through :func:`atomic_write`: the content is
written to a temp file in the same folder, flushed to disk, then renamed over
the target (``os.replace``, atomic on POSIX and Windows). A crash or Ctrl-C
mid-write leaves the previous file, never a partial one, which is what lets
the long sweeps resume from their stored records.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "file_digest", "model_device", "save_figure"]

PathArg = str | os.PathLike[str]


def atomic_write(path: PathArg, write: Callable[[BinaryIO], object]) -> None:
    """Create ``path`` through ``write(file)`` so that readers never see a partial file.

    The parent folder is created; on any error the temp file is removed and the
    old ``path`` (if any) is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600 files; give the result the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: PathArg, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: PathArg, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def file_digest(path: PathArg) -> str:
    """The first 16 hex digits of a file's sha256: how records name the checkpoint or weights they came from."""
    import hashlib

    return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()[:16]


def save_figure(fig: Any, path: PathArg, **savefig_kwargs: Any) -> None:
    """Save a matplotlib figure to ``path`` atomically (rendered in memory, then written)."""
    fmt = savefig_kwargs.pop("format", None) or Path(path).suffix.lstrip(".") or "png"
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, **savefig_kwargs)
    atomic_write_bytes(path, buf.getvalue())


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")
