"""benchmarks/routing.py's last line, the cost cut at the target, on hand-made route outcomes (no search runs)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import load_benchmark

routing = load_benchmark("routing")
BEST = SimpleNamespace(name="trial 7 alone", accuracy=0.4080, cost=0.55)


def test_the_cut_at_the_target_is_the_cheapest_route_within_half_a_point():
    cascade = SimpleNamespace(name="cascade", accuracy=0.4057, cost=0.319)  # -0.23 points, 42% less
    learned = SimpleNamespace(name="learned router", accuracy=0.4010, cost=0.20)  # -0.70 points: beyond the target
    cut, how = routing.at_target(BEST, [cascade, learned], {"cascade": 0.30, "trial 7 alone": 0.37})
    assert cut == pytest.approx(0.42)
    assert how == "cascade, -0.23 points; end to end: 19% less"


def test_no_route_within_the_target_is_no_cut_there_not_the_cut_of_one_that_lost_more():
    """The cheaper route's cut was the number on the last line, 'X% less cost ... at <= 0.5 points accuracy loss',
    though it lost 0.80 points on the report half ('misses the target' beside it)."""
    cascade = SimpleNamespace(name="cascade", accuracy=0.4000, cost=0.319)
    learned = SimpleNamespace(name="learned router", accuracy=0.3990, cost=0.40)
    cut, how = routing.at_target(BEST, [cascade, learned], {})
    assert cut == 0.0
    assert how == "trial 7 alone: neither route is within the target; the cheaper, cascade, -0.80 points at 42% less"


def test_a_route_that_costs_more_than_the_model_alone_is_no_cut():
    """A route within the target that costs more than the most accurate model alone was printed as a negative cut
    ('-20% less cost ... at <= 0.5 points'), and one beyond it as '-1.00 points at -20% less'."""
    cascade = SimpleNamespace(name="cascade", accuracy=0.4070, cost=0.66)  # -0.10 points, 20% more
    learned = SimpleNamespace(name="learned router", accuracy=0.4060, cost=0.70)
    cut, how = routing.at_target(BEST, [cascade, learned], {})
    assert cut == 0.0
    assert how == "trial 7 alone: no route within the target costs less; the cheaper, cascade, -0.10 points at 20% more"
    cascade.accuracy = 0.3980  # -1.00 points: beyond the target
    learned.accuracy = 0.3970
    assert routing.at_target(BEST, [cascade, learned], {}) == (
        0.0, "trial 7 alone: neither route is within the target; the cheaper, cascade, -1.00 points at 20% more")
