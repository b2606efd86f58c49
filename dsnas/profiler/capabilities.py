"""What this machine, its drivers and this torch build allow, each capability with its value or the reason it is
missing: the facts behind `dsnas doctor`. Probed on use, never at import (importing this module loads no torch)."""

from __future__ import annotations

import functools
import math
import os
import platform
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsnas.allocator import POLICY, hold_freed_memory
from dsnas.errors import DsnasError
from dsnas.profiler.memory import _native_stderr_silenced
from dsnas.profiler.nvml import nvml_handle

# The flags that decide which CPU kernels run fast (x86 and Arm spellings as /proc/cpuinfo writes them).
KERNEL_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                   "amx_int8", "asimd", "asimddp", "sve", "sve2", "bf16", "i8mm")
# The rows nvml_capabilities reports, in the order the table shows them.
NVML_ROWS = ("NVML", "energy counter", "GPM", "power", "utilization", "clocks", "process utilization",
             "clock slowdowns")
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Capability:
    name: str
    available: bool
    detail: str  # the value when available, the reason when not


@dataclass(frozen=True)
class Capabilities:
    items: tuple[Capability, ...]

    def __iter__(self) -> Iterator[Capability]:
        return iter(self.items)

    def __getitem__(self, name: str) -> Capability:
        for item in self.items:
            if item.name == name:
                return item
        raise KeyError(f"no capability named {name!r}; known: {[i.name for i in self.items]}")

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {i.name: {"available": i.available, "detail": i.detail} for i in self.items}

    def table(self) -> str:
        """One aligned line per capability under a header: name, yes/no, detail."""
        rows = [("capability", "available", "detail")]
        rows += [(i.name, "yes" if i.available else "no", i.detail) for i in self.items]
        w0, w1 = (max(len(r[k]) for r in rows) for k in (0, 1))
        return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe(device: Any = "auto") -> Capabilities:
    """Probe everything once. ``device``: ``auto`` (first CUDA device, if any), ``cpu`` (GPU rows not probed),
    ``cuda``/``cuda:N`` or a torch.device: which GPU the NVML and CUPTI rows describe."""
    import torch

    cuda = _safe("CUDA", lambda: _cuda(torch))
    gpu, why = _gpu_index(torch, device, cuda)
    items = [_safe("torch", lambda: _torch(torch)), cuda, *_nvml_rows(torch, gpu, why),
             _safe("CUPTI activities", lambda: _cupti(torch, gpu, why)),
             _safe("torch.compile", lambda: _compile(cuda.available)),
             _safe("CPU", _cpu), _safe("CPU kernels (ATen)", lambda: _aten_isa(torch)),
             _safe("threads", lambda: _threads(torch)), _safe("memory", _memory),
             _safe("allocator", _allocator), _safe("cgroup CPU quota", _cgroup_quota)]
    return Capabilities(tuple(items))


def fingerprint_fields(device: Any = "auto") -> dict[str, Any]:
    """What a device fingerprint should add to device.fingerprint(): the CUDA runtime, the CPU's kernel features,
    and for a GPU the driver and maximum clocks (from NVML; ``nvml_error`` says why when it could not be read)."""
    import torch

    out: dict[str, Any] = {"cuda_runtime": torch.version.cuda, "cpu_features": ",".join(cpu_features()),
                           "cpu_isa": _aten_isa(torch).detail}
    cuda = _cuda(torch)
    gpu, _ = _gpu_index(torch, device, cuda)
    if gpu is not None:
        try:
            out.update(nvml_facts(torch.device("cuda", gpu)))
        except Exception as err:  # NVML missing or refused: the fingerprint still stands without it
            out["nvml_error"] = f"{type(err).__name__}: {err}"
    return out


