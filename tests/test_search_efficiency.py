"""benchmarks/search_efficiency.py's flags and scoring, on the recorded table (no search runs)."""

from __future__ import annotations

import sys

import pytest
from conftest import load_benchmark

search_efficiency = load_benchmark("search_efficiency")


def test_methods_are_picked_by_name_and_a_mistyped_one_is_refused_naming_the_known_ones():
    """A name that is none of the methods was dropped silently: `--methods tpe` (the method is "tpe (Optuna
    default)") ran nothing and printed an empty table."""
    assert search_efficiency.chosen_methods(None) == list(search_efficiency.METHODS)
    assert search_efficiency.chosen_methods("dsnas sampler, random") == ["random", "dsnas sampler"]
    assert search_efficiency.chosen_methods("ablation: tpe + halving") == ["  ablation: tpe + halving"]
    with pytest.raises(SystemExit, match=r"--methods: \['tpe'\] are none of \['random', 'tpe \(Optuna default\)'"):
        search_efficiency.chosen_methods("random,tpe")


@pytest.mark.parametrize("argv, message", [
    (["--table", "missing.csv"], r"--table missing.csv: no table there .* Fix: pass --table PATH"),
    (["--seeds", "0"], r"--seeds 0, --trials 160: each must be at least 1"),
])
def test_a_missing_table_or_no_seed_is_one_line_before_any_search(monkeypatch, argv, message):
    """Both ended in a traceback: FileNotFoundError from csv reading, and with --seeds 0, after the predictor's
    tables, a StatisticsError (no median of no seed)."""
    monkeypatch.setattr(sys, "argv", ["search_efficiency.py", *argv])
    with pytest.raises(SystemExit, match=message):
        search_efficiency.main()
