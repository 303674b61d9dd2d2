"""Heads of ``torch.nn.MultiheadAttention`` (torchvision's ViT, ``nn.TransformerEncoderLayer``).

torch computes these heads inside one functional call, so coreunits recomputes
them in a hook (or an fx node) and corrects the module's output by what the
closed heads sent through ``out_proj``. Gating head h must equal zeroing
``out_proj``'s columns of head h; all heads kept must leave the model's output
bit for bit; the fx split and the hooks must agree.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_untouched, plant_carrier_head, signed_tokens, snapshot
from torch import nn

from coreunits import Heads, LayerNotFoundError, export_specialist, find_core_units, holding_rate, mask_units
from coreunits._core.engine import GatedModel
from coreunits._core.layers import resolve_layers

# The planted data give about as many inputs of each class: D'_c may be a few negatives short.
pytestmark = pytest.mark.filterwarnings("ignore:.*D'_c is unbalanced")

DIM, HEADS, TOKENS = 8, 4, 5
CARRIER = 2  # the head that carries the class in the planted model


class MhaNet(nn.Module):
    """tokens (N, T, 2) -> embed -> nn.MultiheadAttention (4 heads of 2, causal mask) -> MLP on the mean token."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(2, DIM)
        self.attn = nn.MultiheadAttention(DIM, HEADS, batch_first=batch_first)
        self.fc = nn.Linear(DIM, 6)
        self.act = nn.ReLU()
        self.out = nn.Linear(6, 2)
        self.register_buffer("mask", torch.triu(torch.ones(TOKENS, TOKENS, dtype=torch.bool), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h if self.batch_first else h.transpose(0, 1)
        h, _ = self.attn(h, h, h, attn_mask=self.mask, need_weights=False)
        h = h if self.batch_first else h.transpose(0, 1)
        return self.out(self.act(self.fc(h.mean(1))))


def _planted(batch_first: bool = True) -> MhaNet:
    """Head CARRIER's values are the class signal (input feature 0); the other heads carry noise (feature 1)."""
    net = MhaNet(batch_first).eval()
    plant_carrier_head(net, net.attn.in_proj_weight, net.attn.out_proj.weight, HEADS, CARRIER, noise=0.1)
    return net


def _tokens(n: int, seed: int = 0) -> torch.Tensor:
    return signed_tokens(n, TOKENS, seed)


def _without_heads(net: nn.Module, attn: str, keep: torch.Tensor) -> nn.Module:
    """A copy whose out_proj ignores the dropped heads: what gating them to zero must give."""
    other = copy.deepcopy(net)
    module = other.get_submodule(attn)
    hd = module.embed_dim // module.num_heads
    with torch.no_grad():
        for h in torch.nonzero(~keep).flatten().tolist():
            module.out_proj.weight[:, h * hd:(h + 1) * hd] = 0.0
    return other


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("engine", ["fx", "hooks"])
def test_one_mha_head_carries_the_class_and_is_found_alone(batch_first: bool, engine: str) -> None:
    net, x = _planted(batch_first), _tokens(400)
    snap = snapshot(net)
    r = find_core_units(net, "heads:attn", 1, x, target_holding_rate=0.99, progress=False, seed=0, engine=engine)
    assert r.units["heads:attn"] == [CARRIER] and r.total_units["heads:attn"] == HEADS
    assert r.settings["engine"] == engine and r.holding_rate_strict >= 0.99
    keep = torch.arange(HEADS) == CARRIER
    assert holding_rate(net, {Heads("attn"): ~keep}, 1, x) < 0.8
    assert_untouched(net, snap)


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_head_gates_are_out_proj_columns_on_both_engines(batch_first: bool) -> None:
    torch.manual_seed(3)
    net = MhaNet(batch_first).eval()  # random weights: every head matters
    x = torch.randn(48, TOKENS, 2)
    with torch.no_grad():
        ref = net(x)
    with mask_units(net, {Heads("attn"): torch.ones(HEADS, dtype=torch.bool)}), torch.no_grad():
        assert torch.equal(net(x), ref)  # all heads kept: the model's own output, bit for bit
    for keep in (torch.tensor([True, False, True, False]), torch.tensor([False, False, False, True])):
        with torch.no_grad():
            expected = _without_heads(net, "attn", keep)(x)
        assert not torch.allclose(expected, ref, atol=1e-4)
        with mask_units(net, {"heads:attn": keep}), torch.no_grad():
            torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-5)
        for engine in ("fx", "hooks"):
            gated = GatedModel(net, resolve_layers(net, ["heads:attn"]), engine=engine)
            gated.probe(x)
            assert gated.engine == engine
            with gated.activated(), torch.no_grad():
                scores = gated.suffix(gated.prefix(x), [keep.float()])
            torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


def test_a_detector_built_on_mha_heads_masks_them() -> None:
    net, x = _planted(), _tokens(200)
    snap = snapshot(net)
    spec = export_specialist(net, {"heads:attn": [CARRIER]}, x[:2], target_class=1)
    assert spec.cuts[0].masked and spec.fallback is not None
    with torch.no_grad():
        expected = _without_heads(net, "attn", torch.arange(HEADS) == CARRIER)(x).argmax(1) == 1
        assert torch.equal(spec.module(x), expected)
    assert_untouched(net, snap)


def test_torchvision_vit_heads_split_with_fx_and_agree_with_hooks() -> None:
    vision_transformer = pytest.importorskip("torchvision.models.vision_transformer")
    torch.manual_seed(0)
    net = vision_transformer.VisionTransformer(image_size=28, patch_size=7, num_layers=2, num_heads=4,
                                               hidden_dim=32, mlp_dim=64, num_classes=3).eval()
    nn.init.normal_(net.heads.head.weight)  # torchvision starts the head at zero: every score would tie
    x = torch.randn(160, 3, 28, 28)
    snap = snapshot(net)
    layer = "heads:encoder.layers.encoder_layer_1.self_attention"
    results = {engine: find_core_units(net, layer, 0, x, target_holding_rate=0.9, ablation="mean", progress=False,
                                       seed=0, engine=engine) for engine in ("fx", "hooks")}
    assert results["fx"].settings["engine"] == "fx"  # the heads are a node of the split, cached like a layer
    assert results["fx"].units == results["hooks"].units
    assert results["fx"].holding_rate_strict == pytest.approx(results["hooks"].holding_rate_strict, abs=1e-6)
    assert results["fx"].holding_rate_strict >= 0.9 and results["fx"].total_units[layer] == 4
    # Both blocks' heads at once: block 1's heads are then computed after block 0's gates, in the suffix.
    both = [f"heads:encoder.layers.encoder_layer_{i}.self_attention" for i in (0, 1)]
    gates = [torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 1.0, 0.5])]
    scores = {}
    for engine in ("fx", "hooks"):
        gated = GatedModel(net, resolve_layers(net, both), engine=engine)
        gated.probe(x[:20])
        with gated.activated(), torch.no_grad():
            scores[engine] = gated.suffix(gated.prefix(x[:20]), gates)
    torch.testing.assert_close(scores["fx"], scores["hooks"], rtol=1e-5, atol=1e-5)
    assert_untouched(net, snap)


def test_mha_heads_errors_name_the_fix() -> None:
    net = MhaNet()
    with pytest.raises(LayerNotFoundError, match="has 4 heads, not 2; leave num_heads out"):
        resolve_layers(net, ["heads:attn:2"])
    with pytest.raises(LayerNotFoundError, match="give 'heads:attn'"):
        find_core_units(net, "attn", 0, _tokens(50), progress=False)  # its output is a tuple
    net.attn = nn.MultiheadAttention(DIM, HEADS, batch_first=True, add_bias_kv=True)
    with pytest.raises(LayerNotFoundError, match="add_bias_kv"):
        resolve_layers(net, [Heads("attn")])