def cpu_features() -> list[str]:
    """The kernel-relevant flags this CPU reports, in KERNEL_FEATURES order ([] where /proc/cpuinfo is absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags = set(line.split(":", 1)[1].split())
            return [f for f in KERNEL_FEATURES if f in flags]
    return []


def nvml_facts(device: Any) -> dict[str, Any]:
    """Driver, CUDA driver version, maximum clocks and memory bus width of a CUDA device, from NVML (found by UUID
    or PCI bus id, see nvml.nvml_handle). A figure NVML refuses is left out and named in ``nvml_missing``;
    raises RuntimeError with the reason when NVML has no handle for the device."""
    handle, how = nvml_handle(device)
    if handle is None:
        raise RuntimeError(how)
    import pynvml

    asks = {"gpu_driver": ("nvmlSystemGetDriverVersion",), "cuda_driver": ("nvmlSystemGetCudaDriverVersion",),
            "gpu_max_sm_clock_mhz": ("nvmlDeviceGetMaxClockInfo", handle, pynvml.NVML_CLOCK_SM),
            "gpu_max_mem_clock_mhz": ("nvmlDeviceGetMaxClockInfo", handle, pynvml.NVML_CLOCK_MEM),
            "gpu_memory_bus_bits": ("nvmlDeviceGetMemoryBusWidth", handle)}
    out: dict[str, Any] = {}
    missing = []
    for key, (fn_name, *args) in asks.items():
        try:  # AttributeError: an older nvidia-ml-py without the function
            value = getattr(pynvml, fn_name)(*args)
        except (AttributeError, pynvml.NVMLError) as err:
            missing.append(f"{key} ({type(err).__name__})")
            continue
        out[key] = value.decode() if isinstance(value, bytes) else value
    if "cuda_driver" in out:  # NVML encodes 12.8 as 12080
        out["cuda_driver"] = f"{out['cuda_driver'] // 1000}.{out['cuda_driver'] % 1000 // 10}"
    if missing:
        out["nvml_missing"] = ", ".join(missing)
    return out


def _safe(name: str, fn: Callable[[], Capability]) -> Capability:
    """One failing probe is one unavailable row with its reason, never a failed doctor."""
    try:
        return fn()
    except Exception as err:
        return Capability(name, False, f"probe failed: {type(err).__name__}: {err}")


def _torch(torch: Any) -> Capability:
    if torch.version.cuda:
        build = f"CUDA {torch.version.cuda} build"
    elif getattr(torch.version, "hip", None):
        build = f"ROCm {torch.version.hip} build"
    else:
        build = "CPU build"
    return Capability("torch", True, f"{torch.__version__}, {build}")


def _cuda(torch: Any) -> Capability:
    if not torch.version.cuda:
        build = "a ROCm" if getattr(torch.version, "hip", None) else "a CPU"
        return Capability("CUDA", False, f"torch is {build} build ({torch.__version__})")
    if not torch.cuda.is_available():
        hidden = " (CUDA_VISIBLE_DEVICES is empty)" if os.environ.get("CUDA_VISIBLE_DEVICES") == "" else ""
        return Capability("CUDA", False, f"no NVIDIA driver/GPU visible{hidden}")
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    names = [f"{p.name} (sm_{p.major}{p.minor})" for p in props]
    return Capability("CUDA", True, f"{len(names)} device(s): {', '.join(names)}; CUDA {torch.version.cuda}")


def _gpu_index(torch: Any, device: Any, cuda: Capability) -> tuple[int | None, str]:
    """The CUDA index the GPU rows describe, or None and the reason they say instead."""
    if not cuda.available:
        return None, f"no NVIDIA GPU: {cuda.detail}"
    if str(device) == "cpu":
        return None, "not probed: device='cpu' was asked for"
    if str(device) == "auto":
        return torch.cuda.current_device(), ""
    dev = torch.device(device)
    index = torch.cuda.current_device() if dev.index is None else dev.index
    count = torch.cuda.device_count()
    if dev.type != "cuda" or index >= count:
        raise DsnasError(f"device must be 'auto', 'cpu' or a visible CUDA device (cuda:0..cuda:{count - 1}), "
                         f"but got {device!r}. Fix: pick one of those")
    return index, ""


def _nvml_rows(torch: Any, gpu: int | None, why: str) -> list[Capability]:
    if gpu is None:
        return [Capability(name, False, why) for name in NVML_ROWS]
    try:
        # Here, not at the top: an NVML module that fails to import is one unavailable row per capability.
        from dsnas.profiler.nvml import nvml_capabilities

        found = nvml_capabilities(torch.device("cuda", gpu))
    except Exception as err:
        return [Capability(name, False, f"NVML not queried: {type(err).__name__}: {err}") for name in NVML_ROWS]
    # nvml.py spells keys as identifiers (energy_counter); match them to the row names case- and separator-blind.
    by_key = {k.lower().replace("_", " "): (k, v) for k, v in found.items()}
    rows = []
    for name in NVML_ROWS:
        _, (ok, detail) = by_key.pop(name.lower(), (name, (False, "not reported by nvml_capabilities")))
        rows.append(Capability(name, bool(ok), str(detail)))
    return rows + [Capability(key, bool(ok), str(detail)) for key, (ok, detail) in by_key.values()]


def _cupti(torch: Any, gpu: int | None, why: str) -> Capability:
    """Kernel times come from CUPTI through torch.profiler; an empty kernel list means it is not working here."""
    name = "CUPTI activities"
    if gpu is None:
        return Capability(name, False, "no CUDA device" if why.startswith("no NVIDIA GPU") else why)
    from torch.profiler import ProfilerActivity, profile, supported_activities


    if ProfilerActivity.CUDA not in supported_activities():
        return Capability(name, False, "this torch build has no CUDA profiling (Kineto without CUPTI)")
    a = torch.randn(256, 256, device=torch.device("cuda", gpu))
    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        a @ a
        torch.cuda.synchronize(gpu)
    kernels = [e for e in prof.events() if "CUDA" in str(e.device_type)]  # DeviceType.CUDA: GPU-side events
    if not kernels:
        return Capability(name, False, "a profiled matmul recorded no kernel events (CUPTI blocked or missing)")
    return Capability(name, True, f"{len(kernels)} kernel event(s) from a profiled 256x256 matmul")


def _compile(has_gpu: bool) -> Capability:
    """Inductor importable and the code generators it needs present; nothing is compiled."""
    import importlib.util

    import torch._inductor.config  # noqa: F401  (the import is the check: it fails on broken installs)

    if not (compiler := os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")):
        return Capability("torch.compile", False, "inductor imports, but no C++ compiler (g++/clang++) for CPU code")
    parts = [f"inductor; CPU codegen with {compiler}"]
    if has_gpu:
        parts.append("GPU codegen with triton" if importlib.util.find_spec("triton") else "no triton: GPU eager only")
    return Capability("torch.compile", True, "; ".join(parts))


def _cpu() -> Capability:
    model, features = cpu_model(), ", ".join(cpu_features()) or "no listed kernel features"
    return Capability("CPU", bool(model), f"{model} ({features})" if model else "CPU model not readable")


def _aten_isa(torch: Any) -> Capability:
    """The vector ISA ATen's CPU kernels dispatch to: what torch will use, which may be less than the CPU has."""
    return Capability("CPU kernels (ATen)", True, str(torch.backends.cpu.get_cpu_capability()))


