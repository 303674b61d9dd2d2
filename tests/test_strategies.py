"""Selection strategies on the planted-truth model, and the sparse mask path they rely on.

On :class:`PlantedNet` the class-0 score reads channels 1 and 4 only (the head's
other weights are zero), so for any set S of ``feat`` channels the masked model
equals the one keeping ``S & {1, 4}``: the holding rate of S is that of
``S & {1, 4}``, and every set holding 0.99 contains both 1 and 4. Strategies
that search on the holding rate or use class-c gradients must find exactly
{1, 4}; the mean activation is class-agnostic and is only checked for what it
computes.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from helpers import assert_same_state, model_state
from planted import PlantedNet, planted_data
from torch import nn

from coreunits import ActivationCache
from coreunits._core.evaluation import dense_masked_scores, masked_scores
from coreunits._core.incremental import build_incremental
from coreunits._core.problem import SelectionProblem
from coreunits._core.strategies import (
    CaptumConductance,
    GradientTimesActivation,
    GreedyBackwardElimination,
    MeanActivation,
    RandomRanking,
    RankingStrategy,
    Strategy,
    TruncatedMonteCarloShapley,
)
from coreunits._core.strategies.rankings import positive_rows

TRUE = set(PlantedNet.TRUE_UNITS)
TARGET = 0.99


def _problem(model: nn.Module, x: torch.Tensor, engine: str = "auto", reading: str = "strict") -> SelectionProblem:
    return SelectionProblem(ActivationCache(model, "feat", x, engine=engine), "feat", 0, reading=reading)


@pytest.fixture(scope="module")
def planted_cache() -> ActivationCache:
    model = PlantedNet()
    return ActivationCache(model, "feat", planted_data(model))


@pytest.fixture
def planted_problem(planted_cache: ActivationCache) -> SelectionProblem:
    # A fresh problem per test: a problem remembers the scores it computed, so counts depend on its history.
    return SelectionProblem(planted_cache, "feat", 0)


def _top(ranking: torch.Tensor, k: int = 2) -> set[int]:
    return set(torch.argsort(ranking, descending=True, stable=True)[:k].tolist())


def _all_strategies() -> list[Strategy]:
    return [
        RandomRanking(seed=0),
        MeanActivation(),
        GradientTimesActivation(),
        TruncatedMonteCarloShapley(permutations=10),
        GreedyBackwardElimination(),
        GreedyBackwardElimination(probe_rows=200),
    ]


def test_planted_model_permits_only_sets_containing_both_true_units(planted_problem: SelectionProblem) -> None:
    # The premise of the assertions below, checked rather than assumed.
    p = planted_problem
    for units in ([1], [4], [], [0, 2, 3, 5, 6, 7, 1], [0, 2, 3, 5, 6, 7, 4]):
        mask = torch.zeros(8, dtype=torch.bool)
        mask[units] = True
        assert p.holding(mask) < TARGET, units
    assert p.holding(p.top_k_mask(torch.tensor([0, 1, 0, 0, 1, 0, 0, 0.0]), 2)) == 1.0


@pytest.mark.parametrize("strategy", _all_strategies(), ids=repr)
def test_result_is_consistent_and_contains_the_true_units(planted_problem: SelectionProblem, strategy: Strategy) -> None:
    p = planted_problem
    before = p.evaluations
    r = strategy.run(p, TARGET)
    assert r.method == strategy.name
    assert r.ranking is not None and r.ranking.shape == (8,)
    assert r.mask is not None and r.mask.dtype == torch.bool and r.mask.shape == (8,)
    assert r.holding_rate is not None and r.holding_rate >= TARGET
    assert r.evaluations == p.evaluations - before
    assert r.holding_rate == p.holding(r.mask)  # judged on all of D'_c, in the problem's reading
    assert p.evaluations == before + r.evaluations  # the result's mask was judged: its scores are remembered
    assert TRUE <= set(r.units)  # forced by the planted model (see the test above)


@pytest.mark.parametrize(
    "strategy",
    [GradientTimesActivation(), TruncatedMonteCarloShapley(permutations=10), GreedyBackwardElimination(),
     GreedyBackwardElimination(probe_rows=200), TruncatedMonteCarloShapley(permutations=10, probe_rows=300)],
    ids=repr,
)
def test_class_aware_strategies_find_exactly_the_true_units(planted_problem: SelectionProblem,
                                                            strategy: Strategy) -> None:
    r = strategy.run(planted_problem, TARGET)
    assert _top(r.ranking) == TRUE
    assert set(r.units) == TRUE


def test_gradient_x_activation_matches_the_closed_form(planted_problem: SelectionProblem) -> None:
    # margin = s_0 - max(s_1, s_2) = 3 (f1 + f4) + b  (s_1 = 0 > s_2 = -0.5), f_j = mean relu(feat_j),
    # so a_e * dm/da_e summed over channel j is 3 * f_j for j in {1, 4} and exactly 0 elsewhere.
    p = planted_problem
    rank = GradientTimesActivation(batch_size=100).rank(p)  # several batches
    model = p.cache.model
    x = planted_data(PlantedNet())[positive_rows(p)]
    with torch.no_grad():
        f = torch.relu(model.feat(x)).mean(dim=(2, 3))
    expected = torch.zeros(8)
    for j in TRUE:
        expected[j] = 3.0 * float(f[:, j].mean())
    torch.testing.assert_close(rank, expected, rtol=1e-4, atol=1e-6)


def test_gradient_x_activation_under_inference_mode(planted_problem: SelectionProblem) -> None:
    ref = GradientTimesActivation().rank(planted_problem)
    with torch.inference_mode():
        got = GradientTimesActivation().rank(planted_problem)
    with torch.no_grad():
        got2 = GradientTimesActivation().rank(planted_problem)
    assert torch.equal(ref, got) and torch.equal(ref, got2)


@pytest.mark.parametrize(
    "layers, kwargs",
    [("feat", {"engine": "fx"}), ("feat", {"engine": "hooks"}), ("feat", {"cache_budget": 0}),
     (["feat", "head"], {"cache_budget": 0})],
    ids=["fx", "hooks", "fx-uncached", "two-layers"],
)
def test_mean_activation_is_the_mean_layer_output_over_positives(layers: object, kwargs: dict) -> None:
    # Every way the layer output is read: the fx frontier, a hook on the real model (feat
    # is followed by ReLU(inplace=True), which must not leak into the captured output),
    # a recomputed prefix, and a cache gating two layers.
    model = PlantedNet()
    x = planted_data(model)
    p = SelectionProblem(ActivationCache(model, layers, x, **kwargs), "feat", 0)
    rank = MeanActivation().rank(p)
    with torch.no_grad():
        expected = model.feat(x[positive_rows(p)]).mean(dim=(0, 2, 3))
    torch.testing.assert_close(rank, expected, rtol=1e-4, atol=1e-6)
    assert (rank < 0).any()  # pre-activation means: a negative one shows no ReLU was applied
    # The Taylor score reads the same layer through a gate, whatever the cache layout.
    torch.testing.assert_close(GradientTimesActivation().rank(p),
                               GradientTimesActivation().rank(_problem(model, x)), rtol=1e-4, atol=1e-6)


def test_mean_activation_says_when_it_cannot_read_the_layer() -> None:
    model = PlantedNet()
    x = planted_data(model)
    cache = ActivationCache(model, ["feat", "head"], x)  # fx, frontier cached, inputs dropped
    assert cache.inputs is None
    with pytest.raises(ValueError, match="build an ActivationCache for this layer alone"):
        MeanActivation().rank(SelectionProblem(cache, "feat", 0))


def test_random_ranking_is_a_seeded_permutation(planted_problem: SelectionProblem) -> None:
    a, b, c = (RandomRanking(seed=s).rank(planted_problem) for s in (0, 0, 1))
    assert torch.equal(a.sort().values, torch.arange(8).float())
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_shapley_values_are_zero_off_the_true_units_and_report_their_cost(planted_problem: SelectionProblem) -> None:
    r = TruncatedMonteCarloShapley(permutations=10).run(planted_problem, None)
    assert r.mask is None and r.holding_rate is None
    assert (r.ranking[[0, 2, 3, 5, 6, 7]] == 0).all()
    assert (r.ranking[[1, 4]] > 0).all()
    # Telescoping: each untruncated order's marginals sum to v(all) - v(empty).
    info = r.info
    assert info["value_all"] == 1.0 and info["value_evaluations"] >= 2
    assert float(r.ranking.sum()) == pytest.approx(info["value_all"] - info["value_empty"], abs=1e-6)


def test_greedy_without_target_ranks_everything_and_counts(planted_problem: SelectionProblem) -> None:
    before = planted_problem.evaluations
    r = GreedyBackwardElimination().run(planted_problem, None)
    assert r.mask is None and r.holding_rate is None
    assert torch.equal(r.ranking.sort().values, torch.arange(8).float())
    assert _top(r.ranking) == TRUE
    assert r.info["dropped"] == 8 and r.info["candidate_evaluations"] == 8 * 9 // 2
    assert r.evaluations == planted_problem.evaluations - before == 36  # all on D'_c: every one counted


def test_greedy_with_probe_verifies_on_all_rows(planted_problem: SelectionProblem) -> None:
    r = GreedyBackwardElimination(probe_rows=200).run(planted_problem, TARGET)
    assert r.info["probe_rows"] == 200
    # At least one verification per accepted drop (6) and one refused at the last step,
    # at most 1 + 3 retries per step; on all of D'_c. The final measurement is the last
    # accepted drop's verification, remembered: it costs no evaluation of its own.
    assert 7 <= r.info["verifications"] <= 4 * 7
    assert r.evaluations == r.info["verifications"]


def test_lazy_greedy_drops_the_same_units_with_fewer_candidate_evaluations(planted_cache: ActivationCache) -> None:
    full = GreedyBackwardElimination(probe_rows=200).run(SelectionProblem(planted_cache, "feat", 0), TARGET)
    lazy = GreedyBackwardElimination(probe_rows=200, lazy=True).run(SelectionProblem(planted_cache, "feat", 0), TARGET)
    assert lazy.units == full.units and lazy.holding_rate == full.holding_rate
    assert lazy.info["lazy"] and not full.info["lazy"]
    assert lazy.info["candidate_evaluations"] < full.info["candidate_evaluations"]
    assert "lazy=True" in repr(GreedyBackwardElimination(lazy=True))


def test_reaches_reuses_remembered_scores(planted_cache: ActivationCache) -> None:
    p = SelectionProblem(planted_cache, "feat", 0)
    n = len(p.rows)
    probe = p.rows[: n // 4]
    computed = _counting(p)
    keep = torch.ones(8, dtype=torch.bool)
    keep[[0, 3]] = False  # a mask that keeps the planted units 1 and 4: reaches the target
    p.holding(keep, rows=probe)
    assert p.reaches(keep, TARGET)[0]
    assert sum(computed) == n  # the probe's quarter once, then only the other rows
    computed.clear()
    assert p.holding(keep) == p.reaches(keep, TARGET)[1]  # from memory: nothing computed
    assert computed == []


def _counting(problem: SelectionProblem) -> list[int]:
    """Record the number of rows of each evaluation the problem runs."""
    computed: list[int] = []
    compute = problem._compute

    def counting(mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        computed.append(len(rows))
        return compute(mask, rows)

    problem._compute = counting  # type: ignore[method-assign]
    return computed


def test_reaches_judges_the_inputs_closest_to_changing_first() -> None:
    # A random MLP: removing hidden unit 0 changes 0.7% of the decisions, spread over D'_c.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    cache = ActivationCache(model, "1", torch.randn(2000, 20))
    c = int(cache.predictions.mode().values)
    every = torch.ones(32, dtype=torch.bool)
    miss = every.clone()
    miss[0] = False
    exact = SelectionProblem(cache, "1", c).holding(miss)
    assert 0.99 < exact < 1.0
    cold = SelectionProblem(cache, "1", c)
    in_order = _counting(cold)
    assert cold.reaches(miss, 1.0, chunk=16) == (False, pytest.approx(1.0 - 1 / len(cold.rows)))
    warm = SelectionProblem(cache, "1", c)
    warm.holding(every)  # judged whole: its margins order the next test
    by_risk = _counting(warm)
    reached, bound = warm.reaches(miss, 1.0, chunk=16)
    assert not reached and bound >= exact
    assert len(by_risk) == 1 < len(in_order)  # the first chunk holds a changed decision


class _ScriptedProblem:
    """A stand-in problem whose probe misranks candidates: dropping unit 0 looks best on the
    probe but fails on all rows; dropping unit 1 holds on both."""

    num_units = 3

    def __init__(self) -> None:
        self.rows = torch.arange(100)
        self.evaluations = 0

    def holding(self, mask: torch.Tensor, rows: torch.Tensor | None = None) -> float:
        if rows is None:
            self.evaluations += 1
        kept = frozenset(torch.nonzero(mask).flatten().tolist())
        on_probe = {frozenset({1, 2}): 0.999, frozenset({0, 2}): 0.995}
        on_all = {frozenset({0, 1, 2}): 1.0, frozenset({0, 2}): 0.995}
        return (on_probe if rows is not None else on_all).get(kept, 0.5)

    def reaches(self, mask: torch.Tensor, target: float) -> tuple[bool, float]:
        rate = self.holding(mask)
        return rate >= target, rate


@pytest.mark.parametrize("retries, kept", [(3, [0, 2]), (0, [0, 1, 2])])
def test_greedy_probe_retries_the_next_candidates(retries: int, kept: list[int]) -> None:
    p = _ScriptedProblem()
    r = GreedyBackwardElimination(probe_rows=10, retries=retries).run(p, TARGET)  # type: ignore[arg-type]
    assert r.units == kept
    assert r.holding_rate == (0.995 if retries else 1.0)


def test_paper_reading() -> None:
    model = PlantedNet()
    p = _problem(model, planted_data(model), reading="paper")
    for s in (GreedyBackwardElimination(), TruncatedMonteCarloShapley(permutations=5)):
        r = s.run(p, TARGET)
        assert set(r.units) == TRUE and r.holding_rate == p.holding(r.mask) == p.rates(r.mask).paper


def _lived_in(model: nn.Module) -> None:
    """Train mode, a frozen parameter, an existing grad and a user hook: all must survive."""
    model.train()
    model.head.bias.requires_grad_(False)
    model.feat.weight.grad = torch.full_like(model.feat.weight, 0.5)
    model.feat.register_forward_hook(lambda m, i, o: None)


@pytest.mark.parametrize("engine", ["fx", "hooks"])
def test_strategies_leave_the_model_unchanged(engine: str) -> None:
    model = PlantedNet()
    x = planted_data(model)
    _lived_in(model)
    before = model_state(model)
    p = _problem(model, x, engine)
    for s in _all_strategies():
        s.run(p, TARGET)
    assert_same_state(before, model_state(model))


class _DirectFeed(nn.Module):
    """A gated layer ``act`` that feeds a Linear or Conv2d directly (the sparse path's cases)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.kind = kind
        if kind == "linear":
            self.fc1, self.act = nn.Linear(6, 16), nn.ReLU()
            self.next, self.act2, self.out = nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)
        else:
            self.fc1, self.act = nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(inplace=True)
            if kind == "conv":
                self.next = nn.Conv2d(6, 5, 3, stride=2, padding=1)
                self.pool = nn.AdaptiveAvgPool2d(1)
            else:  # "flatten": act -> Flatten -> Linear, units are blocks of columns
                self.next = nn.Linear(6 * 6 * 6, 5)
            self.act2, self.out = nn.ReLU(), nn.Linear(5, 4)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        if self.kind == "flatten":
            h = torch.flatten(h, 1)
        h = self.act2(self.next(h))
        if self.kind == "conv":
            h = self.pool(h).flatten(1)
        return self.out(h)


