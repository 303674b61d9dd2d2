"""The layer atlas: which units each class keeps, which classes share them, and how alike classes' core sets are.

Pure data, computed from selections (no model, no data): per layer, the class x unit matrix of how many runs
kept each unit, each class's consensus core set (units kept in at least half of its runs), how many classes
keep each unit, the class-to-class Jaccard similarity of the consensus sets, and an order of the classes by
average-linkage hierarchical clustering on ``1 - Jaccard`` (so that similar classes sit together in the heatmap).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = ["LayerAtlas", "Selection", "average_linkage_order", "build_atlas", "jaccard"]


@dataclass(frozen=True)
class Selection:
    """One selection's core units in one layer, as a report reads it.

    Attributes:
        layer: the layer's name.
        target_class: class c.
        run: 1-based run number among the class's runs of this layer (ordered by seed).
        seed: the selection's seed (its D'_c draw).
        units: kept unit indices (flat).
        total_units: units of the layer.
        unit_shape: the layer's unit layout (``(H, W)`` for input pixels, ``(K,)`` otherwise).
        gates: final gate values, flat, or None where the record has none.
        holding_rate_strict: strict holding rate on D'_c, when recorded.
        holding_rate: the paper's reading, when recorded.
        positives_only: D'_c without negatives (the paper's input-layer runs).
        source: what made it (``table1``, ``sweep``, ``compare:switch_gates``, ``find``).
        dprime_size: the size of the selection's D'_c, when recorded.
    """

    layer: str
    target_class: int
    run: int
    seed: int
    units: tuple[int, ...]
    total_units: int
    unit_shape: tuple[int, ...] = ()
    gates: tuple[float, ...] | None = None
    holding_rate_strict: float | None = None
    holding_rate: float | None = None
    positives_only: bool = False
    source: str = ""
    dprime_size: int | None = None


@dataclass
class LayerAtlas:
    """The class x unit atlas of one layer.

    Attributes:
        layer: the layer.
        total_units: units of the layer.
        unit_shape: the layer's unit layout.
        classes: the classes, in clustering order (rows of every matrix here).
        runs: runs per class, in that order.
        counts: ``counts[i][u]``: runs of ``classes[i]`` that kept unit ``u``.
        core: each class's consensus set: units kept in at least half of its runs.
        sharing: per unit, how many classes' consensus sets keep it.
        jaccard: ``jaccard[i][j]``: Jaccard similarity of the consensus sets of ``classes[i]`` and ``classes[j]``.
    """

    layer: str
    total_units: int
    unit_shape: tuple[int, ...]
    classes: list[int]
    runs: list[int]
    counts: list[list[int]]
    core: list[list[int]]
    sharing: list[int]
    jaccard: list[list[float]] = field(default_factory=list)

    def shared_units(self, min_classes: int | None = None) -> list[int]:
        """Units kept by at least ``min_classes`` classes (default: half of them, at least 2)."""
        need = max(2, (len(self.classes) + 1) // 2) if min_classes is None else min_classes
        return [u for u, n in enumerate(self.sharing) if n >= need]

    def specific_units(self) -> dict[int, list[int]]:
        """Per class, the units of its consensus set that no other class's set keeps."""
        return {c: [u for u in core if self.sharing[u] == 1] for c, core in zip(self.classes, self.core)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with the shared and class-specific units spelled out."""
        d = asdict(self)
        d["shared_units"] = self.shared_units()
        d["specific_units"] = {str(c): u for c, u in self.specific_units().items()}
        return d


def jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    """|a & b| / |a | b|; two empty sets count as identical (1.0)."""
    sa, sb = set(a), set(b)
    union = len(sa | sb)
    return 1.0 if union == 0 else len(sa & sb) / union


def average_linkage_order(distance: np.ndarray) -> list[int]:
    """Leaf order of average-linkage (UPGMA) agglomerative clustering of a symmetric distance matrix.

    The two closest clusters (mean pairwise distance; ties: lowest indices) merge until one is left; a merged
    cluster lists its older (smaller first index) part first. O(n^3) with numpy scans: fine for hundreds.
    """
    n = int(distance.shape[0])
    if n <= 2:
        return list(range(n))
    d = np.array(distance, dtype=np.float64)
    np.fill_diagonal(d, np.inf)
    members: dict[int, list[int]] = {i: [i] for i in range(n)}
    alive = np.ones(n, dtype=bool)
    while len(members) > 1:
        masked = np.where(alive[:, None] & alive[None, :], d, np.inf)
        i, j = divmod(int(np.argmin(masked)), n)
        i, j = min(i, j), max(i, j)
        ni, nj = len(members[i]), len(members[j])
        # Lance-Williams update for average linkage: the merged cluster takes i's slot.
        merged = (ni * d[i] + nj * d[j]) / (ni + nj)
        d[i, :] = merged
        d[:, i] = merged
        d[i, i] = np.inf
        alive[j] = False
        d[j, :] = np.inf
        d[:, j] = np.inf
        members[i] = members[i] + members.pop(j)
    return next(iter(members.values()))


def _consensus(counts: np.ndarray, runs: int) -> list[int]:
    return [int(u) for u in np.nonzero(2 * counts >= runs)[0]] if runs else []


def build_atlas(selections: Sequence[Selection], layer: str) -> LayerAtlas:
    """The atlas of ``layer`` from its single-layer selections (every class, every run)."""
    mine = [s for s in selections if s.layer == layer]
    if not mine:
        raise ValueError(f"no selection of layer {layer!r}")
    total = max(s.total_units for s in mine)
    shape = next((s.unit_shape for s in mine if s.unit_shape), (total,))
    classes = sorted({s.target_class for s in mine})
    counts = np.zeros((len(classes), total), dtype=np.int64)
    runs = np.zeros(len(classes), dtype=np.int64)
    for s in mine:
        i = classes.index(s.target_class)
        runs[i] += 1
        counts[i, list(s.units)] += 1
    core = [_consensus(counts[i], int(runs[i])) for i in range(len(classes))]
    sim = np.array([[jaccard(a, b) for b in core] for a in core])
    order = average_linkage_order(1.0 - sim)
    sharing = np.zeros(total, dtype=np.int64)
    for units in core:
        sharing[units] += 1
    return LayerAtlas(
        layer=layer, total_units=total, unit_shape=tuple(shape),
        classes=[classes[i] for i in order], runs=[int(runs[i]) for i in order],
        counts=[[int(v) for v in counts[i]] for i in order], core=[core[i] for i in order],
        sharing=[int(v) for v in sharing], jaccard=[[round(float(sim[i, j]), 4) for j in order] for i in order],
    )
