"""The two classifiers studied: the TensorFlow "deep MNIST" net and the TF CIFAR-10 net.

Every layer is its own submodule, called exactly once in ``forward`` and in
definition order. That keeps the networks ``torch.fx``-traceable and lets the
core-unit code address hidden layers by name (``dict(model.named_modules())["max1"]``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MODEL_NAMES", "CifarNet", "MnistMLP", "MnistNet", "PerImageStandardize", "build_model"]


class MnistNet(nn.Module):
    """The TensorFlow "Deep MNIST for experts" convolutional network.

    conv1 (5x5, 32) -> relu1 -> max1 (2x2) -> conv2 (5x5, 64) -> relu2 -> max2 (2x2)
    -> flatten -> fc1 (3136 -> 1024) -> relu3 -> dropout (0.5) -> fc2 (1024 -> 10).

    Input: float images (N, 1, 28, 28) in [0, 1]. Output: logits (N, 10).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=5, padding=2)
        self.relu1 = nn.ReLU()
        self.max1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.relu2 = nn.ReLU()
        self.max2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(7 * 7 * 64, 1024)
        self.relu3 = nn.ReLU()
        self.dropout = nn.Dropout(0.5)
        self.fc2 = nn.Linear(1024, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute logits.

        Args:
            x: Images (N, 1, 28, 28) in [0, 1].

        Returns:
            Logits (N, 10).
        """
        x = self.max1(self.relu1(self.conv1(x)))
        x = self.max2(self.relu2(self.conv2(x)))
        x = self.flatten(x)
        x = self.dropout(self.relu3(self.fc1(x)))
        return self.fc2(x)


class MnistMLP(nn.Module):
    """A two-hidden-layer perceptron for MNIST: a classifier of another family than the paper's CNNs.

    flatten -> fc1 (784 -> 128) -> relu1 -> fc2 (128 -> 64) -> relu2 -> fc3 (64 -> 10).
    Gating ``relu1`` (128 units) or ``relu2`` (64 units) selects neurons, each feeding a Linear.

    Input: float images (N, 1, 28, 28) in [0, 1]. Output: logits (N, 10).
    """

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(28 * 28, 128)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(128, 64)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, 10) of images (N, 1, 28, 28)."""
        x = self.relu1(self.fc1(self.flatten(x)))
        return self.fc3(self.relu2(self.fc2(x)))


class PerImageStandardize(nn.Module):
    """Per-image standardisation, like ``tf.image.per_image_standardization``.

    Each image becomes ``(x - mean) / max(std, 1 / sqrt(num_elements))`` with mean
    and (population) std taken over all its channels and pixels; the lower bound
    avoids dividing by zero on uniform images.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Standardise each image of a batch.

        Args:
            x: Float images (N, C, H, W).

        Returns:
            Tensor of the same shape with zero mean and unit std per image.
        """
        flat = x.flatten(1)
        mean = flat.mean(dim=1, keepdim=True)
        std = flat.std(dim=1, unbiased=False, keepdim=True)
        # Built from tensor ops only (no Python math on shapes) so fx can trace it.
        min_std = torch.full_like(std, flat.shape[1]).rsqrt()
        return ((flat - mean) / torch.maximum(std, min_std)).view_as(x)


def _tf_lrn() -> nn.LocalResponseNorm:
    # TF: depth_radius=4, bias=1.0, alpha=0.001/9, beta=0.75. torch divides alpha by
    # the window size (2*4+1 = 9), so pass alpha * 9 to get the same normalisation.
    size = 2 * 4 + 1
    return nn.LocalResponseNorm(size=size, alpha=0.001 / 9.0 * size, beta=0.75, k=1.0)


class CifarNet(nn.Module):
    """The TensorFlow CIFAR-10 tutorial network.

    standardize -> conv1 (5x5, 64, same) -> relu1 -> max1 (3x3/2) -> norm1 (LRN)
    -> conv2 (5x5, 64, same) -> relu2 -> norm2 (LRN) -> max2 (3x3/2) -> flatten
    -> fc1 (2304 -> 384) -> relu3 -> fc2 (384 -> 192) -> relu4 -> fc3 (192 -> 10).

    Input: float images (N, 3, 24, 24) in [0, 1] (24x24 crops of the 32x32 images).
    Output: logits (N, 10).
    """

    def __init__(self) -> None:
        super().__init__()
        self.standardize = PerImageStandardize()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=5, padding=2)
        self.relu1 = nn.ReLU()
        # padding=1 reproduces TF's 'SAME' output size (24 -> 12, 12 -> 6).
        self.max1 = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.norm1 = _tf_lrn()
        self.conv2 = nn.Conv2d(64, 64, kernel_size=5, padding=2)
        self.relu2 = nn.ReLU()
        self.norm2 = _tf_lrn()
        self.max2 = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(6 * 6 * 64, 384)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(384, 192)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(192, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute logits.

        Args:
            x: Images (N, 3, 24, 24) in [0, 1].

        Returns:
            Logits (N, 10).
        """
        x = self.standardize(x)
        x = self.norm1(self.max1(self.relu1(self.conv1(x))))
        x = self.max2(self.norm2(self.relu2(self.conv2(x))))
        x = self.flatten(x)
        x = self.relu3(self.fc1(x))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)


#: Names accepted by :func:`build_model`.
MODEL_NAMES: tuple[str, ...] = ("mnist", "cifar10", "mnist_mlp")


def build_model(name: str) -> nn.Module:
    """Create an untrained model by name.

    Args:
        name: ``"mnist"`` for :class:`MnistNet`, ``"cifar10"`` for :class:`CifarNet`,
            ``"mnist_mlp"`` for :class:`MnistMLP` (case-insensitive).

    Returns:
        The freshly initialised model.

    Raises:
        ValueError: For an unknown name.
    """
    key = name.strip().lower()
    if key == "mnist":
        return MnistNet()
    if key == "cifar10":
        return CifarNet()
    if key == "mnist_mlp":
        return MnistMLP()
    raise ValueError(f"unknown model {name!r}; choose one of {list(MODEL_NAMES)}")
