"""Optimising switch gates on the objective: one selection, or many over one stacked gate tensor.

A selection's step is a mini-batch of its D'_c through the network after the
gated layer, a backward pass to the gates and an Adam step. On a GPU that step
is bound by kernel launches and host synchronisations, not arithmetic (4-8 ms
of suffix arithmetic for all of D'_c against 4.4 ms a step on an H200, see
benchmarks/RESULTS.md). So:

* one selection (:func:`optimise`) reads the device once a step (stopping rule
  and epoch sums stay on the device until they are needed);
* several selections (:func:`optimise_stacked`) hold their gates as rows of one
  ``(S, K)`` tensor: one sampling, one suffix pass, one loss, one backward and
  one Adam step serve all S sets, while each keeps its own D'_c, generators,
  batch order and stopping rule. Adam is elementwise and every live set has
  taken the same number of steps, so one Adam over the stack is S Adams; a set
  that stops is written back at once and its row is no longer read.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from coreunits._core.cache import ActivationCache
from coreunits._core.config import AlphaArg, SelectionConfig
from coreunits._core.dprime import DPrime, build_dprime
from coreunits._core.errors import OptionError
from coreunits._core.evaluation import evaluate_gates
from coreunits._core.gates import HardConcreteGate, SwitchGate, logistic_noise
from coreunits._core.guard import preserved_model_state
from coreunits._core.layers import LayerSpec
from coreunits._core.objective import center_margin, center_score, phi, selection_loss
from coreunits._core.progress import progress_bar

__all__ = ["GateRun", "build_run", "optimise", "optimise_stacked"]

#: Rows of D'_c on which an epoch's history record measures the rounded mask.
PROBE_ROWS = 2048


def _lambda_ramp(step: int, total: int) -> float:
    """0 for the first half of the steps, then linear to 1 at three quarters."""
    start, length = 0.5 * total, max(1.0, 0.25 * total)
    return min(1.0, max(0.0, (step - start) / length))


@dataclass
class GateRun:
    """The state of one gate optimisation: D'_c, the gates, ``w_b``, the generators and the history."""

    cfg: SelectionConfig
    dprime: DPrime
    gates: list[SwitchGate | HardConcreteGate]
    log_wb: torch.Tensor
    params: list[torch.Tensor]
    alpha: float | torch.Tensor
    total_steps: int
    index_gen: torch.Generator
    noise_gen: torch.Generator
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def w_b(self) -> float:
        return float(self.log_wb.detach().exp())

    def hard(self) -> list[torch.Tensor]:
        return [g.hard() for g in self.gates]


def _alpha_vector(alpha: AlphaArg, specs: Sequence[LayerSpec], dev: torch.device) -> float | torch.Tensor:
    """alpha as one float, or one entry per unit for a per-layer dict (which must name exactly the layers)."""
    if not isinstance(alpha, Mapping):
        return float(alpha)
    names = [s.name for s in specs]
    if set(alpha) != set(names):
        raise OptionError(f"alpha dict must give exactly the layers {names}, got {list(alpha)}")
    return torch.cat([torch.full((s.num_units,), float(alpha[s.name]), device=dev) for s in specs])


def build_run(cache: ActivationCache, target_class: int, cfg: SelectionConfig, seed: int) -> GateRun:
    """D'_c, one gate per unit and ``w_b``, seeded (the order of the draws fixes the result)."""
    dev = cache.device
    index_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator(device=dev).manual_seed(seed + 1)
    dprime = build_dprime(cache.predictions, target_class, generator=index_gen, positives_only=cfg.positives_only)
    steps_per_epoch = math.ceil(len(dprime) / cfg.batch_size)
    alpha = _alpha_vector(cfg.alpha, cache.specs, dev)
    gates: list[SwitchGate | HardConcreteGate]
    if cfg.relaxation == "switch":
        gates = [SwitchGate(s.num_units, cfg.gate_slope, cfg.init_gate).to(dev) for s in cache.specs]
    else:  # hard concrete gates are pushed to 0/1 by their own stretch: no phi penalty
        gates = [HardConcreteGate(s.num_units, cfg.init_gate).to(dev) for s in cache.specs]
        cfg = dataclasses.replace(cfg, lam=0.0)
    learn_wb = dprime.num_negative > 0
    log_wb = torch.tensor(math.log(cfg.w_b_init), device=dev, requires_grad=learn_wb)
    params = [g.x for g in gates] + ([log_wb] if learn_wb else [])
    return GateRun(cfg, dprime, gates, log_wb, params, alpha, max(cfg.epochs * steps_per_epoch, cfg.min_steps),
                   index_gen, noise_gen)


