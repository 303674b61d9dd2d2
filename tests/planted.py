"""Hand-built models whose core units are known (shared by the tests)."""

from __future__ import annotations

import torch
from torch import nn


class PlantedNet(nn.Module):
    """8-channel (or ``channels``) conv net where only channels {1, 4} carry class 0's evidence.

    ``feat`` is an 8-channel conv + ReLU; ``pool`` averages each channel; the
    head gives class 0 the score ``3 * (f1 + f4) + b`` and classes 1 and 2
    constant scores, so "is it class 0?" depends on channels 1 and 4 alone,
    and on both (their sum crosses the threshold).
    """

    TRUE_UNITS = [1, 4]

    def __init__(self, seed: int = 0, channels: int = 8) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.feat = nn.Conv2d(1, channels, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(channels, 3)
        with torch.no_grad():
            self.feat.weight.copy_(torch.randn(channels, 1, 3, 3, generator=g) * 0.5)
            self.feat.bias.zero_()
            self.head.weight.zero_()
            self.head.weight[0, 1] = 3.0
            self.head.weight[0, 4] = 3.0
            self.head.bias.copy_(torch.tensor([0.0, 0.0, -0.5]))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.pool(self.relu(self.feat(x)))))


def planted_data(model: PlantedNet, n: int = 1200, seed: int = 1) -> torch.Tensor:
    """Inputs for which roughly 40% are predicted as class 0 (bias set from the data)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    with torch.no_grad():
        f = model.pool(model.relu(model.feat(x))).flatten(1)
        evidence = 3.0 * (f[:, 1] + f[:, 4])
        # Class 0 wins when evidence + b > 0 (class 1 scores 0): put 40% above.
        b = -float(evidence.quantile(0.6))
        model.head.bias[0] = b
    return x
