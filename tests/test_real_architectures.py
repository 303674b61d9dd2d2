"""Real torchvision and timm architectures: the engine that ran, the model untouched, the target reached.

Each model is the library's own class and forward code, randomly initialised
with a fixed seed (no weights can be downloaded), for 32x32 inputs and
``CLASSES`` classes. A random network's decisions are noise spread over every
unit, which no small set of units keeps (with a random head and the biases
centred by ``archs.spread_classes``, target mode needed minutes per model
adding units back one by one); a trained one's are not. So each model gets
decisions worth keeping: its head (the last Linear) is fitted by ridge
regression on its own penultimate features of class-templated images (a
smooth random pattern per class plus noise); the rest stays random. Then
target mode finds the fewest units of one named layer that keep ``TARGET`` of
the "class c / not c" decisions on D'_c, and the test checks that the target
is reached, that the reported mask gives the reported rate through the real
model (forward hooks on its real modules), which engine ran, and that the
model is left as it was (values, modes, hooks, grads, bytes).

With ``COREUNITS_ARCH_TABLE`` naming a file, every passing case appends one
JSON line to it (``scripts/architecture_table.py`` turns them into README's
table of the architectures tested).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import assert_untouched, direct_strict_rate, load_script, predicted, snapshot
from torch import nn

from coreunits import ActivationCache, CoreUnits, find_core_units, holding_rate, mask_units
from coreunits._core.evaluation import masked_scores

CLASSES = 4
SIZE = 32
INPUTS = 128
SEED = 0
TARGET = 0.95
RIDGE = 1e-2
# Short optimisations (target mode lowers alpha from here when a run misses by much), and drops
# tried once each, lowest gate first: least-harm drops end with exchange, which on these layers
# (320 to 4096 units, no batched path) runs the suffix once per unit outside the set per round.
OPTIONS: dict[str, Any] = {"epochs": 1, "min_steps": 60, "drop_order": "gate", "progress": False}
TABLE_ENV = "COREUNITS_ARCH_TABLE"


@dataclass(frozen=True)
class Arch:
    """One layer of one library model: how to build it, where its head is, what to expect."""

    library: str
    model: str
    layer: str
    head: str
    unit_dim: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    engine: str = "fx"
    slow: bool = False

    @property
    def id(self) -> str:
        return f"{self.library}-{self.model}-{self.layer}"

    def build(self) -> nn.Module:
        """The library's model, random init from ``SEED``, ``CLASSES`` outputs."""
        torch.manual_seed(SEED)
        if self.library == "torchvision":
            return torchvision.models.get_model(self.model, num_classes=CLASSES, **self.kwargs)
        timm = pytest.importorskip("timm")
        return timm.create_model(self.model, pretrained=False, num_classes=CLASSES, **self.kwargs)


ARCHS = [
    Arch("torchvision", "resnet18", "layer4.0", "fc"),
    Arch("torchvision", "vgg11_bn", "classifier.4", "classifier.6", slow=True),
    Arch("torchvision", "mobilenet_v3_small", "features.11", "classifier.3"),
    Arch("torchvision", "efficientnet_b0", "features.7", "classifier.1", slow=True),
    Arch("torchvision", "convnext_tiny", "features.7.2", "classifier.2", slow=True),
    Arch("timm", "resnet18", "layer4.0.act2", "fc"),
    Arch("timm", "convnext_atto", "stages.3.blocks.1", "head.fc"),
    Arch("timm", "vit_tiny_patch16_224", "blocks.10", "head", unit_dim=2, kwargs={"img_size": SIZE}),
]


