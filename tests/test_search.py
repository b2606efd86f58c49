"""End-to-end searches through the CLI on a tiny task: local and Ray executors, resume after SIGKILL."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState

from dsnas.cli import main
from dsnas.spec import load_study, read_study
from tests.conftest import copy_study

METRICS = ("accuracy", "val_loss", "throughput_tok_s", "latency_ms", "params", "peak_memory_mb",
           "latency_ms_bs1", "throughput_tok_s_bs4", "train_s")


def trials(study_file, states=None):
    spec = load_study(study_file)
    study = optuna.load_study(study_name=spec.name, storage=spec.storage)
    return study, study.get_trials(states=states)


def check_completed(study, done):
    for t in done:
        assert len(t.values) == 2 and 0 < t.values[0] <= 1 and t.values[1] > 0
        assert set(METRICS) <= set(t.user_attrs), sorted(t.user_attrs)
        assert t.user_attrs["accuracy"] == t.values[0]
        assert t.user_attrs["throughput_tok_s"] == t.values[1]
        assert t.user_attrs["arch"]["family"] == "transformer_lm"
        assert t.user_attrs["profile"]["fingerprint"]["device"] == "cpu"
        assert t.user_attrs["profile"]["batches"]["4"]["repeats"] >= 10
        assert t.constraints == {"max_latency_ms": pytest.approx(t.user_attrs["latency_ms"] - 1000.0)}
    assert study.metric_names == ["accuracy", "throughput"]
    assert study.best_trials


def test_local_search_through_cli(tiny_study, capsys):
    assert main(["search", str(tiny_study), "--executor", "local"]) == 0
    out = capsys.readouterr().out
    study, all_trials = trials(tiny_study)
    done = [t for t in all_trials if t.state == TrialState.COMPLETE]
    assert len(done) == 3 and len(all_trials) == 3
    check_completed(study, done)
    assert "trial 2 done" in out and "front" in out
    assert "Pareto front" in out and "tokens/s" in out


@pytest.mark.slow
def test_ray_search_through_cli(tiny_study, capsys):
    assert main(["search", str(tiny_study), "--executor", "ray"]) == 0
    study, all_trials = trials(tiny_study)
    done = [t for t in all_trials if t.state == TrialState.COMPLETE]
    assert len(done) == 3
    check_completed(study, done)
    assert "executor ray" in capsys.readouterr().out


def test_failing_candidate_is_a_fail_trial_with_reason(tiny_study, capsys):
    # A search space callable that returns an architecture the family cannot build.
    (tiny_study.parent / "broken_space.py").write_text(
        "def space(trial):\n"
        "    return {'family': 'transformer_lm', 'd_model': 30, 'layers': [{'n_heads': 4, 'ffn_ratio': 1}]}\n")
    text = tiny_study.read_text().replace(f'file = "{tiny_space_path(tiny_study)}"', 'callable = "broken_space:space"')
    tiny_study.write_text(text.replace("max_failures = 3", "max_failures = 1"))
    assert main(["search", str(tiny_study), "--executor", "local"]) == 1  # a run in which every trial failed
    _, all_trials = trials(tiny_study)
    assert {t.state for t in all_trials} == {TrialState.FAIL}
    assert "must divide d_model" in all_trials[0].user_attrs["fail_reason"]
    said = capsys.readouterr()
    assert "max_failures = 1" in said.out
    assert said.err.strip().splitlines()[-1].startswith(
        "dsnas: all 2 trials of this run failed; the first: trial 0: the search space gave no valid architecture")


def tiny_space_path(study_file):
    return load_study(study_file).space.file


@pytest.mark.slow
def test_resume_after_sigkill_loses_no_completed_trial(tiny_study):
    # Slower trials, so that the kill lands while one runs.
    tiny_study.write_text(tiny_study.read_text().replace("train_tokens = 2048", "train_tokens = 60000"))
    cmd = [sys.executable, "-m", "dsnas.cli", "search", str(tiny_study), "--executor", "local"]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        running = wait_for(lambda: state_counts(tiny_study), driver)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    _, before = trials(tiny_study)
    completed_before = {t.number: t.values for t in before if t.state == TrialState.COMPLETE}
    assert [t.number for t in before if t.state == TrialState.RUNNING] == [running]

    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"re-queued 1 trial(s) left RUNNING by a stopped driver: #{running}" in result.stdout
    _, after = trials(tiny_study)
    by_number = {t.number: t for t in after}
    assert by_number[running].state == TrialState.FAIL
    assert "stopped while the trial ran" in by_number[running].user_attrs["fail_reason"]
    for number, values in completed_before.items():
        assert by_number[number].values == values
    retried = [t for t in after if t.system_attrs.get("failed_trial") == running]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert retried[0].user_attrs["requeued_from"] == running and "fail_reason" not in retried[0].user_attrs
    if "train_seed" in by_number[running].user_attrs:  # dispatched before the kill: trained again with its seed
        assert retried[0].user_attrs["train_seed"] == by_number[running].user_attrs["train_seed"]
    # Same parameters: all of them, or those the killed driver had sampled when it died mid-dispatch.
    assert by_number[running].params.items() <= retried[0].params.items()
    assert sum(t.state == TrialState.COMPLETE for t in after) == 3


def state_counts(study_file, after_one_completed=True):
    """The number of a RUNNING trial once at least one trial completed (or at once), else None.

    Read-only SQL: opening Optuna's storage here would write (create tables) beside the driver."""
    path = load_study(study_file).storage.removeprefix("sqlite:///")
    if not os.path.exists(path):
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            # A trial counts as running once its driver is recorded: study.ask() and that attribute are two writes,
            # and a kill between them leaves a trial that only GRACE_S later looks stale.
            rows = db.execute("SELECT number, state, EXISTS (SELECT 1 FROM trial_user_attributes a WHERE "
                              "a.trial_id = t.trial_id AND a.key = 'driver') FROM trials t").fetchall()
    except sqlite3.OperationalError:
        return None  # the driver has not created the tables yet, or holds a write lock
    running = [n for n, state, dispatched in rows if state == "RUNNING" and dispatched]
    if (not after_one_completed or any(state == "COMPLETE" for _, state, _ in rows)) and running:
        return running[0]
    return None


