"""Was a measurement disturbed? The share of the CPUs this process may run on that other processes (and a
hypervisor's steal) took while it was timed, from /proc/stat against the process's own CPU time; how much slower
than its fastest the host ran a reference GEMM at the window's ends (dsnas.profiler.host_speed: what /proc/stat
cannot see); on a GPU, what NVML saw of the device (dsnas.profiler.gpu_share); and measuring again, a bounded number
of times, once the disturbance has passed. Reading it loads no torch."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from dsnas.profiler.capabilities import CGROUP_ROOT, binding_quota, cgroup_cpu_max, own_cgroup_folders
from dsnas.profiler.gpu_share import GpuShare, GpuWindow

T = TypeVar("T")

# Others (plus steal) above this share of the CPUs make a measurement disturbed. Measured on a 2-core EPYC with
# every core measuring (2026-12, a d128 2-layer model, batch 32, 17.8-25 ms quiet): quiet moments read 0.00-0.02;
# a process busy 10% of one core 0.04-0.06 (+5-28% time), 25% 0.10 (+15-40%), 50% 0.17-0.19 (+40-55%), a whole
# core 0.30-0.32 (2-2.5x), both cores 0.50 (3-4x). Intra-op threads wait for the slowest, so a little load
# costs a lot: the line sits at 5x the quiet readings, and catches half a core's load on two.
THRESHOLD = 0.10
# A host that runs the reference GEMM more than this much slower than its fastest makes a measurement disturbed.
# Measured on a 2-core EPYC VM (dsnas.profiler.host_speed): quiet windows probed 1.01-1.10x (rarely up to 1.24x);
# windows probed above 1.3x timed a model 11-35% slower at the median than the rest.
SLOWDOWN_LIMIT = 1.3
MAX_ATTEMPTS = 3  # the first measurement and at most two more: a busy machine costs at most 3x the time
SETTLE_STEP_S = 0.2  # how long one sample of the machine lasts while waiting for a disturbance to pass
MAX_SETTLE_S = 1.0  # the longest wait before measuring again
PROC_STAT = Path("/proc/stat")
SCOPE = "host CPU"  # on a GPU too: a launch-bound model slows down when the host's cores are taken
GPU_SCOPE = "host CPU and GPU"
# Other processes above this share of the GPU's SMs make a measurement disturbed. Not yet measured on a GPU: the
# CPU's line, on the reasoning that time-sliced kernels of another process delay every call as another process's
# threads delay intra-op threads. The GPU check measures a co-tenant's reading and its effect.
GPU_THRESHOLD = 0.10
# /proc/stat columns: user nice system idle iowait irq softirq steal guest guest_nice. guest time is already in
# user and nice; idle and iowait are no work.
_BUSY_COLUMNS = (0, 1, 2, 5, 6)
_STEAL_COLUMN = 7


@dataclass(frozen=True)
class CpuSnapshot:
    """Cumulative CPU-seconds at one instant, over the CPUs this process may run on."""
    wall_s: float  # time.monotonic()
    busy_s: float  # every process's work on those CPUs (user, nice, system, irq, softirq)
    steal_s: float  # what a hypervisor took from them
    own_s: float  # this process's user + system time, every thread (torch's intra-op threads included)
    cpus: int  # how many CPUs were counted: the process's affinity
    group_s: float | None = None  # the cgroup's CPU time, read only when its quota is below ``cpus``
    quota: float | None = None  # that quota in CPUs


@dataclass(frozen=True)
class Share:
    """Others' and steal's share of the counted CPUs' capacity over a window, None with the reason when unknown;
    the host's slowdown at the window's ends, None where it was not probed (a GPU's timing, no reference); and on a
    GPU, ``gpu``: what NVML saw of the device over the window (None: not a GPU timing)."""
    others: float | None
    steal: float | None
    unavailable: str = ""
    host_slowdown: float | None = None
    gpu: GpuShare | None = None

    @property
    def load(self) -> float:
        return (self.others or 0.0) + (self.steal or 0.0)

    @property
    def gpu_others(self) -> float | None:
        return None if self.gpu is None else self.gpu.others

    def disturbed(self, threshold: float = THRESHOLD) -> bool | None:
        """Steal counts: CPU time a hypervisor gave to another guest is CPU time the measurement waited for. So
        does a slowed host, which neither share shows, and other processes on the GPU. None where no reading says
        anything is wrong but the share of the device timed is unknown (a CPU without /proc/stat): the host's speed
        probe alone called a window quiet whose p90 was 19x its median."""
        if self.severity(threshold) > 1.0:
            return True
        return None if self.others is None and self.gpu_others is None else False

    def severity(self, threshold: float = THRESHOLD) -> float:
        """How far past its line the worst reading is (above 1: disturbed), to keep the least disturbed of several
        attempts. A GPU held down by power or heat is not among them: a model that loads the GPU to its power limit
        runs at that speed whenever it runs, so its share is recorded, not retried."""
        slowed = 0.0 if self.host_slowdown is None else (self.host_slowdown - 1) / (SLOWDOWN_LIMIT - 1)
        on_gpu = (self.gpu_others or 0.0) / GPU_THRESHOLD
        return max(self.load / threshold, slowed, on_gpu)

    def as_dict(self) -> dict[str, Any]:
        out = {"others_cpu_share": _round(self.others), "steal_share": _round(self.steal),
               "host_slowdown": _round(self.host_slowdown)}
        if self.gpu is not None:
            out.update(others_gpu_share=_round(self.gpu.others), gpu_throttled_share=_round(self.gpu.throttled))
        return out


def parse_stat(text: str, cpus: Collection[int] | None = None, hz: int = 100) -> tuple[float, float]:
    """(busy, steal) CPU-seconds from /proc/stat text: summed over the ``cpuN`` lines of ``cpus`` (all CPUs, the
    aggregate ``cpu`` line, when None or when the per-CPU lines are missing)."""
    rows = {}
    for line in text.splitlines():
        name, *values = line.split()
        if name.startswith("cpu"):
            rows[name] = [int(v) for v in values]
    per_cpu = [rows[f"cpu{i}"] for i in sorted(cpus or ()) if f"cpu{i}" in rows]
    if cpus is None or len(per_cpu) != len(cpus):
        per_cpu = [rows["cpu"]]
    busy = sum(sum(r[i] for i in _BUSY_COLUMNS) for r in per_cpu)
    steal = sum(r[_STEAL_COLUMN] if len(r) > _STEAL_COLUMN else 0 for r in per_cpu)
    return busy / hz, steal / hz


def cpu_share(start: CpuSnapshot, end: CpuSnapshot) -> Share:
    """Others' share = (the counted CPUs' busy time - this process's) / (wall time x counted CPUs). The
    denominator is the CPUs this process may run on, not a cgroup quota: others' work on idle cores takes
    nothing from it. Under a quota, other processes of the same cgroup spend the quota this process runs
    under, so their share of the quota counts too where it is larger."""
    wall = end.wall_s - start.wall_s
    if wall <= 0:
        return Share(None, None, "an empty window")
    own = end.own_s - start.own_s
    capacity = wall * end.cpus
    others = (end.busy_s - start.busy_s - own) / capacity
    if end.quota and end.group_s is not None and start.group_s is not None:
        others = max(others, (end.group_s - start.group_s - own) / (wall * end.quota))
    steal = (end.steal_s - start.steal_s) / capacity
    return Share(_clip(others), _clip(steal))


def snapshot(stat: Path = PROC_STAT, cgroup: Path | None = None) -> CpuSnapshot | str:
    """Now, or the reason it cannot be read (no /proc/stat: not Linux)."""
    try:
        text = stat.read_text(encoding="utf-8")
    except OSError as err:
        return f"{stat} not readable ({err.strerror or err}): others' CPU use is unknown"
    import resource  # here: Unix only, and this module must import everywhere (measure imports it)

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    count = len(cpus) if cpus else (os.cpu_count() or 1)
    wall = time.monotonic()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    busy, steal = parse_stat(text, cpus, os.sysconf("SC_CLK_TCK"))
    quota = cgroup_quota(cgroup)
    group = cgroup_usage_s(cgroup) if quota and quota < count else None
    return CpuSnapshot(wall, busy, steal, usage.ru_utime + usage.ru_stime, count, group,
                       quota if group is not None else None)


def cgroup_quota(root: Path | None = None) -> float | None:
    """The CPU quota of this process's cgroup (or of ``root``) in CPUs, None when there is none or it cannot be
    read."""
    found = cgroup_cpu_max(root)
    if isinstance(found, str) or found[0] in ("max", "-1"):
        return None
    try:
        return int(found[0]) / int(found[1])
    except ValueError:
        return None


def cgroup_usage_s(root: Path | None = None) -> float | None:
    """CPU-seconds every process of the cgroup used (v2 cpu.stat usage_usec, v1 cpuacct.usage in ns): of ``root``
    (v2's files at its top, or v1's cpuacct controller mounted under it), or by default of this process's cgroup
    whose quota binds (its every process spends it), at the same depth in the cpuacct hierarchy."""
    if root is None:
        own = own_cgroup_folders("cpuacct")
        if not own:
            return cgroup_usage_s(CGROUP_ROOT)
        return _usage_in(own[min(binding_quota() or 0, len(own) - 1)])
    return _usage_in(root) if (root / "cpu.stat").exists() else _usage_in(root / "cpuacct")


def _usage_in(folder: Path) -> float | None:
    """One cgroup folder's usage: v2's cpu.stat, or v1's cpuacct.usage."""
    try:
        if (folder / "cpu.stat").exists():
            for line in (folder / "cpu.stat").read_text(encoding="utf-8").splitlines():
                if line.startswith("usage_usec "):
                    return int(line.split()[1]) / 1e6
            return None
        return int((folder / "cpuacct.usage").read_text(encoding="utf-8")) / 1e9
    except (OSError, ValueError):
        return None


class CpuWindow:
    """A context manager: ``share`` is others' and steal's share of the CPUs over the block."""

    def __init__(self, read: Callable[[], CpuSnapshot | str] = snapshot) -> None:
        self._read = read
        self._start: CpuSnapshot | str = ""
        self.share = Share(None, None, "the window was not closed")

    def __enter__(self) -> CpuWindow:
        self._start = self._read()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._read()
        if isinstance(self._start, str) or isinstance(end, str):
            self.share = Share(None, None, self._start if isinstance(self._start, str) else str(end))
        else:
            self.share = cpu_share(self._start, end)


class MachineWindow:
    """A context manager: ``share`` is the CPUs' over the block (CpuWindow) and, on a GPU, the device's
    (GpuWindow). ``gpu``: (NVML handle, why there is none) of the GPU timed, None where none is. ``busy``: this
    process uses the GPU in the block."""

    def __init__(self, gpu: tuple[Any, str] | None = None, busy: bool = True,
                 read: Callable[[], CpuSnapshot | str] = snapshot) -> None:
        self.cpu = CpuWindow(read)
        self.gpu = None if gpu is None or gpu[0] is None else GpuWindow(gpu[0], busy)
        self._gpu_missing = None if gpu is None or gpu[0] is not None else GpuShare(None, None, gpu[1])
        self.share = Share(None, None, "the window was not closed")

    def __enter__(self) -> MachineWindow:
        self.cpu.__enter__()
        if self.gpu is not None:
            self.gpu.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.gpu is not None:
            self.gpu.__exit__(*exc)
        self.cpu.__exit__(*exc)
        gpu = self.gpu.share if self.gpu is not None else self._gpu_missing
        self.share = replace(self.cpu.share, gpu=gpu)


def sample_share(seconds: float, gpu: tuple[Any, str] | None = None) -> Share:
    """Others' share while this process sleeps for ``seconds``: what the rest of the machine (and of the GPU,
    given its NVML handle) wants right now."""
    with MachineWindow(gpu, busy=False) as window:
        time.sleep(seconds)
    return window.share


def wait_for_quiet(max_s: float, threshold: float = THRESHOLD, step_s: float = SETTLE_STEP_S,
                   sample: Callable[[float], Share] = sample_share) -> Share:
    """Sample the machine ``step_s`` at a time until others' share is at most ``threshold``, for ``max_s`` at most;
    returns the last sample."""
    waited = 0.0
    while True:
        share = sample(step_s)
        waited += step_s
        if not share.disturbed(threshold) or waited >= max_s:
            return share


def settle_s(measure_s: float) -> float:
    """How long to wait at most for a disturbance to pass before measuring again: twice the measurement, between
    one sample and MAX_SETTLE_S (a short measurement is not worth a long wait; a search measures many)."""
    return min(MAX_SETTLE_S, max(SETTLE_STEP_S, 2 * measure_s))


def least_disturbed(attempt: Callable[[], tuple[T, Share]], settle: Callable[[], Any], *,
                    threshold: float = THRESHOLD, max_attempts: int = MAX_ATTEMPTS) -> tuple[T, dict[str, Any]]:
    """Run ``attempt`` (one measurement and its window's share); while the share is above ``threshold``, call
    ``settle`` (wait for the disturbance to pass) and measure again, ``max_attempts`` in all. Returns the least
    disturbed attempt's result and the record of them all: its shares, each attempt's, which one was kept and
    whether it is still disturbed (None where the share is unknown)."""
    tried: list[tuple[T, Share]] = []
    while len(tried) < max_attempts:
        if tried:
            settle()
        tried.append(attempt())
        if not tried[-1][1].disturbed(threshold):
            break
    kept = min(range(len(tried)), key=lambda i: tried[i][1].severity(threshold))
    result, share = tried[kept]
    record: dict[str, Any] = {**share.as_dict(), "disturbed": share.disturbed(threshold), "threshold": threshold,
                              "slowdown_limit": SLOWDOWN_LIMIT, "attempts": [s.as_dict() for _, s in tried],
                              "kept": kept, "scope": SCOPE if share.gpu is None else GPU_SCOPE}
    if share.unavailable:
        record["unavailable"] = share.unavailable
    if share.gpu is not None and share.gpu.unavailable:
        record["gpu_unavailable"] = share.gpu.unavailable
    return result, record


def _clip(value: float) -> float:
    return min(1.0, max(0.0, value))  # /proc/stat counts in clock ticks, rusage finer: a tick either way


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
