"""The machine's ceilings: measured once per fingerprint and thread count, then read from a JSON cache that a
corrupt file cannot break; GPU peaks derived from (faked) device properties."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

from dsnas.profiler import ceilings as ceil
from dsnas.profiler.cache import entry_key, store_entry
from dsnas.profiler.ceilings import Ceilings, cache_file, ceilings, gpu_peaks
from dsnas.profiler.disturbance import Share
from dsnas.profiler.timing import cpu_threads

FP = {"host": "h", "device": "cpu", "cpu": "Test CPU", "torch": "2.13.0"}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DSNAS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


class _Window:
    """A CpuWindow that reports ``others`` as others' share of the CPUs (the real one reads /proc/stat)."""

    others = 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.share = Share(type(self).others, 0.0)


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    """The machine as quiet as these tests need (whatever else runs now); a test sets _Window.others to load it."""
    monkeypatch.setattr(ceil, "CpuWindow", _Window)
    monkeypatch.setattr(_Window, "others", 0.0)


@pytest.fixture
def fake_measure(monkeypatch):
    """measure_ceilings replaced by a counter: calls[i] is the thread count of the i-th measurement."""
    calls: list[int | None] = []

    def measure(threads=None):
        calls.append(threads)
        return Ceilings(100.0 + len(calls), 20.0, threads or 1, 0.01, {"gemm": "fake", "stream": "fake"})

    monkeypatch.setattr(ceil, "measure_ceilings", measure)
    return calls


def test_ceilings_are_measured_then_read_from_the_cache(cache_dir, monkeypatch):
    first = ceilings(FP, threads=torch.get_num_threads())
    assert first.gemm_gflop_s > 0 and first.stream_gb_s > 0 and first.seconds > 0
    assert first.threads == torch.get_num_threads()
    assert "torch.mm" in first.details["gemm"] and "copy_" in first.details["stream"]
    # The host-speed reference (dsnas.profiler.host_speed), stored with the ceilings and read back with them. No
    # bound against the GEMM ceiling: on a drifting host the two are measured at different speeds.
    assert 0.001 < first.reference_ms < 1000.0 and "torch.mm 256^3" in first.details["reference"]
    assert cache_file() == cache_dir / "ceilings.json" and cache_file().exists()

    monkeypatch.setattr(ceil, "measure_ceilings", lambda threads=None: pytest.fail("measured again"))
    # The host at the speed its reference says: on a drifting host a faster probe would rightly measure again.
    monkeypatch.setattr(ceil.host_speed, "probe_ms", lambda: first.reference_ms)
    assert ceilings(FP, threads=torch.get_num_threads()) == first


def test_ceilings_measured_while_the_host_ran_slow_are_measured_again_keeping_the_better(monkeypatch):
    """The host now runs the reference GEMM 1.4x faster than the stored reference: those ceilings were measured
    in a slow phase. They are measured again, and each ceiling keeps the better of the two measurements."""
    calls: list[int | None] = []

    def measure(threads=None):
        calls.append(threads)
        return Ceilings(180.0, 20.0, threads, 0.01, {"gemm": "fresh", "stream": "fresh"}, reference_ms=1.05)

    monkeypatch.setattr(ceil, "measure_ceilings", measure)
    monkeypatch.setattr(ceil.host_speed, "probe_ms", lambda: 1.0)  # ms: the host's speed at this moment
    slow = Ceilings(120.0, 25.0, 1, 0.01, {"gemm": "slow", "stream": "slow"}, reference_ms=1.4)
    store_entry(cache_file(), ceil.CACHE_TYPE, entry_key(fingerprint=FP, threads=1, method=ceil.CEILING_METHOD),
                {"fingerprint": FP, "threads": 1, "ceilings": slow.as_dict()})
    found = ceilings(FP, threads=1)
    assert calls == [1]
    assert (found.gemm_gflop_s, found.stream_gb_s, found.reference_ms) == (180.0, 25.0, 1.05)
    assert (found.details["gemm"], found.details["stream"]) == ("fresh", "slow")
    assert "1.40x faster" in found.details["measured again"]
    # Stored so: the host is now 1.05x faster than the new reference, within REMEASURE_FACTOR, so it is read back.
    assert ceilings(FP, threads=1) == found and calls == [1]
    # Ceilings without a reference (stored before it existed) are not judged by one.
    plain = Ceilings(120.0, 25.0, 2, 0.01, {"gemm": "old", "stream": "old"})
    store_entry(cache_file(), ceil.CACHE_TYPE, entry_key(fingerprint=FP, threads=2, method=ceil.CEILING_METHOD),
                {"fingerprint": FP, "threads": 2, "ceilings": plain.as_dict()})
    assert ceilings(FP, threads=2) == plain and calls == [1]


