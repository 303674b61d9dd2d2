"""Works on real models, never harms them.

find_core_units on torchvision's ResNet-18 (narrowed to width 16 for speed, and
at full width: in-place residual additions, shared ReLUs) and on hand-built
models with the shapes of real ones (a VGG ``features`` Sequential, MobileNetV2
blocks, a tabular MLP, dict/tuple outputs, untraceable control flow, half precision):
the result is well formed, the reported holding rate is what its hard mask
really gives, both engines agree, and the model is left byte for byte as it was.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torchvision
from archs import (
    ControlFlowNet,
    DictOutputNet,
    LeafControlFlowNet,
    TupleOutputNet,
    image_data,
    mobilenet_v2_small,
    narrowed,
    spread_classes,
    tabular_data,
    tabular_mlp,
    vgg_small,
)
from helpers import assert_untouched, direct_strict_rate, predicted, snapshot
from torch import nn

from coreunits import (
    ActivationCache,
    CoreUnits,
    CoreUnitsError,
    LayerNotFoundError,
    ModelOutputError,
    find_core_units,
    holding_rate,
    mask_units,
)

# Short, aggressive optimisation: enough steps for gates to cross 0.5, few enough for CI.
FAST: dict[str, Any] = {"epochs": 1, "min_steps": 30, "lr": 0.3, "alpha": 0.01, "progress": False}


# --------------------------------------------------------------------------- helpers
def check_result(r: CoreUnits, layer: str, total: int, unit_shape: tuple[int, ...] | None = None) -> None:
    """Units sorted, unique, in range; masks and gates consistent with them."""
    units = r.units[layer]
    assert units == sorted(set(units))
    assert all(isinstance(u, int) and 0 <= u < total for u in units)
    assert r.total_units[layer] == total
    assert r.num_units[layer] == len(units)
    mask, gates = r.masks[layer], r.gates[layer]
    assert mask.dtype == torch.bool
    assert mask.shape == gates.shape == (unit_shape or (total,))
    assert int(mask.sum()) == len(units)
    assert torch.nonzero(mask.flatten()).flatten().tolist() == units
    assert torch.equal(mask.flatten(), gates.flatten() >= 0.5)
    assert 0.0 <= r.holding_rate_strict <= 1.0 and 0.0 <= r.holding_rate <= 1.0


def check_holding(
    model: nn.Module, r: CoreUnits, c: int, data: Any, output_fn: Callable[[Any], torch.Tensor] | None = None
) -> None:
    """The reported holding rates are exactly what the hard masks give on D'_c."""
    strict = holding_rate(model, r.masks, c, data, build_dprime_first=True, seed=r.seed, output_fn=output_fn)
    assert strict == r.holding_rate_strict
    paper = holding_rate(
        model, r.masks, c, data, reading="paper", build_dprime_first=True, seed=r.seed, output_fn=output_fn
    )
    assert paper == r.holding_rate


# --------------------------------------------------------------------------- ResNet-18
def resnet18(num_classes: int = 10, width: int = 64, seed: int = 0) -> torchvision.models.ResNet:
    """torchvision's ResNet-18 (random init, seeded); ``width`` < 64 narrows every stage by 64 / width."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=num_classes)
    if width != 64:
        narrowed(model, 64 // width)
    return model


@pytest.fixture(scope="module")
def resnet_base() -> tuple[nn.Module, torch.Tensor, int]:
    """torchvision's ResNet-18 narrowed to width 16, 256 random 3x32x32 images, a class."""
    model = resnet18(num_classes=10, width=16, seed=0)
    x = image_data(256, seed=1)
    spread_classes(model, x, model.fc)
    counts = torch.bincount(predicted(model, x), minlength=10)
    assert int((counts > 0).sum()) >= 5, counts  # decisions are non-trivial
    return model, x, int(counts.argmax())


@pytest.fixture()
def resnet(resnet_base) -> tuple[nn.Module, torch.Tensor, int]:
    model, x, c = resnet_base
    return copy.deepcopy(model), x, c


