"""Target mode, refinement, hard-concrete gates and stability, on planted-truth models."""

from __future__ import annotations

import pytest
import torch
from planted import PlantedNet, planted_data

from coreunits import ActivationCache, SelectionProblem, find_core_units
from coreunits._core.stability import stability
from coreunits._core.target import (
    ADD_BACK_SLACK,
    DROP_RETRIES,
    LOOSER_POOLS,
    PROBE_ROWS,
    SEED_POOLS,
    Judge,
    _toggle_by_holding,
    eliminate_from_pool,
    elimination_steps,
    prefer_add_back,
    probe_score,
    refine_mask,
)


def _judge_needs(required: set[int], extra_bonus: dict[int, float] | None = None):
    """A judge whose holding rate is 1.0 exactly when every required unit is kept."""
    bonus = extra_bonus or {}

    def judge(mask: torch.Tensor) -> float:
        kept = set(torch.nonzero(mask).flatten().tolist())
        base = 1.0 if required <= kept else 0.5 + 0.1 * len(required & kept)
        return min(1.0, base + sum(bonus.get(j, 0.0) for j in kept))

    return judge


def test_refine_drops_every_unit_the_target_does_not_need() -> None:
    mask = torch.ones(6, dtype=torch.bool)
    gates = torch.tensor([0.9, 0.6, 0.8, 0.99, 0.7, 0.95])
    out = refine_mask(_judge_needs({0, 3}), mask, gates, target=0.99)
    assert torch.nonzero(out.mask).flatten().tolist() == [0, 3]
    assert out.holding_rate == 1.0 and out.units_before == 6
    # Dropped lowest gate first.
    assert out.dropped == [1, 4, 2, 5]


def test_refine_adds_back_the_most_useful_unit_when_the_target_is_missed() -> None:
    mask = torch.tensor([True, False, False, False])
    out = refine_mask(_judge_needs({0, 2}), mask, torch.tensor([0.9, 0.1, 0.2, 0.3]), target=0.99)
    assert out.added == [2]
    assert torch.nonzero(out.mask).flatten().tolist() == [0, 2]
    assert out.holding_rate >= 0.99


def test_refine_reports_failure_when_no_mask_reaches_the_target() -> None:
    out = refine_mask(lambda m: 0.5, torch.zeros(3, dtype=torch.bool), torch.zeros(3), target=0.9)
    assert out.holding_rate < 0.9 and bool(out.mask.all())


def test_refine_uses_a_known_rate_instead_of_measuring_it() -> None:
    calls: list[int] = []

    def holding(mask: torch.Tensor) -> float:
        calls.append(int(mask.sum()))
        return _judge_needs({0})(mask)

    out = refine_mask(holding, torch.tensor([True, True]), torch.tensor([0.9, 0.2]), target=0.99, rate=1.0)
    assert out.holding_before == 1.0 and out.units_before == 2
    # The given mask (2 units) is never measured: only the drops (unit 1 goes, then unit 0 cannot),
    # then the one smaller set (none kept), since so few can be tried.
    assert calls == [1, 0, 0] and out.evaluations == 3
    assert torch.nonzero(out.mask).flatten().tolist() == [0] and out.smallest


def test_a_smallest_set_outside_the_calibrated_one_is_found_where_every_smaller_set_can_be_tried() -> None:
    holding = _substitute_judge().holding
    out = refine_mask(holding, torch.tensor([True, True, False, False]), torch.tensor([0.9, 0.8, 0.1, 0.0]),
                      target=0.99, rate=1.0)
    # No single drop from {0, 1} holds; trying every smaller set (1 + 4 of them) finds {2}.
    assert torch.nonzero(out.mask).flatten().tolist() == [2] and out.smallest
    assert out.to_dict()["smallest"] and sorted(out.dropped) == [0, 1] and out.added == [2]
    # With many units the smaller sets are too many to try: drops alone, and not called smallest.
    many = torch.zeros(200, dtype=torch.bool)
    many[:2] = True
    out = refine_mask(holding, many, torch.linspace(1, 0, 200), target=0.99, rate=1.0)
    assert torch.nonzero(out.mask).flatten().tolist() == [0, 1] and not out.smallest


