"""Expected hypervolume improvement (EHVI): how much a candidate is expected to add to the front's hypervolume,
given what is known of it exactly (its hardware figures, measured or predicted before training) and what a model
predicts of the rest (accuracy: a Gaussian mean and standard deviation). Every objective here is minimized (the
sampler negates a maximized one), and the hypervolume is that of the region between the front and ``ref``.

Two objectives, the common case, have it in closed form. Seen along the first axis, the front is a staircase:
for t between two of its points' first coordinates, the lowest second coordinate of a point at or left of t. A
candidate (a, b) adds, for each step k of the staircase, the width of [t_k, t_k+1) right of a times the height
of the step above b. With a ~ N(mu, s) the expected width is an integral of the normal CDF, which has a closed
form; with b unknown too, the sampler averages over quantiles of b. Three or more objectives get the improvement
of an optimistic point (mu - s), a cheaper proxy."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dsnas.pareto import dominated_volume, front_indices

_SQRT2 = math.sqrt(2.0)


def normal_cdf(z: np.ndarray) -> np.ndarray:
    import torch  # numpy has no erf

    return 0.5 * (1.0 + torch.special.erf(torch.as_tensor(np.asarray(z, dtype=float) / _SQRT2)).numpy())


def normal_pdf(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * np.asarray(z) ** 2) / math.sqrt(2 * math.pi)


def staircase(front: np.ndarray, ref: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """The steps of a 2-D front inside ``ref``: (left edges t_0 = -inf, t_1, ..., and the right end ref[0]; the
    step heights g_k, the lowest second coordinate of a point with first coordinate <= t in step k)."""
    pts = np.asarray(front, dtype=float).reshape(-1, 2)
    pts = pts[(pts[:, 0] < ref[0]) & (pts[:, 1] < ref[1])]
    pts = pts[np.argsort(pts[:, 0], kind="stable")]
    edges, heights, lowest = [-np.inf], [float(ref[1])], float(ref[1])
    for a, b in pts:
        if b < lowest:
            lowest = b
            edges.append(a)
            heights.append(b)
    return np.array([*edges, float(ref[0])]), np.array(heights)


def improvement_2d(a: np.ndarray, b: np.ndarray, front: np.ndarray, ref: Sequence[float]) -> np.ndarray:
    """The hypervolume each point (a_i, b_i) adds to the front (exact)."""
    edges, heights = staircase(front, ref)
    a, b = np.asarray(a, dtype=float)[:, None], np.asarray(b, dtype=float)[:, None]
    widths = np.clip(edges[None, 1:] - np.maximum(edges[None, :-1], a), 0.0, None)
    return (widths * np.clip(heights[None, :] - b, 0.0, None)).sum(axis=1)


def expected_improvement_2d(mu: np.ndarray, sigma: np.ndarray, b: np.ndarray, front: np.ndarray,
                            ref: Sequence[float]) -> np.ndarray:
    """E[improvement] of points (a_i, b_i) with a_i ~ N(mu_i, sigma_i) and b_i known (exact)."""
    edges, heights = staircase(front, ref)
    mu, sigma = np.asarray(mu, dtype=float)[:, None], np.maximum(np.asarray(sigma, dtype=float), 1e-12)[:, None]
    # Psi(t) = integral of P(a <= u) du up to t = sigma (z Phi(z) + phi(z)), z = (t - mu) / sigma; Psi(-inf) = 0.
    finite = np.where(np.isfinite(edges), edges, 0.0)[None, :]
    z = (finite - mu) / sigma
    psi = sigma * (z * normal_cdf(z) + normal_pdf(z))
    psi[:, ~np.isfinite(edges)] = 0.0
    widths = np.clip(psi[:, 1:] - psi[:, :-1], 0.0, None)
    return (widths * np.clip(heights[None, :] - np.asarray(b, dtype=float)[:, None], 0.0, None)).sum(axis=1)


def expected_improvement(mu: np.ndarray, sigma: np.ndarray, front: np.ndarray, ref: Sequence[float],
                         quantiles: int = 16) -> np.ndarray:
    """EHVI of candidates whose objective i is N(mu[:, i], sigma[:, i]); sigma 0 is a known figure. ``front``: the
    points so far (any, dominated ones are ignored), one row each."""
    mu, sigma = np.asarray(mu, dtype=float), np.asarray(sigma, dtype=float)
    front = np.asarray(front, dtype=float).reshape(-1, mu.shape[1])
    m = mu.shape[1]
    if m == 1:
        best = min([float(ref[0]), *front[:, 0]])
        s = np.maximum(sigma[:, 0], 1e-12)
        z = (best - mu[:, 0]) / s
        ei = (best - mu[:, 0]) * normal_cdf(z) + s * normal_pdf(z)
        return np.where(sigma[:, 0] > 0, ei, np.clip(best - mu[:, 0], 0.0, None))
    if m == 2:
        unknown = sigma.max(axis=0) > 0
        if not unknown.any():
            return improvement_2d(mu[:, 0], mu[:, 1], front, ref)
        # Integrate along an unknown axis in closed form; average over quantiles of the other when it is unknown.
        axis = 0 if unknown[0] else 1
        other = 1 - axis
        swap = [axis, other]
        f, r = front[:, swap], [ref[axis], ref[other]]
        if not unknown[other]:
            return expected_improvement_2d(mu[:, axis], sigma[:, axis], mu[:, other], f, r)
        q = _normal_quantiles(quantiles)
        total = np.zeros(len(mu))
        for z in q:
            total += expected_improvement_2d(mu[:, axis], sigma[:, axis], mu[:, other] + z * sigma[:, other], f, r)
        return total / len(q)
    return _optimistic_improvement(mu - sigma, front, ref)


def probability_feasible(mu: np.ndarray, sigma: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """P(every modelled figure <= its limit), the figures independent."""
    z = (np.asarray(limits)[None, :] - mu) / np.maximum(sigma, 1e-12)
    return np.prod(normal_cdf(z), axis=1)


def _normal_quantiles(n: int) -> np.ndarray:
    from statistics import NormalDist

    return np.array([NormalDist().inv_cdf((i + 0.5) / n) for i in range(n)])


def _optimistic_improvement(points: np.ndarray, front: np.ndarray, ref: Sequence[float]) -> np.ndarray:
    minimize = ["minimize"] * points.shape[1]
    kept = front[front_indices(front.tolist(), minimize)] if len(front) else front
    base = dominated_volume(kept.tolist(), list(ref), minimize)
    return np.array([dominated_volume([*kept.tolist(), p.tolist()], list(ref), minimize) - base for p in points])
