"""What the machine allows: the probe on this (CPU) machine, a faked GPU with a faked NVML, and the fingerprint
fields, without importing torch at module import."""

from __future__ import annotations

import subprocess
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from dsnas.errors import DsnasError
from dsnas.profiler import capabilities as caps
from dsnas.profiler import nvml


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """torch reports one CUDA device (an H200) on this CPU machine; nothing is run on it."""
    props = SimpleNamespace(name="NVIDIA H200", major=9, minor=0, uuid="0f1e2d3c-0000-1111-2222-333344445555",
                            multi_processor_count=132)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: props)
    return props


def test_importing_the_probing_modules_loads_no_torch():
    code = ("import sys, dsnas.profiler.capabilities, dsnas.profiler.ceilings, dsnas.profiler.counting; "
            "print(sorted(m for m in ('torch', 'pynvml') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answers")
def test_probe_on_this_cpu_machine():
    found = caps.probe()
    assert not found["CUDA"].available and found["CUDA"].detail  # unavailable, with a reason
    assert found["CUDA"].detail.startswith(("torch is a CPU build", "no NVIDIA driver/GPU visible"))
    for name in caps.NVML_ROWS:
        assert not found[name].available and found[name].detail.startswith("no NVIDIA GPU"), name
    assert found["CUPTI activities"].detail == "no CUDA device"
    assert found["CPU"].available and found["CPU"].detail.strip("() ")
    assert found["torch"].detail.startswith(torch.__version__)
    assert int(found["threads"].detail.split()[0]) == torch.get_num_threads() > 0


def test_table_has_a_header_and_one_aligned_line_per_capability():
    found = caps.probe()
    lines = found.table().splitlines()
    assert len(lines) == len(found.items) + 1
    assert lines[0].split() == ["capability", "available", "detail"]
    column = lines[0].index("available")
    for line, item in zip(lines[1:], found, strict=True):
        assert line.startswith(item.name)
        assert line[column:].split()[0] == ("yes" if item.available else "no")
    assert found.as_dict()["CPU"] == {"available": found["CPU"].available, "detail": found["CPU"].detail}


def test_probe_reports_a_gpu_and_what_nvml_capabilities_says(fake_gpu, monkeypatch):
    asked = []

    def fake_nvml_capabilities(device):
        asked.append(device)
        return {"nvml": (True, "driver 570.86"), "energy_counter": (True, "1234 J since the driver loaded"),
                "gpm": (False, "GPM: no permission (container)"), "power": (True, "120 W now"),
                "utilization": (True, "gpu 0 %, memory 0 % now"), "clocks": (True, "SM up to 1980 MHz")}

    monkeypatch.setattr(nvml, "nvml_capabilities", fake_nvml_capabilities)
    found = caps.probe()
    assert found["CUDA"].available and "NVIDIA H200 (sm_90)" in found["CUDA"].detail
    assert asked == [torch.device("cuda", 0)]
    assert (found["NVML"].available, found["NVML"].detail) == (True, "driver 570.86")
    assert found["energy counter"].available
    assert (found["GPM"].available, found["GPM"].detail) == (False, "GPM: no permission (container)")
    assert found["clocks"].detail == "SM up to 1980 MHz"


def test_nvml_that_cannot_be_imported_is_unavailable_with_the_reason(fake_gpu, monkeypatch):
    monkeypatch.setitem(sys.modules, "dsnas.profiler.nvml", None)  # makes the import raise ImportError
    found = caps.probe()
    for name in caps.NVML_ROWS:
        assert not found[name].available and "dsnas.profiler.nvml" in found[name].detail, name


def test_asking_for_the_cpu_leaves_the_gpu_rows_unprobed(fake_gpu, monkeypatch):
    monkeypatch.setattr(nvml, "nvml_capabilities", lambda d: pytest.fail("NVML was queried"))
    found = caps.probe("cpu")
    assert found["CUDA"].available and not found["NVML"].available and "not probed" in found["NVML"].detail


def test_a_device_that_is_not_visible_is_an_error_that_names_it(fake_gpu):
    with pytest.raises(DsnasError, match=r"cuda:0\.\.cuda:0.*'cuda:3'"):
        caps.probe("cuda:3")


def test_a_failing_probe_is_one_unavailable_row(monkeypatch):
    monkeypatch.setattr(caps, "_memory", lambda: 1 / 0)
    found = caps.probe()
    assert not found["memory"].available and found["memory"].detail.startswith("probe failed: ZeroDivisionError")


@pytest.mark.parametrize("files, available, words", [
    ({"cpu.max": "150000 100000\n"}, True, "1.50 CPUs"),
    ({"cpu.max": "max 100000\n"}, False, "no quota set"),
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, True, "2.00 CPUs"),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, False, "no quota set"),
    ({}, False, "no cgroup CPU controller"),
])
def test_cgroup_cpu_quota_v1_and_v2(tmp_path, files, available, words):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    found = caps._cgroup_quota(tmp_path)
    assert found.available is available and words in found.detail


def test_fingerprint_fields_on_this_machine():
    fields = caps.fingerprint_fields()
    assert fields["cuda_runtime"] == torch.version.cuda
    assert fields["cpu_features"] == ",".join(caps.cpu_features())
    assert fields["cpu_isa"] == torch.backends.cpu.get_cpu_capability()
    if not torch.cuda.is_available():
        assert not any(key.startswith("gpu_") for key in fields)


