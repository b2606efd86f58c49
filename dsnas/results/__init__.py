"""Results: a study as a pandas DataFrame, its Pareto front and hypervolume, and the report.

``dsnas.results.load(storage, study)`` is the entry point; pandas and SQLAlchemy load on first use."""

from dsnas.pareto import dominates, front_indices
from dsnas.results.trials import (
    Objective,
    default_reference,
    done_trials,
    frame,
    front,
    hypervolume,
    hypervolume_history,
    load,
    objectives,
)

__all__ = ["Objective", "default_reference", "dominates", "done_trials", "frame", "front", "front_indices",
           "hypervolume", "hypervolume_history", "load", "objectives"]
