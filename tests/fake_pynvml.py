"""A stand-in for the part of pynvml that dsnas.profiler.nvml and .window use, for tests on a machine without
an NVIDIA GPU: configurable devices, counters and failures, and a record of what the code under test asked for.

It raises pynvml's own exception classes and fills pynvml's own ctypes structs, so that the code under
test catches and writes exactly what it would against the real library. Install it with
``monkeypatch.setitem(sys.modules, "pynvml", FakePynvml([...]))``.
"""

from __future__ import annotations

import ctypes
import itertools
import time
import types
from dataclasses import dataclass, field
from typing import Any

import pynvml as real

GPM_IDS = {"sm_util": real.NVML_GPM_METRIC_SM_UTIL, "sm_occupancy": real.NVML_GPM_METRIC_SM_OCCUPANCY,
           "tensor_util": real.NVML_GPM_METRIC_ANY_TENSOR_UTIL, "dram_bw_util": real.NVML_GPM_METRIC_DRAM_BW_UTIL}


@dataclass
class FakeGpu:
    """One device as NVML sees it. ``power_mw`` and ``util`` cycle through their values, one per read."""

    uuid: str
    bus_id: str  # as NVML writes it: an 8-digit domain, upper-case hex ("00000000:B3:00.0")
    energy_mj: int = 1_000_000
    energy_step_mj: int = 2_500  # the counter advances this much at every read
    power_mw: list[int] = field(default_factory=lambda: [300_000])
    util: list[tuple[int, int]] = field(default_factory=lambda: [(50, 20)])  # (gpu %, memory %)
    sm_clock: int = 1_755
    mem_clock: int = 2_619
    sm_clock_max: int = 1_980
    mem_clock_max: int = 2_619
    clock_events: int = 0
    temperature_c: int = 41
    gpm_supported: bool = True
    gpm_percent: dict[int, float] = field(default_factory=lambda: {
        real.NVML_GPM_METRIC_SM_UTIL: 80.0, real.NVML_GPM_METRIC_SM_OCCUPANCY: 40.0,
        real.NVML_GPM_METRIC_ANY_TENSOR_UTIL: 60.0, real.NVML_GPM_METRIC_DRAM_BW_UTIL: 30.0})
    gpm_errors: dict[int, int] = field(default_factory=dict)  # metric id -> NVML_ERROR_* code for that metric
    # (pid, SM utilization %) of each process that used the device: one sample each, stamped at the read (so after
    # any window's start), as the driver gives the latest per process. Empty: NVML_ERROR_NOT_FOUND, as no process.
    processes: list[tuple[int, int]] = field(default_factory=list)
    # Violation counters (ns the clocks were held down) per NVML_PERF_POLICY_*, advanced by their step at each read.
    violation_ns: dict[int, int] = field(default_factory=lambda: {real.NVML_PERF_POLICY_POWER: 7_000_000_000,
                                                                  real.NVML_PERF_POLICY_THERMAL: 0})
    violation_step_ns: dict[int, int] = field(default_factory=dict)


@dataclass
class Record:
    """What the code under test did."""

    inits: int = 0
    calls: list[str] = field(default_factory=list)
    allocated: list[int] = field(default_factory=list)  # sample addresses
    got: list[int] = field(default_factory=list)  # sample addresses, in the order they were filled
    freed: list[int] = field(default_factory=list)
    metric_requests: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class FakeHandle:
    index: int


def _address(sample: Any) -> int:
    return ctypes.cast(sample, ctypes.c_void_p).value or 0


