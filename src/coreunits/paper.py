"""The paper layer: its classifiers, data sets, settings and numbers, labelled as such.

``default_checkpoint`` finds the bundled classifiers and ``cifar10_data``
loads CIFAR-10 the way the paper's experiments use it; ``reproduce``,
``compare``, the CLI and the benchmarks all take them from here.

``COEFFICIENTS`` are coreunits' choices of alpha and lambda for the paper's
networks (the paper does not publish its own), picked so that the holding
rate lands near the paper's operating point (about 99.5% on MNIST); see
README "Method notes" for how they were chosen. ``PAPER_TABLE1`` etc. are
the numbers printed in the paper, typed in by hand for comparison only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from coreunits._core.errors import MissingDataError
from coreunits._core.selection import DEFAULTS

__all__ = ["COEFFICIENTS", "MODELS", "cifar10_data", "coefficients", "default_checkpoint"]

_REPO_ROOT = Path(__file__).resolve().parents[2]

#: The bundled classifiers (the paper's two, an MLP and a ViT on MNIST, a ViT on CIFAR-10) and their checkpoints.
MODELS: dict[str, str] = {"mnist": "mnist_cnn.pt", "cifar10": "cifar10_cnn.pt", "mnist_mlp": "mnist_mlp.pt",
                          "mnist_vit": "mnist_vit.pt", "cifar10_vit": "cifar10_vit.pt"}


def default_checkpoint(model: str = "mnist") -> Path:
    """The bundled checkpoint of ``model`` (a key of :data:`MODELS`: "mnist" and "cifar10" are the paper's).

    Looked up under ``./checkpoints`` first, then next to the source tree.

    Raises:
        MissingDataError: no such checkpoint (says how to train one).
    """
    name = MODELS[model]
    for base in (Path.cwd(), _REPO_ROOT):
        path = base / "checkpoints" / name
        if path.is_file():
            return path
    raise MissingDataError(
        f"no {model} checkpoint found at ./checkpoints/{name} or {_REPO_ROOT / 'checkpoints' / name}; "
        f"train one with `coreunits train {model}` or pass --checkpoint"
    )


def cifar10_data(data_root: str | None, quick: bool) -> tuple[TensorDataset, str]:
    """CIFAR-10 as the paper's experiments use it: ``(dataset, description)``.

    The training images (the test split's first 2,000 when ``quick``), centrally
    cropped as for evaluation. CIFAR-10 is never downloaded.

    Raises:
        MissingDataError: no data root given (``--data-root`` / ``$COREUNITS_DATA``).
    """
    # The paper optimises on the training images, centrally cropped as for evaluation.
    data = cifar10_split(data_root, train=not quick, limit=2000 if quick else None)
    split = "test" if quick else "train"
    return data, f"CIFAR-10 {split} ({len(data)}) from {resolve_data_root_or_fail(data_root)}"


def resolve_data_root_or_fail(data_root: str | None) -> Path:
    """The CIFAR-10 data root (``--data-root`` / ``$COREUNITS_DATA``); CIFAR-10 is never downloaded."""
    from coreunits.data import resolve_data_root

    root = resolve_data_root(data_root)
    if root is None:
        raise MissingDataError("CIFAR-10 needs --data-root or $COREUNITS_DATA (it is not downloaded)")
    return root


def cifar10_split(data_root: str | None, train: bool, limit: int | None = None) -> TensorDataset:
    """One CIFAR-10 split (its first ``limit`` images), centrally cropped to 24x24 as the CIFAR-10 net takes it."""
    from coreunits.data import load_cifar10
    from coreunits.train import cifar10_eval_transform

    raw = load_cifar10(resolve_data_root_or_fail(data_root), train=train, limit=limit, progress=False)
    images = torch.cat([cifar10_eval_transform(x) for x in raw.tensors[0].split(5000)])
    return TensorDataset(images, raw.tensors[1])

#: (model, layer) -> alpha, lam and epochs used by the demo and the reproduction.
COEFFICIENTS: dict[tuple[str, str], dict[str, float]] = {
    ("mnist", "max1"): {"alpha": 6e-4, "lam": 3e-3, "epochs": 2},
    ("mnist", "max2"): {"alpha": 3e-4, "lam": 1.5e-3, "epochs": 4},
    ("mnist", "input"): {"alpha": 2e-4, "lam": 1e-3, "epochs": 2},
    ("cifar10", "max1"): {"alpha": 3e-3, "lam": 1.5e-2, "epochs": 2},
    ("cifar10", "max2"): {"alpha": 2.2e-3, "lam": 1.1e-2, "epochs": 4},
}


def coefficients(model: str, layers: Sequence[str],
                 overrides: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Keyword arguments (alpha, lam, epochs) for selecting ``layers`` of the paper's ``model``.

    With several layers, alpha is a per-layer dict, lam the smallest and
    epochs the largest of the layers' settings. Unknown layers get the
    library defaults.

    Args:
        model: ``"mnist"`` or ``"cifar10"``.
        layers: the gated layers.
        overrides: per-layer settings that replace the table's, e.g. the
            ``"coefficients"`` a checkpoint's metadata carries when its classifier
            was tuned separately (a longer-trained one needs other values).
    """
    given = overrides or {}
    found = {layer: given.get(layer) or COEFFICIENTS.get((model, layer)) for layer in layers}
    default = {"alpha": DEFAULTS["alpha"], "lam": DEFAULTS["lam"], "epochs": DEFAULTS["epochs"]}
    per = {layer: (dict(c) if c is not None else default) for layer, c in found.items()}
    if len(per) == 1:
        return dict(next(iter(per.values())))
    return {
        "alpha": {layer: c["alpha"] for layer, c in per.items()},
        "lam": min(c["lam"] for c in per.values()),
        "epochs": int(max(c["epochs"] for c in per.values())),
    }


# --------------------------------------------------------------------------
# The paper's own numbers (typed in from the paper's tables, for comparison).
# (holding rate %, number of units) per class, three optimisations each.
# A "∏" in the paper's extracted text is read as 11 (marked uncertain).
# --------------------------------------------------------------------------

#: Table 1(a), MNIST max1 (32 maps).
PAPER_TABLE1_MAX1: dict[int, list[tuple[float, int]]] = {
    0: [(99.7, 11), (99.5, 11), (99.7, 12)],
    1: [(99.5, 11), (99.7, 13), (99.6, 13)],
    2: [(99.7, 17), (99.6, 15), (99.3, 15)],
    3: [(99.4, 12), (99.7, 12), (99.4, 14)],
    4: [(99.6, 13), (99.2, 14), (99.7, 14)],
    5: [(99.6, 14), (99.6, 14), (99.4, 14)],
    6: [(99.3, 9), (99.4, 9), (99.4, 10)],
    7: [(99.8, 15), (99.6, 13), (99.6, 14)],
    8: [(99.5, 16), (99.6, 15), (99.7, 16)],
    9: [(99.6, 15), (99.4, 14), (99.3, 16)],
}

#: Table 1(b), MNIST max2 (64 maps).
PAPER_TABLE1_MAX2: dict[int, list[tuple[float, int]]] = {
    0: [(99.6, 12), (99.7, 12), (99.6, 13)],
    1: [(99.5, 12), (99.6, 11), (99.5, 12)],
    2: [(99.5, 12), (99.4, 10), (99.4, 12)],
    3: [(99.2, 15), (99.5, 16), (99.4, 16)],
    4: [(99.6, 17), (99.5, 17), (99.5, 15)],
    5: [(99.5, 15), (99.5, 15), (99.4, 14)],
    6: [(99.5, 12), (99.6, 13), (99.5, 12)],
    7: [(99.7, 14), (99.7, 13), (99.5, 12)],
    8: [(99.4, 16), (99.2, 17), (99.4, 18)],
    9: [(99.3, 13), (99.5, 15), (99.4, 15)],
}

#: Table 2, MNIST max1 + max2 together: (holding %, max1 units, max2 units).
PAPER_TABLE2: dict[int, list[tuple[float, int, int]]] = {
    0: [(99.4, 14, 14), (99.2, 11, 13), (99.2, 14, 12)],
    1: [(99.3, 13, 16), (99.4, 13, 12), (99.4, 14, 12)],
    8: [(99.2, 21, 17), (99.4, 25, 24), (99.3, 21, 20)],
}

#: The paper's classifier accuracy and the random-subset range it reports (Fig. 6a text).
PAPER_MNIST_TEST_ACCURACY = 0.992
PAPER_RANDOM_SUBSET_RANGE = (47.0, 98.0)

#: Table 3(a), CIFAR-10 max1 (64 maps). "9771" in the extracted text is read as 97.7.
PAPER_TABLE3_MAX1: dict[int, list[tuple[float, int]]] = {
    0: [(95.2, 47), (95.0, 45), (95.1, 45)],
    1: [(96.9, 42), (97.8, 42), (97.4, 41)],
    2: [(95.4, 52), (96.2, 54), (95.6, 53)],
    3: [(94.0, 50), (93.0, 48), (95.5, 51)],
    4: [(96.5, 48), (95.8, 50), (96.4, 50)],
    5: [(94.6, 46), (94.2, 46), (95.1, 47)],
    6: [(96.3, 44), (95.8, 43), (95.8, 43)],
    7: [(95.3, 43), (94.7, 44), (95.5, 42)],
    8: [(97.0, 41), (96.5, 44), (96.7, 42)],
    9: [(96.8, 44), (96.2, 42), (97.0, 44)],
}

#: Table 3(b), CIFAR-10 max2 (64 maps).
PAPER_TABLE3_MAX2: dict[int, list[tuple[float, int]]] = {
    0: [(97.3, 46), (97.0, 43), (97.5, 44)],
    1: [(97.2, 30), (97.6, 31), (97.9, 32)],
    2: [(96.6, 44), (97.5, 47), (97.0, 45)],
    3: [(96.3, 51), (94.8, 49), (96.5, 50)],
    4: [(96.6, 40), (96.6, 39), (96.8, 39)],
    5: [(97.0, 46), (96.7, 46), (96.6, 46)],
    6: [(97.2, 41), (97.2, 38), (97.3, 38)],
    7: [(97.5, 41), (96.6, 40), (96.7, 40)],
    8: [(97.7, 35), (97.0, 34), (97.7, 34)],
    9: [(97.3, 35), (97.7, 34), (96.3, 34)],
}

#: Table 4, CIFAR-10 max1 + max2 together (airplane, automobile, bird).
PAPER_TABLE4: dict[int, list[tuple[float, int, int]]] = {
    0: [(93.4, 42, 47), (92.7, 41, 44), (94.1, 47, 43)],
    1: [(96.5, 46, 39), (96.0, 44, 39), (95.3, 41, 36)],
    2: [(93.0, 47, 46), (93.2, 52, 48), (93.5, 48, 51)],
}

PAPER_CIFAR10_TEST_ACCURACY = 0.865