def fake_pynvml(missing: tuple[str, ...] = ()) -> types.ModuleType:
    fake = types.ModuleType("pynvml")
    fake.NVMLError = type("NVMLError", (Exception,), {})
    fake.NVML_CLOCK_SM, fake.NVML_CLOCK_MEM = 1, 2
    functions = {"nvmlSystemGetDriverVersion": lambda: b"570.86.15", "nvmlSystemGetCudaDriverVersion": lambda: 12080,
                 "nvmlDeviceGetMaxClockInfo": lambda h, clock: {1: 1980, 2: 3201}[clock],
                 "nvmlDeviceGetMemoryBusWidth": lambda h: 6144}
    for name, fn in functions.items():
        if name not in missing:
            setattr(fake, name, fn)
    return fake


def test_fingerprint_fields_of_a_gpu_come_from_nvml(fake_gpu, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    monkeypatch.setattr(caps, "nvml_handle", lambda device: ("handle", "matched by UUID"))
    fields = caps.fingerprint_fields()
    assert fields["gpu_driver"] == "570.86.15" and fields["cuda_driver"] == "12.8"
    assert (fields["gpu_max_sm_clock_mhz"], fields["gpu_max_mem_clock_mhz"], fields["gpu_memory_bus_bits"]) == (
        1980, 3201, 6144)
    assert "nvml_missing" not in fields


def test_a_figure_an_old_nvml_lacks_is_named_not_fatal(fake_gpu, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(missing=("nvmlDeviceGetMemoryBusWidth",)))
    monkeypatch.setattr(caps, "nvml_handle", lambda device: ("handle", "matched by UUID"))
    fields = caps.fingerprint_fields()
    assert "gpu_memory_bus_bits" not in fields and "gpu_memory_bus_bits" in fields["nvml_missing"]
    assert fields["gpu_driver"] == "570.86.15"


def test_fingerprint_fields_say_why_nvml_is_missing(fake_gpu, monkeypatch):
    monkeypatch.setattr(caps, "nvml_handle", lambda device: (None, "unavailable: driver not loaded"))
    fields = caps.fingerprint_fields()
    assert fields["nvml_error"] == "RuntimeError: unavailable: driver not loaded"


@pytest.mark.parametrize("files, cap", [
    ({"cpu.max": "50000 100000\n"}, 1),  # half a CPU: still one
    ({"cpu.max": "150000 100000\n"}, 2),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),
    ({}, None),
])
def test_the_cpus_a_local_ray_is_given_are_the_affinity_capped_by_the_cgroup_quota(tmp_path, files, cap):
    """A local Ray was started with os.cpu_count(): under `docker --cpus 1` on a 2-core host it ran 2 trials at once,
    and on a 64-core host it would run 64."""
    import os

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    assert caps.usable_cpus(tmp_path) == (min(affinity, cap) if cap else affinity)


def test_the_quota_of_the_process_s_own_cgroup_and_its_parents_is_found(tmp_path, monkeypatch):
    """Only /sys/fs/cgroup's top was read: a quota on the process's own cgroup (systemd-run -p CPUQuota=50%, a
    service) was never seen, and 2 threads measured on half a CPU, throttled 304 times."""
    # cgroup v1's cpu controller (as on this kind of host: v1 controllers beside an empty v2 hierarchy)
    v1 = tmp_path / "v1"
    (v1 / "cpu" / "svc" / "job").mkdir(parents=True)
    (v1 / "cpu" / "svc" / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu" / "svc" / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "cpu" / "svc" / "job" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "svc" / "job" / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "mountinfo").write_text(f"32 31 0:29 / {v1 / 'cpu'} rw,relatime - cgroup cgroup rw,cpu\n"
                                  f"40 31 0:40 / {v1 / 'unified'} rw - cgroup2 cgroup2 rw\n")
    (v1 / "cgroup").write_text("1:cpu:/svc/job\n0::/\n")
    folders = caps.own_cgroup_folders("cpu", v1 / "mountinfo", v1 / "cgroup")
    assert folders == [v1 / "cpu" / "svc" / "job", v1 / "cpu" / "svc", v1 / "cpu"]
    monkeypatch.setattr(caps, "own_cgroup_folders", lambda controller: folders)
    assert caps.cgroup_cpu_max() == ("50000", "100000")  # the parent's quota binds
    # cgroup v2, nested: the tighter of two
    v2 = tmp_path / "v2"
    (v2 / "a.slice" / "b.service").mkdir(parents=True)
    (v2 / "a.slice" / "cpu.max").write_text("300000 100000\n")
    (v2 / "a.slice" / "b.service" / "cpu.max").write_text("150000 100000\n")
    (v2 / "mountinfo").write_text(f"40 31 0:40 / {v2} rw - cgroup2 cgroup2 rw,nsdelegate\n")
    (v2 / "cgroup").write_text("0::/a.slice/b.service\n")
    monkeypatch.undo()
    folders = caps.own_cgroup_folders("cpu", v2 / "mountinfo", v2 / "cgroup")
    assert folders == [v2 / "a.slice" / "b.service", v2 / "a.slice", v2]
    assert caps.own_cgroup_folders("cpu", tmp_path / "none", tmp_path / "none") == []  # not Linux
    monkeypatch.setattr(caps, "own_cgroup_folders", lambda controller: folders)
    assert caps.cgroup_cpu_max() == ("150000", "100000")
    # The usage of the cgroup whose quota binds: a parent's quota is spent by its other children too.
    from dsnas.profiler import disturbance

    (v2 / "a.slice" / "cpu.max").write_text("50000 100000\n")  # now the parent's binds
    (v2 / "a.slice" / "cpu.stat").write_text("usage_usec 900000\n")
    (v2 / "a.slice" / "b.service" / "cpu.stat").write_text("usage_usec 100000\n")
    monkeypatch.setattr(disturbance, "own_cgroup_folders", lambda controller: folders)
    assert caps.binding_quota() == 1 and disturbance.cgroup_usage_s() == 0.9