def test_add_back_ranks_on_the_probe_and_measures_on_all_of_dprime() -> None:
    full_calls: list[int] = []

    def holding(mask: torch.Tensor) -> float:
        full_calls.append(int(mask.sum()))
        return _judge_needs({0, 3})(mask)

    # The probe prefers unit 3 (its score is all the probe sees); one full measurement per added unit.
    judge = Judge(holding, probe=lambda m: (_judge_needs({0, 3})(m), 0.01 * float(m[3])))
    out = refine_mask(judge, torch.tensor([True, False, False, False]), torch.tensor([0.9, 0.5, 0.4, 0.1]),
                      target=0.99)
    assert out.added == [3]
    assert torch.nonzero(out.mask).flatten().tolist() == [0, 3]
    assert out.probe_evaluations == 3 + 2  # the add-back round, then the drop round over {0, 3}
    assert full_calls[:2] == [1, 2]  # the calibrated mask, then the mask with unit 3 added


def test_add_back_that_never_reaches_reports_the_exact_rate() -> None:
    # The early-exit test only bounds a missing rate (here 0.6); the result must carry the real one.
    judge = Judge(lambda m: 0.5, lambda m, t: (False, 0.6), lambda m: (0.5, 0.0))
    out = refine_mask(judge, torch.zeros(3, dtype=torch.bool), torch.zeros(3), target=0.9)
    assert bool(out.mask.all()) and out.holding_rate == 0.5


def test_least_harm_stops_when_the_probes_best_candidates_fail() -> None:
    # Six kept units; any drop fails on all of D'_c although the probe likes the last one least.
    tried: list[int] = []

    def reaches(mask: torch.Tensor, target: float) -> tuple[bool, float]:
        tried.append(int(torch.nonzero(~mask).flatten()[0]))
        return False, 0.5

    def probe(m: torch.Tensor) -> tuple[float, float]:
        return 1.0, float(torch.nonzero(~m).flatten()[0])  # dropping unit j scores j

    judge = Judge(lambda m: 1.0, reaches, probe)
    out = refine_mask(judge, torch.ones(6, dtype=torch.bool), torch.zeros(6), target=0.99)
    assert tried[: 1 + DROP_RETRIES] == [5, 4, 3, 2][: 1 + DROP_RETRIES]
    # Then every smaller set of the 6 units (63 of them) is tried, and none holds.
    assert len(tried) == 1 + DROP_RETRIES + 63 and out.smallest
    assert out.dropped == [] and bool(out.mask.all())


def test_exact_elimination_from_a_looser_pool_reaches_a_small_set_the_calibrated_one_lacks() -> None:
    # 20 units; holds with {15, 16} or with {0, 1, 2}. From {0, 1, 2, 3} (a calibrated set without 15 and
    # 16) no drop or swap reaches two units, and the 211 smaller sets are too many to try; from all 20,
    # exact elimination drops unit 0 first (ties: lowest index) and ends at {15, 16}.
    def holding(mask: torch.Tensor) -> float:
        kept = set(torch.nonzero(mask).flatten().tolist())
        return 1.0 if {15, 16} <= kept or {0, 1, 2} <= kept else 0.5

    judge = Judge(holding)
    judge.toggle = judge.toggle_probe = _toggle_by_holding(judge)
    calibrated = refine_mask(judge, torch.arange(20) < 4, torch.zeros(20), target=0.99, rate=1.0)
    assert torch.nonzero(calibrated.mask).flatten().tolist() == [0, 1, 2] and calibrated.exact_finish
    pooled = eliminate_from_pool(judge, torch.ones(20, dtype=torch.bool), 1.0, target=0.99)
    assert torch.nonzero(pooled.mask).flatten().tolist() == [15, 16]
    assert pooled.units_before == 20 and pooled.exact_finish and pooled.dropped[0] == 0 and pooled.evaluations > 0


def test_elimination_steps_count_every_kept_units_removal_at_every_step() -> None:
    # 64 units down to 9: exact greedy scores 64 + 63 + ... + 10 candidates.
    assert elimination_steps(64, 9) == sum(range(10, 65)) == 2035
    assert elimination_steps(24, 9) == 255 and elimination_steps(9, 9) == 0 == elimination_steps(5, 9)