def class_images(n: int = INPUTS, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``(n, 3, SIZE, SIZE)`` and their labels: a smooth random pattern per class, plus noise."""
    g = torch.Generator().manual_seed(seed)
    patterns = F.interpolate(torch.randn(CLASSES, 3, 4, 4, generator=g), size=SIZE, mode="bilinear")
    labels = torch.arange(n) % CLASSES
    return patterns[labels] + 0.2 * torch.randn(n, 3, SIZE, SIZE, generator=g), labels


def fit_head(model: nn.Module, head_name: str, x: torch.Tensor, labels: torch.Tensor) -> None:
    """Fit the head (a Linear) by ridge regression to the one-hot labels, on its own eval-mode inputs for ``x``."""
    head = model.get_submodule(head_name)
    assert isinstance(head, nn.Linear) and head.bias is not None
    seen: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0].detach()))
    try:
        predicted(model, x)
    finally:
        handle.remove()
    features = seen[0].double()
    mean = features.mean(dim=0)
    centred = features - mean
    targets = F.one_hot(labels, CLASSES).double()
    gram = centred @ centred.T
    ridge = RIDGE * float(gram.trace()) / len(x)
    weight = centred.T @ torch.linalg.solve(gram + ridge * torch.eye(len(x), dtype=gram.dtype), targets)
    with torch.no_grad():
        head.weight.copy_(weight.T)
        head.bias.copy_(targets.mean(dim=0) - mean @ weight)


def prepared(arch: Arch) -> tuple[nn.Module, torch.Tensor, int]:
    """The model with its head fitted, the inputs, and the class it predicts most."""
    model = arch.build()
    x, labels = class_images()
    fit_head(model, arch.head, x, labels)
    counts = torch.bincount(predicted(model, x), minlength=CLASSES)
    assert bool((counts >= INPUTS // (2 * CLASSES)).all()), counts  # decisions spread over every class
    return model, x, int(counts.argmax())


def record(arch: Arch, r: CoreUnits) -> None:
    """Append the case's line to the file ``COREUNITS_ARCH_TABLE`` names (nothing when unset)."""
    path = os.environ.get(TABLE_ENV)
    if not path:
        return
    row = {
        "library": arch.library, "model": arch.model, "layer": arch.layer,
        "units_total": r.total_units[arch.layer], "units_kept": r.num_units[arch.layer],
        "holding_rate_strict": r.holding_rate_strict, "target": TARGET, "engine": r.settings["engine"],
        "prefix_cached": r.settings["prefix_cached"], "fallbacks": r.settings["fallbacks"],
        "seconds": round(r.seconds, 2), "unit_dim": arch.unit_dim, "dprime": r.dprime["size"],
        "drop_order": r.settings["drop_order"],
        "input": [INPUTS, 3, SIZE, SIZE], "torch": torch.__version__,
    }
    with Path(path).open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


@pytest.mark.parametrize(
    "arch", [pytest.param(a, id=a.id, marks=[pytest.mark.slow] if a.slow else []) for a in ARCHS]
)
def test_real_architecture_reaches_target_and_is_left_untouched(arch: Arch) -> None:
    model, x, c = prepared(arch)
    model.train()  # BatchNorm, Dropout, stochastic depth: coreunits must run it in eval mode and restore this
    snap = snapshot(model)
    r = find_core_units(model, arch.layer, c, x, target_holding_rate=TARGET, seed=SEED, unit_dim=arch.unit_dim,
                        **OPTIONS)
    assert_untouched(model, snap)
    assert all(m.training for m in model.modules())

    layer, total = arch.layer, r.total_units[arch.layer]
    assert r.settings["engine"] == arch.engine, r.settings["fallbacks"]
    assert r.settings["target"]["reached"] and r.holding_rate_strict >= TARGET
    assert 0 < r.num_units[layer] < total
    assert r.masks[layer].shape == r.gates[layer].shape and int(r.masks[layer].sum()) == r.num_units[layer]
    # The reported rate is what the mask gives on D'_c, and through the real model's own modules.
    kw = {"unit_dim": arch.unit_dim}
    assert holding_rate(model, r.masks, c, x, build_dprime_first=True, seed=SEED, **kw) == r.holding_rate_strict
    assert holding_rate(model, r.masks, c, x, **kw) == direct_strict_rate(model, r.masks, c, x, **kw)
    assert_untouched(model, snap)
    record(arch, r)


def test_fx_splits_inside_a_timm_block() -> None:
    # Gating inside a block traces the block's own forward: timm's ConvNeXt multiplies by
    # gamma.reshape(1, -1, 1, 1) after the MLP, a constant the suffix recomputes (hooks ran before).
    # gamma starts at 1 instead of timm's 1e-6, so that the MLP's units matter to the scores.
    arch = Arch("timm", "convnext_atto", "stages.3.blocks.1.mlp.act", "head.fc", kwargs={"ls_init_value": 1.0})
    model, x, c = prepared(arch)
    cache = ActivationCache(model, arch.layer, x)
    assert cache.gated.engine == "fx" and "engine" not in cache.fallbacks
    mask = torch.arange(cache.specs[0].num_units) % 3 == 0
    split = masked_scores(cache, torch.arange(len(x)), [mask.float()])
    model.eval()
    with torch.no_grad():
        plain = model(x)
        with mask_units(model, {arch.layer: mask}):
            real = model(x)
    assert not torch.allclose(real, plain, atol=1e-3)  # the mask matters
    assert torch.allclose(split, real, atol=1e-5)
    assert holding_rate(model, {arch.layer: mask}, c, cache) == direct_strict_rate(model, {arch.layer: mask}, c, x)


def _table_script():  # type: ignore[no-untyped-def]
    return load_script("architecture_table")


def test_architecture_table_is_written_between_the_markers_only(tmp_path: Path) -> None:
    script = _table_script()
    row = {"library": "timm", "model": "vit_tiny_patch16_224", "layer": "blocks.10", "units_total": 192,
           "units_kept": 3, "holding_rate_strict": 0.96875, "target": 0.95, "engine": "fx", "seconds": 4.31,
           "unit_dim": 2, "input": [128, 3, 32, 32]}
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(json.dumps(dict(row, units_kept=9)) + "\n" + json.dumps(row) + "\n", encoding="utf-8")
    rows = script.read_rows(jsonl)
    assert rows == [row]  # the last line of a case wins
    table = script.render(rows)
    assert "| timm | vit_tiny_patch16_224 | `blocks.10` (unit_dim=2) | 3 / 192 | 0.969 (0.95) | fx | 4.3 |" in table
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n{script.START}\nold table\n{script.END}\nafter\n", encoding="utf-8")
    assert script.main(["--jsonl", str(jsonl), "--readme", str(readme)]) == 0
    text = readme.read_text(encoding="utf-8")
    assert "old table" not in text and table in text
    assert text.startswith("# Title\n\nbefore\n") and text.endswith(f"{script.END}\nafter\n")
    # No markers: README is left as it was.
    readme.write_text("# Title\n", encoding="utf-8")
    assert script.main(["--jsonl", str(jsonl), "--readme", str(readme)]) == 0
    assert readme.read_text(encoding="utf-8") == "# Title\n"
