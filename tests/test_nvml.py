"""NVML readings (nvml.py, window.py): on CPU against a fake pynvml (tests/fake_pynvml.py), on an NVIDIA GPU
under ``-m gpu``."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from types import SimpleNamespace

import pynvml as real
import pytest
import torch
from fake_pynvml import GPM_IDS, FakeGpu, FakeHandle, FakePynvml

from dsnas.profiler import nvml
from dsnas.profiler.window import WindowResult, _optional_fields, measure_window

UUIDS = ["GPU-0f1e2d3c-0000-1111-2222-333344445555", "GPU-a1b2c3d4-6666-7777-8888-99990000aaaa",
         "GPU-deadbeef-1234-5678-9abc-def012345678"]
BUS_IDS = ["00000000:17:00.0", "00000000:65:00.0", "00000000:B3:00.0"]


class TorchUuid:
    """torch's uuid object: its str has no "GPU-" prefix."""

    def __init__(self, nvml_uuid: str) -> None:
        self.text = nvml_uuid.removeprefix("GPU-")

    def __str__(self) -> str:
        return self.text


def gpus(n: int = 3, **kw) -> list[FakeGpu]:
    return [FakeGpu(uuid=UUIDS[i], bus_id=BUS_IDS[i], **kw) for i in range(n)]


def torch_props(nvml_index: int, uuid: bool = True, pci: bool = True) -> SimpleNamespace:
    bus = int(BUS_IDS[nvml_index].split(":")[1], 16)
    return SimpleNamespace(uuid=TorchUuid(UUIDS[nvml_index]) if uuid else None,
                           **({"pci_domain_id": 0, "pci_bus_id": bus, "pci_device_id": 0} if pci else {}))


