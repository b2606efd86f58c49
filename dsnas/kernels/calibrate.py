"""Activation range calibration for INT8: the amax a layer's input is clipped at, by KL divergence (TensorRT's entropy
method), by the maximum, or by a percentile of |x| observed over calibration batches."""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch

from dsnas.errors import SpecError, TrialError

CALIBRATORS = ("kl", "max", "percentile")


class _AbsHistogram:
    """A fixed number of equal-width bins over [0, range] of |x|, accumulated over batches.

    When a batch exceeds the range, the width doubles (as often as needed) and adjacent bins merge. Merging whole
    bins is exact, unlike interpolating counts into new edges, and the histogram keeps its size, unlike
    pytorch-quantization, which appends bins of the old width (one outlier 100x the first batch's max would make
    the KL search 100x longer).
    """

    def __init__(self, bins: int) -> None:
        self.bins = bins
        self.range = 0.0
        self.counts = torch.zeros(bins, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        a = x.detach().abs().flatten().float()
        if a.numel() == 0:
            return
        top = a.max().item()
        if not math.isfinite(top):
            raise TrialError(f"calibration needs finite activations, but a batch held {top}. "
                             "Fix: calibrate the layer on inputs from a model that does not overflow")
        if top > self.range:
            self._grow(top)
        if self.range == 0.0:  # only zeros so far: they belong to bin 0 whatever range comes later
            self.counts[0] += a.numel()
            return
        self.counts += torch.histc(a, bins=self.bins, min=0.0, max=self.range).to("cpu", torch.float64)

    def _grow(self, top: float) -> None:
        if self.range == 0.0:
            self.range = top
            return
        factor = 2
        while self.range * factor < top:
            factor *= 2
        # Old bin j lies wholly inside new bin j // factor, because the new width is a whole multiple of the old.
        merged_into = torch.arange(self.bins) // min(factor, self.bins)
        self.counts = torch.zeros_like(self.counts).index_add_(0, merged_into, self.counts)
        self.range *= factor

    def edges(self) -> torch.Tensor:
        return torch.linspace(0.0, self.range, self.bins + 1, dtype=torch.float64)


class _HistogramCalibrator:
    def __init__(self, bins: int) -> None:
        if bins < 1:
            raise ValueError(f"bins must be >= 1, but got {bins}")
        self._hist = _AbsHistogram(bins)

    def observe(self, x: torch.Tensor) -> None:
        """Add a batch's |x| to the histogram."""
        self._hist.add(x)

    def histogram(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The counts (float64, ``bins``) and bin edges (float64, ``bins + 1``) observed so far."""
        return self._hist.counts.clone(), self._hist.edges()

    def _require_data(self) -> None:
        if self._hist.counts.sum() == 0:
            raise TrialError(f"{type(self).__name__} has observed no data; call observe() on calibration batches "
                             "before amax()")


class KLCalibrator(_HistogramCalibrator):
    """TensorRT's entropy calibration: the clipping threshold whose ``levels``-level quantization of the |x|
    histogram loses the least information, KL(P || Q)."""

    def __init__(self, bins: int = 2048, levels: int = 128) -> None:
        if bins < levels:
            raise ValueError(f"bins must be >= levels, but got bins={bins}, levels={levels}")
        super().__init__(bins)
        self.levels = levels

    def amax(self) -> torch.Tensor:
        self._require_data()
        if self._hist.range == 0.0:
            return torch.tensor(0.0)
        counts, edges = self.histogram()
        return torch.tensor(kl_amax(counts, edges, self.levels), dtype=torch.float32)


class PercentileCalibrator(_HistogramCalibrator):
    """The amax below which ``percentile`` percent of the observed |x| lie (the upper edge of the histogram bin where
    the cumulative share reaches it; pytorch-quantization takes that bin's lower edge)."""

    def __init__(self, percentile: float = 99.99, bins: int = 2048) -> None:
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], but got {percentile}")
        super().__init__(bins)
        self.percentile = percentile

    def amax(self) -> torch.Tensor:
        self._require_data()
        counts, edges = self.histogram()
        cdf = counts.cumsum(0) / counts.sum()
        target = torch.tensor([self.percentile / 100.0], dtype=torch.float64)
        at = min(int(torch.searchsorted(cdf, target).item()), counts.numel() - 1)
        return torch.tensor(edges[at + 1].item(), dtype=torch.float32)


class MaxCalibrator:
    """The largest |x| observed: no clipping, the widest quantization step."""

    def __init__(self) -> None:
        self._amax: float | None = None

    def observe(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        top = x.detach().abs().max().item()
        if not math.isfinite(top):
            raise TrialError(f"calibration needs finite activations, but a batch held {top}. "
                             "Fix: calibrate the layer on inputs from a model that does not overflow")
        self._amax = top if self._amax is None else max(self._amax, top)

    def amax(self) -> torch.Tensor:
        if self._amax is None:
            raise TrialError("MaxCalibrator has observed no data; call observe() on calibration batches before amax()")
        return torch.tensor(self._amax, dtype=torch.float32)


def make_calibrator(name: str, **options: Any) -> KLCalibrator | MaxCalibrator | PercentileCalibrator:
    """The calibrator a study names: ``"kl"`` | ``"max"`` | ``"percentile"``; ``options`` go to its constructor."""
    kinds = {"kl": KLCalibrator, "max": MaxCalibrator, "percentile": PercentileCalibrator}
    if name not in kinds:
        raise SpecError("quantization", "calibrator", f"must be one of {list(CALIBRATORS)}", name,
                        'use calibrator = "kl" (TensorRT entropy), "max" or "percentile"')
    try:
        return kinds[name](**options)
    except (TypeError, ValueError) as e:
        raise SpecError("quantization", f"calibrator.{name}", f"options must fit {kinds[name].__name__} ({e})",
                        options, "see the calibrator's parameters in dsnas.kernels.calibrate") from None


KL_TIE = 1e-12  # divergences this close (nats) are equal: far above float64's rounding, far below a real difference


def kl_amax(hist: Any, bin_edges: Any, levels: int = 128) -> float:
    """The KL-minimizing amax of an |x| histogram, all candidate thresholds at once.

    Follows pytorch-quantization's ``_compute_amax_entropy``: bin 0 takes bin 1's count (it is dominated by exact
    zeros, e.g. after ReLU); for each candidate ``i`` in ``levels..bins``, P is the first ``i`` bins with the outliers
    added to the last one, Q is those ``i`` bins (without the outliers) merged into ``levels`` levels and spread back
    uniformly over each level's non-zero bins; no smoothing (a bin where P > 0 and Q == 0 makes KL infinite); the last
    of equal minima wins; amax is ``bin_edges[i]``, the upper edge of the last kept bin.

    KL needs no per-bin pass per candidate: with T = sum(P), Z = sum(Q's counts) = sum of the first i bins, S_k and
    m_k a level's sum and mean over its non-zero bins,
    T * KL = sum_j h_j log h_j - sum_k S_k log m_k + Z log(Z / T) + (the last bin's outlier correction),
    which takes prefix sums and a (candidates x levels) gather.
    """
    h = torch.as_tensor(np.asarray(hist), dtype=torch.float64).clone()
    n = h.numel()
    if n < levels:
        raise ValueError(f"the histogram needs at least levels={levels} bins, but has {n}")
    h[0] = h[1]
    total = h.sum()
    if total <= 0:
        raise ValueError("the histogram is empty")
    cand = torch.arange(levels, n + 1)  # number of bins kept
    # Prefix sums of the counts and of the non-zero bins, gathered at every level boundary of every candidate.
    prefix = torch.cat([torch.zeros(1, 2, dtype=torch.float64), torch.stack([h, (h > 0).double()], 1).cumsum(0)])
    level_sum, level_count = prefix[_level_starts(n, levels)].diff(dim=1).unbind(-1)
    level_mean = level_sum / level_count.clamp_min(1)
    hlogh = torch.cat([torch.zeros(1, dtype=torch.float64), torch.xlogy(h, h).cumsum(0)])
    kept = prefix[cand, 0]
    kl = hlogh[cand] - torch.xlogy(level_sum, level_mean).sum(1) + torch.xlogy(kept, kept) - kept * total.log()

    # The last kept bin also carries the outliers in P (not in Q): swap its term for the one with them. Where that
    # bin is empty, Q is zero there while P is not: KL is infinite (what is left over below is overwritten).
    outliers = total - kept
    last = h[cand - 1]
    tiny = torch.finfo(torch.float64).tiny
    log_q_last = level_mean[:, -1].clamp_min(tiny).log() - kept.clamp_min(tiny).log()
    kl += torch.where(outliers > 0, torch.xlogy(last + outliers, last + outliers) - torch.xlogy(last, last)
                      - outliers * (total.log() + log_q_last), 0.0)
    kl = torch.where((outliers > 0) & (last == 0), torch.inf, kl / total)

    # Equal minima within rounding: the terms are differences of large sums, so two thresholds with the same KL
    # (integer-valued inputs give exact ties) differ by ~1e-15, and an exact comparison let that noise pick one
    # that clipped 50-88% of the input.
    best = int(torch.nonzero(kl <= kl.min() + KL_TIE).max().item())
    return float(torch.as_tensor(np.asarray(bin_edges), dtype=torch.float64)[cand[best]].item())


@functools.lru_cache(maxsize=8)
def _level_starts(bins: int, levels: int) -> torch.Tensor:
    """[candidates, levels + 1]: level k of candidate i (bins kept) starts at bin ceil(k * i / levels), the integer
    form of pytorch-quantization's np.digitize(range(i), np.linspace(0, i, levels + 1)); the last column is i."""
    cand = torch.arange(levels, bins + 1)
    return (torch.arange(levels + 1)[None, :] * cand[:, None] + levels - 1) // levels


def kl_amax_reference(hist: Any, bin_edges: Any, levels: int = 128) -> float:
    """The same amax as ``kl_amax``, one candidate threshold at a time as pytorch-quantization computes it (numpy
    only, slow): the check on the vectorized version."""
    h = np.array(hist, dtype=np.float64)
    h[0] = h[1]
    divergences = []
    for i in range(levels, len(h) + 1):
        level = np.digitize(np.arange(i), np.linspace(0, i, num=levels + 1)) - 1
        on = h[:i] > 0  # Q spreads each level's mass over its non-zero bins only
        level_sum = np.bincount(level[on], weights=h[:i][on], minlength=levels)
        level_count = np.bincount(level[on], minlength=levels)
        q = np.zeros(i)
        q[on] = level_sum[level[on]] / level_count[level[on]]
        p = h[:i].copy()
        p[-1] += h[i:].sum()
        if q.sum() == 0:  # every kept bin empty: nothing of P is in Q
            divergences.append(np.inf)
            continue
        p, q = p / p.sum(), q / q.sum()
        if np.any((p > 0) & (q == 0)):
            divergences.append(np.inf)
            continue
        on = p > 0
        divergences.append(float(np.sum(p[on] * np.log(p[on] / q[on]))))
    d = np.array(divergences)
    best = int(np.nonzero(d <= d.min() + KL_TIE)[0].max())
    return float(np.asarray(bin_edges)[best + levels])
