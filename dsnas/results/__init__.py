"""Results: Pareto utilities over what the driver stored."""

from dsnas.results.pareto import dominates, front_indices

__all__ = ["dominates", "front_indices"]
