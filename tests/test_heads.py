"""Heads and Neurons: units of a transformer, each one slice over all tokens.

``Heads`` gates the per-head slices of a timm ``Attention`` where the heads are
concatenated (before ``proj``); ``Neurons`` gates the features of a
``(N, tokens, features)`` output. The masks must be exactly those slices, the
names ``heads:NAME`` / ``neurons:NAME`` must work wherever a layer name does,
and a model where one head carries the class must give that head alone.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_untouched, plant_carrier_head, signed_tokens, snapshot
from torch import nn

from coreunits import Heads, LayerNotFoundError, Neurons, export_specialist, find_core_units, holding_rate, mask_units
from coreunits._core.layers import resolve_layers

# The planted data give about as many inputs of each class: D'_c may be a few negatives short.
pytestmark = pytest.mark.filterwarnings("ignore:.*D'_c is unbalanced")

timm_attention = pytest.importorskip("timm.models.vision_transformer").Attention

DIM, HEADS, TOKENS = 8, 4, 5
CARRIER = 1  # the head that carries the class in the planted model


class TinyTransformer(nn.Module):
    """tokens (N, T, 2) -> embed -> timm Attention (4 heads of 2) -> MLP on the mean token -> 2 scores."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(2, DIM)
        self.attn = timm_attention(DIM, num_heads=HEADS, qkv_bias=True)
        self.fc = nn.Linear(DIM, 6)
        self.act = nn.ReLU()
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attn(self.embed(x))
        return self.out(self.act(self.fc(h.mean(1))))


def _planted() -> TinyTransformer:
    """Head CARRIER's values are the class signal (input feature 0); the other heads carry noise (feature 1)."""
    torch.manual_seed(0)
    net = TinyTransformer().eval()
    plant_carrier_head(net, net.attn.qkv.weight, net.attn.proj.weight, HEADS, CARRIER, noise=0.3)
    return net


def _tokens(n: int, seed: int = 0) -> torch.Tensor:
    return signed_tokens(n, TOKENS, seed)


def test_one_head_carries_the_class_and_is_found_alone() -> None:
    net, x = _planted(), _tokens(600)
    snap = snapshot(net)
    for layer in ("heads:attn", Heads("attn")):
        r = find_core_units(net, layer, 1, x, target_holding_rate=0.99, progress=False, seed=0)
        assert r.layers == ["heads:attn"] and r.total_units["heads:attn"] == HEADS
        assert r.units["heads:attn"] == [CARRIER]
        assert r.holding_rate_strict >= 0.99
    keep = torch.zeros(HEADS, dtype=torch.bool)
    keep[CARRIER] = True
    assert holding_rate(net, {"heads:attn": keep}, 1, x) >= 0.99
    # Without the carrier the decision is the noise heads' (about half the inputs change).
    assert holding_rate(net, {"heads:attn": ~keep}, 1, x) < 0.8
    assert_untouched(net, snap)


def _reference_heads(net: TinyTransformer, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The scores with each dropped head's slice zeroed by hand, before proj."""
    hd = DIM // HEADS

    def zero_heads(_m: nn.Module, _i: object, out: torch.Tensor) -> torch.Tensor:
        return (out.view(*out.shape[:-1], HEADS, hd) * keep.float()[:, None]).reshape(out.shape)

    handle = net.attn.norm.register_forward_hook(zero_heads)
    try:
        with torch.no_grad():
            return net(x)
    finally:
        handle.remove()


def test_head_masks_are_exactly_the_per_head_slices() -> None:
    torch.manual_seed(1)
    net = TinyTransformer().eval()  # random weights: every head matters
    x = torch.randn(64, TOKENS, 2)
    for keep in (torch.tensor([True, False, True, False]), torch.tensor([False, False, False, True])):
        expected = _reference_heads(net, x, keep)
        for key in ("heads:attn", Heads("attn"), "heads:attn.norm:4"):
            with mask_units(net, {key: keep}), torch.no_grad():
                assert torch.allclose(net(x), expected, atol=1e-6), key


def test_neurons_gate_the_last_dim_over_all_tokens() -> None:
    torch.manual_seed(2)
    net = TinyTransformer().eval()
    x = torch.randn(32, TOKENS, 2)
    spec = resolve_layers(net, ["neurons:embed"])[0]
    keep = torch.rand(DIM) < 0.5

    def zero(_m: nn.Module, _i: object, out: torch.Tensor) -> torch.Tensor:
        return out * keep.float()

    handle = net.embed.register_forward_hook(zero)
    with torch.no_grad():
        expected = net(x)
    handle.remove()
    with mask_units(net, {Neurons("embed"): keep}), torch.no_grad():
        got = net(x)
    assert torch.allclose(got, expected, atol=1e-6)
    assert spec.name == "neurons:embed" and spec.module is net.embed


def test_heads_errors_name_the_fix() -> None:
    net = TinyTransformer()
    with pytest.raises(LayerNotFoundError, match="num_heads"):
        resolve_layers(net, [Heads("fc")])  # not an attention module, and no head count
    with pytest.raises(LayerNotFoundError, match="do not split into 4 heads"):
        with mask_units(net, {"heads:fc:4": torch.ones(4, dtype=torch.bool)}), torch.no_grad():
            net(torch.randn(2, TOKENS, 2))  # fc has 6 features
    with pytest.raises(LayerNotFoundError, match="whole number"):
        resolve_layers(net, ["heads:attn:x"])
    with pytest.raises(LayerNotFoundError, match="Closest names"):
        resolve_layers(net, ["neurons:atn"])


def test_a_detector_built_on_heads_masks_them_at_full_size() -> None:
    # Heads cannot be cut out of the qkv and proj matrices by the channel walk: the detector masks them, and says so.
    net, x = _planted(), _tokens(200)
    snap = snapshot(net)
    spec = export_specialist(net, {"heads:attn": [CARRIER]}, x[:2], target_class=1)
    assert spec.cuts[0].masked and "heads" in spec.cuts[0].stops[0] and spec.fallback is not None
    keep = torch.zeros(HEADS, dtype=torch.bool)
    keep[CARRIER] = True
    with torch.no_grad():
        assert torch.equal(spec.module(x), _reference_heads(net, x, keep).argmax(1) == 1)
    assert_untouched(net, snap)


def test_every_compare_method_finds_the_carrier_head(tmp_path) -> None:
    from coreunits.compare import compare_methods, default_methods

    net, x = _planted(), _tokens(600)
    names = ["switch_gates", "greedy_exact", "mean_activation", "grad_x_activation"]
    records = compare_methods(net, "heads:attn", [1], x, target=0.99, methods=default_methods(0, include=names),
                              progress=False, out=tmp_path)
    assert {r["method"]: r["units"] for r in records} == {key: [CARRIER] for key in names}
    # Record files are named without the ':' (not allowed in Windows file names).
    assert min(p.name for p in (tmp_path / "runs").iterdir()) == "heads-attn_c1_grad_x_activation.json"


def test_the_bundled_vit_attention_is_timms_and_its_units_resolve() -> None:
    from coreunits.models import Attention, MnistViT

    torch.manual_seed(0)
    ours, theirs = Attention(16, 4), timm_attention(16, num_heads=4, qkv_bias=True)
    theirs.load_state_dict(ours.state_dict())  # the same parameter names: qkv, proj
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    model = MnistViT().eval()
    specs = resolve_layers(model, ["heads:blocks.0.attn", "neurons:blocks.5.mlp.act"])
    assert [s.path for s in specs] == ["blocks.0.attn.norm", "blocks.5.mlp.act"]
    assert specs[0].groups == 6