class FakePynvml(types.ModuleType):
    """``fail`` maps a pynvml function name to the pynvml exception class it raises (``nvmlInit`` too)."""

    def __init__(self, gpus: list[FakeGpu], fail: dict[str, type[Exception]] | None = None) -> None:
        super().__init__("pynvml")
        for name in dir(real):  # constants, exception classes, structs: the real ones
            if name.startswith(("NVML", "c_nvml", "nvmlPciInfo", "nvmlClocks")):
                setattr(self, name, getattr(real, name))
        self.gpus, self.fail, self.record = gpus, dict(fail or {}), Record()
        self._addresses = itertools.count(0x1000, 0x10)
        self._sample_device: dict[int, int] = {}  # sample address -> device index it was filled from

    def _enter(self, name: str) -> None:
        self.record.calls.append(name)
        if name in self.fail:
            raise self.fail[name]()

    def _gpu(self, handle: FakeHandle) -> FakeGpu:
        return self.gpus[handle.index]

    def nvmlInit(self) -> None:
        self._enter("nvmlInit")
        self.record.inits += 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._enter("nvmlSystemGetDriverVersion")
        return "570.124.06"

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise real.NVMLError_InvalidArgument()
        return FakeHandle(index)

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:
        self._enter("nvmlDeviceGetUUID")
        return self._gpu(handle).uuid

    def nvmlDeviceGetPciInfo(self, handle: FakeHandle) -> Any:
        self._enter("nvmlDeviceGetPciInfo")
        info = real.nvmlPciInfo_t()
        info.busId = self._gpu(handle).bus_id.encode()
        return info

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeHandle) -> int:
        self._enter("nvmlDeviceGetTotalEnergyConsumption")
        gpu = self._gpu(handle)
        value, gpu.energy_mj = gpu.energy_mj, gpu.energy_mj + gpu.energy_step_mj
        return value

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        self._enter("nvmlDeviceGetPowerUsage")
        gpu = self._gpu(handle)
        gpu.power_mw.append(gpu.power_mw.pop(0))
        return gpu.power_mw[-1]

    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> Any:
        self._enter("nvmlDeviceGetUtilizationRates")
        gpu = self._gpu(handle)
        gpu.util.append(gpu.util.pop(0))
        return real.c_nvmlUtilization_t(gpu=gpu.util[-1][0], memory=gpu.util[-1][1])

    def nvmlDeviceGetClockInfo(self, handle: FakeHandle, clock: int) -> int:
        self._enter("nvmlDeviceGetClockInfo")
        gpu = self._gpu(handle)
        return {real.NVML_CLOCK_SM: gpu.sm_clock, real.NVML_CLOCK_MEM: gpu.mem_clock}[clock]

    def nvmlDeviceGetMaxClockInfo(self, handle: FakeHandle, clock: int) -> int:
        self._enter("nvmlDeviceGetMaxClockInfo")
        gpu = self._gpu(handle)
        return {real.NVML_CLOCK_SM: gpu.sm_clock_max, real.NVML_CLOCK_MEM: gpu.mem_clock_max}[clock]

    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:
        self._enter("nvmlDeviceGetTemperature")
        if sensor != real.NVML_TEMPERATURE_GPU:
            raise real.NVMLError_InvalidArgument()
        return self._gpu(handle).temperature_c

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: FakeHandle) -> int:
        self._enter("nvmlDeviceGetCurrentClocksEventReasons")
        return self._gpu(handle).clock_events

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: FakeHandle) -> int:
        self._enter("nvmlDeviceGetCurrentClocksThrottleReasons")
        return self._gpu(handle).clock_events

    def nvmlDeviceGetProcessUtilization(self, handle: FakeHandle, last_seen_us: int) -> list[Any]:
        self._enter("nvmlDeviceGetProcessUtilization")
        gpu = self._gpu(handle)
        if not gpu.processes:
            raise real.NVMLError_NotFound()
        now = max(int(time.time() * 1e6), last_seen_us + 1)
        return [real.c_nvmlProcessUtilizationSample_t(pid=pid, timeStamp=now, smUtil=sm, memUtil=0, encUtil=0,
                                                      decUtil=0) for pid, sm in gpu.processes]

    def nvmlDeviceGetViolationStatus(self, handle: FakeHandle, policy: int) -> Any:
        self._enter("nvmlDeviceGetViolationStatus")
        gpu = self._gpu(handle)
        if policy not in gpu.violation_ns:
            raise real.NVMLError_NotSupported()
        gpu.violation_ns[policy] += gpu.violation_step_ns.get(policy, 0)
        return real.c_nvmlViolationTime_t(referenceTime=int(time.time() * 1e6), violationTime=gpu.violation_ns[policy])

    def nvmlGpmQueryDeviceSupport(self, handle: FakeHandle) -> Any:
        self._enter("nvmlGpmQueryDeviceSupport")
        support = real.c_nvmlGpmSupport_t()
        support.version = real.NVML_GPM_SUPPORT_VERSION  # as the real wrapper does
        support.isSupportedDevice = int(self._gpu(handle).gpm_supported)
        return support

    def nvmlGpmSampleAlloc(self) -> Any:
        self._enter("nvmlGpmSampleAlloc")
        # A distinct, never-dereferenced address, typed as the real opaque sample pointer so it can go in
        # the real request struct.
        sample = ctypes.cast(ctypes.c_void_p(next(self._addresses)), real.c_nvmlGpmSample_t)
        self.record.allocated.append(_address(sample))
        return sample

    def nvmlGpmSampleGet(self, handle: FakeHandle, sample: Any) -> Any:
        self._enter("nvmlGpmSampleGet")
        self.record.got.append(_address(sample))
        self._sample_device[_address(sample)] = handle.index
        return sample

    def nvmlGpmSampleFree(self, sample: Any) -> None:
        self._enter("nvmlGpmSampleFree")
        self.record.freed.append(_address(sample))

    def nvmlGpmMetricsGet(self, request: Any) -> Any:
        self._enter("nvmlGpmMetricsGet")
        ids = [request.metrics[i].metricId for i in range(request.numMetrics)]
        first, second = _address(request.sample1), _address(request.sample2)
        self.record.metric_requests.append(
            {"version": request.version, "numMetrics": request.numMetrics, "ids": ids, "sample1": first,
             "sample2": second})
        if request.version != real.NVML_GPM_METRICS_GET_VERSION:
            raise real.NVMLError_ArgumentVersionMismatch()
        got = self.record.got
        if first not in got or second not in got or got.index(first) >= got.index(second):
            raise real.NVMLError_InvalidArgument()  # samples unfilled, or in the wrong order
        gpu = self.gpus[self._sample_device[second]]
        for i, metric_id in enumerate(ids):
            code = gpu.gpm_errors.get(metric_id, real.NVML_SUCCESS if metric_id in gpu.gpm_percent
                                      else real.NVML_ERROR_NOT_SUPPORTED)
            request.metrics[i].nvmlReturn = code
            request.metrics[i].value = gpu.gpm_percent.get(metric_id, 0.0) if code == real.NVML_SUCCESS else 0.0
        return request
