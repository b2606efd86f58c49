"""The timing protocol: warm up, then time single calls until a minimum count and duration are reached and
the median is known to a set tolerance (the 95% confidence interval of the median, from order statistics),
or a time cap is hit. Report the median with its dispersion, never a single sample."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
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
    host_blocks: int = 0  # under a HostGate: the blocks of calls timed, and those kept (the host ran at speed)
    host_blocks_kept: int = 0
    host_slowdown: float | None = None  # the host's worst probed slowdown around the calls the median came from

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
                         "disturbance",  # the machine's load while timing (dsnas.profiler.disturbance)
                         "host_blocks", "host_blocks_kept", "host_slowdown"})


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


@dataclass(frozen=True)
class HostGate:
    """Keep only the calls timed while the host ran at its own speed. ``probe()`` (the host's slowdown now:
    dsnas.profiler.host_speed.slowdown, quick) is read at the window's start and after every block of at least
    ``block_s`` (a quarter of a shorter ``measure_s``) and ``block_calls`` calls; a block whose probes on both sides
    read at most ``limit`` is kept. A block of ``cold_from`` calls or more leaves out its first, which runs with the
    probe's operands in the caches (+5% on a 1 ms call here, +0.7% on a 15 ms one); a block of long calls keeps it,
    so that a 100 ms call is timed no more often than without the gate.

    Why: a 2-core EPYC VM runs slow in spells of 0.1-1 s that /proc/stat does not show (host_speed), and probes at
    a window's two ends miss those inside it. In a 60 s trace of a d128 L2 model at batch 32 (2026-12-06), the
    medians of 1 s windows varied with a CV of 10.3%, the same windows' kept calls 2.6% (17% of the calls dropped
    at the median window); measure() runs alternating in three noisy hours had a throughput CV of 2.2%, 3.4% and
    3.7% gated against 3.8%, 5.5% and 6.6% with probes at the ends (benchmarks/profiler.py). A probe of 5 calls
    costs ~1 ms, 2% of a block."""

    probe: Callable[[], float | None]
    limit: float
    block_s: float = 0.05
    block_calls: int = 2
    cold_from: int = 4


class _Blocks:
    """The gate's bookkeeping over one window: which samples lie in blocks the host ran at speed."""

    def __init__(self, gate: HostGate, measure_s: float) -> None:
        self.gate = gate
        # A short window still holds a few blocks (a test's 0.02 s window would otherwise last one 0.05 s block).
        self.block_s = min(gate.block_s, measure_s / 4)
        self.before = self._probe()
        self.probed = [self.before]
        self.start, self.started = 0, time.perf_counter()
        self.kept: list[int] = []  # indices of kept samples
        self.blocks = self.kept_blocks = 0
        self.worst_kept = 0.0

    def _probe(self) -> float:
        found = self.gate.probe()
        return math.inf if found is None else found  # no reading: the block cannot be vouched for

    def due(self, n: int) -> bool:
        return n - self.start >= self.gate.block_calls and time.perf_counter() - self.started >= self.block_s

    def close(self, n: int) -> None:
        """End the block of samples [start, n) with a probe; keep it when both its probes are within the limit."""
        after = self._probe()
        self.probed.append(after)
        worst = max(self.before, after)
        self.blocks += 1
        if worst <= self.gate.limit:
            self.kept.extend(range(self.start + (n - self.start >= self.gate.cold_from), n))
            self.kept_blocks += 1
            self.worst_kept = max(self.worst_kept, worst)
        self.before, self.start, self.started = after, n, time.perf_counter()


def time_calls(fn: Callable[[], Any], sync: Callable[[], None], *, warmup_s: float, measure_s: float,
               max_measure_s: float | None = None, ci_tolerance: float = 0.05, min_warmup: int = 2,
               min_repeats: int = 10, max_repeats: int = 100_000, events: Any = None,
               window: AbstractContextManager[Any] | None = None, gate: HostGate | None = None) -> Timing:
    """Warm up for ``warmup_s``; then time calls for at least ``min_repeats`` and ``measure_s``, and on until the
    median's confidence interval is within ``ci_tolerance`` (relative half-width) or ``max_measure_s`` passed.
    ``events``: a CUDA event factory (torch.cuda.Event) to also record device time per call. ``window``: a context
    entered around the timed calls only, not the warm-up (a disturbance.CpuWindow watching the machine). ``gate``:
    count only the calls of blocks the host ran at its own speed (HostGate); when none was, after ``measure_s``,
    the window ends and reports every call, with the host's slowdown that says so. Freed memory is held first
    (dsnas.allocator): a call must not pay for page faults that the heap's history decides."""
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
    blocks: _Blocks | None = None
    with window or nullcontext():
        start_all = time.perf_counter()
        if gate is not None:
            blocks = _Blocks(gate, measure_s)
        next_check = min_repeats
        while len(samples) < max_repeats:
            samples.append(_one_call(fn, sync, events, device))
            if blocks is not None:
                if not blocks.due(len(samples)):
                    continue
                blocks.close(len(samples))
                if blocks.kept_blocks == 0 and time.perf_counter() - start_all >= measure_s:
                    break  # the host never ran at speed: a disturbed window, which the caller measures again
            elapsed = time.perf_counter() - start_all
            counted = len(samples) if blocks is None else len(blocks.kept)
            if counted >= next_check and elapsed >= measure_s:
                if _converged(_pick(samples, blocks), ci_tolerance) or elapsed >= cap:
                    break
                next_check = counted + max(1, counted // 10)  # re-check every 10% more samples
            elif blocks is not None and elapsed >= cap:
                break
        if blocks is not None and len(samples) - blocks.start >= 2:
            blocks.close(len(samples))  # the calls since the last probe, ended by max_repeats
    if blocks is None:
        return summarize(samples, warmup, _converged(samples, ci_tolerance), device or None)
    if len(blocks.kept) >= min_repeats:
        chosen, host = blocks.kept, blocks.worst_kept
    else:  # too few calls at speed: every call, and the worst the host was
        chosen, host = list(range(len(samples))), max(blocks.probed)
    kept = [samples[i] for i in chosen]
    timing = summarize(kept, warmup, _converged(kept, ci_tolerance), [device[i] for i in chosen] if device else None)
    return replace(timing, host_blocks=blocks.blocks, host_blocks_kept=blocks.kept_blocks,
                   host_slowdown=None if math.isinf(host) else host)


def _pick(samples: list[float], blocks: _Blocks | None) -> list[float]:
    return samples if blocks is None else [samples[i] for i in blocks.kept]


def _converged(samples: list[float], ci_tolerance: float) -> bool:
    low, high = median_ci(sorted(samples))
    return (high - low) / 2 <= ci_tolerance * statistics.median(samples)


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