def _threads(torch: Any) -> Capability:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return Capability("threads", True, f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs online, "
                      + (f"{affinity} in this process's affinity" if affinity else "affinity unknown"))


def _memory() -> Capability:
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                return Capability("memory", True, f"{int(line.split()[1]) / 2**20:.1f} GiB total RAM")
    except OSError as err:
        return Capability("memory", False, f"/proc/meminfo not readable: {err.strerror}")
    return Capability("memory", False, "/proc/meminfo has no MemTotal line")


def _allocator() -> Capability:
    """What the allocator does with freed memory while dsnas times (holding it is what every timing does first)."""
    state = hold_freed_memory()
    if state["policy"] != POLICY:
        return Capability("allocator", False, f"freed memory not held while timing: {state['why']}")
    return Capability("allocator", True, f"{state['allocator']}: freed memory held while timing (blocks up to "
                      f"{int(state['mmap_threshold']) >> 20} MiB from the heap, never trimmed), so calls do not "
                      "fault it in again")


@functools.cache  # a process's cgroups are read once: every measurement window asks (dsnas.profiler.disturbance)
def own_cgroup_folders(controller: str, mountinfo: Path = Path("/proc/self/mountinfo"),
                       cgroups: Path = Path("/proc/self/cgroup")) -> list[Path]:
    """This process's cgroup folder of ``controller`` ("cpu", "cpuacct"; cgroup v2's unified one where it has no v1
    mount of its own), then each parent up to the mount: a quota on any of them caps the process. Read from
    /proc/self: only /sys/fs/cgroup's top was read, so a quota on the process's own cgroup (a systemd unit's
    CPUQuota) was never seen. Empty where /proc/self cannot tell (not Linux)."""
    try:
        mounts = [line.split() for line in mountinfo.read_text(encoding="utf-8").splitlines()]
        lines = cgroups.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    own = {}  # "" (v2) or a v1 controller -> the process's path in that hierarchy
    for line in lines:
        _, controllers, relative = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            own[name] = relative
    for fields in mounts:
        if "-" not in fields:
            continue
        sep = fields.index("-")
        fstype, options, root, mount = fields[sep + 1], fields[-1].split(","), fields[3], Path(fields[4])
        v1 = fstype == "cgroup" and controller in options and controller in own
        v2 = fstype == "cgroup2" and "" in own and controller not in own
        relative = own.get(controller if v1 else "") if v1 or v2 else None
        if relative is None or not relative.startswith(root):
            continue
        folder = mount / relative[len(root):].lstrip("/")
        chain = [folder, *folder.parents]
        return [f for f in chain[: chain.index(mount) + 1] if f.is_dir()] if mount in chain else [mount]
    return []


