"""Progress bars: one factory, quiet where nobody watches.

A tqdm bar redrawn into a log file or a CI transcript (stderr not a terminal)
leaves a carriage-return line per update and blank lines when it closes; there
the bars are disabled and the caller's own summary lines are what remains.
Notebooks (ipykernel) keep their widget bars; ``COREUNITS_PROGRESS=1`` forces
bars on, ``=0`` off.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm

__all__ = ["progress_bar", "progress_wanted"]


def progress_wanted(requested: bool = True) -> bool:
    """Whether a bar asked for with ``progress=requested`` is shown here."""
    forced = os.environ.get("COREUNITS_PROGRESS", "").strip()
    if forced in ("0", "1"):
        return requested and forced == "1"
    if not requested:
        return False
    if "ipykernel" in sys.modules:
        return True
    stream = sys.stderr
    return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())


def progress_bar(iterable: Any = None, *, enabled: bool = True, **kwargs: Any) -> tqdm[Any]:
    """A tqdm bar over ``iterable`` (or a manual one with ``total=``), disabled unless :func:`progress_wanted`."""
    return tqdm(iterable, disable=not progress_wanted(enabled), **kwargs)
