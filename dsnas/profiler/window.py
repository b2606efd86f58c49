"""The steady window: loop a call while NVML reads energy and clocks at both ends, power and utilization on a
poller thread, and GPM (SM, tensor, DRAM-bandwidth utilization) from two samples; an unread figure has its reason."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from dsnas.profiler.nvml import _call, _why, gpm_supported

# GPM computes metrics from two samples and needs them more than 100 ms apart; the driver timestamps the
# samples itself, so keep a margin over the documented minimum.
GPM_MIN_GAP_S = 0.11

# Our name -> the pynvml constant (ids 2, 3, 5, 10 in nvidia-ml-py 12/13). GPM reports percent.
GPM_METRICS = {
    "sm_util": "NVML_GPM_METRIC_SM_UTIL",  # share of SMs busy
    "sm_occupancy": "NVML_GPM_METRIC_SM_OCCUPANCY",  # resident warps vs the theoretical maximum
    "tensor_util": "NVML_GPM_METRIC_ANY_TENSOR_UTIL",  # share of time any tensor core was active
    "dram_bw_util": "NVML_GPM_METRIC_DRAM_BW_UTIL",  # DRAM bandwidth used vs the peak
}

# Clock event (formerly "throttle") reason bits, as nvml.h defines them; unknown bits are kept by value.
CLOCK_EVENTS = {
    0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
    0x10: "sync_boost", 0x20: "sw_thermal_slowdown", 0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown", 0x100: "display_clock_setting", 0x200: "board_limit", 0x400: "reliability",
}


@dataclass(frozen=True)
class WindowResult:
    """What NVML saw while ``calls`` calls ran for ``seconds``. A figure NVML could not give is None here
    and has its reason in ``unavailable`` (keyed by field name); none is ever a made-up 0."""

    seconds: float
    calls: int
    energy_j: float | None = None
    energy_per_call_j: float | None = None
    power_w_mean: float | None = None
    power_w_max: float | None = None
    # "A kernel was running" for the sampled period, not SM occupancy: one tiny kernel reads as 100 %.
    gpu_util: float | None = None
    mem_util: float | None = None
    sm_clock_mhz_start: float | None = None
    sm_clock_mhz_end: float | None = None
    sm_clock_mhz_max: float | None = None
    mem_clock_mhz_start: float | None = None
    mem_clock_mhz_end: float | None = None
    mem_clock_mhz_max: float | None = None
    clock_events_start: list[str] | None = None
    clock_events_end: list[str] | None = None
    # At equal clocks a hotter GPU draws more power and meets its power limit sooner.
    temperature_c_start: float | None = None
    temperature_c_end: float | None = None
    sm_util: float | None = None
    sm_occupancy: float | None = None
    tensor_util: float | None = None
    dram_bw_util: float | None = None
    power_samples: int = 0
    unavailable: dict[str, str] = field(default_factory=dict)

    def as_metrics(self) -> dict[str, float]:
        """Flat numbers for a trial's metrics, named with their units; unavailable figures are left out."""
        names = {"energy_per_call_j": "energy_per_call_j", "power_w_mean": "power_w", "power_w_max": "power_w_max",
                 "gpu_util": "gpu_util", "mem_util": "mem_util", "sm_util": "sm_util",
                 "sm_occupancy": "sm_occupancy", "tensor_util": "tensor_util", "dram_bw_util": "dram_bw_util",
                 "sm_clock_mhz_end": "sm_clock_mhz"}
        return {out: float(getattr(self, f)) for f, out in names.items() if getattr(self, f) is not None}

    def as_profile(self) -> dict[str, Any]:
        """Everything read, with clock events and the reason for each missing figure (JSON-ready)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def measure_window(handle: Any, call: Callable[[], Any], sync: Callable[[], None], *, min_s: float = 1.0,
                   poll_s: float = 0.1) -> WindowResult:
    """Run ``call(); sync()`` until ``min_s`` (and at least GPM_MIN_GAP_S) has passed, with NVML reading
    energy, clocks and GPM at both ends and power and utilization every ``poll_s`` in between.

    Syncing after every call (as the timing protocol does) makes the energy that of the calls it times.
    The caller warms the model up first; ``handle`` comes from nvml_handle (None: NVML figures absent).
    """
    sync()  # work queued before the window must not be counted in it
    if handle is None:
        seconds, calls = _loop(call, sync, max(min_s, GPM_MIN_GAP_S))
        return WindowResult(seconds, calls, unavailable=dict.fromkeys(_optional_fields(), "no NVML handle"))
    gpm, poller = _Gpm(handle), _Poller(handle, poll_s)
    try:
        gpm.take()
        start = _snapshot(handle, "start")
        poller.start()
        seconds, calls = _loop(call, sync, max(min_s, GPM_MIN_GAP_S))
        end = _snapshot(handle, "end")
        gpm.take()
        poller.stop()
        poller.read()  # one reading at the end, so that a short window still has one
        gpm_values = gpm.metrics()
    finally:
        poller.stop()
        gpm.free()
    return _result(seconds, calls, start, end, poller, gpm_values)


# --- One window ---------------------------------------------------------------------------------------


def _loop(call: Callable[[], Any], sync: Callable[[], None], min_s: float) -> tuple[float, int]:
    start = time.perf_counter()
    calls = 0
    while True:
        call()
        sync()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_s:
            return elapsed, calls


def _put(got: dict[str, Any], missing: dict[str, str], key: str, value: Any, why: str | None, what: str) -> None:
    if why is None:
        got[key] = value
    else:
        missing[key] = f"{what}: {why}"


def _snapshot(handle: Any, when: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Energy counter, clocks, clock events and temperature at one end of the window (field names end in
    ``when``)."""
    import pynvml

    got: dict[str, Any] = {}
    missing: dict[str, str] = {}
    energy, why = _call("nvmlDeviceGetTotalEnergyConsumption", handle)  # mJ since the driver loaded
    _put(got, missing, f"energy_mj_{when}", energy, why, "energy counter")
    for name, clock in (("sm_clock_mhz", pynvml.NVML_CLOCK_SM), ("mem_clock_mhz", pynvml.NVML_CLOCK_MEM)):
        value, why = _call("nvmlDeviceGetClockInfo", handle, clock)
        _put(got, missing, f"{name}_{when}", value, why, "clock")
        if when == "start":
            value, why = _call("nvmlDeviceGetMaxClockInfo", handle, clock)
            _put(got, missing, f"{name}_max", value, why, "max clock")
    events, why = _clock_events(handle)
    _put(got, missing, f"clock_events_{when}", events, why, "clock events")
    value, why = _call("nvmlDeviceGetTemperature", handle, pynvml.NVML_TEMPERATURE_GPU)  # degrees C
    _put(got, missing, f"temperature_c_{when}", value, why, "temperature")
    return got, missing


