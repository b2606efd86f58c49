"""The timing protocol: warm up for a while, then time single calls until both a minimum count and a
minimum duration are reached; report the median and the spread, never a single sample."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    warmup: int

    @property
    def spread(self) -> float:
        """(p90 - p10) / median: the dispersion that says how much to trust the median."""
        return (self.p90_ms - self.p10_ms) / self.median_ms if self.median_ms else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "spread": self.spread}


def time_calls(fn: Callable[[], Any], sync: Callable[[], None], *, warmup_s: float, measure_s: float,
               min_warmup: int = 2, min_repeats: int = 10, max_repeats: int = 10_000) -> Timing:
    deadline = time.perf_counter() + warmup_s
    warmup = 0
    while warmup < min_warmup or time.perf_counter() < deadline:
        fn()
        sync()
        warmup += 1
    samples: list[float] = []
    deadline = time.perf_counter() + measure_s
    while len(samples) < max_repeats and (len(samples) < min_repeats or time.perf_counter() < deadline):
        start = time.perf_counter_ns()
        fn()
        sync()
        samples.append((time.perf_counter_ns() - start) / 1e6)
    deciles = statistics.quantiles(samples, n=10)
    return Timing(statistics.median(samples), deciles[0], deciles[-1], len(samples), warmup)


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