def cgroup_cpu_max(root: Path | None = None) -> tuple[str, str] | str:
    """(quota, period) in microseconds as the cgroup's files write them (v2 cpu.max, v1 cfs files; a quota of "max"
    or "-1" is none), or why they cannot be read: of the cgroup ``root``, or by default the tightest quota of this
    process's own cgroup and its parents (own_cgroup_folders)."""
    if root is None:
        folders = own_cgroup_folders("cpu")
        if not folders:
            return cgroup_cpu_max(CGROUP_ROOT)
        found = [_quota_in(folder) for folder in folders]
        binding = binding_quota(found)
        if binding is not None:
            return found[binding]  # type: ignore[return-value]
        return next((q for q in found if not isinstance(q, str)), found[0])
    for folder in (root, root / "cpu"):  # v2's files at the top, or v1's cpu controller mounted under it
        found = _quota_in(folder)
        if not isinstance(found, str) or "not readable" in found:
            return found
    return f"no cgroup CPU controller under {root}"


def binding_quota(found: list[tuple[str, str] | str] | None = None) -> int | None:
    """Which of this process's cgroup and its parents (own_cgroup_folders("cpu"), innermost first) has the tightest
    CPU quota, or None where none has one: the cgroup whose usage the quota is spent by."""
    if found is None:
        found = [_quota_in(folder) for folder in own_cgroup_folders("cpu")]
    limits = [(int(q[0]) / int(q[1]), i) for i, q in enumerate(found)
              if not isinstance(q, str) and q[0].isdigit() and q[1].isdigit() and int(q[1]) > 0]
    return min(limits)[1] if limits else None


def _quota_in(folder: Path) -> tuple[str, str] | str:
    """The quota files of one cgroup folder: v2's cpu.max, or v1's cpu controller's cfs files."""
    try:
        if (folder / "cpu.max").exists():
            quota, period = (folder / "cpu.max").read_text(encoding="utf-8").split()[:2]
            return quota, period
        if (folder / "cpu.cfs_quota_us").exists():
            return ((folder / "cpu.cfs_quota_us").read_text(encoding="utf-8").strip(),
                    (folder / "cpu.cfs_period_us").read_text(encoding="utf-8").strip())
    except (OSError, ValueError) as err:
        return f"cgroup CPU files not readable: {err}"
    return f"no cgroup CPU quota files in {folder}"


def usable_cpus(root: Path | None = None) -> int:
    """The CPUs this process may run on at once: its affinity, capped by a cgroup CPU quota (a container given
    `--cpus 2` on a 64-core host sees 64 in os.cpu_count())."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    found = cgroup_cpu_max(root)
    if not isinstance(found, str) and found[0] not in ("max", "-1"):
        try:
            cpus = min(cpus, max(1, math.ceil(int(found[0]) / int(found[1]))))
        except (ValueError, ZeroDivisionError):
            pass
    return max(1, cpus)


def _cgroup_quota(root: Path | None = None) -> Capability:
    """A cgroup CPU quota caps throughput below os.cpu_count() without changing it (v2 cpu.max, v1 cfs files)."""
    name = "cgroup CPU quota"
    found = cgroup_cpu_max(root)
    if isinstance(found, str):
        return Capability(name, False, found)
    quota, period = found
    if quota in ("max", "-1"):
        return Capability(name, False, f"no quota set ({quota})")
    return Capability(name, True, f"{int(quota) / int(period):.2f} CPUs ({quota}/{period} us)")
