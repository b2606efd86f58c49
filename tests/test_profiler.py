"""The measurement protocol: exclusive measuring across processes, timing statistics, peak memory."""

from __future__ import annotations

import multiprocessing as mp
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import torch
from conftest import load_benchmark

import dsnas.profiler
from dsnas.profiler import MeasureGate, time_calls
from dsnas.profiler.memory import peak_memory


def _trainer(folder, started, log, seconds):
    """Hold the gate shared and 'train' in small steps, logging when each step ran."""
    gate = MeasureGate("test", folder)
    with gate.shared() as hold:
        started.set()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.monotonic()
            time.sleep(0.005)
            log.append((t0, time.monotonic()))
            hold.checkpoint()


def test_measuring_excludes_training_in_other_processes(tmp_path):
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        log, started = manager.list(), manager.Event()
        trainers = [ctx.Process(target=_trainer, args=(tmp_path, started, log, 1.5)) for _ in range(2)]
        for p in trainers:
            p.start()
        assert started.wait(30)
        time.sleep(0.2)
        with MeasureGate("test", tmp_path).exclusive():
            inside = (time.monotonic(), time.sleep(0.3), time.monotonic())
        for p in trainers:
            p.join(30)
        steps = list(log)
    begin, _, end = inside
    assert steps, "the trainers never ran"
    overlapping = [s for s in steps if s[0] < end and s[1] > begin]
    assert not overlapping, f"{len(overlapping)} training steps ran while measuring"
    assert any(s[0] >= end for s in steps), "training resumed after the measurement"


def test_gate_is_reentrant_in_sequence(tmp_path):
    gate = MeasureGate("seq", tmp_path)
    for _ in range(3):
        with gate.shared() as hold:
            hold.checkpoint()
        with gate.exclusive():
            pass