def wait_for(probe, process, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the driver ended before it could be killed"
        found = probe()
        if found is not None:
            return found
        time.sleep(0.2)
    raise AssertionError("timed out waiting for a running trial")


def test_python_api_runs_and_resumes_and_logs_instead_of_printing(tiny_study, capsys, caplog):
    import logging

    import dsnas

    first = dsnas.search(str(tiny_study), n_trials=2)
    assert first.completed == 2 and first.front and first.stopped_because == "2 trials completed"
    with caplog.at_level(logging.INFO, logger="dsnas"):
        again = dsnas.search(str(tiny_study), n_trials=3)
    assert again.completed == 3 and len(again.study.trials) == 3  # two stored + one new
    assert any("resuming: 2 completed trials" in r.getMessage() and r.name == "dsnas.search" for r in caplog.records)
    assert "trial" not in capsys.readouterr().out  # a library does not print: the program decides where logs go


def test_the_command_shows_the_logs_on_stdout_and_quiet_hides_them(tiny_study, capsys):
    assert main(["search", str(tiny_study), "--n-trials", "1"]) == 0
    out = capsys.readouterr().out
    assert "trial 0 started" in out and "Pareto front" in out
    assert main(["-q", "search", str(tiny_study), "--n-trials", "2"]) == 0
    out = capsys.readouterr().out
    assert "trial 1 started" not in out and "Pareto front" in out  # the result is printed, the progress is not


def test_version_and_the_dashboards_default_port_are_in_the_help(capsys):
    import dsnas

    for argv in (["--version"], ["dashboard", "--help"]):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"dsnas {dsnas.__version__}\n")
    assert "(default: 8080;" in out and "(default: 127.0.0.1," in out


@pytest.mark.parametrize("sampler", ["nsga2", "nsga3", "gp", "random"])
def test_every_sampler_runs_a_search(tiny_study, sampler):
    tiny_study.write_text(tiny_study.read_text().replace('name = "tpe"', f'name = "{sampler}"')
                          .replace("n_trials = 3", "n_trials = 2"))
    assert main(["search", str(tiny_study)]) == 0
    study, done = trials(tiny_study, states=(TrialState.COMPLETE,))
    assert len(done) == 2


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, said, executor", [
    (signal.SIGINT, 130, "interrupted", "local"), (signal.SIGTERM, 143, "terminated", "local"),
    # ray.init put its own SIGTERM handler in place of dsnas's: exit 134, a trial left RUNNING
    (signal.SIGTERM, 143, "terminated", "ray")])
def test_ctrl_c_or_sigterm_fails_the_running_trial_as_interrupted(tiny_study, sig, code, said, executor):
    tiny_study.write_text(tiny_study.read_text().replace("train_tokens = 2048", "train_tokens = 60000"))
    cmd = [sys.executable, "-m", "dsnas.cli", "search", str(tiny_study), "--executor", executor]
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        running = wait_for(lambda: state_counts(tiny_study), driver)
        driver.send_signal(sig)
        _, err = driver.communicate(timeout=60)
    finally:
        driver.kill()
    assert driver.returncode == code, err[-3000:]
    assert f"{said}; completed trials are stored" in err
    _, after = trials(tiny_study)
    stopped = {t.number: t for t in after}[running]
    assert stopped.state == TrialState.FAIL
    assert stopped.user_attrs["fail_reason"] == "the search was interrupted while the trial ran; queued again"
    assert not [t for t in after if t.state == TrialState.RUNNING]
    # Each queued again with its parameters and seed, as a killed driver's trial is: the resumed study trains it.
    interrupted = [t for t in after if t.state == TrialState.FAIL]  # under Ray, two may run at once
    queued = {t.user_attrs["requeued_from"]: t for t in after if t.state == TrialState.WAITING}
    assert sorted(queued) == sorted(t.number for t in interrupted) and running in queued
    for t in interrupted:
        assert (queued[t.number].params, queued[t.number].user_attrs["train_seed"]) == \
            (t.params, t.user_attrs.get("train_seed", t.number))  # the tiny study's seed is 0


