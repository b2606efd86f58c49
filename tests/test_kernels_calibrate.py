"""Activation range calibration: the vectorized KL search against the per-threshold reference, histogram growth,
and the max and percentile calibrators."""

from __future__ import annotations

import pytest
import torch

from dsnas.errors import SpecError, TrialError
from dsnas.kernels.calibrate import (
    KLCalibrator,
    MaxCalibrator,
    PercentileCalibrator,
    kl_amax,
    kl_amax_reference,
    make_calibrator,
)


def _sample(kind: str, n: int = 50_000) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    if kind == "gaussian":
        return torch.randn(n, generator=gen)
    if kind == "laplace":
        u = torch.rand(n, generator=gen) - 0.5
        return -torch.sign(u) * torch.log1p(-2 * u.abs())
    if kind == "uniform":
        return torch.rand(n, generator=gen) * 2 - 1
    if kind == "relu":
        return torch.relu(torch.randn(n, generator=gen))
    if kind == "outliers":
        return torch.cat([torch.randn(n, generator=gen), torch.tensor([35.0, -48.0, 60.0])])
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["gaussian", "laplace", "uniform", "relu", "outliers"])
def test_kl_amax_matches_the_per_threshold_reference(kind):
    cal = KLCalibrator()
    cal.observe(_sample(kind))
    counts, edges = cal.histogram()
    width = (edges[1] - edges[0]).item()
    fast = cal.amax().item()
    slow = kl_amax_reference(counts.numpy(), edges.numpy())
    assert abs(fast - slow) <= width * 1.001
    assert fast == pytest.approx(kl_amax(counts, edges), rel=1e-6)


def test_kl_amax_clips_a_few_large_outliers():
    x = _sample("outliers")
    cal = KLCalibrator()
    cal.observe(x)
    assert cal.amax().item() < 0.15 * x.abs().max().item()  # the bulk is within ~4.5, the max is 60
    assert cal.amax().item() > 2.5


def test_kl_amax_of_a_uniform_distribution_keeps_the_whole_range():
    cal = KLCalibrator()
    cal.observe(_sample("uniform"))
    assert cal.amax().item() == pytest.approx(1.0, abs=0.01)


def test_kl_amax_follows_pytorch_quantizations_conventions():
    # Mass only in bins 0..127 (1, 2, ..., 128). At i=128 every bin is its own level: Q == P, KL = 0. At i=129 bins 0
    # and 1 share a level, but bin 0 has taken bin 1's count (it stands for exact zeros), so Q == P again. The last of
    # equal minima wins and amax is bin_edges[129], the upper edge of the last kept bin (not a bin center).
    counts = torch.zeros(256, dtype=torch.float64)
    counts[:128] = torch.arange(1, 129, dtype=torch.float64)
    edges = torch.linspace(0, 2.56, 257, dtype=torch.float64)
    assert kl_amax_reference(counts.numpy(), edges.numpy()) == pytest.approx(1.29)
    assert kl_amax(counts, edges) == pytest.approx(1.29)


@pytest.mark.parametrize("seed", range(12))
def test_kl_amax_matches_the_reference_on_random_histograms(seed):
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 50, (256,), generator=gen).double()
    counts[torch.rand(256, generator=gen) < 0.3] = 0  # empty bins: excluded from Q, infinite KL where P has outliers
    counts *= torch.exp(-torch.arange(256) / torch.randint(20, 200, (1,), generator=gen))  # a tail
    counts = counts.round()
    counts[-1] += seed % 3  # sometimes an outlier in the very last bin
    if counts.sum() == 0:
        counts[3] = 1
    edges = torch.linspace(0, 1, 257, dtype=torch.float64)
    assert abs(kl_amax(counts, edges) - kl_amax_reference(counts.numpy(), edges.numpy())) <= 1 / 256 + 1e-12


def test_histogram_growth_merges_bins_exactly():
    x = _sample("gaussian")
    small, large = x[x.abs() < 2.0], x[x.abs() >= 2.0]
    two = KLCalibrator()
    two.observe(small)
    two.observe(large)  # the range grows from < 2 to about 4.2: the bin width doubles twice or so
    counts, edges = two.histogram()
    assert counts.sum().item() == x.numel()
    direct = torch.histc(x.abs(), bins=2048, min=0.0, max=edges[-1].item()).double()
    # Equal bin for bin, except the first batch's max: histc closes its last bin on the right, so that value sat in
    # the old last bin, which merges into the new bin just below the one it falls in when binned afresh.
    assert (counts - direct).abs().sum().item() <= 2