def _clock_events(handle: Any) -> tuple[list[str] | None, str | None]:
    """Why the clocks are below their maximum, by name. Newer nvidia-ml-py calls these clock *event*
    reasons and deprecates the *throttle* reasons function; use whichever this one has."""
    import pynvml

    fn_name = "nvmlDeviceGetCurrentClocksEventReasons"
    if not hasattr(pynvml, fn_name):
        fn_name = "nvmlDeviceGetCurrentClocksThrottleReasons"
    mask, why = _call(fn_name, handle)
    if why is not None:
        return None, why
    names = [name for bit, name in CLOCK_EVENTS.items() if mask & bit]
    unknown = mask & ~sum(CLOCK_EVENTS)
    return names + ([f"unknown_{unknown:#x}"] if unknown else []), None


def _poll(handle: Any) -> tuple[dict[str, float], dict[str, str]]:
    """Power (mW -> W) and utilization (% -> ratio) now."""
    got: dict[str, float] = {}
    missing: dict[str, str] = {}
    power, why = _call("nvmlDeviceGetPowerUsage", handle)  # mW
    if why is None:
        got["power_w"] = power / 1e3
    else:
        missing["power_w_mean"] = missing["power_w_max"] = f"power: {why}"
    util, why = _call("nvmlDeviceGetUtilizationRates", handle)
    if why is None:
        got.update(gpu_util=util.gpu / 100, mem_util=util.memory / 100)
    else:
        missing["gpu_util"] = missing["mem_util"] = f"utilization: {why}"
    return got, missing