def test_narrowed_resnet18_is_torchvisions_with_narrower_tensors() -> None:
    full, slim = resnet18(num_classes=10), resnet18(num_classes=10, width=16)
    assert type(slim) is torchvision.models.ResNet
    assert type(slim.layer1[0]) is torchvision.models.resnet.BasicBlock
    assert [n for n, _ in slim.named_modules()] == [n for n, _ in full.named_modules()]
    assert [type(m) for m in slim.modules()] == [type(m) for m in full.modules()]
    assert list(slim.state_dict()) == list(full.state_dict())
    for (name, a), b in zip(full.state_dict().items(), slim.state_dict().values()):
        # Every channel count shrinks by 4 but the input's 3 and the 10 classes; kernels stay.
        narrow = {0, 1} if a.dim() >= 2 else {0} if a.dim() == 1 else set()
        if name == "conv1.weight":
            narrow = {0}
        elif name.startswith("fc."):
            narrow = {1} if a.dim() == 2 else set()
        assert list(b.shape) == [d // 4 if i in narrow else d for i, d in enumerate(a.shape)], name
    assert slim.relu.inplace and slim.layer3[0].relu.inplace
    assert "layer2.0.downsample.1" in dict(slim.named_modules())
    assert slim(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# Slow: 81-181 s per case for layer2.1 and layer1.0.bn2 on 2 busy cores.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("layer", "total"), [("layer2.1", 32), ("layer3.0.conv2", 64), ("layer1.0.bn2", 16)]
)
def test_resnet18_layers_in_train_mode_leave_model_untouched(resnet, layer: str, total: int) -> None:
    model, x, c = resnet
    model.train()  # BatchNorm would update its running stats if coreunits forgot eval mode
    snap = snapshot(model)
    bn_before = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
    r = find_core_units(model, layer, c, x, seed=3, **FAST)
    assert r.settings["engine"] == "fx" and r.settings["prefix_cached"]
    check_result(r, layer, total)
    assert all(m.training for m in model.modules())
    for k, v in bn_before.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert int(model.bn1.num_batches_tracked) == 0
    check_holding(model, r, c, x)
    assert_untouched(model, snap)


# Slow: 66 s on 2 busy cores.
@pytest.mark.slow
def test_resnet18_full_width_layer3(resnet_base) -> None:
    # The real widths (64..512): 256 channels in layer3. fx keeps the suffix small.
    _, x, _ = resnet_base
    model = resnet18(num_classes=10, seed=0)
    spread_classes(model, x[:128], model.fc)
    x = x[:128]
    c = int(torch.bincount(predicted(model, x), minlength=10).argmax())
    model.train()
    snap = snapshot(model)
    r = find_core_units(model, "layer3.0.conv2", c, x, seed=0, **FAST)
    assert r.settings["engine"] == "fx"
    check_result(r, "layer3.0.conv2", 256)
    check_holding(model, r, c, x)
    assert_untouched(model, snap)


# Slow: 43-279 s per case on 2 busy cores.
@pytest.mark.slow
@pytest.mark.parametrize(
    "layers",
    [["layer1.0.bn2"], ["layer3.0.conv2"], ["layer2.0.downsample.1"], ["layer2.1", "layer3.0.conv2"]],
    ids=["bn2-before-residual-add", "conv2-downsample-block", "downsample-branch", "two-layers"],
)
def test_resnet18_fx_and_hooks_engines_agree(resnet, layers: list[str]) -> None:
    model, x, c = resnet
    model.train()
    snap = snapshot(model)
    fx_r = find_core_units(model, layers, c, x, seed=5, engine="fx", **FAST)
    hk_r = find_core_units(model, layers, c, x, seed=5, engine="hooks", **FAST)
    assert fx_r.settings["engine"] == "fx" and hk_r.settings["engine"] == "hooks"
    assert fx_r.units == hk_r.units
    for layer in layers:
        assert torch.allclose(fx_r.gates[layer], hk_r.gates[layer], atol=1e-4)
    assert fx_r.holding_rate_strict == hk_r.holding_rate_strict
    assert fx_r.holding_rate == hk_r.holding_rate
    assert_untouched(model, snap)


@pytest.mark.slow
def test_resnet18_full_width_fx_and_hooks_agree_on_residual_bn2(resnet_base) -> None:
    # Full widths, gate right before `out += identity`: the hook engine runs the whole
    # ResNet-18 per step (about 20 s on 1 CPU thread).
    _, x, _ = resnet_base
    x = x[:128]
    model = resnet18(num_classes=10, seed=0)
    spread_classes(model, x, model.fc)
    c = int(torch.bincount(predicted(model, x), minlength=10).argmax())
    model.train()
    snap = snapshot(model)
    fx_r = find_core_units(model, "layer1.0.bn2", c, x, seed=0, engine="fx", **FAST)
    hk_r = find_core_units(model, "layer1.0.bn2", c, x, seed=0, engine="hooks", **FAST)
    check_result(fx_r, "layer1.0.bn2", 64)
    assert fx_r.units == hk_r.units
    assert fx_r.holding_rate_strict == hk_r.holding_rate_strict
    check_holding(model, fx_r, c, x)
    assert_untouched(model, snap)


# Slow: 70 s in the final fast run of this session (2 cores, load about 4).
@pytest.mark.slow
def test_resnet18_residual_identity_is_part_of_the_cached_frontier(resnet) -> None:
    # Gating bn2 of a block: the suffix starts after bn2 and must be given the block's
    # input (the identity of `out += identity`) as well, or the residual is lost.
    model, x, c = resnet
    cache = ActivationCache(model, "layer1.0.bn2", x)
    assert cache.gated.engine == "fx" and cache.cached
    assert cache.frontier is not None and len(cache.frontier) == 2
    assert [tuple(f.shape) for f in cache.frontier] == [(256, 16, 8, 8)] * 2
    ones = {"layer1.0.bn2": torch.ones(16, dtype=torch.bool)}
    assert holding_rate(model, ones, c, cache) == 1.0
    # A real mask: the cached fx suffix decides exactly as the real model masked by hooks.
    mask = torch.zeros(16, dtype=torch.bool)
    mask[::3] = True
    masks = {"layer1.0.bn2": mask}
    assert holding_rate(model, masks, c, cache) == direct_strict_rate(model, masks, c, x)
    # The cache itself is not corrupted by the in-place `out += identity` of later steps.
    snapshot_front = [f.clone() for f in cache.frontier]
    find_core_units(model, "layer1.0.bn2", c, cache, seed=0, **FAST)
    assert all(torch.equal(a, b) for a, b in zip(snapshot_front, cache.frontier))


def test_resnet18_reported_masks_reproduce_through_the_real_model(resnet) -> None:
    model, x, c = resnet
    r = find_core_units(model, "layer3.0.conv2", c, x, seed=1, **FAST)
    assert 0 < r.num_units["layer3.0.conv2"] < 64
    assert holding_rate(model, r.masks, c, x) == direct_strict_rate(model, r.masks, c, x)


def test_resnet18_shared_relu_is_refused_clearly(resnet) -> None:
    # torchvision's BasicBlock calls its one ReLU module twice.
    model, x, c = resnet
    snap = snapshot(model)
    with pytest.raises(LayerNotFoundError, match="'layer1.0.relu' runs 2 times"):
        find_core_units(model, "layer1.0.relu", c, x, **FAST)
    assert_untouched(model, snap)


# --------------------------------------------------------------------------- VGG
@pytest.fixture()
def vgg() -> tuple[nn.Module, torch.Tensor, int]:
    model = vgg_small(num_classes=5)
    x = image_data(300, size=16, seed=2)
    spread_classes(model, x, model.classifier[-1])
    counts = torch.bincount(predicted(model, x), minlength=5)
    assert int((counts > 0).sum()) >= 3, counts
    return model, x, int(counts.argmax())


@pytest.mark.parametrize(("layer", "total"), [("features.10", 16), ("classifier.1", 32)])
def test_vgg_features_by_index_in_train_mode(vgg, layer: str, total: int) -> None:
    model, x, c = vgg
    model.train()  # Dropout in the classifier: results would be random if eval mode were forgotten
    snap = snapshot(model)
    a = find_core_units(model, layer, c, x, seed=2, **FAST)
    b = find_core_units(model, layer, c, x, seed=2, **FAST)
    assert a.settings["engine"] == "fx"
    check_result(a, layer, total)
    assert a.units == b.units and torch.equal(a.gates[layer], b.gates[layer])
    assert a.holding_rate_strict == b.holding_rate_strict
    check_holding(model, a, c, x)
    assert_untouched(model, snap)


# --------------------------------------------------------------------------- MobileNetV2
def layer_output(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The real output of ``layer`` on ``x`` (captured before any in-place op after it)."""
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, _i: Any, o: torch.Tensor) -> None:
        seen.append(o.detach().clone())

    handle = dict(model.named_modules())[layer].register_forward_hook(hook)
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
        model.train(was)
    return seen[0]


# Slow: 46-233 s per case on 2 busy cores.
@pytest.mark.slow
@pytest.mark.parametrize("act", [nn.ReLU6, nn.SiLU], ids=["relu6-mobilenet", "silu-efficientnet"])
@pytest.mark.parametrize(("layer", "total"), [("features.0.1", 8), ("features.2.conv.0.1", 24), ("features.3", 12)])
def test_mobilenet_bn_followed_by_inplace_activation(act: type[nn.Module], layer: str, total: int) -> None:
    # A BatchNorm followed by an in-place activation: the unmasked pass that records the
    # decisions must not let the activation write into the cached BatchNorm output.
    # (ReLU hides such a bug: relu(g * relu(x)) == relu(g * x) for g >= 0; SiLU does not.)
    model = mobilenet_v2_small(num_classes=5, act=act)
    x = image_data(256, size=16, seed=4)
    spread_classes(model, x, model.classifier[-1])
    c = int(torch.bincount(predicted(model, x), minlength=5).argmax())
    model.train()
    snap = snapshot(model)
    cache = ActivationCache(model, layer, x)
    assert cache.gated.engine == "fx" and cache.frontier is not None
    assert torch.equal(cache.frontier[-1], layer_output(model, layer, x))
    assert holding_rate(model, {layer: torch.ones(total, dtype=torch.bool)}, c, cache) == 1.0
    fx_r = find_core_units(model, layer, c, cache, seed=0, **FAST)
    hk_r = find_core_units(model, layer, c, x, seed=0, engine="hooks", **FAST)
    check_result(fx_r, layer, total)
    assert fx_r.units == hk_r.units
    assert torch.allclose(fx_r.gates[layer], hk_r.gates[layer], atol=1e-4)
    assert fx_r.holding_rate_strict == hk_r.holding_rate_strict
    check_holding(model, fx_r, c, x)
    assert_untouched(model, snap)


# --------------------------------------------------------------------------- tabular MLP
@pytest.mark.parametrize(("layer", "total"), [("net.1", 64), ("net.2", 32)])
def test_tabular_mlp_hidden_layers(layer: str, total: int) -> None:
    # 2000 rows: D'_c spans several evaluation chunks (256 and 1024 rows), and the
    # reported rate must still be reproduced exactly.
    model = tabular_mlp()
    x = tabular_data(2000)
    spread_classes(model, x, model.net[-1])
    counts = torch.bincount(predicted(model, x), minlength=4)
    c = int(counts.argmax())
    assert int(counts[c]) > 520
    snap = snapshot(model)
    r = find_core_units(model, layer, c, x, seed=4, **FAST)
    assert r.settings["engine"] == "fx"
    assert r.dprime["size"] > 1024
    check_result(r, layer, total)
    assert 0 < r.num_units[layer] < total
    check_holding(model, r, c, x)
    assert holding_rate(model, r.masks, c, x) == direct_strict_rate(model, r.masks, c, x)
    assert_untouched(model, snap)


# --------------------------------------------------------------------------- structured outputs
def _logits_of_dict(o: dict[str, torch.Tensor]) -> torch.Tensor:
    return o["logits"]


def _first_of_tuple(o: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return o[0]


@pytest.mark.parametrize(
    ("net_cls", "output_fn"),
    [(DictOutputNet, _logits_of_dict), (TupleOutputNet, _first_of_tuple)],
    ids=["dict", "tuple"],
)
@pytest.mark.parametrize(("layer", "total"), [("hidden", 16), ("body.conv", 8)])
def test_structured_outputs_with_output_fn(net_cls: type[nn.Module], output_fn: Any, layer: str, total: int) -> None:
    model = net_cls()
    x = image_data(200, size=8, seed=3)
    spread_classes(model, x, model.head, output_fn=output_fn)
    c = int(torch.bincount(predicted(model, x, output_fn)).argmax())
    snap = snapshot(model)
    with pytest.raises(ModelOutputError, match="output_fn"):
        find_core_units(model, layer, c, x, **FAST)
    r = find_core_units(model, layer, c, x, seed=0, output_fn=output_fn, **FAST)
    assert r.settings["engine"] == "fx"
    check_result(r, layer, total)
    check_holding(model, r, c, x, output_fn=output_fn)
    hk = find_core_units(model, layer, c, x, seed=0, output_fn=output_fn, engine="hooks", **FAST)
    assert hk.units == r.units and hk.holding_rate_strict == r.holding_rate_strict
    with torch.no_grad(), mask_units(model, r.masks):
        out = model(x[:4])
    assert type(out) is type(model(x[:4]))  # the masked model still returns its own structure
    assert_untouched(model, snap)


# --------------------------------------------------------------------------- control flow
def test_untraceable_control_flow_falls_back_to_hooks() -> None:
    model = ControlFlowNet()
    x = tabular_data(300, 12, seed=5)
    spread_classes(model, x, model.fc2)
    c = int(torch.bincount(predicted(model, x)).argmax())
    snap = snapshot(model)
    cache = ActivationCache(model, "fc1", x)
    assert cache.gated.engine == "hooks" and cache.gated.fallback_reason
    for layer in ("fc1", "act"):
        r = find_core_units(model, layer, c, x, seed=1, **FAST)
        assert r.settings["engine"] == "hooks" and not r.settings["prefix_cached"]
        check_result(r, layer, 16)
        check_holding(model, r, c, x)
        assert holding_rate(model, r.masks, c, x) == direct_strict_rate(model, r.masks, c, x)
    assert_untouched(model, snap)


def test_forcing_fx_on_untraceable_model_raises_and_leaves_model_untouched() -> None:
    model = ControlFlowNet()
    x = tabular_data(100, 12, seed=5)
    snap = snapshot(model)
    with pytest.raises(CoreUnitsError, match=r"engine='fx' was requested but torch.fx cannot split"):
        find_core_units(model, "fc1", 0, x, engine="fx", **FAST)
    assert_untouched(model, snap)


def test_control_flow_off_the_gated_path_still_uses_fx() -> None:
    # Only modules on the path to the gated layer are traced; the branching head
    # stays one call and runs its real forward per step.
    model = LeafControlFlowNet()
    x = tabular_data(300, 12, seed=5)
    spread_classes(model, x, model.head.lin)
    c = int(torch.bincount(predicted(model, x)).argmax())
    snap = snapshot(model)
    r = find_core_units(model, "fc1", c, x, seed=0, **FAST)
    assert r.settings["engine"] == "fx"
    check_result(r, "fc1", 16)
    check_holding(model, r, c, x)
    hk = find_core_units(model, "fc1", c, x, seed=0, engine="hooks", **FAST)
    assert hk.units == r.units and hk.holding_rate_strict == r.holding_rate_strict
    assert_untouched(model, snap)


class OptionalArgsNet(nn.Module):
    """A forward with optional arguments it branches on, as timm's ViT (``attn_mask=None, is_causal=False``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(12, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, double: bool = False) -> torch.Tensor:
        h = self.act(self.fc1(x))
        if mask is not None:
            h = h * mask
        if double:
            h = h * 2.0
        return self.fc2(h)


class LayerScaleNet(nn.Module):
    """A parameter reshaped after the gated layer, as timm's ConvNeXt block (``gamma.reshape(1, -1, 1, 1)``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(12, 16)
        self.act = nn.ReLU()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 16))
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)).mul(self.gamma.reshape(1, -1)))


@pytest.mark.parametrize("net_cls", [OptionalArgsNet, LayerScaleNet], ids=["optional-args", "layer-scale"])
def test_fx_splits_models_with_optional_args_and_parameter_constants(net_cls: type[nn.Module]) -> None:
    # Found on timm: the ViT's optional forward arguments and ConvNeXt's reshaped gamma made
    # the fx split fail ("exactly one input", "not a per-example tensor"), so hooks ran.
    model = net_cls()
    x = tabular_data(300, 12, seed=5)
    spread_classes(model, x, model.fc2)
    c = int(torch.bincount(predicted(model, x)).argmax())
    snap = snapshot(model)
    r = find_core_units(model, "fc1", c, x, seed=0, **FAST)
    assert r.settings["engine"] == "fx" and r.settings["prefix_cached"]
    assert "engine" not in r.settings["fallbacks"]
    check_result(r, "fc1", 16)
    check_holding(model, r, c, x)
    hk = find_core_units(model, "fc1", c, x, seed=0, engine="hooks", **FAST)
    assert hk.units == r.units and hk.holding_rate_strict == r.holding_rate_strict
    assert holding_rate(model, r.masks, c, x) == direct_strict_rate(model, r.masks, c, x)
    assert_untouched(model, snap)


class TokenNet(nn.Module):
    """Tokens ``(N, 6, 8)`` -> a per-token Linear + GELU ``(N, 6, 16)`` -> mean over tokens -> 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.GELU()
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc1(x)).mean(dim=1))