def test_ceilings_measured_while_others_took_the_cpus_are_used_but_not_cached(fake_measure, monkeypatch):
    """A stream bandwidth measured while other processes loaded a 2-core VM (18.8 GB/s, where 31-34 is usual) was
    cached for good, and every bw_util read 1.7x high: such ceilings serve their call and are measured again."""
    monkeypatch.setattr(_Window, "others", 0.5)
    busy = ceilings(FP, threads=1)
    assert fake_measure == [1] and busy.gemm_gflop_s == 101.0 and not cache_file().exists()
    # Said, so that no measurement takes a share of them: a trial's flop_util read 0.77 where 0.30 was true.
    assert busy.details["disturbed"] == "others took 50% of the CPUs while they were measured"
    import importlib

    measure_module = importlib.import_module("dsnas.profiler.measure")  # the module, not the function
    monkeypatch.setattr(measure_module, "ceilings", lambda fp, threads: busy)
    used = measure_module._ceilings(torch.device("cpu"), FP, 1, {})
    assert used["reference_ms"] is None  # no host-speed reference either: it was measured as slowly
    assert used["unusable"] == ("the CPU ceilings were not measured undisturbed (others took 50% of the CPUs while "
                                "they were measured)")
    monkeypatch.setattr(_Window, "others", 0.0)
    quiet = ceilings(FP, threads=1)
    assert fake_measure == [1, 1] and quiet.gemm_gflop_s == 102.0 and cache_file().exists()
    assert ceilings(FP, threads=1) == quiet and fake_measure == [1, 1]


def test_ceilings_measured_where_others_share_cannot_be_read_are_not_cached(fake_measure, monkeypatch):
    """Without /proc/stat (macOS) an unknown share read as quiet: ceilings measured beside two CPU hogs (15 GFLOP/s
    where 196 is usual) were cached for good, and every flop_util after read 10x high."""
    monkeypatch.setattr(_Window, "others", None)
    ceilings(FP, threads=1)
    ceilings(FP, threads=1)
    assert fake_measure == [1, 1] and not cache_file().exists()
    unknown = Share(None, None, "/proc/stat not readable", host_slowdown=1.0)
    assert unknown.disturbed() is None  # the host's speed probe alone does not make a window quiet
    assert Share(None, None, "/proc/stat not readable", host_slowdown=2.0).disturbed() is True


def test_another_fingerprint_or_thread_count_measures_again(fake_measure):
    a = ceilings(FP, threads=1)
    b = ceilings({**FP, "cpu": "Other CPU"}, threads=1)
    c = ceilings(FP, threads=2)
    assert fake_measure == [1, 1, 2] and len({a.gemm_gflop_s, b.gemm_gflop_s, c.gemm_gflop_s}) == 3
    assert ceilings(FP, threads=1) == a and len(fake_measure) == 3
    stored = json.loads(cache_file().read_text())
    assert stored["_type"] == "dsnas.ceilings_cache" and len(stored["entries"]) == 3


@pytest.mark.parametrize("text", ["{not json", "[]", '{"_type": "something else", "entries": {}}', "\x00\xff"])
def test_a_corrupt_cache_file_is_ignored_and_replaced(cache_dir, fake_measure, text):
    cache_dir.mkdir()
    (cache_dir / "ceilings.json").write_text(text)
    got = ceilings(FP, threads=1)
    assert fake_measure == [1]
    assert json.loads(cache_file().read_text())["_type"] == "dsnas.ceilings_cache"
    assert ceilings(FP, threads=1) == got and fake_measure == [1]
    assert not list(cache_dir.glob(".ceilings-*"))  # no temp file left behind


def test_a_malformed_entry_is_measured_again(fake_measure):
    ceilings(FP, threads=1)
    stored = json.loads(cache_file().read_text())
    for entry in stored["entries"].values():
        del entry["ceilings"]["gemm_gflop_s"]
    cache_file().write_text(json.dumps(stored))
    assert ceilings(FP, threads=1).gemm_gflop_s == 102.0 and fake_measure == [1, 1]


def test_a_cache_that_cannot_be_written_costs_a_measurement_not_a_crash(tmp_path, monkeypatch, fake_measure):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("DSNAS_CACHE_DIR", str(blocker / "cache"))  # a folder inside a file cannot be made
    assert ceilings(FP, threads=1).gemm_gflop_s == 101.0
    assert ceilings(FP, threads=1).gemm_gflop_s == 102.0


