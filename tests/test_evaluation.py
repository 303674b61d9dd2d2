"""Holding-rate curves: the incremental path equals direct evaluation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from coreunits import ActivationCache
from coreunits._core.dprime import build_dprime
from coreunits._core.evaluation import removal_curve
from coreunits._core.incremental import build_incremental


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.relu2 = nn.ReLU(inplace=True)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.relu2(self.conv2(self.pool1(self.relu1(self.conv1(x)))))))


@pytest.mark.parametrize("layer", ["pool1", "relu2"])  # -> Conv2d, and -> Flatten -> Linear
def test_incremental_curve_equals_direct(layer: str) -> None:
    model = SmallCNN().eval()
    x = torch.randn(600, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    cache = ActivationCache(model, layer, x)
    c = int(cache.predictions.mode().values)
    rows = build_dprime(cache.predictions, c, generator=torch.Generator().manual_seed(0)).index
    assert build_incremental(cache, layer) is not None
    gates = torch.rand(cache.specs[0].num_units, generator=torch.Generator().manual_seed(2))
    fast = removal_curve(cache, rows, layer, gates, c, incremental=True)
    slow = removal_curve(cache, rows, layer, gates, c, incremental=False)
    assert [p["units"] for p in fast] == list(range(cache.specs[0].num_units, -1, -1))
    # Float rounding differs between the two paths (a subtraction vs a fresh
    # conv), so allow one input's worth of difference on decisions at a tie.
    tol = 1.0 / len(rows) + 1e-9
    for f, s in zip(fast, slow):
        assert f["holding_rate_strict"] == pytest.approx(s["holding_rate_strict"], abs=tol)
        assert f["holding_rate"] == pytest.approx(s["holding_rate"], abs=tol)
    assert fast[0]["holding_rate_strict"] == 1.0  # all units kept: nothing changes


def test_summed_contributions_equal_the_masked_pre_activation() -> None:
    model = SmallCNN().eval()
    x = torch.randn(300, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    cache = ActivationCache(model, "relu2", x)  # relu2 -> Flatten -> Linear: contributions apply
    inc = build_incremental(cache, "relu2")
    assert inc is not None and cache.frontier is not None
    rows = torch.arange(len(x))
    contrib = inc.unit_contributions(rows)
    assert contrib is not None
    for kept in ([], [0], [1, 4, 7], list(range(8))):
        mask = torch.zeros(8)
        mask[kept] = 1.0
        direct = inc.pre_activation(cache.frontier[0], mask)
        assert torch.allclose(inc.pre_activation_from_contributions(contrib, mask), direct, atol=1e-5)


def test_incremental_declines_when_structure_does_not_fit() -> None:
    model = SmallCNN().eval()
    x = torch.randn(100, 1, 8, 8)
    assert build_incremental(ActivationCache(model, "conv1", x), "conv1") is None  # -> ReLU, not linear
    assert build_incremental(ActivationCache(model, "relu2", x, engine="hooks"), "relu2") is None


def test_cache_is_not_modified_by_inplace_ops_after_the_layer() -> None:
    model = SmallCNN().eval()
    x = torch.randn(200, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    cache = ActivationCache(model, "conv2", x)  # conv2 -> ReLU(inplace=True)
    assert cache.frontier is not None
    with torch.no_grad():
        expected = model.conv2(model.pool1(model.relu1(model.conv1(x))))
    assert torch.equal(cache.frontier[0], expected)  # negative values survive: no in-place ReLU
    assert (cache.frontier[0] < 0).any()


def test_refit_w_b_coarse_to_fine_matches_the_full_grid_search() -> None:
    from coreunits._core.objective import center_score, refit_w_b

    grid = torch.logspace(-3, 3, 241)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        labels = (torch.rand(400, generator=g) < 0.5).float()
        spread = float(torch.rand(1, generator=g)) * 3
        # Positives mostly at margin 0 (c is the max), some misclassified; negatives above 0.
        margin = torch.where(labels > 0, torch.relu(torch.randn(400, generator=g) * spread - 0.5),
                             torch.rand(400, generator=g) * spread)
        errors = torch.stack([((labels - center_score(margin, w)) ** 2).sum() for w in grid])
        assert refit_w_b(margin, labels) == float(grid[int(errors.argmin())])


def test_paper_miss_bound_never_exceeds_the_refitted_reading() -> None:
    # On any prefix of the inputs, the fewest decisions changed under some grid w_b is at most the
    # decisions the paper reading changes on all of them with its refitted w_b: what lets a mask be
    # given up early. On all inputs it also equals the grid's true minimum (up to the threshold slack).
    from coreunits._core.evaluation import paper_holding
    from coreunits._core.objective import center_score, w_b_grid
    from coreunits._core.paper_bound import PaperMissBound

    g = torch.Generator().manual_seed(1)
    for _ in range(30):
        n = 500
        original = torch.rand(n, generator=g) < 0.5
        spread = float(torch.rand(1, generator=g)) * 3 + 0.1
        margin = torch.where(original, torch.relu(torch.randn(n, generator=g) * spread - 0.3),
                             torch.rand(n, generator=g) * spread)
        rate, _ = paper_holding(margin, original)
        changed = round((1.0 - rate) * n)
        bound = PaperMissBound(2)
        seen = 0
        for part in margin.split(97):
            bound.add(torch.stack([part, part + 10.0]), original[seen : seen + len(part)])
            seen += len(part)
            assert int(bound.least()[0]) <= changed
        per_w = torch.stack([((center_score(margin, w) >= 0.5) != original).sum() for w in w_b_grid()])
        assert int(bound.least()[0]) == int(per_w.min())
        # Margins raised by 10 push every input of c past every threshold but the largest few.
        assert int(bound.least(torch.tensor([1]))[0]) >= int(bound.least(torch.tensor([0]))[0])
