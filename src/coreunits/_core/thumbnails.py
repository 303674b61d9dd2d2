"""Small pictures for reports, drawn with Pillow (no matplotlib): thumbnails, heat overlays, tiles.

Every function takes tensors and returns RGB ``uint8`` arrays or encoded image bytes; nothing is written to
disk here. Inputs are shown min-max scaled per image, so any normalisation of the data displays.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["CELL", "encode", "overlay", "tile", "to_rgb"]

#: Side of one thumbnail in pixels (small inputs are enlarged by a whole factor, large ones shrunk).
CELL = 56


def _side(h: int) -> int:
    return h * max(1, round(CELL / h)) if h <= 2 * CELL else CELL


def to_rgb(x: torch.Tensor) -> np.ndarray:
    """An input ``(C, H, W)`` or ``(H, W)`` as an ``(S, S', 3)`` uint8 image, min-max scaled, enlarged to about CELL."""
    t = x.detach().float().cpu()
    if t.dim() == 2:
        t = t[None]
    if t.shape[0] not in (1, 3):
        t = t[:1]
    lo, hi = float(t.min()), float(t.max())
    t = (t - lo) / (hi - lo) if hi > lo else torch.zeros_like(t)
    t = t.expand(3, -1, -1) if t.shape[0] == 1 else t
    t = F.interpolate(t[None], size=(_side(t.shape[1]), _side(t.shape[2])), mode="nearest")[0]
    return (t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, amap: torch.Tensor | None, vmax: float) -> np.ndarray:
    """``image`` with an activation map (any ``(h, w)``), upsampled bilinearly, blended on as heat.

    The map is scaled by ``vmax`` (one value for all thumbnails of a unit, so their strengths compare).
    """
    if amap is None or amap.dim() != 2:
        return image
    t = amap.detach().float().cpu()[None, None]
    m = F.interpolate(t, size=image.shape[:2], mode="bilinear", align_corners=False)[0, 0].numpy()
    v = np.clip(m / vmax, 0, 1) if vmax > 0 else np.zeros_like(m)
    # The input dimmed, the map on top in red (weak) to yellow (strong): visible on white strokes and dark ground.
    alpha = 0.8 * v[..., None]
    hot = np.stack([np.ones_like(v), v, np.zeros_like(v)], axis=-1)
    out = (1 - alpha) * (0.6 * image / 255.0) + alpha * hot
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def tile(rows: Sequence[Sequence[np.ndarray]], gap: int = 2, background: int = 255) -> np.ndarray:
    """Images laid out in rows (each row left to right) on one canvas."""
    h = max((im.shape[0] for row in rows for im in row), default=1)
    w = max((im.shape[1] for row in rows for im in row), default=1)
    cols = max((len(row) for row in rows), default=1)
    canvas = np.full((len(rows) * (h + gap) - gap, cols * (w + gap) - gap, 3), background, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            y, x = i * (h + gap), j * (w + gap)
            canvas[y : y + im.shape[0], x : x + im.shape[1]] = im
    return canvas


def encode(image: np.ndarray, fmt: str = "png") -> bytes:
    """The image encoded as PNG, JPEG (quality 75) or WebP (quality 70) bytes."""
    from PIL import Image

    buf = io.BytesIO()
    pil = Image.fromarray(image)
    if fmt == "jpeg":
        pil.save(buf, format="JPEG", quality=75)
    elif fmt == "webp":
        pil.save(buf, format="WEBP", quality=70, method=6)
    else:
        pil.save(buf, format="PNG", optimize=True)
    return buf.getvalue()
