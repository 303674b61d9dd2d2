"""The two classifiers studied: the TensorFlow "deep MNIST" net and the TF CIFAR-10 net.

Every layer is its own submodule, called exactly once in ``forward`` and in
definition order. That keeps the networks ``torch.fx``-traceable and lets the
core-unit code address hidden layers by name (``dict(model.named_modules())["max1"]``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MODEL_NAMES", "CifarNet", "CifarViT", "MnistMLP", "MnistNet", "MnistViT", "PerImageStandardize", "SmallViT",
    "build_model",
]


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


class Attention(nn.Module):
    """Multi-head self-attention laid out as timm's ``Attention``: ``qkv``, the heads side by side, ``norm``, ``proj``.

    ``norm`` is an Identity, as in timm by default; it is where ``heads:NAME`` gates
    each head's slice, after the heads are concatenated and before ``proj`` mixes them.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape[0], x.shape[1], x.shape[2]
        q, k, v = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        heads = F.scaled_dot_product_attention(q, k, v)  # (b, heads, t, head_dim)
        return self.proj(self.norm(heads.transpose(1, 2).reshape(b, t, c)))


class Mlp(nn.Module):
    """fc1 -> GELU (``act``: the hidden neurons, ``neurons:NAME.act``) -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """A pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SmallViT(nn.Module):
    """A small vision transformer: a classifier whose units are attention heads and MLP neurons.

    Square patches (a class token beside them) -> ``depth`` pre-norm blocks of
    ``num_heads`` heads -> LayerNorm -> a linear head on the class token. Block
    ``i``'s heads are ``heads:blocks.i.attn`` (its ``Attention`` is laid out as
    timm's) and its MLP neurons ``neurons:blocks.i.mlp.act`` (each over all tokens).

    Input: float images (N, in_chans, image_size, image_size) in [0, 1], shifted
    by -0.5 (``standardize=False``) or standardised per image. Output: logits (N, 10).
    """

    def __init__(self, image_size: int, in_chans: int, patch: int, dim: int = 96, depth: int = 6,
                 num_heads: int = 6, mlp_ratio: int = 2, standardize: bool = False) -> None:
        super().__init__()
        tokens = (image_size // patch) ** 2
        self.standardize = PerImageStandardize() if standardize else None
        self.patch_embed = nn.Conv2d(in_chans, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, num_heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, 10) of images (N, in_chans, image_size, image_size)."""
        x = self.standardize(x) if self.standardize is not None else x - 0.5
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class MnistViT(SmallViT):
    """The MNIST ViT: 7x7 patches (16 tokens), 6 blocks of 6 heads, dim 96, MLP 192 neurons; sized for 2 CPU cores.

    Input: float images (N, 1, 28, 28) in [0, 1].
    """

    def __init__(self) -> None:
        super().__init__(image_size=28, in_chans=1, patch=7)


class CifarViT(SmallViT):
    """The CIFAR-10 ViT: 4x4 patches of the 24x24 central crop (36 tokens), 6 blocks of 6 heads, dim 96, MLP 192.

    Input: float images (N, 3, 24, 24) in [0, 1], as the paper's CIFAR-10 net takes them;
    each is standardised per image, as that net does.
    """

    def __init__(self) -> None:
        super().__init__(image_size=24, in_chans=3, patch=4, standardize=True)


#: Names accepted by :func:`build_model`.
MODEL_NAMES: tuple[str, ...] = ("mnist", "cifar10", "mnist_mlp", "mnist_vit", "cifar10_vit")


def build_model(name: str) -> nn.Module:
    """Create an untrained model by name.

    Args:
        name: ``"mnist"`` for :class:`MnistNet`, ``"cifar10"`` for :class:`CifarNet`,
            ``"mnist_mlp"`` for :class:`MnistMLP`, ``"mnist_vit"`` for :class:`MnistViT`, ``"cifar10_vit"`` for
            :class:`CifarViT` (case-insensitive).

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
    if key == "mnist_vit":
        return MnistViT()
    if key == "cifar10_vit":
        return CifarViT()
    raise ValueError(f"unknown model {name!r}; choose one of {list(MODEL_NAMES)}")
