"""The NVML session and devices: NVML started once on first use (pynvml is imported lazily, never at import), a
torch CUDA device matched to its handle, GPM support, and what `dsnas doctor` reports; refusals come back as reasons."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any

# What each NVML failure means to someone reading a profile (keyed by pynvml's exception class name, so
# that a stand-in module raising the same classes reads the same).
_WHY = {
    "NVMLError_LibraryNotFound": "NVML library not found (libnvidia-ml.so.1): no NVIDIA driver visible here",
    "NVMLError_DriverNotLoaded": "the NVIDIA driver is not loaded",
    "NVMLError_NotSupported": "not supported on this device",
    "NVMLError_NoPermission": "no permission (containers often deny it)",
    "NVMLError_FunctionNotFound": "the driver's NVML lacks this function (driver too old)",
    "NVMLError_LibRmVersionMismatch": "NVML library and kernel driver versions differ (reload the driver)",
    "NVMLError_GpuIsLost": "the GPU is lost (fell off the bus)",
    "NVMLError_Uninitialized": "NVML is not initialised",
}

# None: NVML initialised; a string: why it cannot be. Absent: not tried yet in this process.
_init_state: dict[str, str | None] = {}
_init_lock = threading.Lock()


def nvml_handle(device: Any) -> tuple[Any | None, str]:
    """The NVML handle of a torch CUDA device, matched by UUID, else by PCI bus id: NVML numbers devices
    in its own order, which CUDA_VISIBLE_DEVICES does not change. (None, reason) when there is none."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or torch.version.hip:
        return None, "not an NVIDIA GPU"
    try:
        props = torch.cuda.get_device_properties(device)
    except Exception as err:  # torch raises AssertionError or RuntimeError depending on the build
        return None, f"unavailable: torch cannot read the device's properties ({err})"
    why = _init()
    if why is not None:
        return None, why
    import pynvml

    uuid = _uuid(getattr(props, "uuid", None))
    bus = _torch_bus(props)
    try:
        return _find_handle(uuid, bus)
    except pynvml.NVMLError as err:
        return None, f"unavailable: {_why(err)}"


def gpm_supported(handle: Any) -> tuple[bool, str]:
    """Whether the device can give GPM metrics (Hopper and newer), with the reason when not."""
    if handle is None:
        return False, "GPM: no NVML handle"
    # pynvml's wrapper sets the struct's version to NVML_GPM_SUPPORT_VERSION itself.
    support, why = _call("nvmlGpmQueryDeviceSupport", handle)
    if why is not None:
        return False, f"GPM: {why}"
    if not support.isSupportedDevice:
        return False, "GPM: not supported on this device (needs Hopper or newer)"
    return True, "GPM supported"


def nvml_capabilities(device: Any) -> dict[str, tuple[bool, str]]:
    """For ``dsnas doctor``: which NVML figures this device gives, each with a detail or the reason not."""
    names = ("nvml", "energy_counter", "gpm", "power", "utilization", "clocks", "process_utilization",
             "clock_slowdowns")
    handle, how = nvml_handle(device)
    if handle is None:
        return dict.fromkeys(names, (False, how))
    import pynvml

    driver, why = _call("nvmlSystemGetDriverVersion")
    caps = {"nvml": (True, f"driver {driver}, device {how}" if why is None else how)}
    caps["energy_counter"] = _probe("energy counter", lambda v: f"{v / 1e3:.0f} J since the driver loaded",
                                    "nvmlDeviceGetTotalEnergyConsumption", handle)
    caps["gpm"] = _gpm_probe(handle)
    caps["power"] = _probe("power", lambda v: f"{v / 1e3:.0f} W now", "nvmlDeviceGetPowerUsage", handle)
    caps["utilization"] = _probe("utilization", lambda u: f"gpu {u.gpu} %, memory {u.memory} % now",
                                 "nvmlDeviceGetUtilizationRates", handle)
    caps["clocks"] = _probe("clocks", lambda v: f"SM up to {v} MHz", "nvmlDeviceGetMaxClockInfo", handle,
                            pynvml.NVML_CLOCK_SM)
    from dsnas.profiler.gpu_share import share_capabilities  # here: gpu_share reads NVML through this module

    caps.update(share_capabilities(handle))
    return caps


# --- NVML access --------------------------------------------------------------------------------------


