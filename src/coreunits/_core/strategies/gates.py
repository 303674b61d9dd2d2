"""The method itself as a strategy: switch gates (the paper) and hard-concrete L0 gates."""

from __future__ import annotations

import time
from typing import Any

from coreunits._core.problem import SelectionProblem
from coreunits._core.strategies.base import Strategy, StrategyResult

__all__ = ["HardConcreteL0", "SwitchGates"]


class SwitchGates(Strategy):
    """The paper's switch gates; with a target, coreunits' target mode (calibrate + refine).

    Args:
        drop_order: how target mode's refinement drops units (``"least_harm"`` or
            ``"gate"``, see :func:`find_core_units`).
        **options: keyword arguments for :func:`find_core_units` (``alpha``,
            ``lam``, ``epochs``, ...); the library defaults otherwise.
    """

    name = "switch_gates"
    relaxation = "switch"

    def __init__(self, drop_order: str = "least_harm", **options: Any) -> None:
        self.drop_order = drop_order
        self.options = options

    def run(self, problem: SelectionProblem, target: float | None) -> StrategyResult:
        from coreunits._core.selection import find_core_units

        t0 = time.perf_counter()
        cache = problem.cache
        if cache.layer_names != [problem.layer]:
            raise ValueError(f"{self.name} needs a cache built for {problem.layer!r} alone, got {cache.layer_names}")
        res = find_core_units(
            cache.user_model, problem.layer, problem.target_class, cache, seed=problem.seed, progress=False,
            positives_only=problem.dprime.num_negative == 0, relaxation=self.relaxation,
            target_holding_rate=target, reading=problem.reading, drop_order=self.drop_order, **self.options,
        )
        mask = res.masks[problem.layer].flatten().bool()
        rate = res.holding_rate_strict if problem.reading == "strict" else res.holding_rate
        info: dict[str, Any] = {"settings": {k: v for k, v in res.settings.items() if k != "target"}}
        evaluations = 1
        if "target" in res.settings:
            info["target"] = res.settings["target"]
            target_info = res.settings["target"]
            evaluations = (int(target_info["evaluations"]) + len(target_info["calibration"])
                           + sum(int(p["evaluations"]) + (not p["calibrated"]) for p in target_info["pools"]))
        problem.evaluations += evaluations
        return StrategyResult(self.name, res.gates[problem.layer].flatten().float(), mask, rate,
                              time.perf_counter() - t0, evaluations, info)


class HardConcreteL0(SwitchGates):
    """Hard-concrete L0 gates (Louizos et al. 2018) in place of sigmoid + phi; same calibration and refinement."""

    name = "hard_concrete_l0"
    relaxation = "hard_concrete"
