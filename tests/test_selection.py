"""find_core_units on planted-truth models: the method must recover known units."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_untouched, snapshot
from planted import PlantedNet
from torch import nn

from coreunits import (
    ActivationCache,
    CoreUnits,
    OptionError,
    find_core_units,
    find_core_units_batched,
    holding_rate,
    mask_units,
)
from coreunits._core.selection import BATCH_SELECTIONS, BATCH_SELECTIONS_GPU, batch_selections


def test_planted_truth_recovered(planted) -> None:
    model, x = planted
    result = find_core_units(model, "feat", 0, x, seed=0, progress=False)
    kept = set(result.units["feat"])
    assert set(PlantedNet.TRUE_UNITS) <= kept and len(kept - set(PlantedNet.TRUE_UNITS)) <= 1, kept
    assert result.holding_rate_strict >= 0.99
    assert result.holding_rate >= 0.99
    assert result.total_units == {"feat": 8}
    assert result.masks["feat"].dtype == torch.bool and result.gates["feat"].shape == (8,)


def test_planted_truth_needs_the_data_term(planted) -> None:
    # Without the squared-error term's pull (huge alpha), nothing survives and
    # the holding rate collapses: the test above is not passing by accident.
    model, x = planted
    result = find_core_units(model, "feat", 0, x, alpha=1.0, seed=0, progress=False)
    assert result.num_units["feat"] == 0
    assert result.holding_rate_strict < 0.7


def test_same_seed_same_units_and_other_seeds_run(planted) -> None:
    model, x = planted
    a = find_core_units(model, "feat", 0, x, seed=3, progress=False)
    b = find_core_units(model, "feat", 0, x, seed=3, progress=False)
    assert a.units == b.units
    assert torch.equal(a.gates["feat"], b.gates["feat"])


def test_all_on_holds_exactly_and_all_off_holds_less(planted) -> None:
    model, x = planted
    on = {"feat": torch.ones(8, dtype=torch.bool)}
    off = {"feat": torch.zeros(8, dtype=torch.bool)}
    assert holding_rate(model, on, 0, x) == 1.0
    assert holding_rate(model, on, 0, x, reading="paper") == 1.0
    assert holding_rate(model, off, 0, x) < 0.7


def test_reported_holding_rate_matches_hard_mask(planted) -> None:
    model, x = planted
    r = find_core_units(model, "feat", 0, x, seed=1, progress=False)
    again = holding_rate(model, r.masks, 0, x, build_dprime_first=True, seed=1)
    assert again == pytest.approx(r.holding_rate_strict, abs=0)


def test_mask_units_context_applies_and_removes(planted) -> None:
    model, x = planted
    base = model(x)
    mask = torch.zeros(8, dtype=torch.bool)
    mask[[1, 4]] = True
    with mask_units(model, {"feat": mask}):
        masked = model(x)
        with torch.no_grad():
            f = model.relu(model.feat(x)) * mask.float().view(1, 8, 1, 1)
            expected = model.head(model.flatten(model.pool(f)))
    assert torch.allclose(masked, expected)
    assert torch.equal(model(x), base)
    assert not model.feat._forward_hooks


def test_strict_holding_counts_argmax_flips(planted) -> None:
    model, x = planted
    keep_one = torch.zeros(8, dtype=torch.bool)
    keep_one[1] = True
    with torch.no_grad():
        orig = model(x).argmax(1) == 0
        with mask_units(model, {"feat": keep_one}):
            new = model(x).argmax(1) == 0
    expected = float((orig == new).float().mean())
    assert holding_rate(model, {"feat": keep_one}, 0, x) == pytest.approx(expected)


class TwoStage(nn.Module):
    """Planted net with a second gated layer (a linear layer of 6 neurons)."""

    def __init__(self, planted: PlantedNet) -> None:
        super().__init__()
        self.body = planted
        self.mid = nn.Linear(3, 6)
        self.out = nn.Linear(6, 3)
        with torch.no_grad():
            self.mid.weight.zero_()
            self.mid.bias.zero_()
            self.mid.weight[2, 0] = 1.0  # neuron 2 carries class 0's score
            self.mid.weight[5, 1] = 1.0  # neuron 5 carries class 1's score
            self.out.weight.zero_()
            self.out.bias.zero_()
            self.out.weight[0, 2] = 1.0
            self.out.weight[1, 5] = 1.0
            self.out.bias[2] = -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.mid(self.body(x)))


def test_simultaneous_selection_in_two_layers(planted) -> None:
    body, x = planted
    model = TwoStage(body).eval()
    r = find_core_units(model, ["body.feat", model.mid], 0, x, seed=0, progress=False)
    assert r.layers == ["body.feat", "mid"]
    assert set(PlantedNet.TRUE_UNITS) <= set(r.units["body.feat"])
    assert 2 in r.units["mid"]
    assert r.total_units == {"body.feat": 8, "mid": 6}
    assert r.holding_rate_strict >= 0.99


def test_input_layer_gives_a_map_of_the_input_shape(planted) -> None:
    model, x = planted
    r = find_core_units(model, "input", 0, x, seed=0, positives_only=True, progress=False)
    assert r.gates["input"].shape == (8, 8)
    assert r.masks["input"].shape == (8, 8)
    assert r.total_units["input"] == 64
    assert all(0 <= u < 64 for u in r.units["input"])
    assert r.dprime["negatives"] == 0
    assert r.holding_rate_strict == pytest.approx(
        holding_rate(model, r.masks, 0, x, build_dprime_first=True, positives_only=True, seed=0)
    )


def test_fx_and_hook_engines_select_the_same_units(planted) -> None:
    model, x = planted
    fast = find_core_units(model, "feat", 0, x, seed=2, progress=False, engine="fx")
    naive = find_core_units(model, "feat", 0, x, seed=2, progress=False, engine="hooks")
    assert fast.settings["engine"] == "fx" and naive.settings["engine"] == "hooks"
    assert fast.units == naive.units
    assert torch.allclose(fast.gates["feat"], naive.gates["feat"], atol=1e-4)


def test_cache_reused_across_classes_and_budget_fallback(planted) -> None:
    model, x = planted
    cache = ActivationCache(model, "feat", x)
    assert cache.cached and cache.frontier_bytes() == 1200 * 8 * 8 * 8 * 4
    r0 = find_core_units(model, "feat", 0, cache, seed=0, progress=False)
    small = ActivationCache(model, "feat", x, cache_budget=1000)
    assert not small.cached
    r1 = find_core_units(model, "feat", 0, small, seed=0, progress=False)
    assert r0.units == r1.units


def test_result_round_trips_through_json(planted, tmp_path) -> None:
    model, x = planted
    r = find_core_units(model, "feat", 0, x, seed=0, progress=False)
    path = tmp_path / "r.json"
    r.save(path)
    back = CoreUnits.load(path)
    assert back.units == r.units and back.num_units == r.num_units
    assert torch.allclose(back.gates["feat"], r.gates["feat"])
    assert torch.equal(back.masks["feat"], r.masks["feat"])
    assert back.holding_rate == r.holding_rate and back.settings == r.settings
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left


@pytest.mark.parametrize(("layers", "options"), [
    (["feat"], {}),
    # Two gated layers, a price per layer and L0 gates: the stacked rows hold every layer's gates.
    (["feat", "pool"], {"relaxation": "hard_concrete", "alpha": {"feat": 2e-3, "pool": 4e-3}}),
])
def test_batched_selections_equal_one_at_a_time(planted, layers, options) -> None:
    model, x = planted
    snap = snapshot(model)
    cache = ActivationCache(model, layers, x)
    jobs = [(0, 0), (1, 0), (0, 1), (1, 3)]  # classes twice, with two seeds: each set keeps its own D'_c and noise
    together = find_core_units_batched(model, layers, jobs, cache, progress=False, epochs=3, **options)
    assert [(r.target_class, r.seed) for r in together] == jobs
    for (c, seed), r in zip(jobs, together):
        alone = find_core_units(model, layers, c, cache, seed=seed, progress=False, epochs=3, **options)
        assert r.units == alone.units and r.settings["steps_run"] == alone.settings["steps_run"]
        for name in layers:
            torch.testing.assert_close(r.gates[name], alone.gates[name], rtol=1e-4, atol=1e-5)
        assert r.holding_rate_strict == alone.holding_rate_strict and r.settings["batched"] == len(jobs)
        assert [h["hard_units"] for h in r.history] == [h["hard_units"] for h in alone.history]
        assert r.w_b["learned"] == pytest.approx(alone.w_b["learned"], rel=1e-4)
    assert_untouched(model, snap)
    with pytest.raises(OptionError, match="target mode"):
        find_core_units_batched(model, "feat", jobs, cache, progress=False, target_holding_rate=0.99)
    with pytest.raises(OptionError, match="no selections"):
        find_core_units_batched(model, "feat", [], cache, progress=False)


def test_batch_selections_by_device() -> None:
    # A GPU step is launches, so it stacks more selections; a CPU step is arithmetic.
    assert batch_selections("cpu") == BATCH_SELECTIONS < batch_selections("cuda") == BATCH_SELECTIONS_GPU
    assert batch_selections(torch.device("cuda", 0)) == BATCH_SELECTIONS_GPU
