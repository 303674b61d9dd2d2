"""Exact elimination: batched toggles equal one-mask-at-a-time judging, and the loops built on them.

``SelectionProblem.toggle_rates`` scores every candidate's toggled mask in one
pass (incremental through the next Linear or Conv2d, with or without the
precomputed contributions). Each figure it returns must equal judging that
mask on its own through the dense path (``_toggle_rate``); a candidate it gives
up must really miss the target. Exact greedy on the batched path must then drop
the same units as on the one-at-a-time path.
"""

from __future__ import annotations

import pytest
import torch
from planted import PlantedNet, planted_data
from torch import nn

from coreunits import ActivationCache
from coreunits._core import problem as problem_module
from coreunits._core.elimination import Trace, eliminate, exchange
from coreunits._core.incremental import build_incremental
from coreunits._core.problem import SelectionProblem
from coreunits._core.strategies import ExactGreedyElimination, GreedyBackwardElimination

# The small random models predict one class mostly: D'_c is unbalanced, which does not matter here.
pytestmark = pytest.mark.filterwarnings("ignore:.*D'_c is unbalanced")


class _ConvFeed(nn.Module):
    """conv -> ReLU (gated) -> conv -> pool -> linear: the gated layer feeds a Conv2d."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.act = nn.Conv2d(2, 12, 3, padding=1), nn.ReLU()
        self.conv2, self.pool, self.out = nn.Conv2d(12, 6, 3), nn.AdaptiveAvgPool2d(1), nn.Linear(6, 4)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.pool(torch.relu(self.conv2(self.act(self.conv1(x))))).flatten(1))


def _mlp_problem() -> SelectionProblem:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 24), nn.ReLU(), nn.Linear(24, 4)).eval()
    cache = ActivationCache(model, "1", torch.randn(1500, 20))
    return SelectionProblem(cache, "1", int(cache.predictions.mode().values))


def _conv_problem() -> SelectionProblem:
    model = _ConvFeed()
    cache = ActivationCache(model, "act", torch.randn(600, 2, 6, 6, generator=torch.Generator().manual_seed(1)))
    return SelectionProblem(cache, "act", int(cache.predictions.mode().values))


@pytest.fixture(params=["linear", "linear_no_contributions", "conv"])
def problem(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> SelectionProblem:
    if request.param == "linear_no_contributions":
        monkeypatch.setattr(problem_module, "CONTRIBUTION_BYTES", 0)
    p = _conv_problem() if request.param == "conv" else _mlp_problem()
    assert build_incremental(p.cache, p.layer) is not None, "the batched path must apply (else this proves nothing)"
    return p


def _masks(k: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.ones(k, dtype=torch.bool)] + [torch.rand(k, generator=g) < q for q in (0.3, 0.6, 0.9)]


def test_toggles_equal_judging_each_mask_alone(problem: SelectionProblem) -> None:
    k = problem.num_units
    for mask in _masks(k):
        every = list(range(k))
        batched = problem.toggle_rates(mask, every, chunk=97)  # chunks that do not divide D'_c
        for j in every:
            alone = problem._toggle_rate(mask, j, None)
            got = batched[j]
            assert got is not None and alone is not None
            assert got[0] == pytest.approx(alone[0], abs=1e-6), (mask.tolist(), j)
            assert got[1] == pytest.approx(alone[1], rel=1e-4, abs=1e-5)


def test_toggles_on_a_probe_equal_judging_each_mask_on_the_probe(problem: SelectionProblem) -> None:
    probe = torch.randperm(len(problem.rows), generator=torch.Generator().manual_seed(3))[:211]
    mask = _masks(problem.num_units)[2]
    every = list(range(problem.num_units))
    evaluations = problem.evaluations
    batched = problem.toggle_rates(mask, every, positions=probe, chunk=64)
    assert problem.evaluations == evaluations  # a probe is not an evaluation on D'_c
    for j in every:
        alone = problem._toggle_rate(mask, j, None, problem.rows[probe])
        got = batched[j]
        assert got is not None and alone is not None
        assert got[0] == pytest.approx(alone[0], abs=1e-6) and got[1] == pytest.approx(alone[1], rel=1e-4, abs=1e-5)


def test_paper_reading_toggles_equal_judging_each_mask_alone(problem: SelectionProblem) -> None:
    # The paper reading refits w_b per mask: the batched pass must give each mask's own refit.
    problem.reading = "paper"
    assert problem.batched_toggles
    k = problem.num_units
    probe = torch.randperm(len(problem.rows), generator=torch.Generator().manual_seed(3))[:211]
    for mask in _masks(k)[:3]:
        every = list(range(k))
        batched = problem.toggle_rates(mask, every, chunk=97)
        on_probe = problem.toggle_rates(mask, every, positions=probe, chunk=64)
        for j in every:
            for got, alone in ((batched[j], problem._toggle_rate(mask, j, None)),
                               (on_probe[j], problem._toggle_rate(mask, j, None, problem.rows[probe]))):
                assert got is not None and alone is not None
                assert got[0] == pytest.approx(alone[0], abs=1e-6), (mask.tolist(), j)
                assert got[1] == pytest.approx(alone[1], rel=1e-4, abs=1e-5)
        target = sorted(r[0] for r in batched.values() if r is not None)[k // 2]
        for j, score in problem.toggle_rates(mask, every, target).items():
            assert (score is None) == (batched[j][0] < target)  # type: ignore[index]


def test_paper_reading_gives_a_missing_mask_up_early(problem: SelectionProblem) -> None:
    # A mask that keeps no unit changes about every decision of c: in the paper reading too it is
    # rejected after its first chunk, not judged on all of D'_c, and the answer is the same.
    problem.reading = "paper"
    computed: list[int] = []
    compute = problem._compute
    problem._compute = lambda mask, rows: computed.append(len(rows)) or compute(mask, rows)  # type: ignore[method-assign]
    empty = torch.zeros(problem.num_units, dtype=torch.bool)
    reached, bound = problem.reaches(empty, 0.99, chunk=50)
    assert not reached and sum(computed) < len(problem.rows)
    assert bound >= problem.holding(empty)
    full = torch.ones(problem.num_units, dtype=torch.bool)
    computed.clear()
    assert problem.reaches(full, 0.0, chunk=50) == (True, problem.holding(full))
    assert sum(computed) == len(problem.rows)


@pytest.mark.parametrize("reading", ["strict", "paper"])
def test_a_given_up_candidate_misses_the_target(problem: SelectionProblem, reading: str) -> None:
    problem.reading = reading
    mask = torch.ones(problem.num_units, dtype=torch.bool)
    full = problem.toggle_rates(mask, list(range(problem.num_units)))
    rates = sorted(r[0] for r in full.values() if r is not None)
    target = rates[len(rates) // 2]  # about half the candidates reach it
    pruned = problem.toggle_rates(mask, list(range(problem.num_units)), target, chunk=50)
    for j, score in pruned.items():
        exact = full[j]
        assert exact is not None
        if score is None:
            assert exact[0] < target
        else:
            assert exact[0] >= target and score[0] == pytest.approx(exact[0], abs=1e-6)
    assert any(s is None for s in pruned.values()) and any(s is not None for s in pruned.values())


def test_exact_greedy_drops_what_one_at_a_time_greedy_drops(problem: SelectionProblem) -> None:
    # A target that some single drops from all units reach: elimination runs a few steps at least.
    first = problem.toggle_rates(torch.ones(problem.num_units, dtype=torch.bool), list(range(problem.num_units)))
    target = min(0.97, sorted(r[0] for r in first.values() if r is not None)[-3])

    def one_at_a_time(mask: torch.Tensor, cands: list[int], tgt: float | None) -> dict:
        return {j: problem._toggle_rate(mask, j, tgt) for j in cands}

    slow = Trace()
    kept_slow, rate_slow = eliminate(one_at_a_time, torch.ones(problem.num_units, dtype=torch.bool), target, slow)
    r = ExactGreedyElimination().run(problem, target)
    assert r.units == torch.nonzero(kept_slow).flatten().tolist()
    assert r.holding_rate == pytest.approx(rate_slow, abs=1e-6) and r.holding_rate >= target
    assert r.holding_rate == pytest.approx(problem.holding(r.mask), abs=1e-6)
    assert r.info["dropped"] == len(slow.dropped) and 0 < len(r.units) < problem.num_units
    # No kept unit can go: each removal misses the target.
    assert all(s is None for s in problem.toggle_rates(r.mask, r.units, target).values())


def test_exact_greedy_is_greedy_without_a_probe_and_finds_the_planted_units() -> None:
    model = PlantedNet()
    p = SelectionProblem(ActivationCache(model, "feat", planted_data(model)), "feat", 0)
    a = ExactGreedyElimination().run(p, 0.99)
    b = GreedyBackwardElimination(probe_rows=None).run(p, 0.99)
    assert set(a.units) == set(b.units) == set(PlantedNet.TRUE_UNITS)
    assert a.method == "greedy_exact" and b.method == "greedy_backward"
    assert repr(ExactGreedyElimination()) == "ExactGreedyElimination()"


def _table_toggle(holds: dict[frozenset, float]):
    """A toggle over a table of set -> holding rate (sets not listed hold 0.5)."""

    def rate(units: frozenset) -> float:
        return max((r for s, r in holds.items() if s <= units), default=0.5)

    def toggle(mask: torch.Tensor, cands: list[int], target: float | None) -> dict:
        kept = frozenset(torch.nonzero(mask).flatten().tolist())
        out = {}
        for j in cands:
            r = rate(kept ^ {j})
            out[j] = None if target is not None and r < target else (r, 0.0)
        return out

    return toggle


def test_exchange_swaps_units_when_elimination_stalls() -> None:
    # {0, 2, 3} holds best, so elimination keeps it and stops there (no single unit can go);
    # {0, 1} also holds: swapping 1 in lets 2 and 3 go.
    toggle = _table_toggle({frozenset({0, 2, 3}): 1.0, frozenset({0, 1}): 0.996})
    full = torch.ones(4, dtype=torch.bool)
    stalled, rate = eliminate(toggle, full, 0.995)
    assert torch.nonzero(stalled).flatten().tolist() == [0, 2, 3] and rate == 1.0
    trace = Trace()
    smaller, rate = exchange(toggle, stalled, rate, 0.995, trace=trace)
    assert torch.nonzero(smaller).flatten().tolist() == [0, 1] and rate == 0.996
    assert trace.added == [1] and sorted(trace.dropped) == [2, 3]
