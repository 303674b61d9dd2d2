"""The user's model is sacred, and bad input gets a clear error."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import assert_same_state, model_state
from planted import PlantedNet, planted_data
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from coreunits import (
    ActivationCache,
    DataError,
    LayerNotFoundError,
    ModelOutputError,
    find_core_units,
    holding_rate,
    mask_units,
)


class Boom(Exception):
    pass


class FailAfter(nn.Module):
    """Identity that raises ``exc`` from its ``n``-th call on (mid-selection)."""

    def __init__(self, n: int, exc: type[BaseException]) -> None:
        super().__init__()
        self.n, self.exc, self.calls = n, exc, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls >= self.n:
            raise self.exc("injected failure")
        return x


def _prepare_user_state(model: nn.Module) -> list[int]:
    """Give the model a 'lived-in' state: train mode, a frozen param, a grad, user hooks."""
    model.train()
    model.head.bias.requires_grad_(False)
    model.feat.weight.grad = torch.full_like(model.feat.weight, 0.5)
    seen: list[int] = []
    model.feat.register_forward_hook(lambda m, i, o: seen.append(1))
    model.register_forward_pre_hook(lambda m, a: None)
    return seen


def test_model_state_identical_after_success(planted) -> None:
    model, x = planted
    seen = _prepare_user_state(model)
    before = model_state(model)
    find_core_units(model, "feat", 0, x, progress=False)
    find_core_units(model, "input", 0, x, progress=False, positives_only=True)
    holding_rate(model, {"feat": torch.ones(8, dtype=torch.bool)}, 0, x)
    for ablation in ("mean", "resample"):
        find_core_units(model, "feat", 0, x, progress=False, ablation=ablation, epochs=1, min_steps=10)
        holding_rate(model, {"feat": torch.arange(8) < 4}, 0, x, ablation=ablation)
    with mask_units(model, {"feat": torch.ones(8, dtype=torch.bool)}):
        model(x[:2])
    assert_same_state(before, model_state(model))
    assert seen, "the user's own hook must keep firing"


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("engine", ["fx", "hooks"])
def test_model_state_identical_after_failure_mid_selection(exc: type[BaseException], engine: str) -> None:
    body = PlantedNet()
    x = planted_data(body)
    body.relu = nn.Sequential(nn.ReLU(inplace=True), FailAfter(40, exc))  # after the gated layer
    _prepare_user_state(body)
    before = model_state(body)
    with pytest.raises(exc):
        find_core_units(body, "feat", 0, x, progress=False, engine=engine)
    assert_same_state(before, model_state(body))


def test_no_hook_left_after_failing_module() -> None:
    body = PlantedNet()
    x = planted_data(body)
    body.relu = nn.Sequential(nn.ReLU(inplace=True), FailAfter(3, Boom))
    for call in (
        lambda: find_core_units(body, "feat", 0, x, progress=False, engine="hooks"),
        lambda: holding_rate(body, {"feat": torch.ones(8, dtype=torch.bool)}, 0, x),
    ):
        body.relu[1].calls = 0
        with pytest.raises(Boom):
            call()
        for m in body.modules():
            assert not m._forward_hooks and not m._forward_pre_hooks
    body.relu[1].calls = -10**9
    with pytest.raises(Boom):
        with mask_units(body, {"feat": torch.ones(8, dtype=torch.bool), "input": torch.ones(8, 8, dtype=torch.bool)}):
            raise Boom()
    for m in body.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_unknown_layer_lists_close_names(planted) -> None:
    model, x = planted
    with pytest.raises(LayerNotFoundError, match=r"no layer named 'fet'.*'feat'"):
        find_core_units(model, "fet", 0, x, progress=False)


def test_module_not_in_model_and_model_itself(planted) -> None:
    model, x = planted
    with pytest.raises(LayerNotFoundError, match="not a submodule"):
        find_core_units(model, nn.ReLU(), 0, x, progress=False)
    with pytest.raises(LayerNotFoundError, match="model itself"):
        find_core_units(model, model, 0, x, progress=False)


def test_layer_that_never_runs(planted) -> None:
    model, x = planted
    model.unused = nn.Linear(2, 2)
    with pytest.raises(LayerNotFoundError, match="never runs"):
        find_core_units(model, "unused", 0, x, progress=False)


def test_module_called_twice_is_refused() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.out = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.lin(self.lin(x)))

    with pytest.raises(LayerNotFoundError, match="runs 2 times"):
        find_core_units(Twice(), "lin", 0, torch.randn(64, 4), progress=False)


def test_class_out_of_range(planted) -> None:
    model, x = planted
    with pytest.raises(DataError, match=r"out of range.*3 classes.*0\.\.2"):
        find_core_units(model, "feat", 3, x, progress=False)


def test_no_input_predicted_as_class(planted) -> None:
    model, x = planted  # class 2 always scores -0.5 < class 1's 0
    with pytest.raises(DataError, match="no input in the data is predicted as class 2"):
        find_core_units(model, "feat", 2, x, progress=False)


def test_fewer_negatives_than_positives_is_handled_and_said(planted) -> None:
    model, x = planted
    pos = x[(model(x).argmax(1) == 0)]
    neg = x[(model(x).argmax(1) != 0)][:10]
    with pytest.warns(UserWarning, match="fewer than the"):
        r = find_core_units(model, "feat", 0, torch.cat([pos, neg]), progress=False)
    assert r.dprime["negatives"] == 10 and "unbalanced" in r.dprime["note"]


def test_non_classifier_output(planted) -> None:
    model, x = planted

    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x).sum(dim=1)

    with pytest.raises(ModelOutputError, match=r"\(N, num_classes\)"):
        find_core_units(Flat(), "inner.feat", 0, x, progress=False)

    class AsDict(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.inner(x)}

    with pytest.raises(ModelOutputError, match="output_fn"):
        find_core_units(AsDict(), "inner.feat", 0, x, progress=False)
    r = find_core_units(AsDict(), "inner.feat", 0, x, progress=False, output_fn=lambda o: o["logits"])
    assert set(PlantedNet.TRUE_UNITS) <= set(r.units["inner.feat"])


def test_empty_data(planted) -> None:
    model, _ = planted
    with pytest.raises(DataError, match="empty"):
        find_core_units(model, "feat", 0, TensorDataset(torch.zeros(0, 1, 8, 8)), progress=False)


def test_wrong_input_shape(planted) -> None:
    model, _ = planted
    with pytest.raises(ModelOutputError, match=r"input shape \(4, 3, 5\)"):
        find_core_units(model, "feat", 0, torch.zeros(4, 3, 5), progress=False)


def test_nan_scores(planted) -> None:
    model, x = planted
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        find_core_units(model, "feat", 0, x, progress=False)


def test_dataloader_with_labels_and_stale_cache(planted) -> None:
    model, x = planted
    loader = DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=100)
    r = find_core_units(model, "feat", 0, loader, progress=False)
    assert set(PlantedNet.TRUE_UNITS) <= set(r.units["feat"])
    cache = ActivationCache(model, "feat", x)
    with torch.no_grad():
        model.feat.bias.add_(0.0)  # an in-place write bumps the version: cache is stale
    with pytest.raises(DataError, match="changed since"):
        find_core_units(model, "feat", 0, cache, progress=False)


def _entry_points(x: torch.Tensor) -> dict[str, Any]:
    """Every public entry point that runs the model, as a call on (model)."""
    on = {"feat": torch.ones(8, dtype=torch.bool)}

    def masked_forward(m: nn.Module) -> None:
        with mask_units(m, on):
            m(x)

    return {
        "find_core_units": lambda m: find_core_units(m, "feat", 0, x, progress=False),
        "find_core_units_input": lambda m: find_core_units(m, "input", 0, x, progress=False, positives_only=True),
        "holding_rate": lambda m: holding_rate(m, on, 0, x),
        "find_core_units_mean_ablation": lambda m: find_core_units(m, "feat", 0, x, progress=False, ablation="mean"),
        "holding_rate_resample_ablation": lambda m: holding_rate(m, on, 0, x, ablation="resample"),
        "ActivationCache": lambda m: ActivationCache(m, "feat", x),
        "mask_units": masked_forward,
    }


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("entry", list(_entry_points(torch.zeros(1)).keys()))
def test_every_entry_point_leaves_model_intact_when_the_model_fails(entry: str, exc: type[BaseException]) -> None:
    body = PlantedNet()
    x = planted_data(body)
    # The second model call fails (mid-pass for the selection entry points); mask_units calls it once.
    failing = FailAfter(1 if entry == "mask_units" else 2, exc)
    body.relu = nn.Sequential(nn.ReLU(inplace=True), failing)
    _prepare_user_state(body)
    before = model_state(body)
    failing.calls = 0
    with pytest.raises(exc):
        _entry_points(x)[entry](body)
    assert_same_state(before, model_state(body))