@pytest.mark.parametrize("kind", ["linear", "conv", "flatten"])
def test_sparse_mask_scores_equal_direct_evaluation(kind: str) -> None:
    model = _DirectFeed(kind)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=gen) if kind == "linear" else torch.randn(300, 2, 6, 6, generator=gen)
    cache = ActivationCache(model, "act", x)
    # D'_c does not matter for scores: compare on every cached row (positives_only avoids the
    # unbalanced-D'_c warning of this untrained model, whose predictions are skewed).
    p = SelectionProblem(cache, "act", int(cache.predictions.mode().values), positives_only=True)
    rows = torch.arange(len(cache))
    assert build_incremental(cache, "act") is not None, "the sparse path must apply (else the test proves nothing)"
    k = p.num_units
    masks = [torch.zeros(k, dtype=torch.bool), torch.ones(k, dtype=torch.bool)]
    masks += [torch.rand(k, generator=gen) < q for q in (0.2, 0.5, 0.8)]
    masks.append(torch.arange(k) == k - 1)
    for mask in masks:
        ref = dense_masked_scores(cache, rows, [mask.float()])
        torch.testing.assert_close(p.scores(mask, rows=rows), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(masked_scores(cache, rows, [mask.float()]), ref, rtol=1e-5, atol=1e-5)
        sub = rows[torch.randperm(len(rows), generator=gen)[:37]]  # unsorted subset, not a prefix
        torch.testing.assert_close(p.scores(mask, rows=sub), dense_masked_scores(cache, sub, [mask.float()]),
                                   rtol=1e-5, atol=1e-5)


def test_captum_conductance() -> None:
    pytest.importorskip("captum")
    model = PlantedNet()
    x = planted_data(model)
    _lived_in(model)
    before = model_state(model)
    with pytest.raises(ValueError, match="captum needs the model's inputs"):
        CaptumConductance().rank(_problem(model, x, "fx"))
    p = _problem(model, x, "hooks")
    for method in ("conductance", "grad_x_activation"):
        r = CaptumConductance(method=method, n_steps=8).run(p, TARGET)
        assert (r.ranking[[0, 2, 3, 5, 6, 7]] == 0).all()  # the class-0 score does not read them
        assert _top(r.ranking) == TRUE and set(r.units) == TRUE
    # Captum's gradient x activation of s_0 is our Taylor score here (d max(s_1, s_2) = 0).
    torch.testing.assert_close(r.ranking, GradientTimesActivation().rank(p), rtol=1e-4, atol=1e-6)
    assert_same_state(before, model_state(model))


def test_strategy_interface() -> None:
    names: list[Callable[[], Strategy]] = [RandomRanking, MeanActivation, GradientTimesActivation,
                                           TruncatedMonteCarloShapley, GreedyBackwardElimination]
    got = {cls().name for cls in names}
    assert got == {"random", "mean_activation", "grad_x_activation", "tmc_shapley", "greedy_backward"}
    assert CaptumConductance.name == "captum_conductance"
    assert not isinstance(GreedyBackwardElimination(), RankingStrategy)
    assert all(isinstance(cls(), RankingStrategy) for cls in names[:4])


def test_reaches_agrees_with_the_full_holding_rate(planted) -> None:
    """The early-exit test gives the same verdict as the full holding rate, and the exact rate when it passes."""
    model, x = planted
    problem = SelectionProblem(ActivationCache(model, "feat", x), "feat", 0)
    g = torch.Generator().manual_seed(0)
    masks = [torch.rand(8, generator=g) > 0.5 for _ in range(12)] + [torch.ones(8, dtype=torch.bool)]
    for mask in masks:
        full = problem.holding(mask)
        for target in (0.5, 0.9, 0.99, full):
            reached, rate = problem.reaches(mask, target, chunk=100)
            assert reached == (full >= target - 1e-9)
            if reached:
                assert rate == pytest.approx(full, abs=1e-6)
            else:
                assert rate >= full - 1e-6  # stopped early: the rate over what was seen bounds it from above