@pytest.mark.slow
def test_ctrl_c_acts_at_once_while_another_process_holds_the_measurement_gate(tiny_study, tmp_path):
    """Another study's trial measuring on this CPU holds the gate for as long as it measures: a driver waiting for it
    to sample its next candidate held Ctrl-C and SIGTERM back until it let go (a SIGTERM at 300 s ended at 439 s)."""
    from dsnas.profiler import MeasureGate, device_key, resolve_device

    gates = tmp_path / "gates"
    gates.mkdir()
    cmd = [sys.executable, "-m", "dsnas.cli", "search", str(tiny_study)]
    with MeasureGate(device_key(resolve_device("cpu")), gates).exclusive():  # held all along, as a measurer would
        driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "TMPDIR": str(gates)})
        try:
            running = wait_for(lambda: state_counts(tiny_study, after_one_completed=False), driver)
            time.sleep(1.0)  # into the wait for the gate
            driver.send_signal(signal.SIGINT)
            _, err = driver.communicate(timeout=30)
        finally:
            driver.kill()
    assert driver.returncode == 130, err[-3000:]
    assert err.rstrip().endswith("dsnas: interrupted; completed trials are stored, run the same command to resume")
    stopped = {t.number: t for t in trials(tiny_study)[1]}[running]
    assert stopped.state == TrialState.FAIL and "arch" not in stopped.user_attrs  # failed before it was sampled