@pytest.fixture(autouse=True)
def fresh_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts as a process that has not initialised NVML."""
    monkeypatch.setattr(nvml, "_init_state", {})


@pytest.fixture
def install(monkeypatch: pytest.MonkeyPatch):
    """install(gpus, fail=..., cuda=[props per CUDA index]) -> the fake, importable as pynvml."""

    def _install(devices: list[FakeGpu], fail: dict | None = None, cuda: list | None = None) -> FakePynvml:
        fake = FakePynvml(devices, fail)
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        if cuda is not None:
            monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: cuda[d.index or 0])
        return fake

    return _install


def window(min_s: float = 0.0, **kw) -> WindowResult:
    return measure_window(FakeHandle(0), lambda: None, lambda: None, min_s=min_s, **kw)


def assert_reasons_complete(result: WindowResult) -> None:
    for name in _optional_fields():
        assert (getattr(result, name) is None) == (name in result.unavailable), name


# --- import and handles -----------------------------------------------------------------------------


def test_importing_the_modules_loads_no_pynvml():
    code = "import sys, dsnas.profiler.nvml, dsnas.profiler.window; print('pynvml' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_cpu_device_is_not_an_nvidia_gpu_and_starts_no_nvml(install):
    fake = install(gpus(1))
    assert nvml.nvml_handle(torch.device("cpu")) == (None, "not an NVIDIA GPU")
    assert fake.record.inits == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that sees no CUDA device")
def test_a_cuda_device_torch_cannot_see_is_unavailable_and_starts_no_nvml(install):
    fake = install(gpus(1))
    handle, why = nvml.nvml_handle("cuda:0")
    assert handle is None and why.startswith("unavailable: torch cannot read the device's properties")
    assert fake.record.inits == 0


@pytest.mark.parametrize("uuid_of", [TorchUuid, str, lambda u: u.upper(), lambda u: u.encode()],
                         ids=["torch-uuid", "with-prefix", "upper-case", "bytes"])
def test_handle_found_by_uuid_when_nvml_numbers_devices_differently(install, uuid_of):
    # CUDA_VISIBLE_DEVICES=2,0: CUDA 0 is NVML 2, CUDA 1 is NVML 0.
    install(gpus(3), cuda=[SimpleNamespace(uuid=uuid_of(UUIDS[2])), SimpleNamespace(uuid=uuid_of(UUIDS[0]))])
    handle, how = nvml.nvml_handle(torch.device("cuda", 0))
    assert handle == FakeHandle(2) and how == f"matched by UUID {UUIDS[2]}"
    assert nvml.nvml_handle("cuda:1")[0] == FakeHandle(0)


def test_handle_found_by_pci_bus_id_when_torch_gives_no_uuid(install):
    install(gpus(3), cuda=[torch_props(2, uuid=False), torch_props(1, uuid=False)])
    handle, how = nvml.nvml_handle(torch.device("cuda", 0))
    # NVML writes "00000000:B3:00.0", torch gives ints that format as "0000:b3:00.0".
    assert handle == FakeHandle(2) and how == "matched by PCI bus id 0000:b3:00.0"
    assert nvml.nvml_handle(torch.device("cuda", 1))[0] == FakeHandle(1)


def test_handle_found_by_pci_bus_id_when_the_uuid_does_not_match(install):
    props = torch_props(1)
    props.uuid = TorchUuid("GPU-ffffffff-0000-0000-0000-000000000000")  # e.g. a MIG or vGPU id
    install(gpus(3), cuda=[props])
    assert nvml.nvml_handle(torch.device("cuda", 0))[0] == FakeHandle(1)


def test_no_matching_device_says_what_it_looked_for(install):
    install(gpus(2), cuda=[torch_props(2)])  # NVML sees only two devices, neither is this one
    handle, why = nvml.nvml_handle(torch.device("cuda", 0))
    assert handle is None
    assert why == f"unavailable: none of the 2 NVML devices has UUID {UUIDS[2]} or PCI bus id 0000:b3:00.0"


@pytest.mark.parametrize("error, words", [
    (real.NVMLError_LibraryNotFound, "NVML library not found"),
    (real.NVMLError_DriverNotLoaded, "driver is not loaded"),
    (real.NVMLError_NoPermission, "no permission"),
    (real.NVMLError_NotSupported, "not supported"),
    (real.NVMLError_LibRmVersionMismatch, "versions differ"),
    (real.NVMLError_Timeout, "NVML error: Timeout"),
])
def test_nvml_that_cannot_start_is_unavailable_with_a_reason(install, error, words):
    install(gpus(1), fail={"nvmlInit": error}, cuda=[torch_props(0)])
    handle, why = nvml.nvml_handle(torch.device("cuda", 0))
    assert handle is None and why.startswith("unavailable: ") and words in why


def test_missing_nvidia_ml_py_is_unavailable_with_the_install_hint(install, monkeypatch):
    install(gpus(1), cuda=[torch_props(0)])
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert nvml.nvml_handle(torch.device("cuda", 0)) == (
        None, "unavailable: nvidia-ml-py is not installed (pip install nvidia-ml-py)")


def test_nvml_is_initialised_once_per_process(install):
    fake = install(gpus(1), cuda=[torch_props(0)])
    for _ in range(3):
        nvml.nvml_handle(torch.device("cuda", 0))
    assert fake.record.inits == 1


def test_a_failed_start_is_remembered_not_retried(install):
    fake = install(gpus(1), fail={"nvmlInit": real.NVMLError_DriverNotLoaded}, cuda=[torch_props(0)])
    nvml.nvml_handle(torch.device("cuda", 0))
    nvml.nvml_handle(torch.device("cuda", 0))
    assert fake.record.calls.count("nvmlInit") == 1


def test_a_device_nvml_cannot_open_is_skipped(install):
    fake = install(gpus(2), cuda=[torch_props(1)])
    real_get = fake.nvmlDeviceGetHandleByIndex

    def get(index: int):
        if index == 0:
            raise real.NVMLError_NoPermission()  # another tenant's GPU in the same container host
        return real_get(index)

    fake.nvmlDeviceGetHandleByIndex = get
    assert nvml.nvml_handle(torch.device("cuda", 0))[0] == FakeHandle(1)


# --- GPM support ------------------------------------------------------------------------------------


def test_gpm_supported(install):
    install(gpus(1))
    assert nvml.gpm_supported(FakeHandle(0)) == (True, "GPM supported")


def test_gpm_not_supported_before_hopper(install):
    install(gpus(1, gpm_supported=False))
    ok, why = nvml.gpm_supported(FakeHandle(0))
    assert not ok and why == "GPM: not supported on this device (needs Hopper or newer)"


@pytest.mark.parametrize("error, words", [(real.NVMLError_NoPermission, "GPM: no permission"),
                                          (real.NVMLError_FunctionNotFound, "GPM: the driver's NVML lacks")])
def test_gpm_query_refused(install, error, words):
    install(gpus(1), fail={"nvmlGpmQueryDeviceSupport": error})
    ok, why = nvml.gpm_supported(FakeHandle(0))
    assert not ok and why.startswith(words)


def test_gpm_unknown_to_an_old_nvidia_ml_py(install, monkeypatch):
    install(gpus(1))
    monkeypatch.delattr(FakePynvml, "nvmlGpmQueryDeviceSupport")
    assert nvml.gpm_supported(FakeHandle(0)) == (
        False, "GPM: nvidia-ml-py has no nvmlGpmQueryDeviceSupport (upgrade nvidia-ml-py)")


# --- a window ---------------------------------------------------------------------------------------


def test_window_converts_units(install):
    install(gpus(1, energy_step_mj=2_500, power_mw=[300_000], util=[(50, 20)]))
    result = window()
    assert result.energy_j == pytest.approx(2.5)  # mJ -> J
    assert result.energy_per_call_j == pytest.approx(2.5 / result.calls)
    assert result.power_w_mean == pytest.approx(300.0) and result.power_w_max == pytest.approx(300.0)  # mW -> W
    assert (result.gpu_util, result.mem_util) == (pytest.approx(0.5), pytest.approx(0.2))  # % -> ratio
    assert (result.sm_util, result.sm_occupancy, result.tensor_util, result.dram_bw_util) == (
        pytest.approx(0.8), pytest.approx(0.4), pytest.approx(0.6), pytest.approx(0.3))  # % -> ratio
    assert (result.sm_clock_mhz_start, result.sm_clock_mhz_end, result.sm_clock_mhz_max) == (1755, 1755, 1980)
    assert (result.mem_clock_mhz_start, result.mem_clock_mhz_end, result.mem_clock_mhz_max) == (2619, 2619, 2619)
    assert (result.temperature_c_start, result.temperature_c_end) == (41, 41)  # degrees C, as NVML gives them
    assert result.unavailable == {}
    assert_reasons_complete(result)


def test_energy_is_the_counter_difference_not_its_value(install):
    fake = install(gpus(1, energy_mj=987_654_321_000, energy_step_mj=12_345))
    result = window()
    assert result.energy_j == pytest.approx(12.345)
    assert fake.record.calls.count("nvmlDeviceGetTotalEnergyConsumption") == 2


def test_gpm_request_has_the_version_the_metric_ids_and_the_samples_in_order(install):
    fake = install(gpus(1))
    window()
    [request] = fake.record.metric_requests
    assert request["version"] == real.NVML_GPM_METRICS_GET_VERSION
    assert request["numMetrics"] == 4
    assert request["ids"] == [2, 3, 5, 10] == list(GPM_IDS.values())
    assert [request["sample1"], request["sample2"]] == fake.record.got == fake.record.allocated
    assert sorted(fake.record.freed) == sorted(fake.record.allocated)


def test_a_gpm_metric_the_device_refuses_is_unavailable_and_the_others_are_reported(install):
    install(gpus(1, gpm_errors={real.NVML_GPM_METRIC_ANY_TENSOR_UTIL: real.NVML_ERROR_NOT_SUPPORTED}))
    result = window()
    assert result.tensor_util is None
    assert result.unavailable == {"tensor_util": "GPM: not supported on this device"}
    assert result.sm_util == pytest.approx(0.8) and result.dram_bw_util == pytest.approx(0.3)
    assert "tensor_util" not in result.as_metrics() and "sm_util" in result.as_metrics()


def test_gpm_samples_are_freed_when_the_loop_raises(install):
    fake = install(gpus(1))

    def boom() -> None:
        raise RuntimeError("the model failed")

    with pytest.raises(RuntimeError, match="the model failed"):
        measure_window(FakeHandle(0), boom, lambda: None, min_s=0.0)
    assert fake.record.allocated and sorted(fake.record.freed) == sorted(fake.record.allocated)
    assert not [t for t in threading.enumerate() if t.name == "dsnas-nvml-poll"]  # the poller stopped too


@pytest.mark.parametrize("where", ["nvmlGpmMetricsGet", "nvmlGpmSampleGet"])
def test_gpm_refused_in_a_container_leaves_the_rest_and_frees_the_samples(install, where):
    fake = install(gpus(1), fail={where: real.NVMLError_NoPermission})
    result = window()
    for name in ("sm_util", "sm_occupancy", "tensor_util", "dram_bw_util"):
        assert result.unavailable[name] == "GPM: no permission (containers often deny it)"
    assert result.energy_j == pytest.approx(2.5) and result.power_w_mean is not None
    assert fake.record.allocated and sorted(fake.record.freed) == sorted(fake.record.allocated)
    assert_reasons_complete(result)


def test_gpm_not_supported_takes_no_samples(install):
    fake = install(gpus(1, gpm_supported=False))
    result = window()
    assert fake.record.allocated == [] and fake.record.metric_requests == []
    assert result.unavailable["sm_util"] == "GPM: not supported on this device (needs Hopper or newer)"


def test_a_window_shorter_than_gpm_needs_is_extended_past_100_ms(install):
    install(gpus(1))
    result = window(min_s=0.001)
    assert result.seconds > 0.1 and result.calls > 1


def test_a_window_runs_at_least_min_s_and_counts_the_calls(install):
    install(gpus(1))
    calls = []
    result = measure_window(FakeHandle(0), lambda: calls.append(1), lambda: None, min_s=0.2)
    assert 0.2 <= result.seconds < 0.3 and result.calls == len(calls)


def test_a_zero_energy_window_is_unavailable_never_zero(install):
    install(gpus(1, energy_step_mj=0))
    result = window()
    assert result.energy_j is None and result.energy_per_call_j is None
    assert result.unavailable["energy_j"].startswith("energy counter did not advance in 0.1")
    assert result.unavailable["energy_per_call_j"] == result.unavailable["energy_j"]
    assert "energy_per_call_j" not in result.as_metrics()


def test_an_energy_counter_that_is_not_supported_is_unavailable(install):
    install(gpus(1), fail={"nvmlDeviceGetTotalEnergyConsumption": real.NVMLError_NotSupported})
    result = window()
    assert result.unavailable["energy_j"] == "energy counter: not supported on this device"
    assert result.sm_util == pytest.approx(0.8)
    assert_reasons_complete(result)


def test_power_and_utilization_are_sampled_during_the_window(install):
    install(gpus(1, power_mw=[100_000, 300_000, 200_000], util=[(100, 40), (0, 0)]))
    result = window(min_s=0.2, poll_s=0.01)
    assert result.power_samples >= 5  # the thread's readings plus the one at the end
    assert result.power_w_max == pytest.approx(300.0)
    assert 100.0 < result.power_w_mean < 300.0
    assert 0.0 < result.gpu_util < 1.0


def test_clock_events_are_decoded_into_names(install):
    install(gpus(1, clock_events=0x4 | 0x40 | 0x8000))
    result = window()
    assert result.clock_events_start == ["sw_power_cap", "hw_thermal_slowdown", "unknown_0x8000"]
    assert result.clock_events_end == result.clock_events_start


def test_clock_events_fall_back_to_the_throttle_reasons_of_an_older_nvidia_ml_py(install, monkeypatch):
    fake = install(gpus(1, clock_events=0x1))
    monkeypatch.delattr(FakePynvml, "nvmlDeviceGetCurrentClocksEventReasons")
    result = window()
    assert result.clock_events_start == ["gpu_idle"]
    assert "nvmlDeviceGetCurrentClocksThrottleReasons" in fake.record.calls


def test_every_figure_refused_leaves_the_timing_and_a_reason_for_each(install):
    refused = ["nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetPowerUsage", "nvmlDeviceGetUtilizationRates",
               "nvmlDeviceGetClockInfo", "nvmlDeviceGetMaxClockInfo", "nvmlDeviceGetCurrentClocksEventReasons",
               "nvmlDeviceGetTemperature", "nvmlGpmQueryDeviceSupport"]
    install(gpus(1), fail=dict.fromkeys(refused, real.NVMLError_NoPermission))
    result = window()
    assert result.calls > 0 and result.seconds > 0.1
    assert set(result.unavailable) == set(_optional_fields())
    assert all("no permission" in why for why in result.unavailable.values())
    assert result.as_metrics() == {}


def test_no_handle_still_runs_the_window(install):
    result = measure_window(None, lambda: None, lambda: None, min_s=0.0)
    assert result.calls > 0 and result.unavailable["energy_j"] == "no NVML handle"
    assert_reasons_complete(result)


def test_as_metrics_and_as_profile(install):
    install(gpus(1, clock_events=0x4))
    result = window()
    assert result.as_metrics() == {
        "energy_per_call_j": pytest.approx(2.5 / result.calls), "power_w": 300.0, "power_w_max": 300.0,
        "gpu_util": 0.5, "mem_util": 0.2, "sm_util": 0.8, "sm_occupancy": 0.4, "tensor_util": 0.6,
        "dram_bw_util": 0.3, "sm_clock_mhz": 1755.0}
    profile = json.loads(json.dumps(result.as_profile()))
    assert profile["clock_events_start"] == ["sw_power_cap"] and profile["unavailable"] == {}
    assert profile["energy_j"] == pytest.approx(2.5) and profile["calls"] == result.calls


def test_as_profile_keeps_the_reasons_and_drops_the_missing_numbers(install):
    install(gpus(1, energy_step_mj=0))
    profile = window().as_profile()
    assert "energy_j" not in profile and "energy_j" in profile["unavailable"]


# --- capabilities -------------------------------------------------------------------------------------


def test_capabilities_all_available(install):
    install(gpus(1), cuda=[torch_props(0)])
    caps = nvml.nvml_capabilities(torch.device("cuda", 0))
    assert set(caps) == {"nvml", "energy_counter", "gpm", "power", "utilization", "clocks", "process_utilization",
                         "clock_slowdowns"}
    assert all(ok for ok, _ in caps.values()), caps
    assert caps["nvml"][1].startswith("driver 570.124.06")
    assert caps["clocks"] == (True, "SM up to 1980 MHz")
    assert caps["process_utilization"] == (True, "other processes' SM use readable")
    assert caps["clock_slowdowns"] == (True, "power 7.0 s, thermal 0.0 s held down since the driver loaded")


def test_capabilities_say_why_the_gpu_disturbance_readings_are_missing(install):
    install(gpus(1), cuda=[torch_props(0)], fail={"nvmlDeviceGetProcessUtilization": real.NVMLError_NoPermission,
                                                  "nvmlDeviceGetViolationStatus": real.NVMLError_NotSupported})
    caps = nvml.nvml_capabilities(torch.device("cuda", 0))
    assert caps["process_utilization"] == (False, "process utilization: no permission (containers often deny it)")
    assert caps["clock_slowdowns"] == (False, "clock slowdowns: not supported on this device")
    assert caps["power"][0]  # the rest still read


def test_capabilities_without_nvml_all_say_why(install):
    install(gpus(1), fail={"nvmlInit": real.NVMLError_LibraryNotFound}, cuda=[torch_props(0)])
    caps = nvml.nvml_capabilities(torch.device("cuda", 0))
    assert {ok for ok, _ in caps.values()} == {False}
    assert all("NVML library not found" in why for _, why in caps.values())


def test_capabilities_find_gpm_refused_by_the_container(install):
    fake = install(gpus(1), fail={"nvmlGpmSampleGet": real.NVMLError_NoPermission,
                                  "nvmlDeviceGetTotalEnergyConsumption": real.NVMLError_NotSupported},
                   cuda=[torch_props(0)])
    caps = nvml.nvml_capabilities(torch.device("cuda", 0))
    assert caps["gpm"] == (False, "GPM: no permission (containers often deny it)")
    assert caps["energy_counter"] == (False, "energy counter: not supported on this device")
    assert caps["power"][0] and sorted(fake.record.freed) == sorted(fake.record.allocated)


def test_capabilities_of_the_cpu(install):
    caps = nvml.nvml_capabilities(torch.device("cpu"))
    assert set(caps.values()) == {(False, "not an NVIDIA GPU")}


# --- on a real NVIDIA GPU -----------------------------------------------------------------------------

@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch):
    """(device, handle) of the current CUDA device, with the real pynvml."""
    monkeypatch.setitem(sys.modules, "pynvml", real)
    device = torch.device("cuda", torch.cuda.current_device())
    handle, why = nvml.nvml_handle(device)
    assert handle is not None, why
    return device, handle


def run_window(device, handle, fn, min_s: float = 1.0) -> WindowResult:
    sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
    for _ in range(5):  # warm up: cuBLAS heuristics, clocks leaving idle
        fn()
    return measure_window(handle, fn, sync, min_s=min_s)


def gpm_or_skip(result: WindowResult, *names: str) -> None:
    for name in names:
        why = result.unavailable.get(name, "")
        if "no permission" in why:
            pytest.skip(f"this container denies GPM: {why}")
        assert name not in result.unavailable, why


@pytest.mark.gpu
def test_gpm_supported_on_hopper(gpu):
    device, handle = gpu
    if torch.cuda.get_device_capability(device) < (9, 0):
        pytest.skip("GPM needs compute capability 9.0 (Hopper) or newer")
    assert nvml.gpm_supported(handle) == (True, "GPM supported")


@pytest.mark.gpu
def test_energy_counter_advances_over_a_second_of_matmuls(gpu):
    device, handle = gpu
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    result = run_window(device, handle, lambda: a @ a, min_s=1.0)
    assert result.energy_j is not None, result.unavailable
    assert result.seconds >= 1.0 and result.energy_per_call_j > 0
    assert 30 < result.energy_j / result.seconds < 1500  # watts: between idle and any board's limit
    assert result.power_samples >= 5 and result.power_w_max >= result.power_w_mean > 0


@pytest.mark.gpu
def test_gemm_is_sm_bound_and_copy_is_dram_bound(gpu):
    device, handle = gpu
    if not nvml.gpm_supported(handle)[0]:
        pytest.skip(nvml.gpm_supported(handle)[1])
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)  # 1.1 TFLOP on 384 MB: compute-bound
    gemm = run_window(device, handle, lambda: a @ a, min_s=1.0)
    src = torch.empty(2**30, device=device, dtype=torch.uint8)  # 2 GiB moved a call, no arithmetic
    dst = torch.empty_like(src)
    copy = run_window(device, handle, lambda: dst.copy_(src), min_s=1.0)
    gpm_or_skip(gemm, "sm_util", "dram_bw_util")
    gpm_or_skip(copy, "dram_bw_util")
    assert gemm.sm_util > 0.5, gemm.as_profile()
    assert copy.dram_bw_util > 0.5, copy.as_profile()
    assert copy.dram_bw_util > gemm.dram_bw_util, (gemm.as_profile(), copy.as_profile())
