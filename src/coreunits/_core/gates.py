"""The Switch Gate layer: one gate ``b_i = sigmoid(w * x_i)`` per unit."""

from __future__ import annotations

import math

import torch
from torch import nn

from coreunits._core.errors import OptionError

__all__ = ["HardConcreteGate", "SwitchGate", "logistic_noise"]

# Logistic noise is drawn from U(eps, 1 - eps) to keep log() finite.
_EPS = 1e-6


class _Gates(nn.Module):
    """What every gate kind shares: its parameters ``x`` (one per unit) and the methods read on them.

    Each kind defines ``probs_of``, ``sample_of`` and ``hard_of`` on parameters of any
    leading shape, so a stack of gate sets (``optimise_stacked``) uses the same formulas.
    """

    x: nn.Parameter

    def probs_of(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample_of(self, x: torch.Tensor, noise: torch.Tensor, temperature: float) -> torch.Tensor:
        raise NotImplementedError

    def hard_of(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def probs(self) -> torch.Tensor:
        """The gate values the unit cost and penalty act on (differentiable in ``x``)."""
        return self.probs_of(self.x)

    def sample(self, batch: int, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
        """Gates ``(batch, K)`` drawn with ``generator``, differentiable in ``x``."""
        u = torch.rand((batch, self.x.numel()), generator=generator, device=self.x.device)
        return self.sample_of(self.x, logistic_noise(u), temperature)

    def hard(self) -> torch.Tensor:
        """The rounded gates (True: the unit is kept)."""
        return self.hard_of(self.x.detach())


class SwitchGate(_Gates):
    """Gates for the units of one layer, ``b = sigmoid(w * x)`` with fixed ``w > 0``.

    The paper relaxes the binary gate to ``sigmoid(w * x)`` and rounds at 0.5.
    Used deterministically, that relaxation collapses: the center classifier
    divides by the scores' spread, so shrinking every gate together barely
    changes the loss and alpha drives all gates to 0 (measured: no unit kept,
    holding 50%). During optimisation coreunits therefore *samples* each gate
    from the relaxed Bernoulli (concrete) distribution whose probability is
    that same ``b``: ``sigmoid((w * x + logistic noise) / temperature)``. A unit
    whose gate is 0.7 is then really off 30% of the time, so the data term
    sees what dropping it costs. The penalties act on ``b`` as in the paper.

    Args:
        num_units: number of units (gates).
        w: the fixed slope ``w > 0`` of the paper's ``sigmoid(w * x)``.
        init: initial gate value ``b`` (all units start nearly on).
    """

    def __init__(self, num_units: int, w: float = 1.0, init: float = 0.95) -> None:
        super().__init__()
        if w <= 0:
            raise OptionError(f"the gate slope w must be > 0, got {w}")
        if not 0.0 < init < 1.0:
            raise OptionError(f"the initial gate value must be in (0, 1), got {init}")
        self.w = float(w)
        logit = torch.logit(torch.tensor(float(init)))
        self.x = nn.Parameter(torch.full((num_units,), float(logit) / self.w))

    def probs_of(self, x: torch.Tensor) -> torch.Tensor:
        """``b`` for gate parameters ``x`` of any leading shape (a stack of gate sets, say)."""
        return torch.sigmoid(self.w * x)

    def sample_of(self, x: torch.Tensor, noise: torch.Tensor, temperature: float) -> torch.Tensor:
        """Relaxed-Bernoulli gates for parameters ``x`` and drawn :func:`logistic_noise` (broadcast together)."""
        return torch.sigmoid((self.w * x + noise) / temperature)

    def hard_of(self, x: torch.Tensor) -> torch.Tensor:
        """Rounded gates: True where ``b >= 0.5`` (i.e. ``x >= 0``)."""
        return x >= 0


class HardConcreteGate(_Gates):
    """L0 gates with the hard-concrete relaxation (Louizos, Welling & Kingma, 2018).

    An alternative to the paper's ``sigmoid`` + phi penalty: each gate is a
    stretched, clipped concrete variable ``z = clamp(s * (zeta - gamma) + gamma, 0, 1)``
    with ``s = sigmoid((logit(u) + log_alpha) / beta)``, so it is exactly 0 or 1
    with positive probability and needs no penalty pushing it to the ends.
    :meth:`probs` is ``P(z != 0)``, the expected L0 norm's summand, which the
    unit cost alpha multiplies. Same interface as :class:`SwitchGate`.

    Args:
        num_units: number of units (gates).
        init: initial ``P(z != 0)`` of every gate.
        beta: temperature of the concrete distribution (Louizos et al.: 2/3).
        gamma: lower stretch limit (< 0).
        zeta: upper stretch limit (> 1).
    """

    def __init__(self, num_units: int, init: float = 0.95, beta: float = 2.0 / 3.0,
                 gamma: float = -0.1, zeta: float = 1.1) -> None:
        super().__init__()
        if not 0.0 < init < 1.0:
            raise OptionError(f"the initial gate value must be in (0, 1), got {init}")
        self.beta, self.gamma, self.zeta = float(beta), float(gamma), float(zeta)
        self._shift = self.beta * math.log(-self.gamma / self.zeta)
        # P(z != 0) = sigmoid(log_alpha - shift): start every gate at ``init``.
        start = float(torch.logit(torch.tensor(float(init)))) + self._shift
        self.x = nn.Parameter(torch.full((num_units,), start))

    def probs_of(self, x: torch.Tensor) -> torch.Tensor:
        """``P(z != 0)`` for parameters ``x`` of any leading shape."""
        return torch.sigmoid(x - self._shift)

    def _stretch(self, s: torch.Tensor) -> torch.Tensor:
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def sample_of(self, x: torch.Tensor, noise: torch.Tensor, temperature: float) -> torch.Tensor:
        """Hard-concrete gates for parameters ``x`` and :func:`logistic_noise`; ``temperature`` is ignored
        (``beta`` is used)."""
        del temperature
        return self._stretch(torch.sigmoid((noise + x) / self.beta))

    def hard_of(self, x: torch.Tensor) -> torch.Tensor:
        """The test-time gate ``clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)``, rounded at 0.5."""
        return self._stretch(torch.sigmoid(x)) >= 0.5


def logistic_noise(u: torch.Tensor) -> torch.Tensor:
    """Logistic noise ``log(u) - log(1 - u)`` from uniform draws ``u`` (kept off 0 and 1)."""
    u = u.clamp(_EPS, 1.0 - _EPS)
    return torch.log(u) - torch.log1p(-u)
