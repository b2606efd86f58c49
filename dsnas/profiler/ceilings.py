"""The machine's own ceilings, to put an achieved number next to: on the CPU a measured fp32 GEMM peak and a
streaming bandwidth (cached per device fingerprint and thread count); on a GPU the datasheet-style peaks derived
from the device's clocks and widths, which no kernel reaches."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from dsnas.profiler import host_speed
from dsnas.profiler.cache import cache_dir, entry_key, read_entries, store_entry
from dsnas.profiler.capabilities import nvml_facts
from dsnas.profiler.device import fingerprint as device_fingerprint
from dsnas.profiler.disturbance import CpuWindow
from dsnas.profiler.timing import cpu_threads

log = logging.getLogger(__name__)

CACHE_TYPE = "dsnas.ceilings_cache"
# The best of several sizes: the peak is where the blocks fit the caches (512 on a 2-core EPYC: 200 GFLOP/s, against
# 118 at 2048), and a ceiling taken at 1024-2048 alone was exceeded by the small layers of searched models (a
# "flop util" of 229%). Small enough for ~1.5 s on 2 cores.
GEMM_SIZES = (256, 512, 1024, 2048)
# Part of the cache key: ceilings measured by an earlier method are measured again (one without the host-speed
# reference, dsnas.profiler.host_speed, too).
CEILING_METHOD = "gemm-best-of-256-2048+host-reference"
# A probe this much faster than the stored reference says the ceilings were measured while the host ran slow (a
# GEMM peak of 151 GFLOP/s was cached where ~200 is usual on a 2-core EPYC, 2026-12-06): measure them again. Above
# the spread of probes in a quiet phase (1.00-1.10x), so that a quiet host does not measure them on every call.
REMEASURE_FACTOR = 1.15
STREAM_ARRAY_BYTES = 128 * 2**20  # two arrays, 256 MiB in all: far beyond a last-level cache of one CPU complex
# FMA lanes per SM per clock, from NVIDIA's architecture whitepapers (the numbers torch.cuda._device_limits uses).
FP32_FMA_PER_SM = {(7, 0): 64, (8, 0): 64, (8, 6): 128, (8, 9): 128, (9, 0): 128, (10, 0): 128}
BF16_TENSOR_FMA_PER_SM = {(8, 0): 1024, (8, 9): 512, (9, 0): 2048, (10, 0): 4096}  # dense, fp32 accumulate
# Dense tensor-core multiply-adds per SM per clock by precision (A100, L40S, H100, B200 datasheets divided by SMs and
# boost clock); a 2:4 sparse kernel's peak is twice its precision's.
TENSOR_FMA_PER_SM = {
    "tf32": {(8, 0): 512, (8, 9): 256, (9, 0): 1024, (10, 0): 2048},
    "bf16": BF16_TENSOR_FMA_PER_SM,
    "fp16": BF16_TENSOR_FMA_PER_SM,
    "fp8": {(8, 9): 1024, (9, 0): 4096, (10, 0): 8192},
    "int8": {(8, 0): 2048, (8, 9): 1024, (9, 0): 4096, (10, 0): 8192},
}


@dataclass(frozen=True)
class Ceilings:
    gemm_gflop_s: float
    stream_gb_s: float  # GB = 1e9 bytes, counted STREAM's way: bytes read + bytes written
    threads: int
    seconds: float  # how long measuring took
    details: dict[str, str] = field(default_factory=dict)  # how each number was obtained
    reference_ms: float | None = None  # the host-speed probe at its fastest (dsnas.profiler.host_speed)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """The ceilings in words, each with its unit and how it was measured (`dsnas doctor --ceilings`)."""
        out = [f"fp32 GEMM peak: {self.gemm_gflop_s:,.1f} GFLOP/s ({self.details.get('gemm', '')})",
               f"memory bandwidth: {self.stream_gb_s:,.1f} GB/s ({self.details.get('stream', '')})",
               f"with {self.threads} thread(s), measured in {self.seconds:.1f} s"]
        if self.reference_ms is not None:
            out.append(f"host-speed reference: {self.reference_ms:.3f} ms ({self.details.get('reference', '')})")
        out += [f"{k}: {v}" for k, v in self.details.items() if k not in ("gemm", "stream", "reference")]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Ceilings:
        reference = data.get("reference_ms")
        return cls(float(data["gemm_gflop_s"]), float(data["stream_gb_s"]), int(data["threads"]),
                   float(data["seconds"]), {str(k): str(v) for k, v in dict(data["details"]).items()},
                   None if reference is None else float(reference))


@dataclass(frozen=True)
class GpuPeaks:
    """Datasheet-style peaks; a value is None when it could not be derived, and ``details`` then says why."""

    memory_gb_s: float | None
    fp32_gflop_s: float | None
    bf16_tensor_gflop_s: float | None
    details: dict[str, str] = field(default_factory=dict)
    tensor_gflop_s: dict[str, float] = field(default_factory=dict)  # dense tensor-core peak per precision

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def by_precision(self) -> dict[str, float]:
        """The FLOP/s peak of each precision a layer can run in: fp32 on the CUDA cores (torch's default matmul
        precision), the others on the tensor cores (tf32: an fp32 convolution, cuDNN's default), and
        "<precision>-2:4" for a semi-structured sparse kernel (none runs tf32)."""
        out = {} if self.fp32_gflop_s is None else {"fp32": self.fp32_gflop_s}
        for name, peak in self.tensor_gflop_s.items():
            out[name] = peak
            if name != "tf32":
                out[f"{name}-2:4"] = 2 * peak
        return out


def measure_ceilings(threads: int | None = None) -> Ceilings:
    """Measure both CPU ceilings with ``threads`` intra-op threads (None: torch's current setting), ~1-2 s, and
    the host-speed probe's reference. The caller owns the CPU meanwhile: another trial's work would lower them."""
    import torch

    start = time.perf_counter()
    with cpu_threads(threads) as used, torch.inference_mode():
        gemm, gemm_how = _gemm_peak(torch)
        stream, stream_how = _stream_bandwidth(torch)
        reference = host_speed.reference_ms()
    return Ceilings(gemm, stream, used, time.perf_counter() - start, {
        "gemm": gemm_how, "stream": stream_how,
        "reference": f"fp32 torch.mm {host_speed.REFERENCE_N}^3, fastest median of {host_speed.REFERENCE_PROBES} "
                     f"probes of {host_speed.PROBE_S * 1e3:.0f} ms"}, reference)


def ceilings(fingerprint: dict[str, Any], threads: int | None = None) -> Ceilings:
    """The cached ceilings for this fingerprint and thread count, measured on the first call and stored unless
    other processes took the CPUs meanwhile (dsnas.profiler.disturbance); measured again, keeping the better of
    both, when the host now runs the reference GEMM much faster than when they were."""
    import torch

    threads = threads or torch.get_num_threads()
    key, stored = _stored(fingerprint, threads)
    faster = None if stored is None else _runs_faster_now(stored)
    if stored is not None and faster is None:
        return stored
    if faster is not None:
        log.info("this host runs the reference GEMM %.2fx faster than when its ceilings were measured; "
                 "measuring them again", faster)
    with CpuWindow() as window:
        fresh = measure_ceilings(threads)
    measured = fresh if stored is None or faster is None else _best_of(stored, fresh, faster)
    disturbed = window.share.disturbed()
    if disturbed is not False:
        # Other processes took the CPUs meanwhile (or may have: unknown without /proc/stat): these ceilings may be
        # too low, and a cached one would stand for good (a stream bandwidth of 18.8 GB/s was stored where 31-34 is
        # usual on a 2-core EPYC, and every bw_util read 1.7x high): used for this call, measured again at the next.
        if disturbed:
            log.info("others took %.0f%% of the CPUs while the ceilings were measured; not cached",
                     100 * window.share.load)
            if stored is None:  # nothing better to stand for them: said, so that no share is taken of them
                why = f"others took {100 * window.share.load:.0f}% of the CPUs while they were measured"
                return replace(measured, details={**measured.details, "disturbed": why})
        else:
            log.info("others' use of the CPUs while the ceilings were measured is unknown (%s); not cached",
                     window.share.unavailable or "no reading")
        return measured
    store_entry(cache_file(), CACHE_TYPE, key,
                {"fingerprint": fingerprint, "threads": threads, "ceilings": measured.as_dict()})
    return measured


def stored_reference(threads: int | None = None) -> float | None:
    """The host-speed reference stored with this machine's CPU ceilings for ``threads`` (torch's current count by
    default), or None where none is stored yet. Reads only: nothing is measured."""
    import torch

    stored = _stored(device_fingerprint(torch.device("cpu")), threads or torch.get_num_threads())[1]
    return None if stored is None else stored.reference_ms


def _stored(fingerprint: dict[str, Any], threads: int) -> tuple[str, Ceilings | None]:
    """(the cache key, the ceilings stored under it or None); a malformed entry is None, with a warning."""
    key = entry_key(fingerprint=fingerprint, threads=threads, method=CEILING_METHOD)
    entry = read_entries(cache_file(), CACHE_TYPE).get(key)
    if not isinstance(entry, dict):
        return key, None
    try:
        return key, Ceilings.from_dict(entry["ceilings"])
    except (KeyError, TypeError, ValueError):
        log.warning("ignoring a malformed ceilings cache entry %s; measuring again", key)
        return key, None


def _runs_faster_now(stored: Ceilings) -> float | None:
    """How much faster than its stored reference the host runs the reference GEMM now, when by more than
    REMEASURE_FACTOR (None otherwise, or without a stored reference): the ceilings were then measured in a slow
    phase, and a GEMM peak too low inflates every flop_util."""
    if stored.reference_ms is None:
        return None
    with cpu_threads(stored.threads):
        now = host_speed.probe_ms()
    faster = stored.reference_ms / now
    return faster if faster > REMEASURE_FACTOR else None


def _best_of(stored: Ceilings, fresh: Ceilings, faster: float) -> Ceilings:
    """Each ceiling at the better of two measurements, the reference at the faster: a ceiling is what the machine
    does at best, and the fresh measurement may itself meet a slow phase."""
    gemm = max((stored.gemm_gflop_s, stored.details.get("gemm", "")), (fresh.gemm_gflop_s, fresh.details["gemm"]))
    stream = max((stored.stream_gb_s, stored.details.get("stream", "")),
                 (fresh.stream_gb_s, fresh.details["stream"]))
    reference = min(r for r in (stored.reference_ms, fresh.reference_ms) if r is not None)
    return Ceilings(gemm[0], stream[0], fresh.threads, fresh.seconds, {
        **fresh.details, "gemm": gemm[1], "stream": stream[1],
        "measured again": f"the reference GEMM ran {faster:.2f}x faster than the stored reference; the better of "
                          "both measurements kept"}, reference)


def cache_file() -> Path:
    return cache_dir() / "ceilings.json"


def gpu_peaks(device: Any) -> GpuPeaks:
    """Peak DRAM bandwidth (memory clock x bus width x 2 for double data rate) and fp32/bf16-tensor FLOP/s
    (SMs x FMA lanes x 2 x max SM clock) of a CUDA device, from cudaDeviceProp, else NVML's max clocks."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        why = "no NVIDIA GPU" if not torch.cuda.is_available() else f"{dev} is not a CUDA device"
        return GpuPeaks(None, None, None, {k: why for k in ("memory", "fp32", "bf16_tensor")})
    props = torch.cuda.get_device_properties(dev)
    mem_khz, bus_bits, sm_khz, source = _clocks(props, dev)
    details: dict[str, str] = {}
    memory = None
    if mem_khz and bus_bits:
        memory = mem_khz * 1e3 * bus_bits / 8 * 2 / 1e9
        details["memory"] = f"{mem_khz / 1e3:.0f} MHz x {bus_bits}-bit bus x 2 (DDR), from {source}"
    else:
        details["memory"] = f"memory clock or bus width not reported by {source}"
    fp32, details["fp32"] = _compute_peak(props, FP32_FMA_PER_SM, sm_khz, source)
    bf16, details["bf16_tensor"] = _compute_peak(props, BF16_TENSOR_FMA_PER_SM, sm_khz, source)
    tensor = {name: _compute_peak(props, rates, sm_khz, source)[0] for name, rates in TENSOR_FMA_PER_SM.items()}
    return GpuPeaks(memory, fp32, bf16, details, {k: v for k, v in tensor.items() if v is not None})


def _compute_peak(props: Any, fma_per_sm: dict[tuple[int, int], int], sm_khz: float,
                  source: str) -> tuple[float | None, str]:
    arch = (props.major, props.minor)
    if arch not in fma_per_sm:
        return None, f"no per-SM rate known for sm_{arch[0]}{arch[1]}"
    if not sm_khz:
        return None, f"SM clock not reported by {source}"
    sms, lanes = props.multi_processor_count, fma_per_sm[arch]
    return (sms * lanes * 2 * sm_khz * 1e3 / 1e9,
            f"{sms} SMs x {lanes} FMA/clock x 2 x {sm_khz / 1e3:.0f} MHz, from {source}")


def _clocks(props: Any, dev: Any) -> tuple[float, int, float, str]:
    """(memory kHz, bus bits, SM kHz, source). CUDA 13 dropped the clocks from cudaDeviceProp (torch then
    reports 0), so NVML's maximum clocks fill in what is missing."""
    mem, bus, sm = (getattr(props, a, 0) or 0 for a in ("memory_clock_rate", "memory_bus_width", "clock_rate"))
    if mem and bus and sm:
        return mem, bus, sm, "cudaDeviceProp"
    try:
        facts = nvml_facts(dev)
    except Exception as err:  # no NVML here: derive what cudaDeviceProp alone allows
        return mem, bus, sm, f"cudaDeviceProp (NVML unavailable: {err})"
    return (mem or facts.get("gpu_max_mem_clock_mhz", 0) * 1e3, bus or facts.get("gpu_memory_bus_bits", 0),
            sm or facts.get("gpu_max_sm_clock_mhz", 0) * 1e3, "cudaDeviceProp and NVML max clocks")


def _best_seconds(fn: Any, budget_s: float, min_reps: int = 3, max_reps: int = 50) -> tuple[float, int]:
    """Fastest of the timed calls after one warm-up: the ceiling is what the machine can do, so noise that
    only slows calls down is dropped rather than averaged in."""
    fn()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() < deadline):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), len(times)


