"""A disturbed measurement is caught: others' and steal's share of the CPUs from recorded /proc/stat snapshots
(exact numbers), a real CPU hog started during a measurement, the bounded retries with a fake sampler, and the
flag in the trial table and the report."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from dsnas.profiler.disturbance import (
    MAX_ATTEMPTS,
    CpuSnapshot,
    CpuWindow,
    Share,
    cgroup_quota,
    cgroup_usage_s,
    cpu_share,
    least_disturbed,
    parse_stat,
    snapshot,
    wait_for_quiet,
)

# Two recorded /proc/stat readings of a 2-CPU machine, 2 s apart (clock ticks of 1/100 s). Columns: user nice
# system idle iowait irq softirq steal guest guest_nice; guest time is already inside user and nice.
STAT_START = """cpu  300 20 100 5000 40 0 10 5 30 0
cpu0 150 10 50 2500 20 0 5 0 30 0
cpu1 150 10 50 2500 20 0 5 5 0 0
intr 1 2 3
ctxt 99
"""
STAT_END = """cpu  540 20 170 5100 40 0 20 25 90 0
cpu0 270 10 90 2540 20 0 10 0 90 0
cpu1 270 10 80 2560 20 0 10 25 0 0
intr 1 2 3
ctxt 123
"""


def test_busy_and_steal_seconds_from_proc_stat_text():
    assert parse_stat(STAT_START) == pytest.approx((4.30, 0.05))  # user+nice+system+irq+softirq; steal
    assert parse_stat(STAT_START, cpus=[0, 1]) == pytest.approx((4.30, 0.05))
    assert parse_stat(STAT_END, cpus=[1]) == pytest.approx((3.70, 0.25))
    assert parse_stat(STAT_END, cpus=[1], hz=1000) == pytest.approx((0.37, 0.025))
    assert parse_stat(STAT_END, cpus=[7]) == parse_stat(STAT_END)  # a CPU without its line: the whole machine


def test_others_and_steal_share_of_the_cpus_this_process_may_use():
    def snap(text: str, wall: float, own: float, cpus: list[int]) -> CpuSnapshot:
        return CpuSnapshot(wall, *parse_stat(text, cpus), own, len(cpus))

    # Both CPUs: busy 7.50 - 4.30 = 3.20 CPU-s in 2 s of 2 CPUs (4 CPU-s); this process used 1.70 of them.
    share = cpu_share(snap(STAT_START, 10.0, 5.0, [0, 1]), snap(STAT_END, 12.0, 6.7, [0, 1]))
    assert share.others == pytest.approx((3.20 - 1.70) / 4) and share.steal == pytest.approx(0.20 / 4)
    assert share.load == pytest.approx(0.425) and share.disturbed(0.25) and not share.disturbed(0.5)
    # Only CPU 1 in the affinity: its busy 3.70 - 2.15 = 1.55, of which this process's 0.90, over 2 CPU-s.
    share = cpu_share(snap(STAT_START, 10.0, 5.0, [1]), snap(STAT_END, 12.0, 5.9, [1]))
    assert share.others == pytest.approx(0.325) and share.steal == pytest.approx(0.10)
    # The ticks of /proc/stat against rusage's finer clock: never below 0 or above 1.
    assert cpu_share(snap(STAT_START, 10.0, 5.0, [0, 1]), snap(STAT_END, 12.0, 9.0, [0, 1])).others == 0.0
    assert cpu_share(snap(STAT_START, 10.0, 5.0, [0, 1]), snap(STAT_END, 10.5, 5.0, [0, 1])).others == 1.0


def test_under_a_cgroup_quota_other_processes_of_the_cgroup_count_against_the_quota():
    # 16 idle-ish CPUs, a 2-CPU quota: a sibling process in the cgroup used 1.2 of the quota's 2 CPU-s in 1 s.
    start = CpuSnapshot(0.0, 100.0, 0.0, 10.0, 16, group_s=50.0, quota=2.0)
    end = CpuSnapshot(1.0, 102.0, 0.0, 10.8, 16, group_s=52.0, quota=2.0)
    share = cpu_share(start, end)
    assert share.others == pytest.approx((2.0 - 0.8) / 2.0)  # the machine-wide share would be 1.2 / 16
    assert cpu_share(start, CpuSnapshot(1.0, 102.0, 0.0, 10.8, 16)).others == pytest.approx(1.2 / 16)


def test_cgroup_quota_and_usage_files(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    (tmp_path / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\n")
    assert cgroup_quota(tmp_path) == 1.5 and cgroup_usage_s(tmp_path) == 2.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpuacct").mkdir()
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "cpuacct" / "cpuacct.usage").write_text("3000000000\n")
    assert cgroup_quota(v1) == 2.0 and cgroup_usage_s(v1) == 3.0
    assert cgroup_quota(tmp_path / "none") is None and cgroup_usage_s(tmp_path / "none") is None


def test_without_proc_stat_the_share_is_unavailable_with_a_reason_never_zero(tmp_path):
    missing = tmp_path / "stat"
    assert "not readable" in snapshot(stat=missing)
    with CpuWindow(read=lambda: snapshot(stat=missing)) as window:
        pass
    assert window.share.others is None and window.share.disturbed() is None
    result, record = least_disturbed(lambda: ("timing", window.share), lambda: pytest.fail("nothing to wait for"))
    assert result == "timing" and record["disturbed"] is None and record["others_cpu_share"] is None
    assert len(record["attempts"]) == 1 and str(missing) in record["unavailable"]


def test_a_live_window_reads_this_machine():
    if not Path("/proc/stat").exists():
        pytest.skip("no /proc/stat (not Linux)")
    with CpuWindow() as window:
        sum(i * i for i in range(200_000))
    assert 0.0 <= window.share.others <= 1.0 and 0.0 <= window.share.steal <= 1.0 and not window.share.unavailable


class FakeMachine:
    """Shares in order, one per measurement; counts the waits between them."""

    def __init__(self, *others: float) -> None:
        self.shares = [Share(o, 0.0) for o in others]
        self.measured = self.waits = 0

    def attempt(self) -> tuple[str, Share]:
        self.measured += 1
        return f"timing {self.measured}", self.shares[self.measured - 1]

    def settle(self) -> None:
        self.waits += 1


def test_a_disturbed_measurement_is_measured_again_and_the_quiet_one_kept():
    machine = FakeMachine(0.6, 0.05)
    result, record = least_disturbed(machine.attempt, machine.settle, threshold=0.25, max_attempts=3)
    assert result == "timing 2" and machine.waits == 1
    assert record["disturbed"] is False and record["kept"] == 1 and record["others_cpu_share"] == 0.05
    assert record["attempts"] == [{"others_cpu_share": 0.6, "steal_share": 0.0, "host_slowdown": None},
                                  {"others_cpu_share": 0.05, "steal_share": 0.0, "host_slowdown": None}]


def test_a_disturbance_that_never_passes_is_flagged_after_the_last_attempt_keeping_the_least_disturbed():
    machine = FakeMachine(0.6, 0.4, 0.9)
    result, record = least_disturbed(machine.attempt, machine.settle, threshold=0.25, max_attempts=3)
    assert machine.measured == 3 and machine.waits == 2 and len(record["attempts"]) == 3
    assert result == "timing 2" and record["kept"] == 1 and record["disturbed"] is True
    assert record["scope"] == "host CPU" and record["threshold"] == 0.25
    quiet = FakeMachine(0.01)
    assert least_disturbed(quiet.attempt, quiet.settle)[1]["attempts"] == [
        {"others_cpu_share": 0.01, "steal_share": 0.0, "host_slowdown": None}]


def test_steal_counts_as_disturbance_and_the_default_line_separates_quiet_from_a_busy_core():
    assert Share(0.1, 0.2).disturbed(0.25) and not Share(0.1, 0.1).disturbed(0.25)
    # Measured on 2 cores (see THRESHOLD): quiet moments 0.00-0.02, a process busy half of one core 0.17-0.19.
    assert not Share(0.02, 0.0).disturbed() and Share(0.17, 0.0).disturbed() and Share(0.0, 0.17).disturbed()


def test_waiting_for_quiet_samples_until_the_share_falls_and_is_bounded():
    samples = iter([0.9, 0.7, 0.1, 0.9])
    asked = []

    def sample(seconds: float) -> Share:
        asked.append(seconds)
        return Share(next(samples), 0.0)

    assert wait_for_quiet(5.0, threshold=0.25, step_s=0.2, sample=sample).others == 0.1 and asked == [0.2] * 3
    busy = []
    last = wait_for_quiet(0.5, threshold=0.25, step_s=0.2, sample=lambda s: busy.append(s) or Share(0.9, 0.0))
    assert last.others == 0.9 and len(busy) == 3  # 0.2 + 0.2 + 0.2 >= 0.5: then it measures anyway


def test_the_window_covers_the_timed_calls_not_the_warm_up():
    from dsnas.profiler import time_calls

    calls = []

    class Window:
        def __enter__(self):
            calls.append("enter")

        def __exit__(self, *exc):
            calls.append("exit")

    time_calls(lambda: calls.append("call"), lambda: None, warmup_s=0.0, measure_s=0.0, min_warmup=2,
               min_repeats=3, window=Window())
    assert calls[:3] == ["call", "call", "enter"] and calls[-1] == "exit" and calls.count("call") >= 5


def _hogs(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def test_a_cpu_hog_started_during_a_measurement_is_detected(measure_beside):
    """Twice as many busy-looping processes as this process's CPUs, started by the model's first call: each attempt
    finds others on at least half of the CPUs, so the measurement is flagged after every attempt. (No claim is
    made about the quiet case: other test runs may share this machine.)"""
    if not Path("/proc/stat").exists():
        pytest.skip("no /proc/stat (not Linux)")
    from dsnas.spec import HardwareSpec

    hogs: list[subprocess.Popen] = []

    def stop_hogs() -> None:
        for hog in hogs:
            hog.kill()
            hog.wait()

    hardware = HardwareSpec(device="cpu", batch_sizes=(8,), warmup_s=0.2, measure_s=0.5, max_measure_s=0.5)
    metrics, profile = measure_beside(lambda: hogs.extend(_hogs(2 * len(os.sched_getaffinity(0)))), stop_hogs,
                                      hardware)
    record = profile["batches"]["8"]["disturbance"]
    shares = [a["others_cpu_share"] for a in record["attempts"]]
    assert len(shares) == MAX_ATTEMPTS and min(shares) >= 0.5, record
    assert record["disturbed"] is True and profile["disturbed"] is True and metrics["disturbed"] == 1.0
    # The attempt kept is the least disturbed: others' share plus steal (a hypervisor's), not others' alone (CI saw
    # others 0.6684 kept over 0.6656 when the latter had more steal), or the host's slowdown where that is worse.
    severity = [Share(a["others_cpu_share"], a["steal_share"], host_slowdown=a["host_slowdown"]).severity()
                for a in record["attempts"]]
    kept = record["attempts"][severity.index(min(severity))]
    assert record["others_cpu_share"] == kept["others_cpu_share"] and record["scope"] == "host CPU"


def _study_with_flags(tmp_path: Path) -> str:
    """Four completed trials: disturbed, quiet, reused from the cache (a disturbed record, no metric), unknown."""
    import optuna
    from optuna.trial import create_trial

    url = f"sqlite:///{tmp_path / 'flags.db'}"
    study = optuna.create_study(study_name="flags", storage=url, directions=["maximize", "maximize"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.set_metric_names(["accuracy", "throughput"])
    cached = {"batches": {"1": {"median_ms": 1.0, "disturbance": {"disturbed": True, "others_cpu_share": 0.7}}}}
    attrs = [{"disturbed": 1.0}, {"disturbed": 0.0}, {"profile": cached}, {}]
    for i, extra in enumerate(attrs):
        values = [0.1 * (i + 1), 1000.0 * (4 - i)]  # every trial on the front
        study.add_trial(create_trial(values=values, user_attrs={
            "accuracy": values[0], "throughput_tok_s": values[1], "arch_short": f"a{i}", "feasible": 1.0, **extra}))
    return url


def test_the_trial_table_and_the_report_show_disturbed_trials(tmp_path):
    from dsnas.results import hypervolume_history, load
    from dsnas.results.plots import views
    from dsnas.results.report import summary

    df = load(_study_with_flags(tmp_path), "flags")
    assert list(df["disturbed"]) == [True, False, True, None]
    assert list(df.columns[:5]) == ["trial", "state", "feasible", "disturbed", "arch_short"]
    reference = {"accuracy": 0.0, "throughput": 0.0}
    spec = SimpleNamespace(name="flags", path=Path("studies/flags.toml"), task=SimpleNamespace(name="charlm"))
    text = summary(spec, df, views(df, hypervolume_history(df, reference), reference), [tmp_path / "index.html"])
    table = text.splitlines()[1:6]
    assert table[0].split()[-1] == "disturbed"
    assert {row.split()[0]: row.split()[-1] for row in table[1:]} == {"0": "yes", "1": "no", "2": "yes", "3": "?"}
    assert "disturbed: trials 0, 2 measured while other processes took the CPUs or the GPU, or the host ran slow" in text
    assert "dsnas profile studies/flags.toml --trial N" in text
    spaced = SimpleNamespace(**{**vars(spec), "path": Path("my studies/flags.toml")})  # a command one can paste
    text = summary(spaced, df, views(df, hypervolume_history(df, reference), reference), [tmp_path / "index.html"])
    assert "dsnas profile 'my studies/flags.toml' --trial N" in text
