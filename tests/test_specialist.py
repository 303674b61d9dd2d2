"""Class specialists: the cut model computes exactly what the masked model computes, on fewer channels."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, assert_untouched, shared_data_or_skip, snapshot
from torch import nn

from coreunits import export_specialist, mask_units
from coreunits._core.specialist import KeptChannelLRN, count_flops
from coreunits.cli import main


class _Net(nn.Module):
    """Conv/BN/pool, a local response norm on each side of a gated layer, flatten into Linear, an MLP tail."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(12)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.norm1 = nn.LocalResponseNorm(5, alpha=0.5, beta=0.75, k=1.0)
        self.conv2 = nn.Conv2d(12, 16, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.norm2 = nn.LocalResponseNorm(3, alpha=0.5)
        self.pool2 = nn.AdaptiveAvgPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64, 20)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(20, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(self.pool1(self.relu1(self.bn1(self.conv1(x)))))
        x = self.flatten(self.pool2(self.norm2(self.relu2(self.conv2(x)))))
        return self.fc2(self.relu3(self.fc1(x)))


def _net() -> _Net:
    torch.manual_seed(0)
    net = _Net()
    with torch.no_grad():  # BatchNorm statistics that matter, so a wrong slice would show
        net.bn1.running_mean.uniform_(-0.5, 0.5)
        net.bn1.running_var.uniform_(0.5, 2.0)
        net.bn1.weight.uniform_(0.5, 1.5)
        net.bn1.bias.uniform_(-0.2, 0.2)
    return net.eval()


def _masked_scores(model: nn.Module, units: dict[str, list[int]], sizes: dict[str, int], x: torch.Tensor) -> torch.Tensor:
    masks = {k: torch.isin(torch.arange(sizes[k]), torch.tensor(v)) for k, v in units.items()}
    with torch.no_grad(), mask_units(model, masks):
        return model(x)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cut_model_scores_equal_the_masked_models(seed: int) -> None:
    net, x = _net(), torch.rand(64, 3, 16, 16)
    gen = torch.Generator().manual_seed(seed)
    sizes = {"pool1": 12, "pool2": 16, "relu3": 20}
    units = {k: sorted(torch.randperm(n, generator=gen)[: n // 3 + seed].tolist()) for k, n in sizes.items()}
    snap = snapshot(net)
    spec = export_specialist(net, units, x[:4], target_class=1, check_inputs=x)
    assert_untouched(net, snap)
    assert spec.fallback is None and spec.pruned
    expected = _masked_scores(net, units, sizes, x)
    body = spec.module.body
    with torch.no_grad():
        assert torch.allclose(body(x), expected, atol=1e-5)
        assert torch.equal(spec.module(x), expected.argmax(1) == 1)
    cuts = {c.layer: c for c in spec.cuts}
    assert cuts["pool1"].producer == "conv1" and cuts["pool1"].consumers == ["conv2"]
    assert body.conv1.out_channels == body.bn1.num_features == len(units["pool1"])  # BatchNorm sliced with its conv
    assert isinstance(body.norm1, KeptChannelLRN)  # rebuilt over the kept channels' original positions
    assert body.conv2.in_channels == len(units["pool1"])
    # Upstream of pool2 a local response norm mixes channels: conv2 keeps all its outputs, the units are gathered.
    assert cuts["pool2"].producer is None and "norm2" in cuts["pool2"].stops[0]
    assert body.fc1.in_features == 4 * len(units["pool2"]) and body.fc1.out_features == len(units["relu3"])
    assert body.fc2.in_features == len(units["relu3"])
    assert count_flops(spec.module, x[:1]) < count_flops(net, x[:1])


def test_kept_channel_lrn_is_the_full_lrn_of_a_tensor_zero_elsewhere() -> None:
    lrn = nn.LocalResponseNorm(4, alpha=2.0, beta=0.6, k=0.5)  # an even window: asymmetric around each channel
    kept = torch.tensor([0, 2, 3, 5, 6, 9])  # neighbours at distances 1, 2 and 3
    x = torch.randn(3, 10, 5, 5)
    x[:, [i for i in range(10) if i not in kept.tolist()]] = 0
    assert torch.allclose(KeptChannelLRN(lrn, kept)(x[:, kept]), lrn(x)[:, kept], atol=1e-6)


def test_residual_blocks_stop_the_walks_and_stay_exact() -> None:
    from torchvision.models import resnet18

    torch.manual_seed(0)
    net, x = resnet18(num_classes=3).eval(), torch.rand(8, 3, 32, 32)
    units = {"layer1": list(range(0, 64, 3)), "layer2.0.conv1": list(range(0, 128, 2)), "layer2.1.relu": [1, 2, 3]}
    spec = export_specialist(net, units, x[:2], target_class=0)
    cuts = {c.layer: c for c in spec.cuts}
    # layer1's output feeds layer2's block and its shortcut: nothing downstream can be cut.
    assert any("feeds 2 operations" in s for s in cuts["layer1"].stops)
    # A conv's own output channels are cut; BatchNorm after it would turn a masked zero into a constant.
    assert cuts["layer2.0.conv1"].producer == "layer2.0.conv1" and cuts["layer2.0.conv1"].consumers == []
    assert cuts["layer2.1.relu"].masked  # the block calls its ReLU twice
    expected = _masked_scores(net, units, {"layer1": 64, "layer2.0.conv1": 128, "layer2.1.relu": 128}, x)
    with torch.no_grad():
        assert torch.allclose(spec.module.body(x), expected, atol=1e-4)
    # Where nothing can be cut, the detector is the masked model at full size, and the result says why.
    alone = export_specialist(net, {"layer1": units["layer1"]}, x[:2], target_class=0)
    assert not alone.pruned and alone.fallback is not None and "feeds 2 operations" in alone.fallback
    only = _masked_scores(net, {"layer1": units["layer1"]}, {"layer1": 64}, x)
    assert torch.equal(alone.module(x), only.argmax(1) == 0)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(6 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = int(x.shape[0])  # a Python int of a traced size: torch.fx cannot follow it
        return self.fc(self.relu(self.conv(x)).reshape(n, -1))


def test_untraceable_model_falls_back_to_the_masked_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net, x = _Untraceable().eval(), torch.rand(16, 1, 8, 8)
    snap = snapshot(net)
    spec = export_specialist(net, {"relu": [0, 2, 5]}, x[:4], tmp_path / "d.pt2", target_class=2, check_inputs=x)
    assert_untouched(net, snap)
    assert spec.fallback is not None and "torch.fx cannot trace" in spec.fallback and not spec.pruned
    expected = _masked_scores(net, {"relu": [0, 2, 5]}, {"relu": 6}, x)
    assert torch.equal(spec.module(x), expected.argmax(1) == 2)
    loaded = torch.export.load(tmp_path / "d.pt2").module()
    assert torch.equal(loaded(x[:4]), spec.module(x[:4]))


def test_export_loads_in_a_process_without_coreunits(tmp_path: Path) -> None:
    net, x = _net(), torch.rand(20, 3, 16, 16)
    spec = export_specialist(net, {"pool1": [1, 4, 7], "pool2": [0, 3, 9, 12]}, x[:4], tmp_path / "d.pt2",
                             target_class=3)
    torch.save(x, tmp_path / "x.pt")
    script = ("import sys, torch\n"
              f"m = torch.export.load({str(tmp_path / 'd.pt2')!r}).module()\n"
              f"out = m(torch.load({str(tmp_path / 'x.pt')!r}))\n"  # a batch size other than the example's
              "assert not any(n.startswith('coreunits') for n in sys.modules), 'coreunits was imported'\n"
              f"torch.save(out, {str(tmp_path / 'out.pt')!r})\n")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, timeout=300)
    assert torch.equal(torch.load(tmp_path / "out.pt"), spec.module(x))
    assert (tmp_path / "d.pt2.state_dict.pt").exists()


def test_cli_export_of_a_committed_mnist_result(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = shared_data_or_skip()
    out = tmp_path / "detector.pt2"
    code = main(["export", "--data-root", str(root), "--result", str(REPO / "results/specialists/mnist/c0.json"),
                 "--out", str(out), "--threads", "1"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["pruned"] and record["fallback"] is None
    assert record["full_flops"] >= 3 * record["flops"]
    assert record["holding_rate_strict"] >= 0.99 and record["dprime_size"] > 1000
    assert "conv1 output, conv2 input" in printed and "holding rate (strict" in printed
    loaded = torch.export.load(out).module()
    assert loaded(torch.rand(5, 1, 28, 28)).dtype == torch.bool


@pytest.mark.parametrize(("argv", "message"), [
    (["--out", "d.pth"], "must end in .pt2"),
    (["--out", "d.pt2", "--result", "NOT_A_RESULT"], "is not a coreunits result"),
])
def test_cli_export_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                        message: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"layers": []}')
    argv = [str(bad) if a == "NOT_A_RESULT" else str(tmp_path / a) if a.startswith("d.") else a for a in argv]
    if "--result" not in argv:
        argv += ["--result", str(bad)]
    assert main(["export", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
