"""Small but structurally faithful models, built by hand with plain ``torch.nn``, and test data.

ResNet-18 is torchvision's own (``narrowed`` shrinks a real torchvision model's
widths for speed, keeping its classes and forward code). The models here cover
the shapes coreunits must handle on real models: an integer-indexed VGG
``features`` Sequential, MobileNetV2 blocks, a tabular MLP, dict and tuple
outputs, and a forward with data-dependent Python control flow that
``torch.fx`` cannot trace. ``tests/test_real_architectures.py`` runs
unmodified torchvision and timm models.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "BranchyHead",
    "ControlFlowNet",
    "DictOutputNet",
    "InvertedResidual",
    "LeafControlFlowNet",
    "TupleOutputNet",
    "image_data",
    "mobilenet_v2_small",
    "narrowed",
    "spread_classes",
    "tabular_data",
    "tabular_mlp",
    "vgg_small",
]


# --------------------------------------------------------------------------- narrowing
def narrowed(model: nn.Module, factor: int, in_channels: int = 3) -> nn.Module:
    """``model`` with every hidden channel and feature count divided by ``factor``, in place.

    Each ``Conv2d``, ``BatchNorm2d`` and ``Linear`` is replaced by a fresh one of
    the same name, kernel, stride, padding and bias, ``factor`` times narrower;
    the input's ``in_channels`` and the last Linear's classes stay. The model's
    own classes and forward code (torchvision's in-place ReLUs, shared ReLU
    modules, ``out += identity``) are untouched: only the tensors shrink, so a
    test runs in a fraction of the time on the real architecture. Convolutions
    are initialised as torchvision's ResNet does (Kaiming normal, fan-out),
    BatchNorm to weight 1 and bias 0, Linear by its default.
    """
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]

    def narrow(size: int, keep: bool = False) -> int:
        if keep:
            return size
        if size % factor:
            raise ValueError(f"{size} channels do not divide by {factor}")
        return size // factor

    for name, m in list(model.named_modules()):
        new: nn.Module
        if isinstance(m, nn.Conv2d):
            if m.groups != 1:
                raise ValueError(f"{name} is a grouped convolution; narrowed() handles groups=1 only")
            new = nn.Conv2d(narrow(m.in_channels, m.in_channels == in_channels), narrow(m.out_channels),
                            m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
                            bias=m.bias is not None)
            nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            new = nn.BatchNorm2d(narrow(m.num_features))
        elif isinstance(m, nn.Linear):
            new = nn.Linear(narrow(m.in_features), narrow(m.out_features, name == linears[-1]),
                            bias=m.bias is not None)
        else:
            continue
        model.set_submodule(name, new)
    return model


@torch.no_grad()
def spread_classes(model: nn.Module, x: Tensor, head: nn.Linear, output_fn=None) -> None:  # type: ignore[no-untyped-def]
    """Set ``head.bias`` so the (eval-mode) model predicts several classes on ``x``.

    A randomly initialised network tends to predict one class for every input;
    centring each class's logit on its median spreads the argmax over classes.
    The model's training flag is restored afterwards.
    """
    was = model.training
    model.eval()
    try:
        out = model(x)
        logits = output_fn(out) if output_fn is not None else out
        head.bias -= logits.median(dim=0).values
    finally:
        model.train(was)


def image_data(n: int = 256, channels: int = 3, size: int = 32, seed: int = 1) -> Tensor:
    """Random images ``(n, channels, size, size)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, generator=g)


