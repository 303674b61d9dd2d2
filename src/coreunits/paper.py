"""Reference settings and numbers of the paper, labelled as such.

``COEFFICIENTS`` are coreunits' choices of alpha and lambda for the paper's
networks (the paper does not publish its own), picked so that the holding
rate lands near the paper's operating point (about 99.5% on MNIST); see
README "Method notes" for how they were chosen. ``PAPER_TABLE1`` etc. are
the numbers printed in the paper, typed in by hand for comparison only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from coreunits._core.selection import DEFAULTS

__all__ = ["COEFFICIENTS", "coefficients"]

#: (model, layer) -> alpha and lam used by the demo and the reproduction.
COEFFICIENTS: dict[tuple[str, str], dict[str, float]] = {
    ("mnist", "max1"): {"alpha": 6e-4, "lam": 3e-3},
    ("mnist", "max2"): {"alpha": 2e-4, "lam": 1e-3},
    ("mnist", "input"): {"alpha": 2e-4, "lam": 1e-3},
}


def coefficients(model: str, layers: Sequence[str]) -> dict[str, Any]:
    """alpha and lam for selecting ``layers`` of the paper's ``model``.

    Several layers selected together use the smallest alpha of them (a unit
    of the layer that needs the gentlest pressure must not be overpriced).
    Unknown layers get the library defaults.
    """
    found = [COEFFICIENTS[(model, layer)] for layer in layers if (model, layer) in COEFFICIENTS]
    if not found:
        return {"alpha": DEFAULTS["alpha"], "lam": DEFAULTS["lam"]}
    best = min(found, key=lambda c: c["alpha"])
    return dict(best)