def test_unit_dim_masks_are_judged_and_applied_with_the_same_unit_dim() -> None:
    # Found on timm's ViT: a selection over the features (unit_dim=2) of an (N, tokens, dim)
    # output gave masks that holding_rate and mask_units could only read as tokens.
    model = TokenNet()
    x = torch.randn(300, 6, 8, generator=torch.Generator().manual_seed(3))
    spread_classes(model, x, model.head)
    c = int(torch.bincount(predicted(model, x)).argmax())
    r = find_core_units(model, "act", c, x, seed=0, unit_dim=2, **FAST)
    check_result(r, "act", 16)
    strict = holding_rate(model, r.masks, c, x, build_dprime_first=True, seed=0, unit_dim=2)
    assert strict == r.holding_rate_strict
    assert holding_rate(model, r.masks, c, x, unit_dim=2) == direct_strict_rate(model, r.masks, c, x, unit_dim=2)
    with pytest.raises(CoreUnitsError, match="16 entries but the layer has 6 units"):
        holding_rate(model, r.masks, c, x)
    with pytest.raises(CoreUnitsError, match="16 entries but the layer has 6 units"), mask_units(model, r.masks):
        model(x[:2])


# --------------------------------------------------------------------------- precision and devices
# Slow: 61-111 s per case on 2 busy cores.
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fx", "hooks"])
def test_half_precision_model_and_inputs_work(resnet, engine: str) -> None:
    # Found behaviour: a float16 model with float16 inputs works on CPU with both
    # engines; gates and scores are computed in float32, the model stays float16.
    model, x, c = resnet
    model = model.half().train()
    xh = x.half()
    c = int(torch.bincount(predicted(model, xh), minlength=10).argmax())
    snap = snapshot(model)
    r = find_core_units(model, "layer3.0.conv2", c, xh, seed=0, engine=engine, **FAST)
    assert r.settings["engine"] == engine
    check_result(r, "layer3.0.conv2", 64)
    assert r.gates["layer3.0.conv2"].dtype == torch.float32
    check_holding(model, r, c, xh)
    assert all(p.dtype == torch.float16 for p in model.parameters())
    assert_untouched(model, snap)


