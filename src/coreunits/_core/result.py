"""CoreUnits: the result of a selection, as data."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from coreunits._core.io import atomic_write_text

__all__ = ["CoreUnits", "fingerprint_of", "read_record"]


def fingerprint_of(settings: Any) -> str:
    """Short hash of JSON-able settings: stored results made with other settings are redone."""
    import hashlib

    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_record(path: str | os.PathLike[str], fingerprint: str, required: str = "holding_rate") -> dict[str, Any] | None:
    """A finished JSON record of a resumable sweep, or None when missing, corrupt or made with other settings."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("fingerprint") != fingerprint or required not in record:
        return None
    return record


@dataclass
class CoreUnits:
    """Core units of one class in one or more layers.

    All per-layer dicts are keyed by layer name (``"input"`` for the input; a
    module passed as an object is keyed by its dotted name).

    Attributes:
        target_class: class c.
        units: sorted kept unit indices per layer (flat indices for multi-dim units).
        gates: final gate values ``b`` in [0, 1] per layer, shaped like the units (the mask, 1.0 or 0.0, where
            target mode tried every smaller set without optimising gates).
        masks: hard masks per layer (True = kept), shaped like the units.
        num_units: number of kept units per layer.
        total_units: number of units per layer.
        holding_rate: paper's reading on D'_c (center classifier, ``w_b`` refitted
            on the hard mask).
        holding_rate_strict: strict reading on D'_c (argmax decision unchanged).
        history: one record per epoch (loss, soft/hard unit counts, holding rate
            of the hard mask on a probe subset of D'_c, w_b).
        settings: coefficients and options used (alpha, lam, epochs, ...).
        seed: the seed.
        dprime: sizes of D'_c (positives, negatives) and any note.
        w_b: the learned center-classifier weight (None where no gates were optimised) and its refit on the
            hard mask.
        seconds: wall time of the selection.
    """

    target_class: int
    units: dict[str, list[int]]
    gates: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    num_units: dict[str, int]
    total_units: dict[str, int]
    holding_rate: float
    holding_rate_strict: float
    history: list[dict[str, float]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    dprime: dict[str, Any] = field(default_factory=dict)
    w_b: dict[str, float | None] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def layers(self) -> list[str]:
        """The gated layers, in the order given."""
        return list(self.units)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tensors as nested lists)."""
        return {
            "target_class": self.target_class,
            "layers": self.layers,
            "units": self.units,
            "num_units": self.num_units,
            "total_units": self.total_units,
            "holding_rate": self.holding_rate,
            "holding_rate_strict": self.holding_rate_strict,
            "gates": {k: v.tolist() for k, v in self.gates.items()},
            "masks": {k: v.int().tolist() for k, v in self.masks.items()},
            "history": self.history,
            "settings": self.settings,
            "seed": self.seed,
            "dprime": self.dprime,
            "w_b": self.w_b,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CoreUnits:
        """Inverse of :meth:`to_dict`."""
        return cls(
            target_class=int(d["target_class"]),
            units={k: [int(i) for i in v] for k, v in d["units"].items()},
            gates={k: torch.tensor(v, dtype=torch.float32) for k, v in d["gates"].items()},
            masks={k: torch.tensor(v).bool() for k, v in d["masks"].items()},
            num_units={k: int(v) for k, v in d["num_units"].items()},
            total_units={k: int(v) for k, v in d["total_units"].items()},
            holding_rate=float(d["holding_rate"]),
            holding_rate_strict=float(d["holding_rate_strict"]),
            history=list(d.get("history", [])),
            settings=dict(d.get("settings", {})),
            seed=int(d.get("seed", 0)),
            dprime=dict(d.get("dprime", {})),
            w_b=dict(d.get("w_b", {})),
            seconds=float(d.get("seconds", 0.0)),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the result as JSON, atomically."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CoreUnits:
        """Read a result written by :meth:`save`."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def __repr__(self) -> str:
        per = ", ".join(f"{k}: {self.num_units[k]}/{self.total_units[k]}" for k in self.units)
        return (
            f"CoreUnits(class={self.target_class}, {per}, holding_rate={self.holding_rate:.4f}, "
            f"holding_rate_strict={self.holding_rate_strict:.4f})"
        )