def test_prefer_add_back_weighs_the_miss_and_its_cost() -> None:
    rows = 188 * 128  # one max1 optimisation: 188 steps of 128 inputs
    close = 0.995 - 0.5 * ADD_BACK_SLACK * 0.005
    far = 0.995 - 2 * ADD_BACK_SLACK * 0.005
    assert prefer_add_back(close, 0.995, 9, 32, rows)
    assert not prefer_add_back(far, 0.995, 9, 32, rows)
    # An input layer of 784 pixels: one add-back round ranks 700+ masks, dearer than an optimisation.
    assert not prefer_add_back(close, 0.995, 50, 784, rows)
    assert prefer_add_back(close, 0.995, 50, 784, rows * 10, probe_rows=PROBE_ROWS // 4)


def _substitute_judge() -> Judge:
    """Unit 2 alone keeps every decision, and so do units 0 and 1 together; the probe knows 2 matters most."""

    def holding(mask: torch.Tensor) -> float:
        kept = set(torch.nonzero(mask).flatten().tolist())
        return 1.0 if 2 in kept or {0, 1} <= kept else 0.5

    return Judge(holding, probe=lambda m: (holding(m), 0.1 * float(m[2])))


def test_least_harm_drops_find_a_smaller_set_than_gate_order() -> None:
    # Unit 2 has the lowest gate, so gate order drops it first and is left with {0, 1};
    # least harm keeps it (its removal scores worst on the probe) and ends with {2}. Gate order
    # on 200 units: too many smaller sets to try them all, which would find {2} whatever it dropped.
    padded = refine_mask(_substitute_judge(), torch.ones(200, dtype=torch.bool),
                         torch.cat([torch.tensor([0.9, 0.8, 0.1]), torch.full((197,), 0.5)]), target=0.99,
                         drop_order="gate")
    assert torch.nonzero(padded.mask).flatten().tolist() == [0, 1] and not padded.smallest
    gates = torch.tensor([0.9, 0.8, 0.1, 0.5])
    mask = torch.ones(4, dtype=torch.bool)
    least = refine_mask(_substitute_judge(), mask, gates, target=0.99)
    assert torch.nonzero(least.mask).flatten().tolist() == [2]
    assert least.dropped == [3, 1, 0] and least.holding_rate == 1.0
    # Lazy re-scoring: all 4 in the first round; then only units whose earlier score could still be best.
    assert least.probe_evaluations == 4 + 2 + 1 + 1
    assert least.to_dict()["drop_order"] == "least_harm"
    with pytest.raises(ValueError, match="drop_order"):
        refine_mask(_substitute_judge(), mask, gates, target=0.99, drop_order="random")


def test_lazy_rescoring_drops_what_full_rescoring_drops_with_fewer_probe_evaluations() -> None:
    # Additive unit weights: the probe score of a mask is its kept weight, so dropping a unit
    # from a smaller mask scores lower (the bound lazy re-scoring relies on holds), and the
    # target holds while the kept weight is at least 10. Full re-scoring drops the lightest
    # unit first each round, weighing 8 + 7 + ... + 2 = 35 masks on the probe.
    weights = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0, 6.0, 0.5, 7.0])
    scored: list[int] = []

    def probe(m: torch.Tensor) -> tuple[float, float]:
        scored.append(int(m.sum()))
        return float((weights * m).sum()), 0.0

    def holding(m: torch.Tensor) -> float:
        return 1.0 if float((weights * m).sum()) >= 10.0 else 0.5

    out = refine_mask(Judge(holding, probe=probe), torch.ones(8, dtype=torch.bool), torch.zeros(8), target=0.99)
    assert out.dropped == [6, 1, 3, 4, 2, 0]  # lightest first; then 6 + 7 = 13 and either drop leaves < 10
    assert torch.nonzero(out.mask).flatten().tolist() == [5, 7]
    assert out.probe_evaluations == len(scored) < 35
    assert scored[:8] == [7] * 8  # the first round scores every unit


def test_probe_score_counts_kept_decisions_and_orders_by_margin() -> None:
    original = torch.tensor([True, True, False])
    # Class 0: rows 0 and 1 were predicted 0, row 2 was not.
    kept_all = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    one_flipped = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    narrower = torch.tensor([[0.5, 0.0], [0.2, 0.0], [0.0, 0.1]])
    assert probe_score(kept_all, original, 0)[0] == 1.0
    assert probe_score(one_flipped, original, 0)[0] == pytest.approx(2 / 3)
    assert probe_score(narrower, original, 0)[0] == 1.0
    assert probe_score(narrower, original, 0)[1] < probe_score(kept_all, original, 0)[1]


