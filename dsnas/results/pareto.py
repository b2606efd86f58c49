"""Non-dominated sorting for any mix of maximized and minimized objectives."""

from __future__ import annotations

from collections.abc import Sequence


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """``a`` is at least as good as ``b`` in every objective and better in one."""
    sign = [1.0 if d == "maximize" else -1.0 for d in directions]
    better_or_equal = all(s * x >= s * y for s, x, y in zip(sign, a, b))
    return better_or_equal and any(s * x > s * y for s, x, y in zip(sign, a, b))


def front_indices(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Indices of the points no other point dominates (duplicates all stay)."""
    return [i for i, p in enumerate(points)
            if not any(dominates(q, p, directions) for j, q in enumerate(points) if j != i)]
