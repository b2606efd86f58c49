"""Non-dominated sorting for any mix of maximized and minimized objectives, NSGA-II's crowding distance, and the
exact hypervolume a set of points dominates (slicing: exact for any number of objectives, fast enough for the
hundreds of trials a study has)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def comparable(value: object) -> bool:
    """A figure that can be ranked: a finite number (a NaN compares false either way, and nothing dominates it)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[str]) -> bool:
    """``a`` is at least as good as ``b`` in every objective and better in one."""
    sign = [1.0 if d == "maximize" else -1.0 for d in directions]
    better_or_equal = all(s * x >= s * y for s, x, y in zip(sign, a, b))
    return better_or_equal and any(s * x > s * y for s, x, y in zip(sign, a, b))


def front_indices(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Indices of the points no other point dominates (duplicates all stay), in ascending order.

    Best first in lexicographic order (every objective turned into one to maximize), a point can only be dominated
    by one before it, and then by one of the front found so far (dominance is transitive): each point is compared
    with the front alone. NAS-Bench-201's 15,625 cells took 1.8 s against each other (7.5 s for the tests' synthetic
    table), 0.19 s so (0.65 s)."""
    sign = [1.0 if d == "maximize" else -1.0 for d in directions]
    keyed = [tuple(s * x for s, x in zip(sign, p)) for p in points]
    if any(math.isnan(x) for key in keyed for x in key):  # NaN has no order: every pair is compared
        return [i for i, p in enumerate(points)
                if not any(dominates(q, p, directions) for j, q in enumerate(points) if j != i)]
    front: list[int] = []
    for i in sorted(range(len(keyed)), key=keyed.__getitem__, reverse=True):
        if not any(_dominates_maximized(keyed[j], keyed[i]) for j in front):
            front.append(i)
    return sorted(front)


def _dominates_maximized(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a != b and all(x >= y for x, y in zip(a, b))


def dominates_by(a: Sequence[float], b: Sequence[float], directions: Sequence[str], margins: Sequence[float]) -> bool:
    """``a`` dominates ``b`` by a margin: at least as good in every objective, and better by more than
    ``margins[k]`` (a share of ``b``'s value) in every objective that has one; with no margins, plain dominance."""
    if not any(margins):
        return dominates(a, b, directions)
    sign = [1.0 if d == "maximize" else -1.0 for d in directions]
    if not all(s * x >= s * y for s, x, y in zip(sign, a, b)):
        return False
    return all(s * (x - y) > m * abs(y) for s, x, y, m in zip(sign, a, b, margins) if m > 0)


def nondominated_ranks(points: Sequence[Sequence[float]], directions: Sequence[str],
                       margins: Sequence[float] | None = None) -> list[int]:
    """Each point's front: 0 for the non-dominated points, 1 for those only they dominate, and so on
    (dominance by a margin where ``margins`` are given, see :func:`dominates_by`).

    Every pair is compared once, as arrays: each front is then the points no point left dominates. Compared pair by
    pair in Python for each front peeled, a rung's decision took 0.8 s among 1,000 trials and 15 s among 4,000, and
    a one-bracket study of 5,000 trials would have spent hours of its driver's time on them."""
    import numpy as np

    n = len(points)
    if n == 0:
        return []
    margins = list(margins or [0.0] * len(directions))
    sign = np.array([1.0 if d == "maximize" else -1.0 for d in directions])
    raw = np.asarray(points, dtype=float).reshape(n, len(directions))
    x = raw * sign  # every objective maximized; in the n x n tables below, row j against column i
    dominated = np.ones((n, n), dtype=bool)  # dominated[j, i]: j dominates i
    better = np.zeros((n, n), dtype=bool)  # better somewhere (plain dominance)
    for k, margin in enumerate(margins):  # an objective at a time, as n x n booleans (4,000 points: 16 MB each)
        col = x[:, k]
        dominated &= col[:, None] >= col[None, :]
        if margin > 0:  # better by more than the margin, a share of i's value
            dominated &= col[:, None] > (col + margin * np.abs(raw[:, k]))[None, :]
        elif not any(margins):
            better |= col[:, None] > col[None, :]
    if not any(margins):
        dominated &= better
    np.fill_diagonal(dominated, False)
    dominators = dominated.sum(axis=0)  # per point: how many of the points left dominate it
    ranks = np.full(n, -1)
    left = np.ones(n, dtype=bool)
    rank = 0
    while left.any():
        current = left & (dominators == 0)
        ranks[current] = rank
        left &= ~current
        dominators -= dominated[current].sum(axis=0)
        rank += 1
    return ranks.tolist()


def crowding_distances(points: Sequence[Sequence[float]], ranks: Sequence[int]) -> list[float]:
    """NSGA-II's crowding distance within each front: per objective, the gap between a point's two neighbours
    over the front's range, summed; the ends of each objective's order get infinity (they are kept first)."""
    distance = [0.0] * len(points)
    for rank in set(ranks):
        members = [i for i, r in enumerate(ranks) if r == rank]
        for k in range(len(points[members[0]]) if members else 0):
            order = sorted(members, key=lambda i: points[i][k])
            low, high = points[order[0]][k], points[order[-1]][k]
            distance[order[0]] = distance[order[-1]] = math.inf
            if high == low:
                continue
            for before, i, after in zip(order, order[1:-1], order[2:]):
                distance[i] += (points[after][k] - points[before][k]) / (high - low)
    return distance

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
    # A dominated point adds no volume: slicing only the non-dominated ones (in this projection, at every level)
    # keeps each call near the front's size. Slicing them all took 2.7 s for 400 points in 4 objectives, and a
    # report's hypervolume history of such a study 8 minutes.
    points = [points[i] for i in front_indices(points, ["minimize"] * len(ref))]
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
