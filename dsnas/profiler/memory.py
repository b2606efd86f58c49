"""Peak memory of one call, measured on one extra call outside the timed ones.

On a GPU: the CUDA caching allocator's peak (weights, activations, workspace). On the CPU: the weights plus the
peak of live tensor allocations during the call, from the PyTorch profiler's memory events (the resident set is
no measure here: a worker that trained before keeps freed memory resident, and the call reuses it).
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


def peak_memory(fn: Callable[[], Any], device: Any, resident_bytes: int) -> Peak:
    """Peak bytes while ``fn`` runs; ``resident_bytes`` (the weights) is added on the CPU, where the
    allocator events see only what the call allocates."""
    if device.type == "cuda":
        return _cuda_peak(fn, device)
    peak = _cpu_allocation_peak(fn)
    return Peak(None if peak.bytes is None else peak.bytes + resident_bytes, peak.method, peak.reason)


def _cuda_peak(fn: Callable[[], Any], device: Any) -> Peak:
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return Peak(int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated")


def _cpu_allocation_peak(fn: Callable[[], Any]) -> Peak:
    from torch.profiler import ProfilerActivity, profile

    method = "weights+profiler_cpu_allocation_peak"
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