def _init() -> str | None:
    """Initialise NVML once per process; None when it is up, else why not (remembered: a missing library
    or driver does not appear mid-run). Never shut down: handles must stay valid for the process."""
    with _init_lock:
        if "reason" not in _init_state:
            _init_state["reason"] = _try_init()
        return _init_state["reason"]


def _try_init() -> str | None:
    try:
        import pynvml
    except ImportError:
        return "unavailable: nvidia-ml-py is not installed (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        return f"unavailable: {_why(err)}"
    return None


def _why(err: BaseException) -> str:
    return _WHY.get(type(err).__name__) or f"NVML error: {err}"


def _call(fn_name: str, *args: Any) -> tuple[Any, str | None]:
    """``pynvml.<fn_name>(*args)`` as (value, None), or (None, why) when the library, driver, device or
    container refuses; an old nvidia-ml-py without the function is a reason too, not a crash."""
    import pynvml

    fn = getattr(pynvml, fn_name, None)
    if fn is None:
        return None, f"nvidia-ml-py has no {fn_name} (upgrade nvidia-ml-py)"
    try:
        return fn(*args), None
    except pynvml.NVMLError as err:
        return None, _why(err)


def _probe(what: str, describe: Callable[[Any], str], fn_name: str, *args: Any) -> tuple[bool, str]:
    value, why = _call(fn_name, *args)
    return (True, describe(value)) if why is None else (False, f"{what}: {why}")


# --- Mapping a torch device to an NVML handle ---------------------------------------------------------


def _uuid(value: Any) -> str | None:
    """'GPU-<uuid>' in lower case, from torch's uuid (whose str lacks the prefix) or NVML's string."""
    if value is None:
        return None
    text = (value.decode() if isinstance(value, bytes) else str(value)).strip().lower()
    text = text.removeprefix("gpu-")
    return f"GPU-{text}" if text else None


def _bus(text: Any) -> tuple[int, int, int, int] | None:
    """(domain, bus, device, function) from a PCI address: NVML writes an 8-digit domain
    ('00000000:B3:00.0'), sysfs and torch users a 4-digit one ('0000:b3:00.0'), so compare numbers."""
    text = text.decode() if isinstance(text, bytes) else str(text)
    match = re.fullmatch(r"([0-9a-fA-F]+):([0-9a-fA-F]+):([0-9a-fA-F]+)\.([0-9a-fA-F]+)", text.strip())
    return tuple(int(part, 16) for part in match.groups()) if match else None  # type: ignore[return-value]


def _torch_bus(props: Any) -> tuple[int, int, int, int] | None:
    ids = [getattr(props, name, None) for name in ("pci_domain_id", "pci_bus_id", "pci_device_id")]
    return None if None in ids else (ids[0], ids[1], ids[2], 0)  # CUDA devices are function 0


def _find_handle(uuid: str | None, bus: tuple[int, ...] | None) -> tuple[Any | None, str]:
    import pynvml

    handles = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle, why = _call("nvmlDeviceGetHandleByIndex", index)
        if why is None:  # a device this container may not open is not ours anyway
            handles.append(handle)
    for handle in handles if uuid else []:
        if _uuid(_call("nvmlDeviceGetUUID", handle)[0]) == uuid:
            return handle, f"matched by UUID {uuid}"
    for handle in handles if bus else []:
        info, why = _call("nvmlDeviceGetPciInfo", handle)
        if why is None and _bus(info.busId) == bus:
            return handle, f"matched by PCI bus id {_bus_text(bus)}"
    wanted = " or ".join(s for s in (uuid and f"UUID {uuid}", bus and f"PCI bus id {_bus_text(bus)}") if s)
    return None, f"unavailable: none of the {len(handles)} NVML devices has {wanted or 'a known id'}"


def _bus_text(bus: tuple[int, ...]) -> str:
    return f"{bus[0]:04x}:{bus[1]:02x}:{bus[2]:02x}.{bus[3]:x}"


# --- GPM for `dsnas doctor` ---------------------------------------------------------------------------


def _gpm_probe(handle: Any) -> tuple[bool, str]:
    """GPM as `dsnas doctor` sees it: supported, and a sample can be taken (containers may refuse)."""
    supported, reason = gpm_supported(handle)
    if not supported:
        return False, reason
    sample, why = _call("nvmlGpmSampleAlloc")
    if why is None:
        try:
            _, why = _call("nvmlGpmSampleGet", handle, sample)  # NO_PERMISSION shows up here
        finally:
            _call("nvmlGpmSampleFree", sample)  # a C allocation
    return (True, reason) if why is None else (False, f"GPM: {why}")