def test_target_mode_recovers_planted_units_and_reports_before_after(planted) -> None:
    model, x = planted
    r = find_core_units(model, "feat", 0, x, progress=False, target_holding_rate=0.99)
    assert r.units["feat"] == PlantedNet.TRUE_UNITS
    t = r.settings["target"]
    assert t["reached"] and t["units_after"] == 2 and t["holding_rate_after"] >= 0.99
    assert r.holding_rate_strict == pytest.approx(t["holding_rate_after"])
    assert {"units_before", "holding_rate_before", "calibration", "evaluations", "probe_evaluations"} <= set(t)
    assert t["drop_order"] == "least_harm"
    assert t["pools"] == []  # feat feeds a ReLU: no batched toggle path, so no exact elimination from pools
    by_gate = find_core_units(model, "feat", 0, x, progress=False, target_holding_rate=0.99, drop_order="gate")
    assert by_gate.units["feat"] == PlantedNet.TRUE_UNITS
    assert by_gate.settings["target"]["drop_order"] == "gate"
    with pytest.raises(ValueError, match="drop_order"):
        find_core_units(model, "feat", 0, x, progress=False, target_holding_rate=0.99, drop_order="best")


def test_target_mode_also_eliminates_from_looser_selections_where_the_layer_feeds_a_linear(planted) -> None:
    model, x = planted
    r = find_core_units(model, "pool", 0, x, progress=False, target_holding_rate=0.99)
    assert r.units["pool"] == PlantedNet.TRUE_UNITS
    t = r.settings["target"]
    # Exact elimination from the calibrated mask (it reached the target), then from two looser selections
    # (alpha / 3, then / 9); the result is the smallest, so no pool ended smaller. A looser pool ran, so no
    # other seed's selection is spent.
    pools = t["pools"]
    assert len(pools) == 1 + LOOSER_POOLS and pools[0]["calibrated"] and pools[0]["alpha"] == t["calibration"][-1]["alpha"]
    assert pools[1]["alpha"] == pytest.approx(pools[0]["alpha"] / 3) == pytest.approx(pools[2]["alpha"] * 3)
    assert [p["seed"] for p in pools] == [0, 0, 0]
    assert all(p["units_after"] is None or p["units_after"] >= t["units_after"] for p in pools)
    assert all(p["units_after"] is not None and p["units"] >= p["units_after"] for p in pools if p["reached"])


def test_target_mode_joins_another_seeds_selection_where_no_looser_pool_ran(planted, monkeypatch) -> None:
    from coreunits._core import selection

    model, x = planted
    monkeypatch.setattr(selection, "LOOSER_POOLS", 0)  # as where every looser selection is too large to eliminate from
    r = find_core_units(model, "pool", 0, x, progress=False, target_holding_rate=0.99, seed=3)
    assert r.units["pool"] == PlantedNet.TRUE_UNITS and r.seed == 3
    t = r.settings["target"]
    pools = t["pools"]
    # The calibrated mask, then the smallest set so far joined with seed 4's selection at the calibrated alpha.
    assert len(pools) == 1 + SEED_POOLS and pools[0]["calibrated"] and [p["seed"] for p in pools] == [3, 4]
    assert pools[1]["alpha"] == pools[0]["alpha"] and not pools[1]["calibrated"]
    assert pools[1]["units"] >= t["units_after"]  # the union holds the smallest set found before it
    assert pools[1]["reached"] and pools[1]["units_after"] is not None and pools[1]["units_after"] >= t["units_after"]


def test_target_mode_tries_every_smaller_set_where_the_layer_has_few_units(capsys) -> None:
    import itertools

    from coreunits import holding_rate
    from coreunits._core.result import CoreUnits
    from coreunits.cli import _print_found

    model = PlantedNet(channels=6)
    x = planted_data(model)
    r = find_core_units(model, "feat", 0, x, progress=False, target_holding_rate=0.99)
    assert r.units["feat"] == PlantedNet.TRUE_UNITS
    t = r.settings["target"]
    # No gates optimised: the empty set, exact greedy from all 6 units, then the 6 sets of one unit.
    assert t["calibration"] == [] and t["drop_order"] == "exhaustive" and t["smallest"] and t["reached"]
    assert r.history == [] and r.w_b["learned"] is None
    assert r.gates["feat"].tolist() == r.masks["feat"].float().tolist()
    assert r.holding_rate_strict == pytest.approx(t["holding_rate_after"]) and r.holding_rate_strict >= 0.99
    # No set of fewer units reaches the target (checked through the public holding rate).
    for units in itertools.chain.from_iterable(itertools.combinations(range(6), k) for k in range(2)):
        mask = torch.zeros(6, dtype=torch.bool)
        mask[list(units)] = True
        assert holding_rate(model, {"feat": mask}, 0, x, build_dprime_first=True) < 0.99
    assert CoreUnits.from_dict(r.to_dict()).w_b["learned"] is None
    _print_found(r, "planted")
    assert "exact greedy elimination from all 6 units, and no smaller set reaches it: 2 after" in capsys.readouterr().out
    # Eight units (255 smaller sets) are too many: the gates are optimised, as before.
    wide = PlantedNet(channels=8)
    r8 = find_core_units(wide, "feat", 0, planted_data(wide), progress=False, target_holding_rate=0.99)
    assert len(r8.settings["target"]["calibration"]) >= 1 and r8.settings["target"]["drop_order"] == "least_harm"