def test_bfloat16_mlp_works() -> None:
    x = tabular_data(300)
    model = tabular_mlp()
    spread_classes(model, x, model.net[-1])
    model = model.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    c = int(torch.bincount(predicted(model, xb)).argmax())
    snap = snapshot(model)
    r = find_core_units(model, "net.1", c, xb, seed=0, **FAST)
    check_result(r, "net.1", 64)
    check_holding(model, r, c, xb)
    with torch.no_grad(), mask_units(model, r.masks):
        assert model(xb[:3]).dtype == torch.bfloat16
    assert_untouched(model, snap)


def test_half_model_with_float_inputs_gives_a_clear_error() -> None:
    model = tabular_mlp().half()
    snap = snapshot(model)
    with pytest.raises(ModelOutputError, match=r"dtype torch\.float32.*Check that the data"):
        find_core_units(model, "net.1", 0, tabular_data(64), **FAST)
    assert_untouched(model, snap)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("model_on_cuda", [True, False], ids=["model-on-cuda", "cpu-model-device-cuda"])
def test_cuda(resnet, model_on_cuda: bool) -> None:
    model, x, c = resnet
    if model_on_cuda:
        model = model.cuda()
        x = x.cuda()
    model.train()
    snap = snapshot(model)
    r = find_core_units(model, "layer3.0.conv2", c, x, seed=0, device="cuda", **FAST)
    check_result(r, "layer3.0.conv2", 64)
    assert r.masks["layer3.0.conv2"].device.type == "cpu"
    strict = holding_rate(model, r.masks, c, x, build_dprime_first=True, seed=0, device="cuda")
    assert strict == r.holding_rate_strict
    expected_device = "cuda" if model_on_cuda else "cpu"
    assert all(p.device.type == expected_device for p in model.parameters())  # never moved
    assert_untouched(model, snap)


