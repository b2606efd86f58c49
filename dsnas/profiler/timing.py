"""The timing protocol: warm up, then time single calls until a minimum count and duration are reached and
the median is known to a set tolerance (the 95% confidence interval of the median, from order statistics),
or a time cap is hit. Report the median with its dispersion, never a single sample."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

from dsnas.allocator import hold_freed_memory


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    warmup: int
    p25_ms: float = math.nan
    p75_ms: float = math.nan
    ci_low_ms: float = math.nan  # 95% confidence interval of the median
    ci_high_ms: float = math.nan
    converged: bool = False  # the interval reached the tolerance before the time cap
    device_median_ms: float | None = None  # CUDA events: the device's own time, without host overhead

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: the dispersion that says how much to trust the median."""
        return (self.p90_ms - self.p10_ms) / self.median_ms if self.median_ms else float("nan")

    @property
    def iqr_ms(self) -> float:
        return self.p75_ms - self.p25_ms

    @property
    def ci_rel(self) -> float:
        """Half-width of the median's confidence interval relative to the median."""
        return (self.ci_high_ms - self.ci_low_ms) / (2 * self.median_ms) if self.median_ms else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "spread": self.spread, "iqr_ms": self.iqr_ms, "ci_rel": self.ci_rel}


# The keys of Timing.as_dict() (and the old profiles' peak_bytes): a batch's statistics, not its figures.
TIMING_KEYS = frozenset({"median_ms", "p10_ms", "p90_ms", "repeats", "warmup", "p25_ms", "p75_ms", "ci_low_ms",
                         "ci_high_ms", "converged", "device_median_ms", "spread", "iqr_ms", "ci_rel", "peak_bytes",
                         "disturbance"})  # the machine's load while timing (dsnas.profiler.disturbance)


def median_ci(sorted_samples: list[float], z: float = 1.96) -> tuple[float, float]:
    """Distribution-free confidence interval of the median: the order statistics at ranks
    n/2 - z*sqrt(n)/2 and 1 + n/2 + z*sqrt(n)/2 (binomial, normal approximation). Timings are skewed, so no
    normal theory on the values themselves."""
    n = len(sorted_samples)
    half = z * math.sqrt(n) / 2
    low = max(0, math.floor(n / 2 - half) - 1)
    high = min(n - 1, math.ceil(1 + n / 2 + half) - 1)  # 1-based ranks: e.g. n = 100 gives the 40th and 61st
    return sorted_samples[low], sorted_samples[high]


def summarize(samples: list[float], warmup: int, converged: bool, device: list[float] | None = None) -> Timing:
    ordered = sorted(samples)
    q = statistics.quantiles(ordered, n=20, method="inclusive")  # 5% steps: q[1]=p10, q[4]=p25 ...
    low, high = median_ci(ordered)
    return Timing(statistics.median(ordered), q[1], q[17], len(samples), warmup, q[4], q[14], low, high, converged,
                  statistics.median(device) if device else None)


def time_calls(fn: Callable[[], Any], sync: Callable[[], None], *, warmup_s: float, measure_s: float,
               max_measure_s: float | None = None, ci_tolerance: float = 0.05, min_warmup: int = 2,
               min_repeats: int = 10, max_repeats: int = 100_000, events: Any = None,
               window: AbstractContextManager[Any] | None = None) -> Timing:
    """Warm up for ``warmup_s``; then time calls for at least ``min_repeats`` and ``measure_s``, and on until the
    median's confidence interval is within ``ci_tolerance`` (relative half-width) or ``max_measure_s`` passed.
    ``events``: a CUDA event factory (torch.cuda.Event) to also record device time per call. ``window``: a context
    entered around the timed calls only, not the warm-up (a disturbance.MachineWindow watching the machine). Freed
    memory is held first (dsnas.allocator): a call must not pay for page faults that the heap's history decides."""
    hold_freed_memory()
    deadline = time.perf_counter() + warmup_s
    warmup = 0
    while warmup < min_warmup or time.perf_counter() < deadline:
        fn()
        sync()
        warmup += 1
    cap = max(measure_s, max_measure_s or measure_s)
    samples: list[float] = []
    device: list[float] = []
    with window or nullcontext():
        start_all = time.perf_counter()
        converged, next_check = False, min_repeats
        while len(samples) < max_repeats:
            samples.append(_one_call(fn, sync, events, device))
            elapsed = time.perf_counter() - start_all
            if len(samples) >= next_check and elapsed >= measure_s:
                low, high = median_ci(sorted(samples))
                converged = (high - low) / 2 <= ci_tolerance * statistics.median(samples)
                if converged or elapsed >= cap:
                    break
                next_check = len(samples) + max(1, len(samples) // 10)  # re-check every 10% more samples
    if len(samples) >= max_repeats and not converged:  # a call of a microsecond stops here, before any check
        low, high = median_ci(sorted(samples))
        converged = (high - low) / 2 <= ci_tolerance * statistics.median(samples)
    return summarize(samples, warmup, converged, device or None)


def call_ms(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    """The wall time of one call, synchronized, in ms."""
    start = time.perf_counter_ns()
    fn()
    sync()
    return (time.perf_counter_ns() - start) / 1e6


def _one_call(fn: Callable[[], Any], sync: Callable[[], None], events: Any, device: list[float]) -> float:
    if events is None:
        return call_ms(fn, sync)
    begin, end = events(enable_timing=True), events(enable_timing=True)
    start = time.perf_counter_ns()
    begin.record()
    fn()
    end.record()
    sync()
    wall = (time.perf_counter_ns() - start) / 1e6
    device.append(begin.elapsed_time(end))  # ms, on the device's clock
    return wall


@contextmanager
def cpu_threads(n: int | None) -> Iterator[int]:
    """Run the block with ``n`` intra-op threads (None: leave as is), then restore."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
