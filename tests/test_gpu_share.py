"""What NVML saw of the GPU while a measurement was timed (dsnas.profiler.gpu_share): other processes' share of the
SMs, and the share of the window the clocks were held down. On CPU against a fake pynvml (tests/fake_pynvml.py); on
an NVIDIA GPU under ``-m gpu``, with a real second process on the device."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pynvml as real
import pytest
import torch
from fake_pynvml import FakeGpu, FakeHandle, FakePynvml

from dsnas.profiler import nvml
from dsnas.profiler.disturbance import GPU_SCOPE, GPU_THRESHOLD, MachineWindow, Share, least_disturbed, sample_share
from dsnas.profiler.gpu_share import GpuShare, GpuWindow
from dsnas.profiler.measure import _add_disturbance

ME = os.getpid()
POWER, THERMAL = real.NVML_PERF_POLICY_POWER, real.NVML_PERF_POLICY_THERMAL


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch):
    """fake(processes=..., violation_step_ns=..., fail=...) -> (the fake, importable as pynvml; its device's handle)."""
    monkeypatch.setattr(nvml, "_init_state", {"reason": None})

    def _install(fail: dict | None = None, **gpu) -> tuple[FakePynvml, FakeHandle]:
        module = FakePynvml([FakeGpu(uuid="GPU-0", bus_id="00000000:17:00.0", **gpu)], fail)
        monkeypatch.setitem(sys.modules, "pynvml", module)
        return module, FakeHandle(0)

    return _install


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def window(handle: FakeHandle, seconds: float = 0.5, busy: bool = True) -> GpuShare:
    clock = Clock()
    with GpuWindow(handle, busy=busy, clock=clock) as w:
        clock.now += seconds
    return w.share


def test_another_process_on_the_sms_is_others_share_and_this_process_is_not(fake):
    _, handle = fake(processes=[(ME, 95), (4242, 40), (4343, 15)])
    share = window(handle)
    assert share.others == pytest.approx(0.55) and share.unavailable == ""
    assert Share(0.0, 0.0, gpu=share).disturbed() is True  # 55% of the SMs to others: far past the 10% line


def test_alone_on_the_gpu_is_zero_and_not_disturbed(fake):
    _, handle = fake(processes=[(ME, 99)])
    share = window(handle)
    assert share.others == 0.0
    assert Share(0.0, 0.0, gpu=share).disturbed() is False


def test_others_share_is_at_most_the_whole_device(fake):
    _, handle = fake(processes=[(ME, 50), (1, 80), (2, 70)])
    assert window(handle).others == 1.0


def test_in_a_container_this_process_is_not_among_nvmls_pids_so_others_are_unknown_never_zero(fake):
    """NVML names host PIDs: in a container the measuring process has another, and every sample looks foreign."""
    _, handle = fake(processes=[(987654, 97)])
    share = window(handle)
    assert share.others is None and "PID namespace" in share.unavailable and f"pid {ME}" in share.unavailable
    assert Share(None, None, "no /proc/stat", gpu=share).disturbed() is None  # nothing known: not called quiet


def test_while_this_process_waits_every_other_process_counts_and_none_is_quiet(fake):
    """Waiting for a disturbance to pass, this process uses no GPU: no sample of its own is expected."""
    module, handle = fake(processes=[(987654, 30)])
    assert window(handle, busy=False).others == pytest.approx(0.30)
    module.gpus[0].processes = []  # NVML_ERROR_NOT_FOUND: no process used the GPU since the window opened
    assert window(handle, busy=False).others == 0.0
    assert window(handle, busy=True).others is None  # but a timing window without this process's sample: unknown


def test_an_empty_answer_nvidia_ml_py_raises_as_success_is_no_process(fake, monkeypatch):
    """nvidia-ml-py raises NVMLError(NVML_SUCCESS) when the driver's size query finds nothing to size."""
    module, handle = fake()

    def empty(_handle, _since):
        raise real.NVMLError(real.NVML_SUCCESS)

    monkeypatch.setattr(module, "nvmlDeviceGetProcessUtilization", empty, raising=False)
    assert window(handle, busy=False).others == 0.0


def test_per_process_utilization_refused_is_unknown_with_the_reason(fake):
    _, handle = fake(processes=[(ME, 90)], fail={"nvmlDeviceGetProcessUtilization": real.NVMLError_NoPermission})
    share = window(handle)
    assert share.others is None and share.unavailable == "others' GPU use: no permission (containers often deny it)"
    assert share.throttled == 0.0  # the violation counters still read


def test_throttled_share_is_the_violation_time_over_the_window(fake):
    """0.2 s held down by the power limit and 0.1 s by heat in a 0.5 s window."""
    _, handle = fake(processes=[(ME, 90)], violation_step_ns={POWER: 200_000_000, THERMAL: 100_000_000})
    assert window(handle, seconds=0.5).throttled == pytest.approx(0.6)
    _, handle = fake(processes=[(ME, 90)], violation_step_ns={POWER: 500_000_000, THERMAL: 400_000_000})
    assert window(handle, seconds=0.5).throttled == 1.0  # power and heat at once: at most the whole window


def test_a_throttled_gpu_is_recorded_but_not_a_disturbance(fake):
    """A model that loads the GPU to its power limit runs at that speed whenever it runs: no retry would change it."""
    _, handle = fake(processes=[(ME, 99)], violation_step_ns={POWER: 500_000_000})
    share = window(handle, seconds=0.5)
    assert share.throttled == 1.0 and share.others == 0.0
    assert Share(0.0, 0.0, gpu=share).disturbed() is False
    assert Share(0.0, 0.0, gpu=share).as_dict()["gpu_throttled_share"] == 1.0


def test_violation_counters_the_driver_refuses_leave_the_throttled_share_unknown(fake):
    _, handle = fake(processes=[(ME, 90)], fail={"nvmlDeviceGetViolationStatus": real.NVMLError_NotSupported})
    share = window(handle)
    assert share.throttled is None and share.others == 0.0
    assert share.unavailable == "clock slowdowns: not supported on this device"


def test_gpu_line_and_severity():
    quiet, busy = GpuShare(0.05, 0.0), GpuShare(2 * GPU_THRESHOLD, 0.0)
    assert Share(0.0, 0.0, gpu=quiet).disturbed() is False
    assert Share(0.0, 0.0, gpu=busy).severity() == pytest.approx(2.0)
    # The worst reading decides: a busy host CPU with a quiet GPU is still disturbed.
    assert Share(0.5, 0.0, gpu=quiet).disturbed() is True
    # A CPU timing's record is unchanged: no GPU keys.
    assert set(Share(0.0, 0.0).as_dict()) == {"others_cpu_share", "steal_share", "host_slowdown"}


def test_a_co_tenant_makes_the_measurement_retry_and_the_least_disturbed_is_kept(fake):
    """Through least_disturbed, as measure() does: a GPU shared with another process is measured again; once the
    other process leaves, that attempt is kept and the record says so, with the GPU in its scope."""
    module, handle = fake(processes=[(ME, 60), (4242, 70)])

    def attempt() -> tuple[str, Share]:
        # The host's CPUs unread, so that only the GPU decides (a busy test machine must not add attempts).
        with MachineWindow((handle, ""), read=lambda: "no /proc/stat in this test") as w:
            time.sleep(0.01)
        return f"attempt with {len(module.gpus[0].processes)} processes", w.share

    def settle() -> None:
        module.gpus[0].processes = [(ME, 95)]  # the other process ends while this one waits

    result, record = least_disturbed(attempt, settle)
    assert result == "attempt with 1 processes" and record["kept"] == 1
    assert [a["others_gpu_share"] for a in record["attempts"]] == [0.7, 0.0]
    assert record["disturbed"] is False and record["scope"] == GPU_SCOPE


def test_a_gpu_without_an_nvml_handle_says_why_in_the_record_and_the_profile():
    with MachineWindow((None, "unavailable: the NVIDIA driver is not loaded")) as w:
        pass
    _, record = least_disturbed(lambda: (None, w.share), lambda: None)
    assert record["others_gpu_share"] is None and record["scope"] == GPU_SCOPE
    assert record["gpu_unavailable"] == "unavailable: the NVIDIA driver is not loaded"
    profile = {"unavailable": {}}
    _add_disturbance(profile, record)
    assert profile["unavailable"]["gpu disturbance"] == "unavailable: the NVIDIA driver is not loaded"


def test_waiting_for_quiet_samples_the_gpu_too(fake):
    _, handle = fake(processes=[(4242, 50)])
    share = sample_share(0.01, (handle, ""))
    assert share.gpu is not None and share.gpu.others == pytest.approx(0.5) and share.severity() >= 5.0
    assert sample_share(0.01).gpu is None  # the CPU's: no GPU reading at all


# --- On an NVIDIA GPU -----------------------------------------------------------------------------------------

def _co_tenant():
    """benchmarks/gpu_co_tenant.py, loaded by path (benchmarks/ is no package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_co_tenant.py"
    spec = importlib.util.spec_from_file_location("gpu_co_tenant", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_co_tenant_that_is_not_ready_in_time_is_killed_and_said_not_waited_for():
    """The GPU check must not hang on a CUDA start that hangs: the child is killed at the deadline."""
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="the co-tenant process did not start: exit status -9"):
        _co_tenant().start(30, ready_within_s=0.01)  # importing torch alone takes longer
    assert time.monotonic() - started < 10


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
def test_a_process_running_gemms_on_the_same_gpu_is_detected():
    """A second process loops bf16 GEMMs on the same GPU through the whole measurement: every attempt sees it, so
    the measurement is disturbed after its retries; the throttled share is a share."""
    from dsnas.models import build
    from dsnas.profiler import measure
    from dsnas.spec import HardwareSpec, TaskSpec
    from dsnas.tasks import make_task

    task = make_task(TaskSpec("charlm", {"corpus_bytes": 200_000, "context": 64}, "."))
    model = build({"family": "transformer_lm", "d_model": 512, "layers": [{"n_heads": 8, "ffn_ratio": 4}] * 2,
                   **task.arch_defaults()}).cuda()
    hog = _co_tenant().start(60)
    try:
        _, profile = measure(model, task, torch.device("cuda"), HardwareSpec(
            device="cuda", batch_sizes=(32,), warmup_s=0.2, measure_s=0.5, max_measure_s=0.5, steady_s=0.2))
    finally:
        hog.kill()
        hog.wait()
    record = profile["batches"]["32"]["disturbance"]
    assert "gpu_unavailable" not in record, f"others' GPU use unreadable here: {record['gpu_unavailable']}"
    assert min(a["others_gpu_share"] for a in record["attempts"]) >= GPU_THRESHOLD, record
    assert record["disturbed"] is True and profile["disturbed"] is True
    assert 0.0 <= record["gpu_throttled_share"] <= 1.0