# --------------------------------------------------------------------------- inputs
class InplaceInputNet(nn.Module):
    """Shifts its input in place (``x.sub_``) before the first layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(20, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.sub_(0.1)
        return self.fc2(self.act(self.fc1(x)))


def test_model_that_modifies_its_input_in_place() -> None:
    model = InplaceInputNet()
    x = tabular_data(400, seed=6)
    c = int(torch.bincount(predicted(model, x.clone())).argmax())
    cache = ActivationCache(model, "fc1", x.clone())
    assert holding_rate(model, {"fc1": torch.ones(16, dtype=torch.bool)}, c, cache) == 1.0


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_selection_called_inside_no_grad(context: Any) -> None:
    model = tabular_mlp()
    x = tabular_data(300)
    spread_classes(model, x, model.net[-1])
    c = int(torch.bincount(predicted(model, x)).argmax())
    snap = snapshot(model)
    with context():
        r = find_core_units(model, "net.1", c, x, seed=0, **FAST)
    check_result(r, "net.1", 64)
    assert_untouched(model, snap)


def test_holding_rate_and_mask_units_work_inside_no_grad(resnet) -> None:
    model, x, c = resnet
    mask = {"layer2.1": torch.arange(32) % 2 == 0}
    expected = holding_rate(model, mask, c, x)
    with torch.no_grad():
        assert holding_rate(model, mask, c, x) == expected
    with torch.inference_mode():
        assert holding_rate(model, mask, c, x) == expected
