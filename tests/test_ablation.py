"""Ablations: a masked unit becomes zero, its mean over the data, or its value on another input."""

from __future__ import annotations

import pytest
import torch
from planted import PlantedNet, planted_data
from torch import nn

from coreunits import ActivationCache, OptionError, SelectionProblem, find_core_units, holding_rate
from coreunits._core.engine import gate_tensor
from coreunits._core.scoring import dense_masked_scores
from coreunits.compare import compare_methods
from coreunits.strategies import ExactGreedyElimination


class ConstantUnit(nn.Module):
    """Three units: a constant 5, the evidence x0, and x1 (unused by the head)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.full_like(x[:, 0], 5.0), x[:, 0], x[:, 1]], dim=1)


class ConstantNet(nn.Module):
    """Class 1 scores u0 + u1 - 5 = x0, class 0 scores 0: a constant unit the decision leans on.

    Zeroing u0 lowers class 1 by 5, so zero ablation must keep it; its mean and
    its value on any other input are 5, so mean and resample ablation may drop it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.hidden = ConstantUnit()
        self.head = nn.Linear(3, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))
            self.head.bias.copy_(torch.tensor([0.0, -5.0]))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(x))


def _constant_data() -> torch.Tensor:
    # Shifted so that fewer than half the inputs are class 1: D'_c of class 1 is balanced.
    return torch.randn(400, 2, generator=torch.Generator().manual_seed(0)) - torch.tensor([0.2, 0.0])


@pytest.mark.parametrize(("ablation", "core"), [("zero", [0, 1]), ("mean", [1]), ("resample", [1])])
def test_the_ablation_decides_whether_a_constant_unit_is_core(ablation: str, core: list[int]) -> None:
    model, x = ConstantNet(), _constant_data()
    r = find_core_units(model, "hidden", 1, x, progress=False, target_holding_rate=1.0, ablation=ablation)
    assert r.units["hidden"] == core
    assert r.settings["ablation"] == ablation
    problem = SelectionProblem(ActivationCache(model, "hidden", x, ablation=ablation), "hidden", 1)
    assert ExactGreedyElimination().run(problem, 1.0).units == core


def _layer_outputs(model: PlantedNet, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.feat(x)


def _decisions_with(model: PlantedNet, x: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.head(model.flatten(model.pool(model.relu(feat)))).argmax(1) == 0


@pytest.mark.parametrize("engine", ["fx", "hooks"])
@pytest.mark.parametrize("ablation", ["mean", "resample"])
def test_holding_rate_equals_masking_by_hand(ablation: str, engine: str) -> None:
    model = PlantedNet()
    x = planted_data(model, n=300)
    keep = torch.tensor([0, 1, 1, 0, 0, 0, 1, 0], dtype=torch.bool)
    cache = ActivationCache(model, "feat", x, ablation=ablation, engine=engine)
    feat = _layer_outputs(model, x)
    if ablation == "mean":
        value = feat.mean(dim=0, keepdim=True).expand_as(feat)  # per channel and position
    else:
        partner = cache.ablation.partner
        assert partner is not None
        assert sorted(partner.tolist()) == list(range(len(x))) and not bool((partner == torch.arange(len(x))).any())
        value = feat[partner]
    m = keep.view(1, -1, 1, 1)
    masked = torch.where(m, feat, value)
    by_hand = float((_decisions_with(model, x, masked) == _decisions_with(model, x, feat)).float().mean())
    rate = holding_rate(model, {"feat": keep}, 0, cache)
    assert rate == pytest.approx(by_hand, abs=1e-9)
    assert rate < 1.0  # the mask matters: the check can fail
    # The same scores through the whole-network path, the one selection uses.
    scores = dense_masked_scores(cache, torch.arange(len(x)), [keep.float()])
    with torch.no_grad():
        direct = model.head(model.flatten(model.pool(model.relu(masked))))
    torch.testing.assert_close(scores, direct, rtol=1e-5, atol=1e-5)


def test_heads_take_their_ablation_value_slice_by_slice() -> None:
    g = torch.Generator().manual_seed(0)
    x, base = torch.randn(5, 3, 8, generator=g), torch.randn(1, 3, 8, generator=g)
    gate = torch.tensor([1.0, 0.0, 0.0, 1.0])  # 4 heads of 2 features
    out = gate_tensor(x, gate, (2,), (4,), group=2, baseline=base)
    kept = torch.tensor([0, 1, 6, 7])
    dropped = torch.tensor([2, 3, 4, 5])
    assert torch.equal(out[..., kept], x[..., kept])
    assert torch.equal(out[..., dropped], base.expand_as(x)[..., dropped])


def test_no_incremental_shortcut_under_mean_ablation_and_it_says_why() -> None:
    model, x = ConstantNet(), _constant_data()
    cache = ActivationCache(model, "hidden", x, ablation="mean")
    problem = SelectionProblem(cache, "hidden", 1)
    assert not problem.batched_toggles
    assert "mean ablation" in cache.fallbacks["incremental:hidden"]


def test_bad_ablation_and_a_cache_built_with_another_are_one_line_errors() -> None:
    model, x = ConstantNet(), _constant_data()
    with pytest.raises(OptionError, match="ablation must be one of 'zero', 'mean', 'resample'"):
        find_core_units(model, "hidden", 1, x, progress=False, ablation="median")
    cache = ActivationCache(model, "hidden", x)
    with pytest.raises(OptionError, match=r"built with ablation='zero', not 'mean'.*ablation='mean'"):
        holding_rate(model, {"hidden": torch.ones(3, dtype=torch.bool)}, 1, cache, ablation="mean")
    # Unspecified: the cache's ablation is used.
    assert find_core_units(model, "hidden", 1, cache, progress=False).settings["ablation"] == "zero"


def test_compare_records_the_ablation(tmp_path) -> None:
    model, x = ConstantNet(), _constant_data()
    cache = ActivationCache(model, "hidden", x, ablation="resample")
    records = compare_methods(model, "hidden", [1], cache, target=1.0, curves=False, progress=False,
                              methods=[ExactGreedyElimination()], out=tmp_path)
    assert [r["ablation"] for r in records] == ["resample"]
    assert records[0]["units"] == [1]


def test_export_refuses_a_set_found_under_another_ablation() -> None:
    from coreunits import export_specialist

    model, x = ConstantNet(), _constant_data()
    r = find_core_units(model, "hidden", 1, x, progress=False, target_holding_rate=1.0, ablation="mean")
    with pytest.raises(OptionError, match="found with mean ablation"):
        export_specialist(model, r, x[:8])
