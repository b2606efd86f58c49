"""Measurement: the timing protocol, peak memory, device fingerprints, and exclusive access to a device."""

from dsnas.profiler.device import device_key, fingerprint, has_cuda, resolve_device
from dsnas.profiler.gate import MeasureGate
from dsnas.profiler.measure import measure
from dsnas.profiler.timing import Timing, time_calls

__all__ = ["MeasureGate", "Timing", "device_key", "fingerprint", "has_cuda", "measure", "resolve_device",
           "time_calls"]
