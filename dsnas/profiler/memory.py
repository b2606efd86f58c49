"""Peak memory of one measured call: the CUDA allocator's peak on a GPU; on the CPU, the process's
peak resident set above what was resident before (Linux VmHWM, reset through /proc/self/clear_refs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def cpu_peak_supported() -> tuple[bool, str]:
    """Whether the peak resident set can be reset and read here, and why not."""
    try:
        _CLEAR_REFS.write_text("5")  # "5" resets the peak RSS (Linux >= 4.0)
        _read_kb("VmHWM")
    except (OSError, KeyError) as e:
        return False, f"cannot reset or read the peak resident set: {e}"
    return True, ""


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.bytes`` (None with ``peak.reason`` if unavailable)."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.bytes: int | None = None
        self.reason = ""
        self.method = "cuda_max_memory_allocated" if device.type == "cuda" else "rss_peak_delta"

    def __enter__(self) -> "PeakMemory":
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = 0
        else:
            ok, self.reason = cpu_peak_supported()
            self._base = _read_kb("VmRSS") * 1024 if ok else None
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
        elif self._base is not None:
            self.bytes = max(0, _read_kb("VmHWM") * 1024 - self._base)


def _read_kb(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)