def _gemm_peak(torch: Any) -> tuple[float, str]:
    best, how = 0.0, ""
    for n in GEMM_SIZES:
        # fp32 whatever torch's default dtype: under set_default_dtype(torch.float64) the "fp32" peak was fp64's
        # (65 GFLOP/s where fp32 ran 121 on a 2-core EPYC), cached, and every fp32 flop_util read 1.8x high.
        a, b = torch.randn(n, n, dtype=torch.float32), torch.randn(n, n, dtype=torch.float32)
        out = torch.empty(n, n, dtype=torch.float32)
        seconds, reps = _best_seconds(lambda: torch.mm(a, b, out=out), budget_s=0.3)
        rate = 2 * n**3 / seconds / 1e9
        if rate > best:
            best, how = rate, f"fp32 torch.mm {n}x{n}, best of {reps} after 1 warm-up, 2*n^3 FLOPs"
    return best, how


def _stream_bandwidth(torch: Any) -> tuple[float, str]:
    src = torch.ones(STREAM_ARRAY_BYTES // 4, dtype=torch.float32)  # 4 bytes each, as counted, whatever the default
    dst = torch.empty_like(src)  # the warm-up call touches its pages, so page faults stay out of the timing
    seconds, reps = _best_seconds(lambda: dst.copy_(src), budget_s=0.4)
    moved = 2 * STREAM_ARRAY_BYTES
    return moved / seconds / 1e9, (f"fp32 copy_ of {STREAM_ARRAY_BYTES >> 20} MiB, best of {reps}; bytes = read + "
                                   "write (write-allocate traffic not counted, as in STREAM)")
