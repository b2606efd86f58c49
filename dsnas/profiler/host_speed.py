"""Is the host running at its own speed? A short fp32 GEMM timed just before and just after a timing window,
against the fastest this machine has run it. It sees what /proc/stat cannot: another guest of the hypervisor on
the same physical core (an SMT sibling), a lowered clock, a thread of this very process competing with the timed
calls. Each slows every call, yet shows as neither others' CPU time nor steal (dsnas.profiler.disturbance).

Measured on a 2-core AMD EPYC VM (2026-12-06; 0.3 s windows of a d128 L2 model at batch 32, each between two
probes; others' share of the CPUs 0-3%): over 60 s, 16% of the windows probed above 1.3x and timed the model 11%
slower at the median than the rest (above 1.5x: 38% slower); over 90 s at a noisier hour, half of them did, 35%
slower. Quiet windows probed 1.01-1.10x."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

REFERENCE_N = 256  # fp32 256x256 @ 256x256: 34 MFLOP, ~0.2 ms on 2 EPYC cores, so a probe holds ~50 calls
PROBE_S = 0.01  # two probes per window: ~7% of a 0.3 s window
MIN_CALLS = 5
REFERENCE_PROBES = 5  # the reference stored with the CPU ceilings: the fastest of this many probes
_fastest: dict[int, float] = {}  # torch thread count -> the fastest probe seen in this process, ms


def probe_ms() -> float:
    """The reference GEMM's median call in ms over PROBE_S (at least MIN_CALLS calls after one warm-up), with
    torch's current thread count. The median, not the fastest call: one lucky call says nothing of the moment."""
    import torch

    # fp32 whatever torch's default dtype: under set_default_dtype(torch.float64) every probe ran an fp64 GEMM
    # against the fp32 reference, read the host 2x slowed, and every measurement was retried and flagged disturbed.
    a = torch.randn(REFERENCE_N, REFERENCE_N, dtype=torch.float32)
    b = torch.randn(REFERENCE_N, REFERENCE_N, dtype=torch.float32)
    out = torch.empty(REFERENCE_N, REFERENCE_N, dtype=torch.float32)
    torch.mm(a, b, out=out)
    times: list[float] = []
    deadline = time.perf_counter() + PROBE_S
    while len(times) < MIN_CALLS or time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def reference_ms(probes: int = REFERENCE_PROBES) -> float:
    """The fastest of ``probes`` probes: what the host does when nothing slows it (the CPU ceilings store it)."""
    return min(probe_ms() for _ in range(probes))


def slowdown(reference: float | None) -> float | None:
    """How much slower the host runs the reference GEMM now than at its fastest: this moment's probe over the
    faster of ``reference`` (the stored one, for this thread count) and any probe seen since in this process.
    None without a stored reference: a process's first probe alone says nothing about the host's usual speed."""
    if reference is None:
        return None
    import torch

    threads = torch.get_num_threads()
    now = probe_ms()
    fastest = min(reference, _fastest.get(threads, reference), now)
    _fastest[threads] = fastest
    return now / fastest


@dataclass(frozen=True)
class Steadiness:
    """The host's speed over a stretch of back-to-back probes (ms each), each against the fastest: of them, and of
    ``reference_ms`` (the fastest stored for this machine) where there is one, since a slow spell can outlast the
    stretch. Whether this machine is quiet enough for repeatable timings: `dsnas doctor`'s "host speed" row."""

    probes: tuple[float, ...]
    reference_ms: float | None = None

    @property
    def against_reference(self) -> bool:
        """The stored reference is the fastest (no probe ran as fast)."""
        return self.reference_ms is not None and self.reference_ms <= min(self.probes)

    @property
    def fastest_ms(self) -> float:
        return self.reference_ms if self.reference_ms is not None and self.against_reference else min(self.probes)

    @property
    def median(self) -> float:
        """The median probe over the fastest."""
        return statistics.median(self.probes) / self.fastest_ms

    @property
    def slowest(self) -> float:
        return max(self.probes) / self.fastest_ms

    def share_slowed(self, limit: float) -> float:
        """The share of the probes more than ``limit`` times the fastest (where a timing counts as disturbed)."""
        return sum(p > limit * self.fastest_ms for p in self.probes) / len(self.probes)


def steadiness(seconds: float = 1.0, reference_ms: float | None = None,
               probe: Callable[[], float] | None = None) -> Steadiness:
    """Probes back to back for ``seconds`` (at least two). On a 2-core EPYC VM the reference GEMM ran in two states,
    0.20 and 0.32 ms on 2 threads (the slow one a 1-thread GEMM's time), for spells of a fraction of a second to
    several seconds, with no process using the CPUs: a measurement there is often slowed past the line."""
    probe = probe or probe_ms
    probes: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(probes) < 2 or time.perf_counter() < deadline:
        probes.append(probe())
    return Steadiness(tuple(probes), reference_ms)