def test_two_batches_give_about_the_amax_of_one():
    x = _sample("laplace")
    one, two = KLCalibrator(), KLCalibrator()
    one.observe(x)
    two.observe(x[x.abs() < 3.0])
    two.observe(x[x.abs() >= 3.0])
    # The grown histogram is coarser (twice or four times the bin width), which moves the KL optimum a little.
    assert two.amax().item() == pytest.approx(one.amax().item(), rel=0.05)


def test_a_huge_later_batch_folds_everything_seen_into_the_first_bin():
    cal = KLCalibrator(bins=256)
    cal.observe(torch.tensor([0.0, 0.0]))  # zeros only: no range yet
    cal.observe(torch.linspace(0, 1, 1000))
    cal.observe(torch.tensor([1e6]))
    counts, edges = cal.histogram()
    assert counts.sum().item() == 1003 and counts[0].item() == 1002  # the range doubled 20 times past 256 bins
    assert edges[-1].item() == 2.0**20 and counts[int(1e6 / 2**20 * 256)].item() == 1


def test_calibrators_refuse_no_data_and_non_finite_inputs():
    for cal in (KLCalibrator(), MaxCalibrator(), PercentileCalibrator()):
        with pytest.raises(TrialError, match="observed no data"):
            cal.amax()
        with pytest.raises(TrialError, match="finite"):
            cal.observe(torch.tensor([1.0, float("nan")]))


def test_all_zero_activations_calibrate_to_zero():
    cal = KLCalibrator()
    cal.observe(torch.zeros(10))
    assert cal.amax().item() == 0.0


def test_max_calibrator_keeps_the_largest_magnitude():
    cal = MaxCalibrator()
    cal.observe(torch.tensor([0.5, -3.0]))
    cal.observe(torch.tensor([2.0]))
    assert cal.amax().item() == 3.0 and cal.amax().dtype == torch.float32


def test_percentile_calibrator_cuts_the_tail():
    x = torch.arange(1, 10_001, dtype=torch.float32)
    cal = PercentileCalibrator(percentile=99.0)
    cal.observe(x)
    width = 10_000 / 2048
    assert cal.amax().item() == pytest.approx(9900, abs=width)
    full = PercentileCalibrator(percentile=100.0)
    full.observe(x)
    assert full.amax().item() == pytest.approx(10_000)


def test_make_calibrator_by_name():
    assert isinstance(make_calibrator("kl"), KLCalibrator)
    assert isinstance(make_calibrator("max"), MaxCalibrator)
    assert make_calibrator("percentile", percentile=99.9).percentile == 99.9
    with pytest.raises(SpecError, match="calibrator.*must be one of"):
        make_calibrator("entropy")
    with pytest.raises(SpecError, match=r"percentile must be in \(0, 100\]"):
        make_calibrator("percentile", percentile=150)


@pytest.mark.parametrize("k", [4, 7, 8, 10, 16, 5, 12])
def test_kl_amax_of_integer_valued_inputs_keeps_their_range(k):
    """Integer codes 0..k-1 (categories, counts) give exact ties in KL that rounding noise (~1e-15) used to break:
    amax ~1.0 clipped 50-88% of the input for k in 4, 7, 8, 10, 16. The last of the tied minima keeps the range."""
    x = torch.randint(0, k, (200_000,), generator=torch.Generator().manual_seed(0)).float()
    cal = KLCalibrator()
    cal.observe(x)
    counts, edges = cal.histogram()
    assert cal.amax().item() >= k - 1
    assert (x > cal.amax()).float().mean().item() == 0.0
    assert kl_amax_reference(counts.numpy(), edges.numpy()) == pytest.approx(cal.amax().item(), rel=1e-6)


def test_the_kl_reference_gives_no_nan_where_every_kept_bin_is_empty():
    counts = torch.zeros(256, dtype=torch.float64)
    counts[0], counts[1], counts[200:210] = 5, 0, 3  # bin 0 takes bin 1's count (0): bins 0..127 empty
    edges = torch.linspace(0, 2.56, 257, dtype=torch.float64)
    assert kl_amax_reference(counts.numpy(), edges.numpy()) == pytest.approx(kl_amax(counts, edges))
    assert kl_amax(counts, edges) >= edges[210].item()
