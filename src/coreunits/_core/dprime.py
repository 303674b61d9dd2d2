"""D'_c: the data a selection for class c is optimised and judged on."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from coreunits._core.errors import ClassIndexError, DataError, OptionError

__all__ = ["DPrime", "build_dprime", "check_class", "random_rows"]


@dataclass
class DPrime:
    """Rows of the cached data that form D'_c, in a random order.

    Attributes:
        index: row indices into the :class:`ActivationCache` (permuted).
        labels: y' per row (1.0 = the model predicts c, 0.0 = it does not).
        num_positive: inputs predicted as c.
        num_negative: inputs predicted otherwise, drawn at random.
        note: how a shortage of negatives was handled, if there was one.
    """

    index: torch.Tensor
    labels: torch.Tensor
    num_positive: int
    num_negative: int
    note: str | None = None

    def sizes(self) -> dict[str, Any]:
        """What a result records of D'_c: its size, positives, negatives and note."""
        return {"size": len(self), "positives": self.num_positive, "negatives": self.num_negative, "note": self.note}

    def __len__(self) -> int:
        return int(self.index.numel())


def check_class(target_class: int, num_classes: int) -> int:
    """Validate a class index against the model's number of classes."""
    if isinstance(target_class, bool) or not isinstance(target_class, int):
        try:
            target_class = int(target_class)  # numpy / 0-d tensor
        except (TypeError, ValueError):
            raise ClassIndexError(f"target_class must be an int class index, got {target_class!r}") from None
    if not 0 <= target_class < num_classes:
        raise ClassIndexError(
            f"target_class {target_class} is out of range: the model outputs {num_classes} classes, "
            f"so use 0..{num_classes - 1}"
        )
    return target_class


def build_dprime(
    predictions: torch.Tensor,
    target_class: int,
    *,
    generator: torch.Generator,
    positives_only: bool = False,
) -> DPrime:
    """Build D'_c from the unmasked model's predictions.

    Positives are every input predicted as ``target_class``; negatives are as
    many inputs predicted otherwise, drawn without replacement. The union is
    shuffled. With fewer negatives than positives, all negatives are used
    (a warning says so and :attr:`DPrime.note` records it).

    Raises:
        DataError: no input is predicted as the class.
    """
    preds = predictions.cpu()
    pos = torch.nonzero(preds == target_class).flatten()
    if pos.numel() == 0:
        present = torch.bincount(preds).tolist()
        listed = ", ".join(f"{c}: {n}" for c, n in enumerate(present) if n)
        raise DataError(
            f"no input in the data is predicted as class {target_class}, so D'_c has no positives "
            f"(predicted classes and counts: {listed}); pick a class the model predicts or give more data"
        )
    note = None
    if positives_only:
        neg = pos[:0]
    else:
        others = torch.nonzero(preds != target_class).flatten()
        if others.numel() < pos.numel():
            note = (
                f"only {others.numel()} inputs are predicted as another class, fewer than the "
                f"{pos.numel()} positives; all of them are used as negatives (D'_c is unbalanced)"
            )
            warnings.warn(note, stacklevel=3)
            neg = others
        else:
            neg = others[torch.randperm(others.numel(), generator=generator)[: pos.numel()]]
    index = torch.cat([pos, neg])
    labels = torch.cat([torch.ones(pos.numel()), torch.zeros(neg.numel())])
    perm = torch.randperm(index.numel(), generator=generator)
    return DPrime(index[perm], labels[perm], int(pos.numel()), int(neg.numel()), note)


def random_rows(rows: torch.Tensor, size: int | None, seed: int) -> torch.Tensor | None:
    """A fixed random subset of ``size`` of ``rows`` (a probe of D'_c), or None when it would be all of them.

    The same ``seed`` draws the same subset, so every probe of one D'_c with one
    seed (greedy's, Shapley's, target mode's) is the same rows.
    """
    n = rows.numel()
    if size is None or size >= n:
        return None
    if size < 1:
        raise OptionError(f"probe_rows must be >= 1, got {size}")
    return rows[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]]