# --------------------------------------------------------------------------- VGG
def vgg_small(num_classes: int = 5, in_channels: int = 3, seed: int = 0) -> nn.Module:
    """A VGG-style net: ``features`` (conv/BN/ReLU(inplace)/MaxPool, integer names) and ``classifier``.

    For a 3x16x16 input: ``features.3`` is the first MaxPool, ``features.10`` the
    ReLU after the third conv block's BatchNorm (16 channels at 4x4),
    ``classifier.1`` the hidden ReLU (32 features).
    """
    torch.manual_seed(seed)

    class VGG(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            cfg = [8, "M", 16, "M", 16, 16, "M"]
            layers: list[nn.Module] = []
            c = in_channels
            for v in cfg:
                if v == "M":
                    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                else:
                    layers += [nn.Conv2d(c, int(v), kernel_size=3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
                    c = int(v)
            self.features = nn.Sequential(*layers)
            self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
            self.classifier = nn.Sequential(
                nn.Linear(c * 4, 32), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(32, num_classes)
            )

        def forward(self, x: Tensor) -> Tensor:
            x = self.features(x)
            x = self.avgpool(x)
            x = torch.flatten(x, 1)
            return self.classifier(x)

    return VGG()


# --------------------------------------------------------------------------- MobileNetV2
def conv_bn_act(cin: int, cout: int, stride: int = 1, groups: int = 1, act: type[nn.Module] = nn.ReLU6) -> nn.Sequential:
    """torchvision's ``Conv2dNormActivation``: ``0`` conv, ``1`` BatchNorm, ``2`` in-place activation."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3 if groups > 1 or stride > 1 or cin == 3 else 1, stride,
                  1 if groups > 1 or stride > 1 or cin == 3 else 0, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        act(inplace=True),
    )


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV2 block: expand (1x1), depthwise (3x3), project (1x1, linear) in ``conv``."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, act: type[nn.Module] = nn.ReLU6) -> None:
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_act(inp, hidden, act=act))
        layers += [
            conv_bn_act(hidden, hidden, stride=stride, groups=hidden, act=act),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


def mobilenet_v2_small(num_classes: int = 5, act: type[nn.Module] = nn.ReLU6, seed: int = 0) -> nn.Module:
    """A narrow MobileNetV2 (torchvision's names and block structure; ``act=nn.SiLU`` for an EfficientNet-like net).

    Every BatchNorm but the projections' is followed by an in-place activation,
    e.g. ``features.2.conv.0.1`` (BN, 24 channels) -> ``features.2.conv.0.2`` (ReLU6).
    ``features.3`` is a residual block (``x + self.conv(x)``).
    """
    torch.manual_seed(seed)

    class MobileNetV2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            settings = [(1, 8, 1, 1), (3, 12, 2, 2), (3, 16, 2, 2)]  # t, c, n, s
            cin = 8
            feats: list[nn.Module] = [conv_bn_act(3, cin, stride=2, act=act)]
            for t, c, n, s in settings:
                for i in range(n):
                    feats.append(InvertedResidual(cin, c, s if i == 0 else 1, t, act=act))
                    cin = c
            feats.append(conv_bn_act(cin, 64, act=act))
            self.features = nn.Sequential(*feats)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, num_classes))
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0, 0.01)
                    nn.init.zeros_(m.bias)

        def forward(self, x: Tensor) -> Tensor:
            x = self.features(x)
            x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
            x = torch.flatten(x, 1)
            return self.classifier(x)

    return MobileNetV2()


# --------------------------------------------------------------------------- tabular MLP
def tabular_mlp(in_features: int = 20, num_classes: int = 4, seed: int = 0) -> nn.Module:
    """MLP 20 -> 64 -> 32 -> 4 in ``net`` (``net.0`` Linear, ``net.1`` ReLU, ``net.2`` Linear, ...)."""
    torch.manual_seed(seed)

    class TabularMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(in_features, 64),
                nn.ReLU(),
                nn.Linear(64, 32),
                nn.ReLU(),
                nn.Linear(32, num_classes),
            )

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

    return TabularMLP()


def tabular_data(n: int = 400, in_features: int = 20, seed: int = 1) -> Tensor:
    """Standardised-looking tabular rows ``(n, in_features)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, in_features, generator=g)


# --------------------------------------------------------------------------- structured outputs
class _SmallConvBody(nn.Module):
    def __init__(self, in_channels: int = 3, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.pool(self.relu(self.conv(x))), 1)


class DictOutputNet(nn.Module):
    """Returns ``{"logits": (N, C), "aux": (N, 2)}`` (e.g. a multi-task head)."""

    def __init__(self, num_classes: int = 4, width: int = 8, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = _SmallConvBody(3, width)
        self.hidden = nn.Linear(width, 16)
        self.act = nn.ReLU()
        self.head = nn.Linear(16, num_classes)
        self.aux_head = nn.Linear(width, 2)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.body(x)
        return {"logits": self.head(self.act(self.hidden(f))), "aux": self.aux_head(f)}


class TupleOutputNet(DictOutputNet):
    """Returns ``(logits, features)`` (features = the pooled conv features)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        f = self.body(x)
        return self.head(self.act(self.hidden(f))), f


# --------------------------------------------------------------------------- control flow
class ControlFlowNet(nn.Module):
    """Data-dependent Python control flow in ``forward``: ``torch.fx`` cannot trace it.

    Each input takes its own branch (by the sign of its mean), in a Python loop
    over the batch, so the scores of one input never depend on the rest of the
    batch. fx fails both on iterating over a traced tensor and on ``bool()`` of one.
    """

    def __init__(self, in_features: int = 12, hidden: int = 16, num_classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.fc1(x))
        rows = []
        for xi, hi in zip(x, h):
            if xi.mean() > 0:  # data-dependent branch, per input
                rows.append(hi * 2.0)
            else:
                rows.append(hi - 0.5)
        return self.fc2(torch.stack(rows))


class BranchyHead(nn.Module):
    """A head whose forward branches on its input's values, element by element (a Python loop)."""

    def __init__(self, hidden: int = 16, num_classes: int = 3) -> None:
        super().__init__()
        self.lin = nn.Linear(hidden, num_classes)

    def forward(self, h: Tensor) -> Tensor:
        rows = []
        for row in h:
            rows.append(row * 2.0 if bool(row.detach().sum() > 1.0) else row)
        return self.lin(torch.stack(rows))


class LeafControlFlowNet(nn.Module):
    """Untraceable control flow only in a submodule *after* the gated layer.

    coreunits' tracer keeps modules off the path to the gated layers as leaves,
    so fx should still split this model and run ``head``'s real forward each step.
    """

    def __init__(self, in_features: int = 12, hidden: int = 16, num_classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.ReLU()
        self.head = BranchyHead(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.act(self.fc1(x)))
