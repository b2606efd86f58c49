"""Results: a study as a pandas DataFrame, its Pareto front and hypervolume, dsnas's tables beside
Optuna's, and the report.

``dsnas.results.load(storage, study)`` is the entry point; pandas and SQLAlchemy load on first use."""

from typing import Any

from dsnas.results.pareto import dominates, front_indices

__all__ = ["Objective", "default_reference", "dominates", "done_trials", "frame", "front", "front_indices",
           "hypervolume", "hypervolume_history", "load", "objectives"]
_LAZY = set(__all__) - {"dominates", "front_indices"}  # from dsnas.results.trials, with pandas, on first use


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from dsnas.results import trials as _trials

        return getattr(_trials, name)
    raise AttributeError(f"module 'dsnas.results' has no attribute {name!r}")
