"""What a report shows, computed: per class and layer the core set's unit views; the atlases; notes.

Formatting (:mod:`coreunits._core.html_format`) only reads these; :mod:`coreunits.html_report` fills them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from coreunits._core.atlas import LayerAtlas, Selection
from coreunits._core.selections import ResultsSource

__all__ = ["ClassView", "ReportData", "UnitView"]


@dataclass
class UnitView:
    """One core unit of one class: what it responds to and how much the class's decision needs it."""

    unit: int
    gate: float | None
    drop_strict: float | None
    drop_paper: float | None
    classes_keeping: int
    top_dprime: list[int]
    top_class: list[int]
    image: bytes | None = None


@dataclass
class ClassView:
    """The core set of one class in one layer (its first run) and its units' views."""

    layer: str
    target_class: int
    selection: Selection
    units: list[UnitView]
    strict: float | None = None
    paper: float | None = None
    judged_rows: int | None = None
    dprime_size: int | None = None
    pixel_map: bytes | None = None


@dataclass
class ReportData:
    """Everything the page shows, computed; formatting only reads it."""

    source: ResultsSource
    atlases: dict[str, LayerAtlas]
    classes: dict[tuple[str, int], ClassView]
    class_names: dict[int, str]
    top_k: int
    probe_rows: int | None
    notes: list[str] = field(default_factory=list)
    image_format: str = "png"
