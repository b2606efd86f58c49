"""Multi-objective successive halving and Hyperband: rungs, brackets, non-dominated sorting with crowding, the
decision at a rung, and the [fidelity] section."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsnas.errors import Invalid
from dsnas.fidelity import RungPlan, decide, over_limits
from dsnas.pareto import crowding_distances, front_indices, nondominated_ranks
from dsnas.spec import Constraints, FidelitySpec, load_study

MAX2 = ["maximize", "maximize"]


@pytest.mark.parametrize("eta, min_fraction, rungs", [
    (3, 0.1, (1 / 9, 1 / 3)),
    (3, 1 / 9, (1 / 9, 1 / 3)),  # exactly 1/9: the rung is there, not lost to rounding
    (3, 0.3, (1 / 3,)),
    (2, 0.1, (1 / 8, 1 / 4, 1 / 2)),
    (4, 0.25, (1 / 4,)),
])
def test_rungs_are_powers_of_one_over_eta_below_the_full_budget(eta, min_fraction, rungs):
    assert RungPlan(FidelitySpec(eta=eta, min_fraction=min_fraction)).rungs == pytest.approx(rungs)


def test_successive_halving_has_one_bracket_hyperband_one_per_first_rung():
    halving = RungPlan(FidelitySpec(kind="successive_halving"))
    assert halving.brackets == 1 and {halving.bracket_of(n) for n in range(50)} == {0}
    hyper = RungPlan(FidelitySpec(kind="hyperband", eta=3, min_fraction=0.1))
    assert hyper.brackets == 3
    assert [hyper.fractions(b) for b in range(3)] == [pytest.approx((1 / 9, 1 / 3)), pytest.approx((1 / 3,)), ()]
    # Li et al.'s allocation for s_max = 2, eta = 3: 9, 5 and 3 trials per round of brackets.
    counts = Counter(hyper.bracket_of(n) for n in range(17 * 10))
    assert counts == {0: 90, 1: 50, 2: 30}
    # Interleaved, not in blocks, and the same for a trial number whenever it is asked (a resume).
    first = [hyper.bracket_of(n) for n in range(17)]
    assert len(set(first[:6])) == 3 and first == [hyper.bracket_of(n) for n in range(17)]


def test_ranks_sort_fronts():
    points = [[3, 1], [1, 3], [2, 2], [1, 1], [2, 1], [0, 0]]
    assert nondominated_ranks(points, MAX2) == [0, 0, 0, 2, 1, 3]
    assert nondominated_ranks([[1, 5], [2, 4]], ["minimize", "minimize"]) == [0, 0]
    assert nondominated_ranks([[1, 5], [2, 6]], ["minimize", "minimize"]) == [0, 1]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=12))
def test_rank_zero_is_the_front_and_each_rank_is_dominated_only_by_lower_ranks(raw):
    from dsnas.pareto import dominates

    points = [list(p) for p in raw]
    ranks = nondominated_ranks(points, MAX2)
    assert sorted(i for i, r in enumerate(ranks) if r == 0) == front_indices(points, MAX2)
    for i, p in enumerate(points):
        for j, q in enumerate(points):
            if dominates(q, p, MAX2):
                assert ranks[j] < ranks[i]
        if ranks[i] > 0:  # something of the rank just below dominates it
            assert any(ranks[j] == ranks[i] - 1 and dominates(q, p, MAX2) for j, q in enumerate(points))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.1, 0.2, 0.3, 0.5, 1.0, 1.01, 1.02]), st.integers(0, 5)), min_size=1,
                max_size=14),
       st.sampled_from([None, [0.015, 0.0], [0.2, 0.0], [0.015, 0.5]]))
def test_ranks_by_a_margin_are_the_fronts_peeled_pair_by_pair(raw, margins):
    """As arrays, against the definition: each front is the points left that no other point left dominates."""
    from dsnas.pareto import dominates_by

    points = [list(p) for p in raw]
    expected, left, rank = [-1] * len(points), set(range(len(points))), 0
    while left:
        current = {i for i in left if not any(dominates_by(points[j], points[i], MAX2, margins or [0.0, 0.0])
                                              for j in left if j != i)}
        for i in current:
            expected[i] = rank
        left, rank = left - current, rank + 1
    assert nondominated_ranks(points, MAX2, margins) == expected


def test_a_rung_decision_among_thousands_of_trials_takes_milliseconds():
    """Compared pair by pair in Python for each front, one decision took 15 s among 4,000 trials."""
    import time

    rng = np.random.default_rng(0)
    points = np.column_stack([rng.random(4000), rng.random(4000) * 1e5]).tolist()
    start = time.perf_counter()
    ranks = nondominated_ranks(points, MAX2, [0.015, 0.0])
    assert time.perf_counter() - start < 3.0 and min(ranks) == 0 and max(ranks) > 10


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3).flatmap(lambda k: st.tuples(
    st.lists(st.lists(st.sampled_from([0.0, -0.0, 1.0, 2.0, 3.0, math.inf, -math.inf, math.nan]), min_size=k,
                      max_size=k), max_size=14),
    st.lists(st.sampled_from(["maximize", "minimize"]), min_size=k, max_size=k))))
def test_the_front_is_every_point_no_other_dominates(case):
    """Against every pair compared, with ties, signed zeros, infinities and NaN (which no order sorts)."""
    from dsnas.pareto import dominates

    points, directions = case
    brute = [i for i, p in enumerate(points)
             if not any(dominates(q, p, directions) for j, q in enumerate(points) if j != i)]
    assert front_indices(points, directions) == brute


def test_crowding_gives_the_ends_of_each_front_infinity_and_the_middle_its_neighbours_gap():
    points = [[0.0, 4.0], [1.0, 3.0], [3.0, 1.0], [4.0, 0.0], [0.0, 0.0]]
    ranks = nondominated_ranks(points, MAX2)
    distance = crowding_distances(points, ranks)
    assert math.isinf(distance[0]) and math.isinf(distance[3]) and math.isinf(distance[4])  # ends; a lone point
    # [1, 3]: neighbours [0, 4] and [3, 1]: (3 - 0) / 4 + (4 - 1) / 4
    assert distance[1] == pytest.approx(1.5) and distance[2] == pytest.approx(1.5)


def test_decide_waits_for_min_trials_then_keeps_the_first_front_and_the_best_share():
    assert decide(2, [0.1, 1.0], {0: [0.9, 9.0], 1: [0.8, 8.0]}, MAX2, eta=3, min_trials=4).go
    peers = {0: [0.50, 100.0], 1: [0.40, 300.0], 2: [0.45, 200.0], 3: [0.30, 150.0], 4: [0.35, 90.0]}
    # Dominated by trial 2 (more accurate and faster), and not among the best 6 // 3: stops.
    stop = decide(5, [0.42, 180.0], peers, MAX2, eta=3, min_trials=3)
    assert not stop.go and stop.reason == "dominated: 4 of 6 (front 2); the first front and the best 2 go on"
    # On the first front, however crowded: goes on.
    assert decide(5, [0.44, 250.0], {**peers, 6: [0.43, 260.0], 7: [0.445, 240.0]}, MAX2, eta=4, min_trials=3).go
    # Dominated, but the first front is one trial and the share is two: the best of the second front goes on.
    few = {0: [0.5, 100.0], 1: [0.3, 50.0]}
    assert not decide(2, [0.4, 90.0], few, MAX2, eta=2, min_trials=3).go  # 3 // 2 = 1: only the best
    assert decide(2, [0.4, 90.0], {**few, 3: [0.2, 40.0]}, MAX2, eta=2, min_trials=3).go  # 4 // 2 = 2


def test_a_lead_in_accuracy_within_the_margin_is_noise_not_dominance():
    # Early in training every candidate sits near the same accuracy; the fastest must not stop all the others.
    plateau = {0: [0.296, 900.0], 1: [0.296, 600.0], 2: [0.297, 400.0]}
    margins = [0.015, 0.0]  # accuracy: 1.5% of its value; throughput: measured, exact
    assert not decide(3, [0.295, 300.0], plateau, MAX2, eta=3, min_trials=3).go  # exact: dominated by all
    assert decide(3, [0.295, 300.0], plateau, MAX2, eta=3, min_trials=3, margins=margins).go
    # A clear lead still counts: 0.35 > 0.30 * 1.015, and at least as fast.
    assert not decide(3, [0.30, 300.0], {**plateau, 4: [0.35, 300.0]}, MAX2, eta=3, min_trials=3,
                      margins=margins).go


def test_decide_counts_a_trial_once_whether_or_not_its_own_values_are_among_the_peers():
    peers = {0: [0.5, 100.0], 1: [0.4, 300.0], 2: [0.45, 200.0]}
    assert decide(2, [0.45, 200.0], peers, MAX2, 3, 3) == decide(2, [0.45, 200.0], {0: peers[0], 1: peers[1]},
                                                                 MAX2, 3, 3)


def test_dominance_by_a_margin():
    from dsnas.pareto import dominates_by

    assert dominates_by([0.31, 5.0], [0.30, 5.0], MAX2, [0.015, 0.0])  # 0.31 > 0.30 * 1.015
    assert not dominates_by([0.302, 9.0], [0.30, 5.0], MAX2, [0.015, 0.0])  # faster, but not clearly better
    assert not dominates_by([0.31, 4.0], [0.30, 5.0], MAX2, [0.015, 0.0])  # slower
    assert dominates_by([1.0, 2.0], [1.0, 3.0], ["maximize", "minimize"], [0.0, 0.0])  # no margins: plain
    assert dominates_by([2.0, 1.0], [2.5, 1.0], ["minimize", "maximize"], [0.1, 0.0])  # a loss: lower by > 10%


def test_over_limits_names_each_broken_limit():
    assert over_limits({"latency_ms": 61.24, "params": 10.0}, Constraints(max_latency_ms=50, max_params=100)) == \
        ["latency_ms 61.24 > 50"]
    assert over_limits({"latency_ms": 1.0}, Constraints(max_peak_memory_mb=10)) == []  # not measured: not judged


def test_pruning_is_on_by_default_and_can_be_turned_off(tiny_study):
    assert not load_study(tiny_study).fidelity.enabled  # the tests' tiny study turns it off
    tiny_study.write_text(tiny_study.read_text().replace('[fidelity]\nkind = "none"', ""))
    assert load_study(tiny_study).fidelity.kind == "successive_halving"
    with pytest.raises(Invalid):
        FidelitySpec(eta=0)


def test_a_nan_figure_at_a_rung_stops_the_trial_there(tiny_study):
    """A nan is never dominated: a user task's nan accuracy went on at every rung, its value among its peers'."""
    from dsnas.fidelity import RungJudge
    from dsnas.rungs import RungReport

    tiny_study.write_text(tiny_study.read_text().replace('[fidelity]\nkind = "none"', ""))
    judge = RungJudge(load_study(tiny_study))
    peers = {n: [0.3 + 0.01 * n, 1000.0] for n in range(6)}
    report = RungReport(9, 1, 0.3, {"accuracy": float("nan"), "throughput_tok_s": 2000.0})
    decision = judge.decide(report, peers)
    assert not decision.go and decision.reason.startswith("accuracy nan at this rung: a figure must be a finite")
    assert judge.decide(RungReport(9, 1, 0.3, {"accuracy": 0.9, "throughput_tok_s": 2000.0}), peers).go


def test_a_trial_stopped_for_a_nan_is_no_peer_of_later_trials(tiny_study):
    """Its record keeps the nan: nothing dominates a nan, so it sat on the first front of every later decision at
    that rung and pushed a real second-best trial out of the best max(1, n // eta)."""
    from types import SimpleNamespace

    from dsnas.fidelity import RungJudge
    from dsnas.rungs import RungReport

    tiny_study.write_text(tiny_study.read_text().replace('[fidelity]\nkind = "none"', "[fidelity]\nmin_trials = 1"))
    judge = RungJudge(load_study(tiny_study))
    nan = RungReport(5, 1, 1 / 3, {"accuracy": float("nan"), "throughput_tok_s": 120.0})
    stored = judge.attrs(nan, judge.decide(nan, {}))
    points = [[0.50, 500.0], [0.30, 100.0], [0.31, 90.0], [0.29, 80.0], [0.28, 70.0]]
    trials = [SimpleNamespace(number=n, user_attrs={"rung1": {"values": p}}) for n, p in enumerate(points)]
    trials.append(SimpleNamespace(number=5, user_attrs=stored))
    study = SimpleNamespace(get_trials=lambda deepcopy, states: trials)
    peers = judge.peers(study, 0, 1, 6)
    assert sorted(peers) == [0, 1, 2, 3, 4]
    second = RungReport(6, 1, 1 / 3, {"accuracy": 0.45, "throughput_tok_s": 450.0})  # the best of front 2
    assert judge.decide(second, peers).go


def test_a_rung_compares_trials_at_the_same_share_of_the_budget_after_fidelity_was_edited(tiny_study):
    """Resumed with min_fraction = 0.1 (rungs at 1/9 and 1/3), a new trial's accuracy after 1/9 of its training was
    judged against the earlier trials' rung 1, taken after 1/3 (0.314 against 0.394), and its rung at 1/3 found
    no peer."""
    from types import SimpleNamespace

    from dsnas.fidelity import RungJudge

    tiny_study.write_text(tiny_study.read_text().replace('[fidelity]\nkind = "none"', "[fidelity]\nmin_fraction = 0.1"))
    judge = RungJudge(load_study(tiny_study))
    assert judge.plan.rungs == pytest.approx((1 / 9, 1 / 3))
    earlier = [SimpleNamespace(number=n, user_attrs={"rung0": {"fraction": 0.0, "go": True},
                                                     "rung1": {"fraction": 1 / 3, "values": [0.39, 1000.0 + n]}})
               for n in range(3)]
    study = SimpleNamespace(get_trials=lambda deepcopy, states: earlier)
    assert judge.peers(study, 0, 1, 3) == {}
    assert judge.peers(study, 0, 2, 3) == {n: [0.39, 1000.0 + n] for n in range(3)}