def test_target_mode_lowers_alpha_when_the_first_try_misses(planted) -> None:
    model, x = planted
    # alpha this large switches every unit off: the first run must miss the target.
    r = find_core_units(model, "feat", 0, x, progress=False, alpha=5.0, target_holding_rate=0.99,
                        calibration_runs=6)
    cal = r.settings["target"]["calibration"]
    assert cal[0]["holding_rate"] < 0.99
    assert len(cal) >= 2 and cal[1]["alpha"] < cal[0]["alpha"]
    assert r.settings["target"]["reached"]
    assert set(PlantedNet.TRUE_UNITS) <= set(r.units["feat"])


def test_target_mode_adds_back_instead_of_optimising_again(planted) -> None:
    model, x = planted
    # One optimisation only: alpha switches every unit off, and add-back must find the planted units.
    r = find_core_units(model, "feat", 0, x, progress=False, alpha=5.0, target_holding_rate=0.99,
                        calibration_runs=1)
    t = r.settings["target"]
    assert len(t["calibration"]) == 1 and t["units_before"] == 0
    assert set(t["added"]) >= set(PlantedNet.TRUE_UNITS)
    assert t["reached"] and r.units["feat"] == PlantedNet.TRUE_UNITS


def test_target_mode_paper_reading_and_bad_targets(planted) -> None:
    model, x = planted
    cache = ActivationCache(model, "feat", x)
    r = find_core_units(model, "feat", 0, cache, progress=False, target_holding_rate=0.95, reading="paper")
    assert r.settings["target"]["reading"] == "paper"
    assert r.holding_rate >= 0.95
    # "pool" feeds the Linear head (through Flatten): the paper reading ends with exact elimination there, as
    # the strict reading does (without swap moves).
    pooled = ActivationCache(model, "pool", x)
    assert SelectionProblem(pooled, "pool", 0, reading="paper").batched_toggles, "no batched path: proves nothing"
    r = find_core_units(model, "pool", 0, pooled, progress=False, target_holding_rate=0.95, reading="paper")
    assert r.settings["target"]["exact_finish"] and r.holding_rate >= 0.95
    with pytest.raises(ValueError, match="target_holding_rate"):
        find_core_units(model, "feat", 0, cache, progress=False, target_holding_rate=1.5)
    with pytest.raises(ValueError, match="reading"):
        find_core_units(model, "feat", 0, cache, progress=False, target_holding_rate=0.9, reading="loose")


def test_hard_concrete_relaxation_recovers_planted_units(planted) -> None:
    model, x = planted
    r = find_core_units(model, "feat", 0, x, progress=False, relaxation="hard_concrete")
    assert r.units["feat"] == PlantedNet.TRUE_UNITS
    assert r.settings["relaxation"] == "hard_concrete" and r.settings["lam"] == 0.0
    with pytest.raises(ValueError, match="relaxation"):
        find_core_units(model, "feat", 0, x, progress=False, relaxation="gumbel")


def test_target_mode_with_two_layers(planted) -> None:
    model, x = planted
    r = find_core_units(model, ["feat", "head"], 0, x, progress=False, target_holding_rate=0.99)
    assert r.settings["target"]["reached"]
    assert set(PlantedNet.TRUE_UNITS) <= set(r.units["feat"])
    assert 0 in r.units["head"]  # class 0's own score must stay on


def test_stability_counts_agreement_exactly() -> None:
    masks = [torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 1, 0]), torch.tensor([1, 1, 0, 0])]
    s = stability([m.bool() for m in masks])
    assert s.runs == 3 and s.total_units == 4
    assert s.frequency == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    assert s.always == [0] and s.ever == [0, 1, 2]
    # Pairs: (A,B) 1/3, (A,C) 1, (B,C) 1/3.
    assert s.mean_jaccard == pytest.approx((1 / 3 + 1 + 1 / 3) / 3)
    assert s.units == [2, 2, 2] and s.units_spread == 0
    with pytest.raises(ValueError):
        stability([])
    with pytest.raises(ValueError, match="different numbers"):
        stability([torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool)])
