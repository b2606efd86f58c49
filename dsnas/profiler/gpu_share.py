"""Was a GPU measurement disturbed? What NVML saw of the device while the calls were timed: other processes' share
of its SMs (the driver's per-process utilization samples) and the share of the window its clocks were held down by
the power limit or by heat (the driver's violation counters). The host-side reading (dsnas.profiler.disturbance)
sees neither: a co-tenant shows there only through its CPU time, and a process that keeps the GPU busy spends little
(it launches, then waits). Reading it loads no torch; NVML comes from dsnas.profiler.nvml."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dsnas.profiler.nvml import _call, _why

# The violation counters that slow the SMs (ns held down, cumulative since the driver loaded). Sync boost, board
# and utilization policies are left out: they describe the clocks' targets, not a device slowed by its load.
_SLOWDOWNS = {"power": "NVML_PERF_POLICY_POWER", "thermal": "NVML_PERF_POLICY_THERMAL"}


@dataclass(frozen=True)
class GpuShare:
    """Over one window: others' share of the SMs (0..1; each other process's mean SM utilization, summed) and the
    share of the window the clocks were held down by power or heat, each None with its reason when unknown."""
    others: float | None
    throttled: float | None
    unavailable: str = ""


class GpuWindow:
    """A context manager over NVML ``handle``: ``share`` is the device's GpuShare over the block. ``busy``: this
    process used the GPU in the block (a timing window), so its own samples must be there to be told apart from
    others'; an idle block (waiting for a disturbance to pass) counts every process but this one."""

    def __init__(self, handle: Any, busy: bool = True, pid: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.handle, self.busy, self.pid, self.clock = handle, busy, os.getpid() if pid is None else pid, clock
        self.share = GpuShare(None, None, "the window was not closed")
        self._start_us = 0
        self._start_s = 0.0
        self._violations: tuple[dict[str, int] | None, str | None] = (None, None)

    def __enter__(self) -> GpuWindow:
        self._violations = _violation_ns(self.handle)
        self._start_us = int(time.time() * 1e6)  # NVML stamps its samples with the CPU's wall clock in us
        self._start_s = self.clock()
        return self

    def __exit__(self, *exc: object) -> None:
        seconds = self.clock() - self._start_s
        others, why_others = _others_sm_share(self.handle, self._start_us, self.pid, self.busy)
        end, why_end = _violation_ns(self.handle)
        start, why_start = self._violations
        throttled, why_throttled = None, why_start or why_end
        if start is not None and end is not None and seconds > 0:
            held_ns = sum(max(0, end[k] - start[k]) for k in _SLOWDOWNS)
            throttled = min(1.0, held_ns / (seconds * 1e9))  # power and heat may overlap: at most the window
        reasons = [f"others' GPU use: {why_others}" if why_others else "",
                   f"clock slowdowns: {why_throttled}" if why_throttled else ""]
        self.share = GpuShare(others, throttled, "; ".join(r for r in reasons if r))


def _violation_ns(handle: Any) -> tuple[dict[str, int] | None, str | None]:
    """Nanoseconds each slowdown has held the clocks down since the driver loaded, or why they cannot be read."""
    import pynvml

    held = {}
    for name, policy in _SLOWDOWNS.items():
        value, why = _call("nvmlDeviceGetViolationStatus", handle, getattr(pynvml, policy))
        if why is not None:
            return None, why
        held[name] = int(value.violationTime)
    return held, None


def _others_sm_share(handle: Any, since_us: int, pid: int, busy: bool) -> tuple[float | None, str | None]:
    """Other processes' SM utilization since ``since_us`` (each process's mean over its samples, summed, at most 1),
    or why it is unknown."""
    import pynvml

    try:
        samples = pynvml.nvmlDeviceGetProcessUtilization(handle, since_us)
    except pynvml.NVMLError as err:
        # No process used the GPU since then: NOT_FOUND, or (nvidia-ml-py's wrapper raises on any answer to its
        # size query but "buffer too small") an empty success.
        if getattr(err, "value", None) not in (pynvml.NVML_ERROR_NOT_FOUND, pynvml.NVML_SUCCESS):
            return None, _why(err)
        samples = []
    except AttributeError:
        return None, "nvidia-ml-py has no nvmlDeviceGetProcessUtilization (upgrade nvidia-ml-py)"
    util: dict[int, list[int]] = {}
    for sample in samples:
        if sample.timeStamp > since_us:
            util.setdefault(int(sample.pid), []).append(int(sample.smUtil))
    if busy and pid not in util:
        # NVML names host PIDs: in a container this process has another, and would count as another process.
        return None, (f"this process (pid {pid}) has no utilization sample of its own in the window: NVML sees "
                      "another PID namespace (a container) or samples more slowly than the window lasted")
    others = sum(sum(v) / len(v) for p, v in util.items() if p != pid) / 100
    return min(1.0, others), None


def share_capabilities(handle: Any) -> dict[str, tuple[bool, str]]:
    """For ``dsnas doctor``: whether this device gives the two readings, each with a detail or the reason not."""
    caps = {}
    _, why = _others_sm_share(handle, 0, os.getpid(), busy=False)
    caps["process_utilization"] = (True, "other processes' SM use readable") if why is None else \
        (False, f"process utilization: {why}")
    held, why = _violation_ns(handle)
    caps["clock_slowdowns"] = (False, f"clock slowdowns: {why}") if held is None else (
        True, ", ".join(f"{name} {ns / 1e9:.1f} s" for name, ns in held.items()) + " held down since the driver loaded")
    return caps
