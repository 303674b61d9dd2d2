"""Stability of a selection across runs: which units every run keeps, and how much runs agree."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["Stability", "stability"]


@dataclass
class Stability:
    """Agreement of R hard masks of one layer (e.g. R seeds of one class).

    Attributes:
        runs: number of masks R.
        total_units: units of the layer.
        frequency: per unit, the share of runs that kept it.
        always: units kept in every run.
        ever: units kept in at least one run.
        mean_jaccard: mean Jaccard index |A & B| / |A | B| over all pairs of runs
            (1.0 = identical sets; two empty sets count as identical).
        units: the number of units each run kept.
    """

    runs: int
    total_units: int
    frequency: list[float]
    always: list[int]
    ever: list[int]
    mean_jaccard: float
    units: list[int]

    @property
    def units_spread(self) -> int:
        """Largest minus smallest number of units kept."""
        return max(self.units) - min(self.units)

    @property
    def units_std(self) -> float:
        """Standard deviation of the number of units kept (0 for one run)."""
        return statistics.pstdev(self.units) if self.units else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"units_spread": self.units_spread, "units_std": self.units_std}


def _jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def stability(masks: Sequence[torch.Tensor]) -> Stability:
    """Per-unit selection frequency, always/ever-kept units and mean pairwise Jaccard of ``masks``.

    Args:
        masks: R bool masks (True = kept) of the same layer, any shape.

    Raises:
        ValueError: no masks, or masks of different sizes.
    """
    if not masks:
        raise ValueError("stability needs at least one mask")
    flat = [torch.as_tensor(m).flatten().bool().cpu() for m in masks]
    sizes = {m.numel() for m in flat}
    if len(sizes) != 1:
        raise ValueError(f"masks have different numbers of units: {sorted(sizes)}")
    stack = torch.stack(flat)
    freq = stack.float().mean(dim=0)
    pairs = [_jaccard(a, b) for a, b in itertools.combinations(flat, 2)]
    return Stability(
        runs=len(flat),
        total_units=stack.shape[1],
        frequency=[round(float(f), 6) for f in freq],
        always=torch.nonzero(stack.all(dim=0)).flatten().tolist(),
        ever=torch.nonzero(stack.any(dim=0)).flatten().tolist(),
        mean_jaccard=sum(pairs) / len(pairs) if pairs else 1.0,
        units=[int(m.sum()) for m in flat],
    )