def test_the_engine_probe_of_a_ray_study_says_who_holds_the_gate_it_waits_for(tiny_study, tmp_path, monkeypatch):
    """The engine probe runs in a Ray worker, whose notice of its wait for the measurement gate the driver never
    sees (the workers' logs do not reach it): a search behind another study's measurement said nothing for a
    minute. The driver says who holds the gate as it sends the probe there."""
    import io
    import tempfile

    from dsnas.driver import Driver
    from dsnas.progress import Progress
    from dsnas.study import open_study
    from dsnas.worker import run_trial

    gates = tmp_path / "gates"
    gates.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(gates))
    hold = ("import sys, time\nfrom dsnas.profiler import MeasureGate, device_key, resolve_device\n"
            "with MeasureGate(device_key(resolve_device('cpu'))).exclusive():\n"
            "    print('held', flush=True)\n    time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "TMPDIR": str(gates)})
    try:
        assert holder.stdout.readline().strip() == "held"
        tiny_study.write_text(tiny_study.read_text().replace('kind = "local"', 'kind = "ray"'))
        spec = load_study(tiny_study)
        said = io.StringIO()
        driver = Driver(spec, open_study(spec), run_trial, Progress(spec, out=said))
        driver._executor = SimpleNamespace(call=lambda fn, *args: fn(*args))  # no Ray: where it runs is not the point
        assert driver._call_waiting(lambda: "probed") == "probed"
    finally:
        holder.kill()
        holder.wait()
    assert f"the engine probe waits to measure: the measurement gate {gates}" in said.getvalue()
    assert f"held by pid {holder.pid} (python -c" in said.getvalue(), said.getvalue()


@pytest.mark.parametrize("command", ["export", "verify", "report"])
def test_ctrl_c_outside_a_search_does_not_speak_of_trials_to_resume(command, monkeypatch, capsys):
    """Every command's Ctrl-C said "completed trials are stored, run the same command to resume": export, verify or
    report resumes nothing."""
    import dsnas.cli

    def stopped(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(dsnas.cli, f"cmd_{command}", stopped)
    assert main([command, "anything"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "dsnas: interrupted; what was stored before is kept; run the same command again"


def test_resuming_with_other_objectives_is_refused_before_any_trial(tiny_study, capsys):
    assert main(["search", str(tiny_study), "--n-trials", "1"]) == 0
    tiny_study.write_text(tiny_study.read_text().replace('throughput = "maximize"', 'latency = "minimize"'))
    assert main(["search", str(tiny_study), "--n-trials", "2"]) == 2
    err = capsys.readouterr().err
    assert "[objectives] the stored study 'tiny' has objectives {'accuracy': 'maximize', 'throughput': 'maximize'}" \
        in err
    assert len(trials(tiny_study)[1]) == 1
    # A flipped direction: both sides show it (the stored side named no direction, so no difference showed).
    tiny_study.write_text(tiny_study.read_text().replace('latency = "minimize"', 'throughput = "minimize"'))
    assert main(["search", str(tiny_study), "--n-trials", "2"]) == 2
    assert "has objectives {'accuracy': 'maximize', 'throughput': 'maximize'}, the file asks for {'accuracy': " \
        "'maximize', 'throughput': 'minimize'}" in capsys.readouterr().err
    # Refused, the study is one file in rollback-journal mode again (an account that may only read it opens it).
    with contextlib.closing(sqlite3.connect(tiny_study.parent / "tiny.db")) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert not (tiny_study.parent / "tiny.db-wal").exists()


@pytest.mark.parametrize("old, new, said", [
    ("val_tokens = 512", "val_tokens = 1024",
     "[task.val_tokens] the stored study 'tiny' was searched with 512, the file now says 1024; its stored "
     "accuracies were measured on the task as it was. Fix: restore val_tokens = 512, or give the study a new "
     "[study] name"),
    ("val_tokens = 512", "val_tokens = 512\nlr = 0.01", "[task.lr] the stored study 'tiny' was searched with "
     "0.003, the file now says 0.01; its stored accuracies were measured on the task as it was. Fix: restore lr = "
     "0.003"),
    ("batch_sizes = [1, 4]", "batch_sizes = [1, 8]", "[hardware.batch_sizes] the stored study 'tiny' was searched "
     "with [1, 4], the file now says [1, 8]; its stored speeds were measured, and their limits judged, as it was"),
    ("max_latency_ms = 1000", "max_latency_ms = 0.001", "[hardware.constraints.max_latency_ms] the stored study "
     "'tiny' was searched with 1000.0, the file now says 0.001"),
    ("[executor]", "[engine]\nint8_backend = \"int8-static\"\n[executor]", "[engine.int8_backend] the stored study "
     "'tiny' was searched with \"auto\", the file now says \"int8-static\"; its stored candidates were compressed "
     "and measured as it was"),
])
def test_resuming_under_other_settings_is_refused_before_any_trial(finished_study, tmp_path, capsys, old, new, said):
    """A stored trial's numbers mean what the task, the measurement and the limits made them: a study resumed
    under other ones would put unlike trials on one front (once, a looser limit left a feasible trial off it)."""
    study = copy_study(finished_study, tmp_path / "s")
    original = study.read_text()
    assert old in original
    study.write_text(original.replace(old, new).replace("n_trials = 3", "n_trials = 4"))
    assert main(["search", str(study)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"dsnas: error: {study}: ") and said in err, err
    assert len(trials(study)[1]) == 3  # nothing ran
    # The budget, the executor and the sampler are not what a stored number means: a resume may change them.
    study.write_text(original.replace("n_trials = 3", "n_trials = 4").replace('name = "tpe"', 'name = "random"'))
    assert main(["search", str(study), "--executor", "local"]) == 0
    assert len(trials(study)[1]) == 4


def test_a_task_default_written_out_or_deleted_resumes_without_a_word(finished_study, tmp_path):
    """`lr = 0.003` (charlm's default) written into the file changes no trial, yet the resume was refused ("searched
    with (not set), the file now says 0.003") and report, export and dashboard said the file was edited."""
    from dsnas.study import SETTINGS_ATTR, edited_since, open_study

    study = copy_study(finished_study, tmp_path / "s")
    original = study.read_text()
    study.write_text(original.replace("val_tokens = 512", "val_tokens = 512\nlr = 0.003"))
    spec = load_study(study)
    assert edited_since(spec, open_study(spec, create=False)) == ""
    assert open_study(spec).user_attrs[SETTINGS_ATTR]["task"]["lr"] == 0.003  # resumed, recorded as written
    study.write_text(original)  # and deleted again: the default it was
    spec = load_study(study)
    assert edited_since(spec, open_study(spec, create=False)) == ""
    open_study(spec)
    study.write_text(original.replace("val_tokens = 512", "val_tokens = 512\nlr = 0.01"))  # not the default
    assert "[task.lr] is 0.01 in the file, but the study was searched with 0.003" in \
        edited_since(load_study(study), open_study(load_study(study), create=False))


def test_a_second_driver_under_other_settings_is_refused_while_the_first_runs_its_first_trial(tiny_study):
    """Before a trial finished, a second `dsnas search` with another train_tokens overwrote the recorded settings:
    bundles of the first driver's trial then carried the second's, and the first file was refused at its resume.
    A trial another driver runs binds as a finished one; one a stopped driver left does not."""
    from dsnas.errors import DsnasError
    from dsnas.spec import load_study
    from dsnas.storage import driver_identity
    from dsnas.study import SETTINGS_ATTR, open_study

    first = open_study(load_study(tiny_study))
    running = first.ask()
    first._storage.set_trial_user_attr(running._trial_id, "driver", driver_identity())  # this process: alive
    recorded = first.user_attrs[SETTINGS_ATTR]
    other = tiny_study.with_name("other.toml")
    other.write_text(tiny_study.read_text().replace("val_tokens = 512", "val_tokens = 256"))
    assert "val_tokens = 256" in other.read_text()
    with pytest.raises(DsnasError, match=r"\[task.val_tokens\] the stored study 'tiny' was searched with"):
        open_study(load_study(other))
    assert first.user_attrs[SETTINGS_ATTR] == recorded
    # Its driver gone (a pid that no longer runs), the trial binds nothing: it is queued again, to run under these.
    gone = {**driver_identity(), "pid": 2**22 + 1, "pid_start": 0}
    first._storage.set_trial_user_attr(running._trial_id, "driver", gone)
    assert open_study(load_study(other)).user_attrs[SETTINGS_ATTR]["task"]["val_tokens"] == 256


def test_a_second_driver_under_other_settings_is_refused_while_the_first_has_no_trial_yet(tiny_study):
    """Started together, the second driver came before the first's first trial (it was probing the engine): both
    ran trials, each under its own settings, and the study recorded one of them. A live driver of this host that
    recorded them binds; once it is gone, it does not."""
    import subprocess

    from dsnas import storage
    from dsnas.errors import DsnasError
    from dsnas.spec import load_study
    from dsnas.study import RECORDED_BY, SETTINGS_ATTR, open_study

    first = open_study(load_study(tiny_study))
    other_driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = {**storage.driver_identity(), "pid": other_driver.pid,
                 "pid_start": storage._start_time(other_driver.pid)}
        first.set_user_attr(SETTINGS_ATTR, {**first.user_attrs[SETTINGS_ATTR], RECORDED_BY: alive})
        other = tiny_study.with_name("other.toml")
        other.write_text(tiny_study.read_text().replace("val_tokens = 512", "val_tokens = 256"))
        with pytest.raises(DsnasError, match=r"\[task.val_tokens\] the stored study 'tiny' was searched with"):
            open_study(load_study(other))
        open_study(load_study(tiny_study))  # the same settings: a driver beside it is welcome
    finally:
        other_driver.kill()
        other_driver.wait()
    assert open_study(load_study(other)).user_attrs[SETTINGS_ATTR]["task"]["val_tokens"] == 256


def test_a_finished_run_in_a_live_process_binds_the_settings_by_its_trials_only(tiny_study):
    """A notebook's dsnas.search returned and its process lived on: its record kept binding, and another run with
    fixed settings was refused ("searched with 0") where no trial had been stored, until the kernel was killed."""
    from dsnas.spec import load_study
    from dsnas.study import RECORDED_BY, SETTINGS_ATTR, open_study

    tiny_study.write_text(tiny_study.read_text().replace("n_trials = 3", "n_trials = 1"))
    assert main(["search", str(tiny_study)]) == 0  # this process lives on, as a notebook's does
    assert RECORDED_BY not in open_study(load_study(tiny_study), create=False).user_attrs[SETTINGS_ATTR]


def test_resuming_with_other_options_in_the_space_is_refused_before_any_trial(finished_study, tmp_path, capsys):
    """Optuna keeps a parameter's options for a study's life: each trial of a resumed study whose space changed them
    once failed ("CategoricalDistribution does not support dynamic value space") and was stored failed."""
    study = copy_study(finished_study, tmp_path / "s")
    study.write_text(study.read_text().replace("n_trials = 3", "n_trials = 5"))
    space = tmp_path / "s" / "tiny_space.toml"
    original = space.read_text()
    for old, new, key, name in (("d_model = [16, 32]", "d_model = [16, 32, 64]", "choices.d_model", "d_model"),
                                ("n_heads = [1, 2]", "n_heads = [2, 1]", "per_layer.n_heads", "layer0.n_heads")):
        space.write_text(original.replace(old, new))
        assert main(["search", str(study)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"{space}: [{key}] the stored study 'tiny' sampled {name} from " in err, err
        assert f"Fix: restore {key.split('.')[-1]} = " in err and f"new [study] name in {study}" in err
        assert len(trials(study)[1]) == 3 and not trials(study, (optuna.trial.TrialState.FAIL,))[1]
    space.write_text(original.replace("n_layers = [1, 2]", "n_layers = 2"))  # a choice fixed: no options to keep
    assert main(["search", str(study), "--n-trials", "4"]) == 0
    assert sum("reused_from" not in t.user_attrs for t in trials(study)[1]) == 4  # a repeat is reused, not counted


# Ray made unimportable, as on a machine without its wheel: find_spec("ray") is None, `import ray` raises.
NO_RAY = "import sys; sys.modules['ray'] = None; from dsnas.cli import main; sys.exit(main(sys.argv[1:]))"


def test_a_local_search_needs_no_ray_and_a_ray_one_says_how_to_get_it(tiny_study):
    def dsnas(*args):
        return subprocess.run([sys.executable, "-c", NO_RAY, *args], capture_output=True, text=True, timeout=300)

    local = dsnas("search", str(tiny_study), "--executor", "local", "--n-trials", "1")
    assert local.returncode == 0, local.stderr
    assert "1 trials completed" in local.stdout
    refused = dsnas("search", str(tiny_study), "--executor", "ray")
    assert refused.returncode == 2
    err = refused.stderr.strip()
    assert err.count("\n") == 0 and "[executor.kind] the ray executor needs the ray package" in err
    assert 'pip install ray, or set kind = "local"' in err and str(tiny_study) in err


def test_a_resumed_run_whose_trials_all_fail_exits_non_zero(finished_study, tmp_path, capsys, monkeypatch):
    """Trials stored by an earlier run do not hide that every trial of this one failed."""
    from dsnas.errors import TrialError
    from dsnas.tasks.charlm import CharLMTask

    def diverges(*args, **kwargs):  # the study's settings stay as they were: a resume under others is refused
        raise TrialError("training diverged: the loss became nan")

    monkeypatch.setattr(CharLMTask, "train", diverges)  # the local executor trains in this process
    study = copy_study(finished_study, tmp_path / "s")
    study.write_text(study.read_text().replace("n_trials = 3", "n_trials = 4").replace("max_failures = 3",
                                                                                     "max_failures = 0"))
    assert main(["search", str(study), "--executor", "local"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("dsnas: all 1 trials of this run failed; the first: trial 3: ") and "diverged" in err


def test_a_resumed_search_counts_a_reused_repeat_once_on_the_front(tiny_study, capsys):
    """A repeat has its original's values; the progress line's front counted both on a resume (front 6 beside a
    final table of 5), where a live run and the final table count the original alone."""
    from optuna.trial import create_trial

    from dsnas.progress import Progress

    spec = load_study(tiny_study)
    study = optuna.create_study(directions=spec.directions)
    for values, attrs in (([0.5, 100.0], {}), ([0.5, 100.0], {"reused_from": 0}), ([0.4, 300.0], {})):
        study.add_trial(create_trial(values=values, user_attrs={"feasible": 1.0, **attrs}))
    progress = Progress(spec)
    progress.start(study, [])
    assert progress.front_points == [[0.5, 100.0], [0.4, 300.0]] and progress.reused == 1


def test_flags_and_places_that_cannot_work_are_one_line(tmp_path, finished_study, capsys):
    """Each was a traceback: init into a file, --port 99999, --threads -2, a report --out that is a file (and
    --host '' served every interface)."""
    (tmp_path / "afile").write_text("")
    cases = [(["init", str(tmp_path / "afile")], "cannot write "),
             (["dashboard", str(finished_study), "--port", "99999"], "--port 99999: must be a port number"),
             # A blank host listened on every interface, at "http://:8080/dashboard/".
             (["dashboard", str(finished_study), "--host", ""], "--host '': must name an address to listen on"),
             (["doctor", "--threads", "-2"], "--threads -2: must be from 1 to the "),
             # More threads than CPUs: 100000 crashed torch (exit 139) after the capability table was printed.
             (["doctor", "--ceilings", "--threads", "100000"], "--threads 100000: must be from 1 to the "),
             (["report", str(finished_study), "--out", str(tmp_path / "afile")], "is a file, and the report is a "
                                                                                 "folder")]
    for argv, said in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("dsnas: error: ") and said in err and "Fix: " in err and err.count("\n") == 1, err


def test_a_driver_whose_budget_runs_elsewhere_takes_back_the_trial_of_one_that_died(tiny_study, monkeypatch, capsys):
    """Two drivers on one study, the other killed while it ran a trial: this driver ended ('the rest of the budget
    is running in other drivers') and the dead one's trial stayed RUNNING, the study a trial short of n_trials.
    It now waits while other drivers hold the rest, and takes back a trial whose driver stopped."""
    from dsnas import driver as dsnas_driver
    from dsnas import storage as dsnas_storage
    from dsnas.study import open_study

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        study = open_study(load_study(tiny_study))
        held = study.ask()  # the other driver's trial
        held.set_user_attr("driver", {"host": dsnas_storage.driver_identity()["host"], "pid": other.pid,
                                      "pid_start": dsnas_storage._start_time(other.pid)})
        watch = dsnas_driver.Driver._watch_other_drivers

        def other_dies_while_watched(self):
            other.kill()
            other.wait()
            watch(self)

        monkeypatch.setattr(dsnas_driver.Driver, "_watch_other_drivers", other_dies_while_watched)
        assert main(["search", str(tiny_study), "--executor", "local", "--n-trials", "2"]) == 0
    finally:
        other.kill()
    out = capsys.readouterr().out
    assert f"taken back from a stopped driver: trial(s) {held.number}" in out
    _, after = trials(tiny_study)
    by_number = {t.number: t for t in after}
    assert by_number[held.number].state == TrialState.FAIL
    assert "stopped while the trial ran" in by_number[held.number].user_attrs["fail_reason"]
    assert sum(t.state == TrialState.COMPLETE for t in after) == 2


def test_drivers_on_one_study_get_their_own_seed_and_see_each_others_candidates(tiny_study):
    """Two drivers started together on one study seeded their samplers alike (seed + the same count of trials)
    and proposed the same candidates in lockstep; and a driver indexed the study's completed candidates once, so it
    trained again what the other had just completed (24 trials of 19 candidates)."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from dsnas.driver import Driver
    from dsnas.progress import Progress
    from dsnas.run import DRIVER_SEED_STEP, driver_run, make_sampler
    from dsnas.study import open_study
    from dsnas.worker import run_trial

    spec = load_study(tiny_study)
    study = open_study(spec)
    assert [driver_run(study, spec), driver_run(study, spec)] == [0, 1]
    assert make_sampler(spec, 0, run=1)._rng.rng.bytes(8) != make_sampler(spec, 0)._rng.rng.bytes(8)
    assert DRIVER_SEED_STEP > 10**6
    mine = Driver(spec, study, run_trial, Progress(spec, out=open(os.devnull, "w")))
    assert mine._original("candidate") is None  # indexed now: nothing completed yet
    study.add_trial(create_trial(value=None, values=[0.5, 100.0], params={"x": 0.5},
                                 distributions={"x": FloatDistribution(0, 1)},
                                 user_attrs={"evaluation_key": "candidate"}))  # the other driver's
    assert mine._original("candidate") == 0


def test_a_study_of_an_older_dsnas_is_not_stamped_with_an_edited_study_file(finished_study, tmp_path, capsys):
    """A study with trials but no recorded settings (searched before dsnas recorded them) took the file's settings
    of the day it was resumed: an edited context was then what its bundles carried and what a resume demanded. And
    what its trials say of their settings was never checked: it resumed under other batch sizes, or another
    context, without a word (one front of two meanings), and an export carried the edited context (verify then
    crashed on it)."""
    from dsnas.spec import load_study
    from dsnas.study import SETTINGS_ATTR, as_searched, open_study

    study = copy_study(finished_study, tmp_path / "s")
    spec = load_study(study)
    stored = open_study(spec, create=False)
    stored._storage.set_study_user_attr(stored._study_id, SETTINGS_ATTR, None)  # as an older dsnas left it
    original = study.read_text()
    study.write_text(original.replace("batch_sizes = [1, 4]", "batch_sizes = [1, 8]").replace("context = 16",
                                                                                              "context = 32"))
    assert main(["search", str(study), "--n-trials", "9"]) == 2
    err = capsys.readouterr().err
    assert "[hardware.batch_sizes] the stored study 'tiny' was searched with [1, 4] (as its trials say" in err
    edited = load_study(study)
    assert not open_study(edited, create=False).user_attrs.get(SETTINGS_ATTR)  # nothing stamped
    searched = as_searched(edited, open_study(edited, create=False))  # as its trials say, for its bundles
    assert searched.hardware.batch_sizes == (1, 4) and searched.task.params["context"] == 16
    study.write_text(original)
    assert main(["search", str(study)]) == 0  # not refused for a setting no trial ran under
    # A task's own figures ("recorded") may give some batch sizes only: no evidence of the batch sizes asked for.
    from types import SimpleNamespace

    from dsnas.study import inferred_differences

    own = SimpleNamespace(user_attrs={"profile": {"backend": "recorded", "batches": {"1": {}}}})
    assert inferred_differences(spec, [own]) == []
    # The context line deleted: the task's default (64) is what a resume would run, against trials of 16.
    study.write_text(original.replace("context = 16\n", ""))
    deleted = load_study(study)
    assert ("task.context", 16, 64) in inferred_differences(deleted, open_study(deleted, create=False).trials)
    assert as_searched(deleted, open_study(deleted, create=False)).task.params["context"] == 16  # its bundles'
    assert main(["search", str(study), "--n-trials", "9"]) == 2
    assert "[task.context] the stored study 'tiny' was searched with 16 (as its trials say" in capsys.readouterr().err


def test_a_study_whose_data_changed_since_its_trials_is_refused_before_any_trial(tiny_study, capsys):
    """A class folder added, a corpus edited: the [task] keys were the same, so the study resumed, and trials of
    the new data shared a front, rung cutoffs and reused results with trials of the old. The same data moved with
    its study folder is the same data."""
    import shutil

    corpus = tiny_study.parent / "text.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(3000)))
    tiny_study.write_text(tiny_study.read_text().replace("corpus_bytes = 200_000", 'corpus = "text.txt"')
                          .replace("n_trials = 3", "n_trials = 1"))
    assert main(["search", str(tiny_study)]) == 0
    moved = tiny_study.parent.parent / "moved"
    shutil.copytree(tiny_study.parent, moved)
    assert main(["search", str(moved / tiny_study.name), "--n-trials", "2"]) == 0  # moved whole: the same data
    capsys.readouterr()
    corpus.write_text(corpus.read_text().replace("fox", "cat"))
    # In the same process (a notebook's second dsnas.search): the task reads its data again, as a new process does.
    assert main(["search", str(tiny_study), "--n-trials", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "[task] the data differs from what the stored trials trained on" in err, err
    assert "corpus_sha256" in err and "Fix: restore the data, or give the study a new [study] name" in err
    assert len(trials(tiny_study)[1]) == 1  # nothing ran


def test_threads_written_out_at_the_count_every_trial_measured_with_resumes(finished_study, tmp_path):
    """Left out, threads is the CPUs the process may use: `threads = 2` written out on the 2-CPU machine that
    searched changes no number, yet the resume was refused ("[hardware.threads] searched with (not set)")."""
    from dsnas.errors import DsnasError
    from dsnas.study import edited_since, open_study

    study = copy_study(finished_study, tmp_path / "s")
    original = study.read_text()
    used = {t.user_attrs["profile"]["threads"] for t in trials(study)[1]}
    assert len(used) == 1 and "threads =" not in original
    count = used.pop()
    study.write_text(original.replace("measure_s = 0.02", f"measure_s = 0.02\nthreads = {count + 1}"))
    with pytest.raises(DsnasError, match=r"\[hardware.threads\] the stored study 'tiny' was searched with \(not set\)"):
        open_study(read_study(study))  # (load_study refuses more threads than this machine's CPUs first)
    study.write_text(original.replace("measure_s = 0.02", f"measure_s = 0.02\nthreads = {count}"))
    spec = load_study(study)
    assert edited_since(spec, open_study(spec, create=False)) == ""
    open_study(spec)  # resumed, and recorded with threads = count
    study.write_text(original)  # the line deleted again, on the machine whose CPU count it was: no change either
    spec = load_study(study)
    assert edited_since(spec, open_study(spec, create=False)) == ""
    open_study(spec)


def test_a_small_models_peak_memory_is_printed_with_its_digits():
    """At one decimal, a measured 0.0399 MiB read 0.0 in the front (as if nothing was measured) and 0.0927 and
    0.139 MiB both read 0.1; a large figure keeps its thousands, not an exponent."""
    from dsnas.progress import format_metric

    shown = [format_metric("peak_memory_mb", v) for v in (0.0399, 0.0927, 0.139, 4.004, 99.96, 1234.5)]
    assert shown == ["0.0399", "0.0927", "0.139", "4.00", "100", "1,234"]


def test_a_slow_tasks_throughput_is_printed_with_its_digits():
    """Whole numbers read 52 for both 52.4 and 52.2 items/s; from 100 up they stay whole, with their thousands."""
    from dsnas.progress import format_metric

    shown = [format_metric("throughput_tok_s", v) for v in (52.4, 52.2, 0.731, 430_226.4)]
    assert shown == ["52.4", "52.2", "0.731", "430,226"]


def test_a_study_read_as_searched_has_the_engine_it_was_searched_with(finished_study, tmp_path):
    """`dsnas profile --trial N` (and export, route) read the study as searched: its task and hardware, but the
    engine from the file as edited since (an int8_backend edited there built the trial's INT8 layers otherwise)."""
    from dsnas.study import as_searched, open_study

    study = copy_study(finished_study, tmp_path / "s")
    study.write_text(study.read_text().replace("[executor]", '[engine]\nint8_backend = "torch-dynamic"\n'
                                                             "calibration_batches = 3\n[executor]"))
    edited = read_study(study)
    searched = as_searched(edited, open_study(edited, create=False))
    assert (searched.engine.int8_backend, searched.engine.calibration_batches) == ("auto", 8)


def test_a_sigterm_before_a_search_loop_starts_is_a_stop_said_in_one_line(monkeypatch, capsys):
    """SIGTERM while a search opened its study (before its loop's guard) killed the process at once, without a
    word, its database left in write-ahead-log mode: it now raises where it lands, and the command's cleanup runs."""
    import os
    import signal
    import time

    import dsnas.cli

    cleaned = []

    def opening(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the signal lands here
        finally:
            cleaned.append(True)
        return 0

    monkeypatch.setattr(dsnas.cli, "cmd_search", opening)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["search", "anything"]) == 143
    assert cleaned == [True]
    assert capsys.readouterr().err.strip() == "dsnas: terminated; completed trials are stored, run the same " \
                                              "command to resume"
    assert signal.getsignal(signal.SIGTERM) == before  # as it was


def test_threads_written_out_resumes_a_study_with_a_repeat(finished_study, tmp_path):
    """A repeat answered from an earlier trial (and a candidate the predictor skipped) keeps no profile: counted
    as a trial of another thread count, it refused the resume of `threads = 2` written out as every measurement ran."""
    from dsnas.study import edited_since, open_study

    study = copy_study(finished_study, tmp_path / "s")
    optuna_study, done = trials(study)
    first = done[0]
    optuna_study.add_trial(optuna.trial.create_trial(
        values=list(first.values), params=first.params, distributions=first.distributions,
        user_attrs={"accuracy": first.user_attrs["accuracy"], "arch": first.user_attrs["arch"], "reused_from": 0}))
    threads = {t.user_attrs["profile"]["threads"] for t in done}
    assert len(threads) == 1
    study.write_text(study.read_text().replace("measure_s = 0.02", f"measure_s = 0.02\nthreads = {threads.pop()}"))
    spec = load_study(study)
    assert edited_since(spec, open_study(spec, create=False)) == ""
    open_study(spec)  # resumed
