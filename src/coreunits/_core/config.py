"""Every setting of a selection in one dataclass, its checks, and the defaults a reproduction records."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from coreunits._core.ablation import check_ablation
from coreunits._core.errors import OptionError
from coreunits._core.target import DROP_ORDERS

__all__ = ["DEFAULTS", "READINGS", "RELAXATIONS", "AlphaArg", "SelectionConfig"]

RELAXATIONS = ("switch", "hard_concrete")
READINGS = ("strict", "paper")

AlphaArg = float | Mapping[str, float]


@dataclass(frozen=True)
class SelectionConfig:
    """Every setting of a selection, in one place: its defaults, its checks, and what a result records.

    The coefficient defaults were chosen on MNIST (see README "Method notes").
    :func:`find_core_units` takes these as keyword arguments or as one
    ``config``; the result's ``settings`` holds them as they were used.

    Attributes:
        alpha: cost of one unit (paper's alpha divided by |D'_c|); a dict prices each layer.
        lam: weight of the relaxation penalty phi (ramped in over the second half).
        epochs: passes over D'_c (at least ``min_steps`` steps are taken).
        batch_size: mini-batch size.
        lr: Adam learning rate for the gate parameters and ``w_b``.
        temperature: temperature of the concrete gate noise.
        gate_slope: the fixed ``w > 0`` in ``b = sigmoid(w x)``.
        init_gate: initial ``b`` of every gate.
        w_b_init: initial center-classifier weight ``w_b``.
        min_steps: minimum number of optimisation steps.
        patience: steps the rounded mask must stay unchanged (second half) to stop early.
        positives_only: D'_c from positives only (the paper's input-layer setting).
        relaxation: ``"switch"`` (the paper's gates + phi) or ``"hard_concrete"`` (L0 gates).
        target_holding_rate: target mode's holding rate on D'_c (None: plain selection).
        reading: the reading the target is judged in, ``"strict"`` or ``"paper"``.
        calibration_runs: most optimisations target mode runs.
        drop_order: how target mode drops units, ``"least_harm"`` or ``"gate"``.
        ablation: what a masked unit becomes, ``"zero"``, ``"mean"`` or ``"resample"``
            (see ``_core.ablation``); None: the cache's (zero when built here).
    """

    alpha: AlphaArg = 2e-3
    lam: float = 1e-2
    epochs: int = 2
    batch_size: int = 128
    lr: float = 0.1
    temperature: float = 0.5
    gate_slope: float = 1.0
    init_gate: float = 0.95
    w_b_init: float = 1.0
    min_steps: int = 150
    patience: int = 25
    positives_only: bool = False
    relaxation: str = "switch"
    target_holding_rate: float | None = None
    reading: str = "strict"
    calibration_runs: int = 4
    drop_order: str = "least_harm"
    ablation: str | None = None

    def check(self) -> SelectionConfig:
        """Raise :class:`OptionError` (one line: the problem and the fix) for a bad setting; return self."""
        alphas = list(self.alpha.values()) if isinstance(self.alpha, Mapping) else [self.alpha]
        if self.lam < 0 or any(a < 0 for a in alphas):
            raise OptionError(f"alpha and lam must be >= 0, got alpha={self.alpha}, lam={self.lam}")
        if self.batch_size < 1 or self.epochs < 0:
            raise OptionError(f"batch_size must be >= 1 and epochs >= 0, got {self.batch_size} and {self.epochs}")
        _check_choice("relaxation", self.relaxation, RELAXATIONS)
        _check_choice("reading", self.reading, READINGS)
        _check_choice("drop_order", self.drop_order, DROP_ORDERS)
        if self.ablation is not None:
            check_ablation(self.ablation)
        t = self.target_holding_rate
        if t is not None and not 0.0 < t <= 1.0:
            raise OptionError(f"target_holding_rate must be in (0, 1], got {t}; e.g. 0.995")
        if self.calibration_runs < 1:
            raise OptionError(f"calibration_runs must be >= 1, got {self.calibration_runs}")
        return self

    def with_options(self, **options: Any) -> SelectionConfig:
        """A copy with ``options`` replaced; an unknown name is a TypeError naming the closest setting."""
        known = [f.name for f in dataclasses.fields(self)]
        for name in options:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; settings: {', '.join(known)}"
                raise TypeError(f"find_core_units() got an unexpected keyword argument {name!r}{hint}")
        return dataclasses.replace(self, **options)

    def settings(self) -> dict[str, Any]:
        """The settings a result records (alpha as a plain float or dict)."""
        out = dataclasses.asdict(self)
        out["alpha"] = dict(self.alpha) if isinstance(self.alpha, Mapping) else self.alpha
        return out


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise OptionError(f"{name} must be one of {tuple(choices)}, got {value!r}")


#: The default coefficients and schedule, as a dict (what a reproduction's fingerprint records).
DEFAULTS: dict[str, Any] = {
    k: getattr(SelectionConfig(), k)
    for k in ("alpha", "lam", "epochs", "batch_size", "lr", "temperature", "gate_slope", "init_gate", "w_b_init",
              "min_steps", "patience")
}
