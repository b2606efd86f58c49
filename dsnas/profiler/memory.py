"""Peak memory of one call, measured on one extra call outside the timed ones.

Both devices count the same thing: the weights plus the peak of what the call allocates. On a GPU the call's part is
the CUDA caching allocator's peak above what was allocated before the call (activations, workspace): the process's
whole peak counted whatever else it held, the last training step's gradients and the optimizer's moments among
them, so the same architecture weighed one to three fp32 copies of its weights more when it was measured right after
training than when measured untrained. On the CPU it is the peak of live tensor allocations during the call, from the
PyTorch profiler's memory events (the resident set is no measure here: a worker that trained before keeps freed
memory resident, and the call reuses it).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Peak:
    bytes: int | None  # None when it could not be measured; then ``reason`` says why
    method: str
    reason: str = ""


CUDA_METHOD = "weights+cuda_peak_above_start"
CPU_METHOD = "weights+profiler_cpu_allocation_peak"


def peak_memory(fn: Callable[[], Any], device: Any, resident_bytes: int) -> Peak:
    """Peak bytes while ``fn`` runs: ``resident_bytes`` (the weights) plus the peak of what the call allocates."""
    peak = _cuda_peak(fn, device) if device.type == "cuda" else _cpu_allocation_peak(fn)
    return Peak(None if peak.bytes is None else peak.bytes + resident_bytes, peak.method, peak.reason)


def _cuda_peak(fn: Callable[[], Any], device: Any) -> Peak:
    """The allocator's peak during the call above what was allocated when it began."""
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return Peak(max(0, int(torch.cuda.max_memory_allocated(device)) - start), CUDA_METHOD)


def _cpu_allocation_peak(fn: Callable[[], Any]) -> Peak:
    from torch.profiler import ProfilerActivity, profile

    method = CPU_METHOD
    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        return Peak(None, method, "this torch's profiler exposes no memory events")
    events = sorted((e for e in results.events() if e.name() == "[memory]" and e.device_type().name == "CPU"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()  # allocations are positive, frees negative
        peak = max(peak, live)
    return Peak(peak, method)


@contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Kineto prints start/stop lines straight to file descriptor 2 on every profiler session; they would
    interleave with the search's progress. Python exceptions still propagate."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
