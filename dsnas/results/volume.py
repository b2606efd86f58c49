"""Exact hypervolume: the volume of objective space that a set of points dominates, bounded by a
reference point. Any mix of maximized and minimized objectives; exact for any number of objectives
(slicing, fast enough for the hundreds of trials a study has)."""

from __future__ import annotations

from collections.abc import Sequence


def dominated_volume(points: Sequence[Sequence[float]], reference: Sequence[float], directions: Sequence[str]) -> float:
    """Volume dominated by ``points`` and bounded by ``reference``; points that are not better than the
    reference in every objective add nothing."""
    # Turn every objective into one to minimize, then keep only points strictly inside the reference box.
    sign = [-1.0 if d == "maximize" else 1.0 for d in directions]
    ref = [s * r for s, r in zip(sign, reference)]
    inside = [[s * x for s, x in zip(sign, p)] for p in points]
    inside = [p for p in inside if all(x < r for x, r in zip(p, ref))]
    return _volume(inside, ref)


def _volume(points: list[list[float]], ref: list[float]) -> float:
    if not points:
        return 0.0
    if len(ref) == 1:
        return ref[0] - min(p[0] for p in points)
    if len(ref) == 2:
        return _volume_2d(points, ref)
    # Slice along the last objective: between two consecutive values, the volume is the (d-1)-dimensional
    # volume of the points already reached, times the slice's thickness.
    points = sorted(points, key=lambda p: p[-1])
    total = 0.0
    for i, p in enumerate(points):
        upper = points[i + 1][-1] if i + 1 < len(points) else ref[-1]
        if upper > p[-1]:
            total += _volume([q[:-1] for q in points[: i + 1]], ref[:-1]) * (upper - p[-1])
    return total


def _volume_2d(points: list[list[float]], ref: list[float]) -> float:
    total, best_y = 0.0, ref[1]
    for x, y in sorted(points):
        if y < best_y:
            total += (ref[0] - x) * (best_y - y)
            best_y = y
    return total