@dataclass
class _Stepping:
    """One optimisation's place in the loop: its batch order, epoch sums (on the device) and stopping state."""

    target_class: int
    run: GateRun
    probe_rows: torch.Tensor
    steps_per_epoch: int
    sums: torch.Tensor  # this epoch's (loss, squared error) summed over its examples
    rows: torch.Tensor = field(init=False)  # D'_c's cache rows and labels in this epoch's order
    labels: torch.Tensor = field(init=False)
    step: int = 0
    stable: int = 0
    epoch_n: int = 0
    done: bool = False

    def __post_init__(self) -> None:
        self._shuffle()

    @classmethod
    def start(cls, cache: ActivationCache, target_class: int, run: GateRun,
              sums: torch.Tensor | None = None) -> _Stepping:
        n = len(run.dprime)
        return cls(target_class, run, run.dprime.index[: min(n, PROBE_ROWS)], math.ceil(n / run.cfg.batch_size),
                   torch.zeros(2, device=cache.device) if sums is None else sums)

    def _shuffle(self) -> None:
        perm = torch.randperm(len(self.run.dprime), generator=self.run.index_gen)
        self.rows, self.labels = self.run.dprime.index.index_select(0, perm), self.run.dprime.labels.index_select(0, perm)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's cache rows and labels (CPU), in the run's own batch order (a new one each epoch)."""
        k = self.step % self.steps_per_epoch
        if k == 0 and self.step > 0:
            self._shuffle()
        size = self.run.cfg.batch_size
        return self.rows[k * size : (k + 1) * size], self.labels[k * size : (k + 1) * size]

    @property
    def lam(self) -> float:
        return self.run.cfg.lam * _lambda_ramp(self.step, self.run.total_steps)

    def after_step(self, cache: ActivationCache, mask: torch.Tensor, unchanged: bool, spread: float,
                   probs: torch.Tensor, log_wb: torch.Tensor, bar: Any) -> None:
        """Count the step, write the epoch's history record, and stop once done or settled.

        ``mask`` is the rounded mask (all layers) and ``log_wb`` the log of ``w_b`` after the step;
        ``spread`` the largest ``min(b, 1 - b)`` and ``probs`` the gate values before it.
        """
        run = self.run
        self.stable = self.stable + 1 if unchanged else 0
        bar.update(1)
        settled = self.step >= run.total_steps // 2 and self.stable >= run.cfg.patience and spread < 0.1
        last = self.step == run.total_steps - 1
        if self.step % self.steps_per_epoch == self.steps_per_epoch - 1 or last or settled:
            w_b = float(log_wb.detach().exp())
            layers = [m.float() for m in mask.split([g.x.numel() for g in run.gates])]
            rates = evaluate_gates(cache, self.probe_rows, layers, self.target_class, w_b=w_b)
            loss, sq = self.sums.tolist()
            run.history.append({
                "step": self.step + 1, "loss": loss / self.epoch_n, "squared_error": sq / self.epoch_n,
                "soft_units": float(probs.detach().sum()), "hard_units": int(mask.sum()),
                "holding_rate_probe": rates.strict, "w_b": w_b, "lambda": self.lam,
            })
            self.sums.zero_()
            self.epoch_n = 0
            bar.set_postfix(units=int(mask.sum()), holding=f"{rates.strict:.3f}")
        self.step += 1
        self.done = settled or last


def _stop_flags(mask: torch.Tensor, last: torch.Tensor, probs: torch.Tensor) -> tuple[list[bool], list[float]]:
    """Per set (rows): is the rounded mask unchanged, and the largest ``min(b, 1 - b)``; one device read."""
    flags = torch.stack([(mask == last).all(dim=-1).float(), torch.minimum(probs, 1 - probs).amax(dim=-1)])
    unchanged, spread = flags.tolist()
    return [u == 1.0 for u in unchanged], spread


def optimise(cache: ActivationCache, target_class: int, run: GateRun, progress: bool) -> None:
    """Adam on the objective until ``total_steps`` or settled; one history record per epoch."""
    st = _Stepping.start(cache, target_class, run)
    last = torch.cat(run.hard())
    opt = torch.optim.Adam(run.params, lr=run.cfg.lr)
    bar = progress_bar(enabled=progress, total=run.total_steps, desc=f"class {target_class}", unit="step",
                       leave=False)
    with bar, preserved_model_state(cache.model), cache.gated.activated():
        while not st.done:
            rows, labels = st.batch()
            gates = [g.sample(rows.numel(), run.cfg.temperature, run.noise_gen) for g in run.gates]
            scores = cache.suffix_scores(rows, gates)
            y_hat = center_score(center_margin(scores, target_class), run.log_wb.exp())
            probs = torch.cat([g.probs() for g in run.gates])
            loss, sq = selection_loss(y_hat, labels.to(cache.device), probs, run.alpha, st.lam)
            st.sums += torch.stack([loss.detach(), sq.detach()]) * rows.numel()
            st.epoch_n += rows.numel()
            for p, g in zip(run.params, torch.autograd.grad(loss, run.params)):
                p.grad = g
            opt.step()
            mask = torch.cat(run.hard())
            (unchanged,), (spread,) = _stop_flags(mask[None], last[None], probs[None].detach())
            last = mask
            st.after_step(cache, mask, unchanged, spread, probs, run.log_wb, bar)


def optimise_stacked(cache: ActivationCache, jobs: Sequence[tuple[int, GateRun]], progress: bool) -> None:
    """Optimise several gate sets of one config in lock step, as rows of one stacked gate tensor.

    Each set takes the steps it would take alone (its own D'_c, batch order, noise
    and stopping rule); only the arithmetic is shared, so its units are those of
    :func:`optimise` up to the rounding of larger reductions.
    """
    if len(jobs) == 1:
        optimise(cache, jobs[0][0], jobs[0][1], progress)
        return
    runs = [run for _, run in jobs]
    if any(run.cfg != runs[0].cfg for run in runs):
        raise OptionError("stacked selections must share one config; optimise them one at a time")
    dev, cfg, form = cache.device, runs[0].cfg, runs[0].gates[0]
    sizes = [s.num_units for s in cache.specs]
    x = torch.stack([torch.cat([g.x.detach() for g in run.gates]) for run in runs]).requires_grad_()
    log_wb = torch.stack([run.log_wb.detach() for run in runs]).requires_grad_()
    learns_wb = torch.tensor([run.log_wb.requires_grad for run in runs], dtype=x.dtype, device=dev)
    classes = torch.tensor([c for c, _ in jobs], device=dev)
    sums = torch.zeros(2, len(jobs), device=dev)
    states = [_Stepping.start(cache, c, run, sums[:, i]) for i, (c, run) in enumerate(jobs)]
    last = form.hard_of(x.detach())
    # One fused kernel for the stack's Adam step on a GPU, where a step is launches; the default elsewhere.
    opt = torch.optim.Adam([x, log_wb], lr=cfg.lr, fused=dev.type == "cuda")
    layouts: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[torch.Tensor, torch.Tensor]] = {}
    bar = progress_bar(enabled=progress, total=sum(run.total_steps for run in runs),
                       desc=f"{len(jobs)} selections", unit="step", leave=False)
    with bar, preserved_model_state(cache.model), cache.gated.activated():
        while live := [i for i, st in enumerate(states) if not st.done]:
            picks = [states[i].batch() for i in live]
            counts = [rows.numel() for rows, _ in picks]
            owner, n = _layout(layouts, live, counts, len(jobs), dev)
            # Each set draws its noise from its own generator, in the order it would alone.
            u = torch.cat([_uniform(runs[i].noise_gen, k, sizes, dev) for i, k in zip(live, counts)])
            gates = form.sample_of(x.index_select(0, owner), logistic_noise(u), cfg.temperature).split(sizes, dim=1)
            scores = cache.suffix_scores(torch.cat([rows for rows, _ in picks]), list(gates))
            y_hat = center_score(center_margin(scores, classes.index_select(0, owner)),
                                 log_wb.exp().index_select(0, owner))
            errors = (torch.cat([labels for _, labels in picks]).to(dev) - y_hat) ** 2
            sq = torch.zeros(len(jobs), device=dev).index_add_(0, owner, errors) / n.clamp_min(1.0)
            probs = form.probs_of(x)
            lam = torch.tensor([st.lam for st in states], device=dev)
            loss = sq + (runs[0].alpha * probs).sum(dim=1) + lam * phi(probs).sum(dim=1)
            # Only live sets' losses count; each depends on its own row, so one backward serves all.
            gx, gw = torch.autograd.grad((loss * (n > 0)).sum(), [x, log_wb])
            x.grad, log_wb.grad = gx, gw * learns_wb
            sums.add_(torch.stack([loss.detach(), sq.detach()]) * n)
            opt.step()
            masks = form.hard_of(x.detach())
            unchanged, spread = _stop_flags(masks, last, probs.detach())
            last = masks
            for i, k in zip(live, counts):
                st = states[i]
                st.epoch_n += k
                st.after_step(cache, masks[i], unchanged[i], spread[i], probs[i], log_wb[i], bar)
                if st.done:
                    _write_back(st.run, x[i], log_wb[i], sizes)


def _layout(memo: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[torch.Tensor, torch.Tensor]],
            live: list[int], counts: list[int], num_sets: int,
            dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The set each stacked batch row belongs to, and each set's row count (0: stopped), on the device.

    Memoised: the layout changes only at an epoch's short last batch and when a set stops.
    """
    key = (tuple(live), tuple(counts))
    if key not in memo:
        if len(memo) > 256:
            memo.clear()
        n = torch.zeros(num_sets)
        n[live] = torch.tensor(counts, dtype=n.dtype)
        memo[key] = (torch.repeat_interleave(torch.tensor(live), torch.tensor(counts)).to(dev), n.to(dev))
    return memo[key]


def _uniform(gen: torch.Generator, rows: int, sizes: Sequence[int], dev: torch.device) -> torch.Tensor:
    """``(rows, sum(sizes))`` uniform draws, one per gated layer in order, as a selection alone draws them."""
    parts = [torch.rand((rows, size), generator=gen, device=dev) for size in sizes]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _write_back(run: GateRun, x_row: torch.Tensor, log_wb: torch.Tensor, sizes: Sequence[int]) -> None:
    """Copy a set's row of the stack into its own gates and ``w_b`` (what its result and records read)."""
    with torch.no_grad():
        for g, part in zip(run.gates, x_row.split(list(sizes))):
            g.x.copy_(part)
        run.log_wb.copy_(log_wb)