class _Poller:
    """Reads power and utilization every ``interval_s`` on a daemon thread while the window runs
    (NVML is thread-safe). Both are averages over the driver's own period (up to 1 s), so they lag."""

    def __init__(self, handle: Any, interval_s: float) -> None:
        self.handle, self.interval_s = handle, interval_s
        self.readings: list[dict[str, float]] = []
        self.missing: dict[str, str] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dsnas-nvml-poll", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(self.interval_s):
            self.read()

    def read(self) -> None:
        got, missing = _poll(self.handle)
        self.readings.append(got)
        self.missing.update(missing)

    def stop(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


class _Gpm:
    """GPM samples around the window. They are C allocations: free() releases every one taken."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.samples: list[Any] = []
        self.why: str | None = None
        supported, reason = gpm_supported(handle)
        if not supported:
            self.why = reason.removeprefix("GPM: ")

    def take(self) -> None:
        if self.why is not None:
            return
        sample, self.why = _call("nvmlGpmSampleAlloc")
        if self.why is None:
            self.samples.append(sample)
            _, self.why = _call("nvmlGpmSampleGet", self.handle, sample)  # NO_PERMISSION shows up here

    def free(self) -> None:
        while self.samples:
            _call("nvmlGpmSampleFree", self.samples.pop())

    def metrics(self) -> tuple[dict[str, float], dict[str, str]]:
        if self.why is None and len(self.samples) == 2:
            return _gpm_metrics(*self.samples)
        return {}, dict.fromkeys(GPM_METRICS, f"GPM: {self.why or 'fewer than two samples'}")


def _gpm_metrics(first: Any, second: Any) -> tuple[dict[str, float], dict[str, str]]:
    """GPM metrics between two samples (% -> ratio); a metric the device refuses is missing on its own."""
    import pynvml

    request = pynvml.c_nvmlGpmMetricsGet_t()
    request.version = pynvml.NVML_GPM_METRICS_GET_VERSION
    request.numMetrics = len(GPM_METRICS)
    request.sample1, request.sample2 = first, second  # order matters: counters run from sample1 to sample2
    for i, const in enumerate(GPM_METRICS.values()):
        request.metrics[i].metricId = getattr(pynvml, const)
    _, why = _call("nvmlGpmMetricsGet", request)
    if why is not None:
        return {}, dict.fromkeys(GPM_METRICS, f"GPM: {why}")
    got: dict[str, float] = {}
    missing: dict[str, str] = {}
    for i, name in enumerate(GPM_METRICS):
        metric = request.metrics[i]
        if metric.nvmlReturn != pynvml.NVML_SUCCESS:
            missing[name] = f"GPM: {_why(pynvml.NVMLError(metric.nvmlReturn))}"
        elif not math.isfinite(metric.value):
            missing[name] = f"GPM: not a number ({metric.value})"
        else:
            got[name] = metric.value / 100
    return got, missing


def _result(seconds: float, calls: int, start: tuple[dict, dict], end: tuple[dict, dict], poller: _Poller,
            gpm: tuple[dict, dict]) -> WindowResult:
    got = {**start[0], **end[0], **gpm[0], **_poll_summary(poller.readings)}
    missing = {**start[1], **end[1], **poller.missing, **gpm[1]}
    energy_j, why = _energy_j(got.pop("energy_mj_start", None), got.pop("energy_mj_end", None), missing, seconds)
    if why is None:
        got.update(energy_j=energy_j, energy_per_call_j=energy_j / calls)
    else:
        missing.update(energy_j=why, energy_per_call_j=why)
    # A reading that failed once but succeeded at another time is present, so only absent fields get a reason.
    unavailable = {k: missing.get(k, "not read") for k in _optional_fields() if k not in got}
    return WindowResult(seconds, calls, **got, power_samples=len(poller.readings), unavailable=unavailable)


def _energy_j(start_mj: int | None, end_mj: int | None, missing: dict[str, str],
              seconds: float) -> tuple[float, str | None]:
    """The counter difference (mJ -> J). A counter that did not move is its 20-100 ms granularity, not
    zero energy; one that went back was reset."""
    if start_mj is None or end_mj is None:
        return 0.0, missing.get("energy_mj_start") or missing.get("energy_mj_end") or "energy counter: not read"
    if end_mj == start_mj:
        return 0.0, f"energy counter did not advance in {seconds:.3f} s (its granularity is 20-100 ms)"
    if end_mj < start_mj:
        return 0.0, "energy counter went backwards (driver reloaded?)"
    return (end_mj - start_mj) / 1e3, None


def _poll_summary(readings: list[dict[str, float]]) -> dict[str, float]:
    series: dict[str, list[float]] = {}
    for reading in readings:
        for key, value in reading.items():
            series.setdefault(key, []).append(value)
    out = {key: sum(values) / len(values) for key, values in series.items() if key != "power_w"}
    if series.get("power_w"):
        out.update(power_w_mean=sum(series["power_w"]) / len(series["power_w"]), power_w_max=max(series["power_w"]))
    return out


def _optional_fields() -> list[str]:
    return [f.name for f in fields(WindowResult) if f.default is None]