def _measurer(folder, queued, done):
    gate = MeasureGate("nested", folder)
    with open(gate.paths[0], "rb+") as turnstile:  # queued as exclusive() queues: the turnstile, then the lock
        import fcntl
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        queued.set()
        with open(gate.paths[1], "rb+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            done.set()


def test_a_hold_within_a_hold_of_the_same_thread_does_not_wait_behind_a_queued_measurer(tmp_path):
    """The driver held the gate shared to screen a candidate, and the screen's counter took it shared again: with a
    measurer queued between the two (another trial, another study), each waited for the other for ever, through
    Ctrl-C and SIGTERM. The inner hold now holds nothing more, and the measurer goes on once the outer ends."""
    gate = MeasureGate("nested", tmp_path)
    ctx = mp.get_context("spawn")
    queued, done = ctx.Event(), ctx.Event()
    with gate.shared() as outer:
        measurer = ctx.Process(target=_measurer, args=(tmp_path, queued, done))
        measurer.start()
        assert queued.wait(30)
        started = time.monotonic()
        with gate.shared() as inner:  # deadlocked here before
            inner.checkpoint()
            with inner.paused():
                pass
        assert time.monotonic() - started < 5
        assert not done.is_set()  # the outer hold still keeps the measurer out
        with pytest.raises(RuntimeError, match="would wait for itself"):
            with gate.exclusive():
                pass
        with outer.paused():  # paused, the thread holds nothing: a hold inside is a hold of its own, after it
            assert done.wait(30)
            with gate.exclusive():
                pass
    measurer.join(30)
    with gate.exclusive(), gate.exclusive():  # within its own exclusive hold: nothing more
        pass


@contextmanager
def _another_holds(gate, script, mode, seconds):
    """Another process, running ``script`` (its name shows in the notices), holds the gate's lock file (mode "SH"
    or "EX") for ``seconds``; yields its Popen once it holds it."""

    with open(gate.paths[1], "ab"):  # the lock file, made as the gate makes it
        pass
    script.write_text("import fcntl, sys, time\nf = open(sys.argv[1], 'rb+')\nfcntl.flock(f, getattr(fcntl, "
                      "sys.argv[2]))\nprint('held', flush=True)\ntime.sleep(float(sys.argv[3]))\n", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, str(script), str(gate.paths[1]), f"LOCK_{mode}", str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.wait(30)


def test_a_measurement_kept_waiting_says_by_whom_and_for_how_long(tmp_path, caplog):
    """`dsnas verify` behind another process's measurement waited minutes without a word and looked hung."""
    import logging

    gate = MeasureGate("announce", tmp_path, announce="dsnas verify")
    with _another_holds(gate, tmp_path / "trainer_mark.py", "SH", 1.0) as proc:
        with caplog.at_level(logging.INFO, logger="dsnas"), gate.exclusive():
            pass
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2, said
    assert said[0].startswith("dsnas verify waits to measure") and f"pid {proc.pid} (" in said[0], said
    assert "trainer_mark.py" in said[0], said  # its command line
    waited = float(said[1].split("waited ")[1].split(" s")[0])
    assert said[1].startswith("dsnas verify measures now") and 0 <= waited <= 30, said
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dsnas"), gate.exclusive():  # uncontended: nothing said
        pass
    assert not caplog.records


def test_a_trial_kept_waiting_long_says_so_and_a_short_wait_says_nothing(tmp_path, caplog, monkeypatch):
    """A trial behind other studies' measurements waited ten minutes while its search printed nothing. A trial's
    wait (to train or to measure) is said once it lasts say_after_s, with who holds the gate; the Ray driver says
    it from the trial's clock events."""
    import logging
    from types import SimpleNamespace

    from dsnas.driver import Driver, TrialClock
    from dsnas.rungs import ClockEvent

    waits = []
    gate = MeasureGate("long", tmp_path, on_wait=waits.append, announce="trial 7", say_after_s=0.3)
    for seconds in (0.05, 1.2):
        with _another_holds(gate, tmp_path / "measurer_mark.py", "EX", seconds):
            with caplog.at_level(logging.INFO, logger="dsnas"), gate.shared():
                pass
        said = [r.getMessage() for r in caplog.records]
        if seconds == 0.05:
            assert said == [] and waits == [True, False]  # a short wait: counted, not said
            continue
        assert len(said) == 2, said
        assert said[0].startswith("trial 7 has waited 0 s for the measurement gate") and "measurer_mark.py" in said[0]
        assert said[1].startswith("trial 7 goes on (waited 1 s")
    # The driver of Ray trials, from the clock events its workers send.
    clock, lines = TrialClock(), []
    driver = SimpleNamespace(clocks={3: clock}, progress=SimpleNamespace(say=lines.append))
    clock.tell(ClockEvent(3, "waiting", 1.0, 1), 100.0)
    monkeypatch.setattr("dsnas.driver.time.monotonic", lambda: 100.0 + 5)
    Driver._say_long_waits(driver)
    assert lines == []
    monkeypatch.setattr("dsnas.driver.time.monotonic", lambda: 100.0 + 12)
    Driver._say_long_waits(driver)
    Driver._say_long_waits(driver)  # once a minute at most
    assert lines == ["  trial 3 has waited 12 s for its device's measurement gate: other trials or dsnas processes "
                     "measure there (waits do not count toward trial_timeout_s)"]
    clock.tell(ClockEvent(3, "running", 1.0, 2), 113.0)
    assert clock.waiting_since is None


def test_a_shared_hold_with_patience_goes_on_holding_nothing_once_its_patience_runs_out(tmp_path):
    """A trial hung holding the gate, another queued to measure behind it, and the driver waited for the gate with
    no limit: it never reached the check that stops the hung trial at trial_timeout_s, and the search hung."""
    gate = MeasureGate("patience", tmp_path)
    ctx = mp.get_context("spawn")
    queued, done = ctx.Event(), ctx.Event()
    with gate.shared():  # the hung trainer (here, this thread; the patient hold below stands for another thread)
        measurer = ctx.Process(target=_measurer_of, args=(tmp_path, "patience", queued, done))
        measurer.start()
        assert queued.wait(30)
    # The hold above is released, and the measurer measures for 3 s: a patient hold gives up after its 0.3 s and
    # goes on holding nothing.
    started = time.monotonic()
    with MeasureGate("patience", tmp_path).shared(patience_s=0.3) as hold:
        hold.checkpoint()
        assert type(hold).__name__ == "_HeldAlready" and not done.is_set()
        with MeasureGate("patience", tmp_path).shared() as inner:  # the screen's counter within: no wait either
            assert type(inner).__name__ == "_HeldAlready"
    assert time.monotonic() - started < 2
    measurer.join(30)
    with MeasureGate("patience", tmp_path).shared(patience_s=0.3) as hold:  # uncontended: a real hold
        assert type(hold).__name__ == "_SharedHold"


def _measurer_of(folder, key, queued, done):
    import fcntl

    gate = MeasureGate(key, folder)
    with open(gate.paths[0], "rb+") as turnstile:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        queued.set()
        with open(gate.paths[1], "rb+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            time.sleep(3)  # measuring
            done.set()


def test_a_holder_kept_waiting_by_another_says_so_and_an_uncontended_pass_says_nothing(tmp_path):
    """What a trial's time limit leaves out (trial_timeout_s): a trial waiting to measure behind a hung trainer was
    stopped with it, though it had run a few seconds of its own."""
    import threading

    told: list[bool] = []
    gate = MeasureGate("told", tmp_path, on_wait=told.append)
    with gate.shared() as hold:
        hold.checkpoint()
    with gate.exclusive():
        pass
    assert told == []  # nothing kept it waiting: no message per training step
    holding, release = threading.Event(), threading.Event()

    def trainer():
        with MeasureGate("told", tmp_path).shared():
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=trainer)
    thread.start()
    assert holding.wait(10)
    threading.Timer(0.3, release.set).start()
    start = time.monotonic()
    with gate.exclusive():
        waited = time.monotonic() - start
    thread.join(10)
    assert told == [True, False] and waited >= 0.25


def test_a_trials_clock_counts_its_own_time_only():
    from dsnas.driver import TrialClock
    from dsnas.rungs import ClockEvent

    clock = TrialClock()
    assert clock.ran_s(100.0) == 0.0  # queued: not started on a worker yet
    clock.tell(ClockEvent(0, "started", 0.0, 1), 10.0)
    clock.tell(ClockEvent(0, "waiting", 2.0, 2), 12.0)  # behind another trial's measurement
    assert clock.ran_s(50.0) == 2.0
    clock.tell(ClockEvent(0, "running", 2.0, 3), 52.0)
    assert clock.ran_s(55.0) == 5.0
    clock.waited_s += 3.0  # the database was out
    assert clock.ran_s(55.0) == 2.0
    # A busy driver reads a wait and its end late, at once: the worker's count of its own time stands. Stamped by
    # the driver on reading, the 10 s wait was counted as running and the trial was stopped at trial_timeout_s.
    late = TrialClock()
    late.tell(ClockEvent(1, "started", 0.0, 1), 0.0)
    late.tell(ClockEvent(1, "waiting", 1.0, 2), 11.0)
    late.tell(ClockEvent(1, "running", 1.0, 3), 11.0)
    assert late.ran_s(12.0) == 2.0
    late.tell(ClockEvent(1, "waiting", 1.5, 2), 12.0)  # an older event read after a newer one changes nothing
    assert late.ran_s(13.0) == 3.0


def test_the_worker_counts_its_waits_and_tells_its_own_time(monkeypatch):
    from types import SimpleNamespace

    from dsnas import worker

    now = [100.0]
    monkeypatch.setattr(worker.time, "monotonic", lambda: now[0])
    told = []
    request = SimpleNamespace(trial=3, channel=SimpleNamespace(clock=told.append))
    clock = worker.OwnClock(request)
    clock.tell("started")
    now[0] = 102.0
    clock.tell("waiting")
    now[0] = 112.0
    assert clock.waited_s() == 10.0
    clock.tell("running")
    now[0] = 115.0
    assert [(e.event, e.ran_s, e.seq) for e in told] == [("started", 0.0, 1), ("waiting", 2.0, 2),
                                                           ("running", 2.0, 3)]
    assert clock.waited_s() == 10.0


def test_a_paused_hold_lets_a_measurer_in_and_then_holds_again(tmp_path):
    import threading

    gate = MeasureGate("paused", tmp_path)
    measured = threading.Event()

    def measure():
        with gate.exclusive():
            measured.set()

    with gate.shared() as hold:
        with hold.paused():  # a trial waiting for the driver's answer at a rung
            thread = threading.Thread(target=measure)
            thread.start()
            assert measured.wait(10), "the measurer waited for a hold that computes nothing"
            thread.join(10)
        measured.clear()
        blocked = threading.Thread(target=measure)
        blocked.start()
        time.sleep(0.3)
        assert not measured.is_set()  # held again after the pause
    blocked.join(10)
    assert measured.is_set()


def test_the_driver_samples_holding_this_nodes_cpu_gate(tiny_study, tmp_path, monkeypatch):
    """The sampler's model computes for about a second a proposal, on the CPUs a trial measures on: each sampling
    pass of the driver holds the gate as a training trial does, so no measurer's exclusive hold can be taken then."""
    import fcntl
    import tempfile

    import optuna

    from dsnas.cli import main
    from dsnas.space import SearchSpace

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this test's own gate, which nothing else holds
    lock = MeasureGate("cpu").paths[1]
    held: list[bool] = []
    sample = SearchSpace.sample

    def checked(self, trial):
        if isinstance(trial, optuna.trial.Trial):  # the driver's pass, not the sampler's own used() / arch_of()
            with open(lock, "a+") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(f, fcntl.LOCK_UN)
                    held.append(False)
                except BlockingIOError:
                    held.append(True)
        return sample(self, trial)

    monkeypatch.setattr(SearchSpace, "sample", checked)
    assert main(["search", str(tiny_study)]) == 0
    assert held == [True, True, True]


def test_time_calls_reports_median_and_spread():
    calls = []
    timing = time_calls(lambda: calls.append(time.sleep(0.002)), lambda: None, warmup_s=0.01, measure_s=0.05)
    assert timing.repeats >= 10 and timing.warmup >= 2
    assert len(calls) == timing.repeats + timing.warmup
    assert 2.0 <= timing.median_ms < 50
    assert timing.p10_ms <= timing.median_ms <= timing.p90_ms
    assert timing.as_dict()["spread"] == pytest.approx(timing.spread)


def test_a_call_too_fast_to_reach_measure_s_before_the_repeat_cap_is_judged_at_the_cap():
    """A call of a microsecond reached 100,000 repeats before measure_s, and stopped unjudged: "did not converge",
    with a confidence interval of 0.05% against a 5% tolerance."""
    timing = time_calls(lambda: None, lambda: None, warmup_s=0.0, measure_s=30.0, max_repeats=2000)
    assert timing.repeats == 2000
    assert timing.converged == ((timing.ci_high_ms - timing.ci_low_ms) / 2 <= 0.05 * timing.median_ms)


def test_timing_statistics_are_ordered():
    timing = time_calls(lambda: sum(range(2000)), lambda: None, warmup_s=0.01, measure_s=0.05)
    d = timing.as_dict()
    assert 0 < d["p10_ms"] <= d["p25_ms"] <= d["median_ms"] <= d["p75_ms"] <= d["p90_ms"]
    assert d["ci_low_ms"] <= d["median_ms"] <= d["ci_high_ms"]
    assert d["iqr_ms"] == pytest.approx(d["p75_ms"] - d["p25_ms"]) and d["ci_rel"] >= 0


def test_median_ci_is_the_order_statistics_around_the_middle():
    from dsnas.profiler.timing import median_ci

    samples = [float(i) for i in range(1, 101)]  # n = 100: ranks 50 -+ 9.8 -> 40th and 60th values
    assert median_ci(samples) == (40.0, 61.0)
    assert median_ci([1.0, 2.0, 3.0]) == (1.0, 3.0)  # few samples: the interval is the whole range


def test_repeats_stop_when_the_median_is_known_to_the_tolerance():
    """Steady calls converge after the minimum; calls alternating 1x/3x never do and stop at the time cap."""
    steady = time_calls(lambda: time.sleep(0.001), lambda: None, warmup_s=0, measure_s=0.02, max_measure_s=2.0,
                        ci_tolerance=0.5)
    assert steady.converged and steady.repeats < 200
    flip = iter(range(10**6))
    noisy = time_calls(lambda: time.sleep(0.001 if next(flip) % 2 else 0.003), lambda: None, warmup_s=0,
                       measure_s=0.02, max_measure_s=0.3, ci_tolerance=0.01)
    assert not noisy.converged
    assert noisy.repeats >= 10


def test_cpu_peak_memory_counts_live_intermediates(capfd):
    x = torch.randn(512, 256)
    mlp = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
    with torch.inference_mode():
        peak = peak_memory(lambda: mlp(x), torch.device("cpu"), resident_bytes=1000)
    # Two 512x1024 fp32 intermediates are alive at once (2 MiB each); the 0.5 MiB output comes after one is freed.
    assert peak.bytes == 1000 + 2 * 512 * 1024 * 4
    assert peak.method == "weights+profiler_cpu_allocation_peak"
    assert capfd.readouterr().err == ""  # the profiler's native log lines do not reach the terminal


def test_cuda_peak_memory_is_the_weights_plus_what_the_call_allocates(monkeypatch):
    """On a GPU the process's whole peak counted what it held before the call: a trial measured right after
    training weighed its leftover gradients (one fp32 copy of the weights) more than one measured untrained. A fake
    allocator holding 900 bytes of such leftovers, whose peak reaches 1500 during the call, gives 600 + weights."""
    held = {"now": 900, "peak": 900}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: held.update(peak=held["now"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: held["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: held["peak"])
    peak = peak_memory(lambda: held.update(peak=1500), torch.device("cuda"), resident_bytes=1000)
    assert peak.bytes == 1000 + 600 and peak.method == "weights+cuda_peak_above_start"


def test_measure_reports_each_batch_size(tiny_study):
    from dsnas.models import build
    from dsnas.profiler import measure
    from dsnas.spec import load_study
    from dsnas.tasks import make_task

    spec = load_study(tiny_study)
    task = make_task(spec.task)
    model = build({"family": "transformer_lm", "d_model": 16, "layers": [{"n_heads": 2, "ffn_ratio": 1}],
                   **task.arch_defaults()})
    metrics, profile = measure(model, task, torch.device("cpu"), spec.hardware)
    assert metrics["latency_ms"] == metrics["latency_ms_bs1"]
    assert metrics["throughput_tok_s"] == metrics["throughput_tok_s_bs4"]
    assert metrics["throughput_tok_s_bs4"] == pytest.approx(4 * 16 / (metrics["latency_ms_bs4"] / 1e3))
    assert metrics["params"] == sum(p.numel() for p in model.parameters())
    assert set(profile["batches"]) == {"1", "4"} and profile["threads"] >= 1
    assert metrics["peak_memory_mb"] * 2**20 > sum(p.numel() * 4 for p in model.parameters())  # weights + activations
    assert profile["fingerprint"]["torch"] == torch.__version__


def test_measuring_uses_the_cpus_this_process_may_use_not_every_cpu_of_the_host(tiny_study, monkeypatch):
    """In a container given --cpus 2 on a 64-core host, os.cpu_count() says 64: the default measured with 64 threads
    on 2 CPUs' worth of quota. The default is the affinity capped by the cgroup quota (usable_cpus), as Ray's is."""
    import importlib
    import os

    from dsnas.models import build
    from dsnas.profiler.capabilities import usable_cpus
    from dsnas.spec import load_study
    from dsnas.tasks import make_task

    spec = load_study(tiny_study)
    task = make_task(spec.task)
    model = build({"family": "transformer_lm", "d_model": 16, "layers": [{"n_heads": 2, "ffn_ratio": 1}],
                   **task.arch_defaults()})
    measure_module = importlib.import_module("dsnas.profiler.measure")  # the module, not the function it exports
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(measure_module, "usable_cpus", lambda: 1)
    _, profile = measure_module.measure(model, task, torch.device("cpu"), spec.hardware)
    assert profile["threads"] == 1
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))


def test_a_new_gate_is_made_for_every_account_whatever_the_umask(tmp_path):
    """A second user's search failed every trial: the first user's umask had made the gate 0644."""
    import os
    old = os.umask(0o077)
    try:
        gate = MeasureGate("modes", tmp_path)
    finally:
        os.umask(old)
    assert [p.stat().st_mode & 0o777 for p in gate.paths] == [0o666, 0o666]


def test_a_gate_of_another_account_gives_one_warning_and_a_gate_of_this_accounts_own(tmp_path, monkeypatch, caplog):
    import os

    from dsnas.profiler import gate as gate_module
    real_open = os.open
    theirs = {tmp_path / "dsnas-gate-shared.turnstile", tmp_path / "dsnas-gate-shared.lock"}

    def refusing(path, flags, *args):
        if path in theirs:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)
    monkeypatch.setattr(gate_module.os, "open", refusing)
    monkeypatch.setattr(gate_module, "_WARNED", set())
    for _ in range(2):
        gate = MeasureGate("shared", tmp_path)
        with gate.exclusive():
            pass
    assert [p.name for p in gate.paths] == [f"dsnas-gate-shared-uid{os.getuid()}.turnstile",
                                            f"dsnas-gate-shared-uid{os.getuid()}.lock"]
    warnings = [r.getMessage() for r in caplog.records if "measurement gate" in r.getMessage()]
    assert len(warnings) == 1 and "chmod 666" in warnings[0], warnings
    # Its fix names both files: with only the first named, the owner's chmod left the second refused and a warning
    # about it at the next run.
    fix = warnings[0].split("Fix:")[1]
    assert all(str(path) in fix for path in theirs), fix


def test_a_gate_another_account_made_is_used_without_o_creat(tmp_path, monkeypatch):
    """Linux's protected_regular refuses O_CREAT on another owner's file in a sticky world-writable folder (/tmp),
    even one of mode 0666: each hold opened the gate with O_CREAT and failed for a second account."""
    import os

    from dsnas.profiler import gate as gate_module
    MeasureGate("theirs", tmp_path)  # made by "them"
    real_open = os.open

    def protected(path, flags, *args):
        if flags & os.O_CREAT and os.path.exists(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)
    monkeypatch.setattr(gate_module.os, "open", protected)
    gate = MeasureGate("theirs", tmp_path)
    assert gate.paths[0].name == "dsnas-gate-theirs.turnstile"  # theirs, shared: not a gate of this account's own
    with gate.exclusive():
        pass
    with gate.shared() as hold:
        hold.checkpoint()


def test_a_trials_train_seconds_leave_out_its_waits_for_another_measurement(tmp_path, monkeypatch):
    """train_s was the wall time of training: a candidate that trained beside another trial's measurements looked
    as costly as its waits (26 s stored for 16 s of training and a 10 s wait)."""
    import tempfile
    import threading

    from dsnas.profiler import device_key, resolve_device
    from dsnas.spec import EngineSpec, HardwareSpec, TaskSpec
    from dsnas.tasks.charlm import CharLMTask
    from dsnas.trial import TrialRequest
    from dsnas.worker import run_trial

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # a gate of this test's own
    measured = threading.Event()

    def train(self, model, device, *, checkpoint, **kwargs):
        def measurer():  # another trial, measuring for 1 s while this one trains
            with MeasureGate(device_key(resolve_device("cpu")), tmp_path).exclusive():
                time.sleep(1.0)
            measured.set()

        threading.Thread(target=measurer).start()
        while not measured.is_set():  # 0.05 s of work between checkpoints, the measurement waited for at one
            time.sleep(0.05)
            checkpoint()
        return {}

    monkeypatch.setattr(CharLMTask, "train", train)
    arch = {"family": "transformer_lm", "d_model": 16, "layers": [{"n_heads": 1, "ffn_ratio": 1}]}
    task = TaskSpec("charlm", {"corpus_bytes": 200_000, "context": 16, "val_tokens": 256})
    result = run_trial(TrialRequest(0, {**arch, "vocab_size": 256, "context": 16}, task,
                                    HardwareSpec(batch_sizes=(1,), warmup_s=0.01, measure_s=0.05), seed=0,
                                    engine=EngineSpec()))
    assert result.metrics["waited_s"] >= 0.9
    assert result.metrics["train_s"] < 0.6, result.metrics  # its own few steps, not the 1 s wait


@pytest.mark.parametrize("slowdown, said", [(None, "CV with probe / shares only: none: no attempt was probed"),
                                            (1.02, "CV with probe / shares only: ")])
def test_the_benchmark_gives_no_probe_ratio_where_no_attempt_was_probed(monkeypatch, capsys, slowdown, said):
    """Without a host-speed reference (ceilings measured under others' load are not stored) measure() probes
    nothing: benchmarks/profiler.py compared the same protocol twice and printed a CV ratio of 2.33x as the probe's."""
    bench = load_benchmark("profiler", as_name="profiler_benchmark")
    tok_s = iter([100.0, 120.0, 90.0, 110.0])

    def measure(model, task, device, hardware):
        attempt = {"others_cpu_share": 0.0, "host_slowdown": slowdown}
        return {"throughput_tok_s": next(tok_s)}, {"batches": {"32": {"disturbance": {
            "attempts": [attempt], "disturbed": False}}}}

    monkeypatch.setattr(dsnas.profiler, "measure", measure)
    bench.host_probe_effect(None, None, torch.device("cpu"), 2)
    out = capsys.readouterr().out
    assert said in out and ("none:" in out) is (slowdown is None)
