"""Is the host running at its own speed? A short fp32 GEMM timed between blocks of a timing window's calls
(dsnas.profiler.timing.HostGate), against the fastest this machine has run it. It sees what /proc/stat cannot:
another guest of the hypervisor on the same physical core (an SMT sibling), a lowered clock, a thread of this very
process competing with the timed calls. Each slows every call, yet shows as neither others' CPU time nor steal
(dsnas.profiler.disturbance).

Measured on a 2-core AMD EPYC VM (2026-12-06; 0.3 s windows of a d128 L2 model at batch 32, each between two
probes; others' share of the CPUs 0-3%): over 60 s, 16% of the windows probed above 1.3x and timed the model 11%
slower at the median than the rest (above 1.5x: 38% slower); over 90 s at a noisier hour, half of them did, 35%
slower. Quiet windows probed 1.01-1.10x. The slow spells last 0.1-1 s, so a probe at each end of a window
misses those inside it; a quick probe every ~50 ms sees them (see HostGate for what that bought)."""

from __future__ import annotations

import statistics
import time

REFERENCE_N = 256  # fp32 256x256 @ 256x256: 34 MFLOP, ~0.2 ms on 2 EPYC cores, so a probe holds ~50 calls
PROBE_S = 0.01  # a full probe (the stored reference, a settling wait): ~50 calls
MIN_CALLS = 5
QUICK_CALLS = 5  # a quick probe, between blocks of timed calls (dsnas.profiler.timing.HostGate): ~1 ms
REFERENCE_PROBES = 5  # the reference stored with the CPU ceilings: the fastest of this many probes
_fastest: dict[int, float] = {}  # torch thread count -> the fastest probe seen in this process, ms
_operands: list = []  # the reference GEMM's a, b and out, made once: randn of 128k values costs ~0.5 ms


def probe_ms(calls: int | None = None) -> float:
    """The reference GEMM's median call in ms, with torch's current thread count: over PROBE_S (at least
    MIN_CALLS calls after one warm-up), or over exactly ``calls`` calls without a warm-up (a quick probe; the
    median shrugs off a first call that finds the operands out of cache). The median, not the fastest call: one
    lucky call says nothing of the moment."""
    import torch

    if not _operands:
        with torch.inference_mode(False):  # an inference tensor could not be written into outside inference mode
            _operands.extend([torch.randn(REFERENCE_N, REFERENCE_N), torch.randn(REFERENCE_N, REFERENCE_N),
                              torch.empty(REFERENCE_N, REFERENCE_N)])
    a, b, out = _operands
    if calls is None:
        torch.mm(a, b, out=out)
    times: list[float] = []
    deadline = time.perf_counter() + (0.0 if calls else PROBE_S)
    while len(times) < (calls or MIN_CALLS) or time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def reference_ms(probes: int = REFERENCE_PROBES) -> float:
    """The fastest of ``probes`` probes: what the host does when nothing slows it (the CPU ceilings store it)."""
    return min(probe_ms() for _ in range(probes))


def slowdown(reference: float | None, quick: bool = False) -> float | None:
    """How much slower the host runs the reference GEMM now than at its fastest: this moment's probe (a quick one
    of QUICK_CALLS calls with ``quick``) over the faster of ``reference`` (the stored one, for this thread count)
    and any probe seen since in this process. None without a stored reference: a process's first probe alone says
    nothing about the host's usual speed."""
    if reference is None:
        return None
    import torch

    threads = torch.get_num_threads()
    now = probe_ms(QUICK_CALLS if quick else None)
    fastest = min(reference, _fastest.get(threads, reference), now)
    _fastest[threads] = fastest
    return now / fastest