def test_the_default_cache_is_under_the_user_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("DSNAS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_file() == tmp_path / "dsnas" / "ceilings.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_file() == tmp_path / ".cache" / "dsnas" / "ceilings.json"


def test_the_cpu_ceilings_and_the_host_probe_run_fp32_whatever_the_default_dtype(monkeypatch):
    """Under torch.set_default_dtype(torch.float64) the "fp32" GEMM peak, the copy bandwidth and the host-speed
    probe ran in fp64: the peak and bandwidth about half (cached: every fp32 flop_util and bw_util read ~2x high),
    and every probe against the fp32 reference read the host 2x slowed, so every measurement was flagged disturbed."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dsnas.profiler import host_speed

    seen: set[torch.dtype] = set()

    class Dtypes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.copy_):
                seen.update(a.dtype for a in args if isinstance(a, torch.Tensor))
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(ceil, "GEMM_SIZES", (64,))
    monkeypatch.setattr(ceil, "STREAM_ARRAY_BYTES", 4096)
    monkeypatch.setattr(host_speed, "PROBE_S", 0.001)
    monkeypatch.setattr(ceil, "_best_seconds", lambda fn, budget_s: (fn(), (1e-3, 1))[1])
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with Dtypes():
            ceil.measure_ceilings(1)
    finally:
        torch.set_default_dtype(before)
    assert seen == {torch.float32}


def test_gpu_peaks_without_a_gpu_say_why():
    peaks = gpu_peaks("cpu")
    assert (peaks.memory_gb_s, peaks.fp32_gflop_s, peaks.bf16_tensor_gflop_s) == (None, None, None)
    assert set(peaks.details) == {"memory", "fp32", "bf16_tensor"} and all(peaks.details.values())


def h100_props(**kw):
    base = dict(name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132, clock_rate=1_980_000,
                memory_clock_rate=2_619_000, memory_bus_width=5120)
    return SimpleNamespace(**{**base, **kw})


@pytest.fixture
def fake_cuda(monkeypatch):
    def install(props):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: props)
    return install


def test_gpu_peaks_from_device_properties_match_the_datasheet(fake_cuda):
    fake_cuda(h100_props())
    peaks = gpu_peaks("cuda:0")
    assert peaks.memory_gb_s == pytest.approx(3352.3, rel=1e-3)  # H100 SXM datasheet: 3.35 TB/s
    assert peaks.fp32_gflop_s == pytest.approx(132 * 128 * 2 * 1.98e9 / 1e9)  # datasheet: 67 TFLOP/s
    assert peaks.bf16_tensor_gflop_s == pytest.approx(132 * 2048 * 2 * 1.98e9 / 1e9)
    assert "5120-bit" in peaks.details["memory"] and "cudaDeviceProp" in peaks.details["memory"]


def test_gpu_peaks_fall_back_to_nvml_clocks_when_cuda_reports_none(fake_cuda, monkeypatch):
    fake_cuda(h100_props(clock_rate=0, memory_clock_rate=0))
    facts = {"gpu_max_sm_clock_mhz": 1980, "gpu_max_mem_clock_mhz": 2619, "gpu_memory_bus_bits": 5120}
    monkeypatch.setattr("dsnas.profiler.ceilings.nvml_facts", lambda device: facts)
    peaks = gpu_peaks("cuda:0")
    assert peaks.memory_gb_s == pytest.approx(3352.3, rel=1e-3) and "NVML" in peaks.details["memory"]


def test_gpu_peaks_that_cannot_be_derived_are_none_with_a_reason(fake_cuda, monkeypatch):
    fake_cuda(h100_props(major=7, minor=5, clock_rate=0, memory_clock_rate=0))

    def no_nvml(device):
        raise RuntimeError("unavailable: driver not loaded")

    monkeypatch.setattr("dsnas.profiler.ceilings.nvml_facts", no_nvml)
    peaks = gpu_peaks("cuda:0")
    assert (peaks.memory_gb_s, peaks.fp32_gflop_s, peaks.bf16_tensor_gflop_s) == (None, None, None)
    assert "driver not loaded" in peaks.details["memory"]
    assert peaks.details["fp32"] == "no per-SM rate known for sm_75"


def test_gpu_peaks_per_precision_match_the_h100_datasheet_at_its_boost_clock(fake_cuda):
    fake_cuda(h100_props(clock_rate=1_830_000))  # the datasheet's figures are at 1830 MHz
    peaks = gpu_peaks("cuda:0").by_precision()
    tflop_s = {k: round(v / 1e3) for k, v in peaks.items()}
    # H100 SXM dense: fp32 67, tf32 495, bf16/fp16 989, fp8 1979, int8 1979 (TOPS); 2:4 sparse doubles the tensor cores'.
    assert tflop_s == {"fp32": 62, "tf32": 495, "bf16": 989, "fp16": 989, "fp8": 1979, "int8": 1979, "bf16-2:4": 1979,
                       "fp16-2:4": 1979, "fp8-2:4": 3958, "int8-2:4": 3958}


def test_no_layer_shape_of_the_shipped_spaces_beats_the_gemm_ceiling():
    """A ceiling is a limit: the matrix products of the searched models (quickstart widths, 32 x 64 tokens) must not
    run faster than it. Measured at 1024-2048 alone, the ceiling was beaten by these cache-resident shapes."""
    threads = os.cpu_count() or 1  # as trials are measured: every core (the gap showed with 2 threads, not 1)
    peak = ceil.measure_ceilings(threads=threads).gemm_gflop_s
    rates = {}
    with cpu_threads(threads):
        for m, k, n in ((2048, 64, 256), (2048, 128, 512), (64, 512, 512), (2048, 96, 384)):
            a, b, out = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
            seconds, _ = ceil._best_seconds(lambda: torch.mm(a, b, out=out), budget_s=0.2, min_reps=10)
            rates[m, k, n] = 2 * m * k * n / seconds / 1e9
    if max(rates.values()) > 1.15 * peak:  # a ceiling is the best of its measurements, as dsnas keeps it on a
        peak = max(peak, ceil.measure_ceilings(threads=threads).gemm_gflop_s)  # slow host (79 GFLOP/s, usually 200)
    assert all(rate <= 1.15 * peak for rate in rates.values()), (rates, peak)


def test_the_stored_host_speed_reference_is_read_without_measuring(monkeypatch):
    """`dsnas doctor`'s host-speed row judges its probes against the reference stored with this machine's ceilings
    (a slow spell can outlast its second of probes); reading it measures nothing, and no entry reads as None."""
    from dsnas.profiler.device import fingerprint

    monkeypatch.setattr(ceil, "measure_ceilings", lambda threads=None: pytest.fail("measured"))
    assert ceil.stored_reference(threads=2) is None
    fp = fingerprint(torch.device("cpu"))
    stored = Ceilings(120.0, 25.0, 2, 0.01, {"gemm": "g", "stream": "s"}, reference_ms=0.197)
    store_entry(cache_file(), ceil.CACHE_TYPE, entry_key(fingerprint=fp, threads=2, method=ceil.CEILING_METHOD),
                {"fingerprint": fp, "threads": 2, "ceilings": stored.as_dict()})
    assert ceil.stored_reference(threads=2) == 0.197
    assert ceil.stored_reference(threads=3) is None  # another thread count has its own reference


def test_doctor_prints_the_ceilings_in_words_with_their_units():
    """`dsnas doctor --ceilings` printed the dataclass as key=value, details dict and all, without units."""
    found = ceil.Ceilings(206.96, 31.4, 2, 1.5, {"gemm": "fp32 torch.mm 1024x1024", "stream": "fp32 copy_",
                                                 "reference": "probes", "measured again": "faster now"}, 4.25)
    assert found.lines() == ["fp32 GEMM peak: 207.0 GFLOP/s (fp32 torch.mm 1024x1024)",
                             "memory bandwidth: 31.4 GB/s (fp32 copy_)", "with 2 thread(s), measured in 1.5 s",
                             "host-speed reference: 4.250 ms (probes)", "measured again: faster now"]


def test_an_account_without_a_home_caches_in_a_folder_of_its_own(monkeypatch, caplog):
    """With HOME unset and no passwd entry (a container's uid, `env -i`), Path.home() raised and every trial failed."""
    import tempfile
    from pathlib import Path

    from dsnas.profiler import cache

    for name in ("DSNAS_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    monkeypatch.setattr(cache, "_SAID_HOMELESS", [])
    expected = Path(tempfile.gettempdir()) / f"dsnas-cache-uid{os.getuid()}"
    assert cache.cache_dir() == expected and cache.cache_dir() == expected
    said = [r.getMessage() for r in caplog.records if "no home folder" in r.getMessage()]
    assert len(said) == 1 and "DSNAS_CACHE_DIR" in said[0]
    monkeypatch.setenv("XDG_CACHE_HOME", "/x")
    assert cache.cache_dir() == Path("/x/dsnas")
