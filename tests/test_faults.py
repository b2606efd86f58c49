"""Faults a search survives, each injected for real: a worker process that dies mid-trial (run again up to
[budget] retries), one that the kernel's OOM killer ends (the same, with "out of memory" as the reason), a trial
past its time limit (failed, its worker killed), training that diverges (a FAIL trial with the reason, not a
crash)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from optuna.trial import TrialState

from dsnas.cli import main
from dsnas.executors.ray_executor import explain_death
from dsnas.tasks.faults import memory_cgroup, memory_cgroup_supported


def faulty_study(study_file, fault: str, n_trials: int, extra_budget: str = "", extra_task: str = "") -> str:
    """The tiny study, on Ray, with a task that injects ``fault`` into the first trial's training."""
    marker = study_file.parent / "marker.txt"
    text = study_file.read_text().replace('name = "charlm"', f'name = "dsnas.tasks.faults:faulty_charlm"\n'
                                                               f'fault = "{fault}"\nmarker = "{marker}"\n{extra_task}')
    text = text.replace("n_trials = 3", f"n_trials = {n_trials}\n{extra_budget}").replace('kind = "local"', 'kind = "ray"')
    study_file.write_text(text)
    return str(marker)


def stored(study_file):
    from dsnas.spec import load_study
    from dsnas.study import open_study

    return open_study(load_study(study_file), create=False).trials


@pytest.mark.slow
def test_a_worker_that_dies_fails_its_trial_which_runs_again(tiny_study, capsys):
    faulty_study(tiny_study, "crash_once", n_trials=2, extra_budget="retries = 1")
    assert main(["search", str(tiny_study)]) == 0
    trials = stored(tiny_study)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1
    assert "its worker died" in failed[0].user_attrs["fail_reason"]
    assert "WorkerCrashedError" in failed[0].user_attrs["fail_reason"]
    retried = [t for t in trials if t.user_attrs.get("requeued_from") == failed[0].number]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert retried[0].params == failed[0].params and retried[0].user_attrs["attempt"] == 2
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2  # the search went on to its budget


@pytest.mark.slow
def test_a_worker_the_kernel_kills_for_memory_fails_its_trial_as_out_of_memory_and_runs_again(tiny_study):
    ok, why = memory_cgroup_supported()
    if not ok:
        pytest.skip(why)
    # The first trial's worker joins a cgroup of 64 MiB and allocates until the kernel's OOM killer ends it:
    # the machine's memory is never at stake.
    with memory_cgroup(limit_mb=64) as cgroup:
        faulty_study(tiny_study, "oom_once", n_trials=2, extra_budget="retries = 1", extra_task=f'cgroup = "{cgroup}"')
        assert main(["search", str(tiny_study)]) == 0
    trials = stored(tiny_study)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1, [(t.number, t.state, t.user_attrs.get("fail_reason")) for t in trials]
    reason = failed[0].user_attrs["fail_reason"]
    assert reason.startswith("its worker died (OutOfMemoryError: out of memory: the worker died (WorkerCrashedError) "
                             "while the kernel's OOM killer ended"), reason
    retried = [t for t in trials if t.user_attrs.get("requeued_from") == failed[0].number]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert retried[0].params == failed[0].params
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2


def test_a_worker_death_is_named_out_of_memory_only_with_evidence():
    from ray.exceptions import OutOfMemoryError, WorkerCrashedError

    monitor = OutOfMemoryError("Task was killed due to the node running low on memory.\nMemory on the node was "
                               "23.1GB / 24.0GB (0.96).\n\nRefer to the documentation on how to address it.")
    said = explain_death(monitor, None, None, lambda: True)
    assert isinstance(said, OutOfMemoryError)
    assert str(said) == ("out of memory: Ray's memory monitor killed the worker. Task was killed due to the node "
                         "running low on memory. Memory on the node was 23.1GB / 24.0GB (0.96).")
    crash = WorkerCrashedError()
    kernel = explain_death(crash, 3, 4, lambda: True)
    assert isinstance(kernel, OutOfMemoryError) and "oom_kill in /proc/vmstat went 3 -> 4" in str(kernel)
    assert explain_death(crash, 3, 3, lambda: True) is crash  # no OOM kill meanwhile: a crash
    assert explain_death(crash, 3, 4, lambda: False) is crash  # nodes elsewhere: this machine's count says nothing
    assert explain_death(crash, None, None, lambda: True) is crash  # no /proc/vmstat
    diverged = ValueError("loss is nan")
    assert explain_death(diverged, 3, 4, lambda: True) is diverged


@pytest.mark.slow
def test_a_trial_past_its_time_limit_fails_and_its_worker_is_killed(tiny_study):
    tiny_study.write_text(tiny_study.read_text().replace("max_failures = 3", "max_failures = 0"))
    marker = faulty_study(tiny_study, "hang_once", n_trials=1, extra_budget="trial_timeout_s = 4")
    assert main(["search", str(tiny_study)]) == 1  # the run's only trial failed
    trials = stored(tiny_study)
    assert [t.state for t in trials] == [TrialState.FAIL]
    assert trials[0].user_attrs["fail_reason"] == ("ran longer than trial_timeout_s = 4 s (not counting time queued "
                                                   "or waiting for another trial); its worker was stopped")
    pid = int(open(marker).read().split()[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the hung worker process is gone


def test_a_time_limit_needs_an_executor_that_can_stop_a_trial(tiny_study, capsys):
    tiny_study.write_text(tiny_study.read_text().replace("n_trials = 3", "n_trials = 3\ntrial_timeout_s = 5"))
    assert main(["search", str(tiny_study)]) == 2
    err = capsys.readouterr().err
    assert "[budget.trial_timeout_s] needs the ray executor" in err and 'kind = "ray"' in err
    # Chosen by the flag, not the file: the message blames the flag.
    tiny_study.write_text(tiny_study.read_text().replace('kind = "local"', 'kind = "ray"'))
    assert main(["search", str(tiny_study), "--executor", "local"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dsnas: error: {tiny_study} with --executor local: [budget.trial_timeout_s] needs the ray")
    assert err.endswith("(or leave out --executor local)") and err.count("\n") == 0


def test_diverging_training_is_a_fail_trial_with_the_reason(tiny_study):
    tiny_study.write_text(tiny_study.read_text().replace("val_tokens = 512", "val_tokens = 512\nlr = 1e30")
                          .replace("max_failures = 3", "max_failures = 0"))
    assert main(["search", str(tiny_study)]) == 1  # the run's only trial failed
    trials = stored(tiny_study)
    assert trials[0].state == TrialState.FAIL
    assert "training diverged: the loss became" in trials[0].user_attrs["fail_reason"]


@pytest.mark.slow
def test_a_time_limit_counts_a_trials_own_time_not_its_wait_in_rays_queue(tmp_path):
    """One trial at a time fits (cpus_per_trial = every CPU), three are dispatched: the last waits two trials'
    time in Ray's queue. Each runs 2.5 s of a 5 s limit; counted from dispatch, the queued ones failed."""
    from tests.table_study import write_table_study

    (tmp_path / "slow_task.py").write_text(
        "import time\nfrom table_task import TableTask\n\n\nclass SlowTask(TableTask):\n"
        "    def evaluate_arch(self, arch, **kwargs):\n        time.sleep(2.5)\n"
        "        return super().evaluate_arch(arch, **kwargs)\n")
    study = write_table_study(tmp_path, n_trials=3, executor="ray", task="slow_task:SlowTask",
                              fidelity='kind = "none"')
    study.write_text(study.read_text().replace('kind = "ray"', f'kind = "ray"\nworkers = 3\n'
                                                               f'cpus_per_trial = {os.cpu_count()}')
                     .replace("n_trials = 3", "n_trials = 3\ntrial_timeout_s = 5"))
    assert main(["search", str(study)]) == 0
    assert [t.state for t in stored(study)] == [TrialState.COMPLETE] * 3


def test_a_trial_that_fits_on_no_node_is_refused_before_it_waits_forever():
    """Ray queues a task no node can hold without a word: the search printed "trial 0 started", then nothing."""
    from types import SimpleNamespace

    from dsnas.errors import DsnasError
    from dsnas.executors.ray_executor import _check_a_node_fits

    ray = SimpleNamespace(nodes=lambda: [{"Alive": True, "Resources": {"CPU": 2.0}},
                                         {"Alive": True, "Resources": {"CPU": 1.0, "GPU": 1.0}},
                                         {"Alive": False, "Resources": {"CPU": 64.0}}])
    _check_a_node_fits(ray, SimpleNamespace(cpus_per_trial=2), 1)  # 2 CPUs on one node, a GPU on another: fits each
    with pytest.raises(DsnasError, match=r"\[executor.cpus_per_trial\] a trial runs on one node and asks for 4 CPUs, "
                                         r"but the largest of the Ray cluster's 2 node\(s\) has 2"):
        _check_a_node_fits(ray, SimpleNamespace(cpus_per_trial=4), 0)
    with pytest.raises(DsnasError, match=r"asks for 2 GPUs, but the largest .* has 1. Fix: set \[executor\] "
                                         r"gpus_per_trial = 1 or less"):
        _check_a_node_fits(ray, SimpleNamespace(cpus_per_trial=1), 2)
    with pytest.raises(DsnasError, match=r"^/s/study.toml: \[executor.cpus_per_trial\] a trial runs on one node"):
        _check_a_node_fits(ray, SimpleNamespace(cpus_per_trial=4), 0, "/s/study.toml")  # the file named, as elsewhere


def test_a_ray_started_for_a_refused_search_is_shut_down():
    """A search refused after it started its own Ray (a trial no node holds) left Ray running; a later search in
    the same process joined it as someone else's and never shut it down either."""
    import ray

    from dsnas.errors import DsnasError
    from dsnas.executors.ray_executor import RayExecutor
    from dsnas.spec import ExecutorSpec

    assert not ray.is_initialized()
    with pytest.raises(DsnasError, match="asks for"):
        RayExecutor(ExecutorSpec(cpus_per_trial=(os.cpu_count() or 1) + 8), "cpu")
    assert not ray.is_initialized()


def test_ctrl_c_while_ray_starts_leaves_no_ray_running(monkeypatch):
    """Ctrl-C inside ray.init (a notebook's interrupt) left Ray's processes running for the kernel's life."""
    import ray

    from dsnas.executors.ray_executor import RayExecutor
    from dsnas.spec import ExecutorSpec

    started = ray.init

    def interrupted(**kwargs):
        started(**kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(ray, "init", interrupted)
    with pytest.raises(KeyboardInterrupt):
        RayExecutor(ExecutorSpec(), "cpu")
    assert not ray.is_initialized()


def test_errors_raised_in_a_worker_cross_to_the_driver_whole():
    """A SpecError raised in a Ray worker could not be unpickled in the driver: the trial's reason was Ray's
    "Failed to deserialize exception", with dsnas's one line buried in a colored traceback."""
    import pickle

    from dsnas.errors import Invalid, SpecError

    err = pickle.loads(pickle.dumps(SpecError("study.toml", "task.corpus", "must exist", "x.txt", "check the path")))
    assert str(err) == "study.toml: [task.corpus] must exist, but got 'x.txt'. Fix: check the path"
    assert (err.where, err.key, err.fix) == ("study.toml", "task.corpus", "check the path")
    inv = pickle.loads(pickle.dumps(Invalid("d_model", "must be positive", -1, "use 64")))
    assert (str(inv), inv.key, inv.got, inv.fix) == ("must be positive", "d_model", -1, "use 64")


@pytest.mark.slow
def test_a_search_on_a_local_ray_ignores_a_ray_address_in_the_environment(tiny_study, monkeypatch):
    """Without [executor] address dsnas starts a Ray of its own; ray.init(address=None) joined whatever RAY_ADDRESS
    (or a `ray start` on the machine) named, and refused the CPU count dsnas passed, in a traceback."""
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # nothing listens there
    tiny_study.write_text(tiny_study.read_text().replace('kind = "local"', 'kind = "ray"')
                          .replace("n_trials = 3", "n_trials = 1"))
    assert main(["search", str(tiny_study)]) == 0
    assert [t.state for t in stored(tiny_study)] == [TrialState.COMPLETE]


def test_a_trial_another_driver_took_back_is_one_line_and_the_search_goes_on(tmp_path, monkeypatch, capsys):
    """A driver paused past GRACE_S (Ctrl-Z, a long outage) had its trial taken back and finished by another: storing
    its result stopped it with Optuna's UpdateFinishedTrialError, twice (again as it failed its running trials)."""
    from tests.table_study import write_table_study

    (tmp_path / "taken_task.py").write_text(
        "import os\nimport optuna\nfrom optuna.trial import TrialState\nfrom table_task import TableTask\n\n\n"
        "class TakenTask(TableTask):\n    def evaluate_arch(self, arch, **kwargs):\n"
        "        out = super().evaluate_arch(arch, **kwargs)\n"
        "        storage = optuna.storages.RDBStorage(os.environ['TAKEN_URL'])\n"
        "        for t in storage.get_all_trials(storage.get_study_id_from_name('table'), states=(TrialState.RUNNING,)):\n"
        "            if t.number == 0:  # another driver's recovery: failed, as recover_stale_trials does\n"
        "                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)\n"
        "        return out\n")
    study = write_table_study(tmp_path, n_trials=2, task="taken_task:TakenTask", fidelity='kind = "none"')
    monkeypatch.setenv("TAKEN_URL", f"sqlite:///{tmp_path / 'table.db'}")
    assert main(["search", str(study)]) == 0
    out = capsys.readouterr().out
    assert "trial 0 was taken back by another driver while this one sent no heartbeat" in out, out
    assert [t.state for t in stored(study)] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]


def test_a_trial_taken_back_just_before_it_is_told_is_one_line_too(tmp_path, monkeypatch, capsys):
    """Taken back between its last stored figure and study.tell, which reads the trial first: "Cannot tell a FAIL
    trial." stopped the search."""
    import optuna

    from dsnas import driver
    from tests.table_study import write_table_study

    study = write_table_study(tmp_path, n_trials=2, fidelity='kind = "none"')
    real = driver.Driver._store_artifacts

    def then_taken_back(self, trial, outcome):
        real(self, trial, outcome)
        if trial.number == 0:  # what another driver's recover_stale_trials does, through its own storage
            storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'table.db'}")
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)

    monkeypatch.setattr(driver.Driver, "_store_artifacts", then_taken_back)
    assert main(["search", str(study)]) == 0
    assert "trial 0 was taken back by another driver" in capsys.readouterr().out
    assert [t.state for t in stored(study)] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]


def test_a_trial_past_its_time_limit_that_another_driver_took_back_is_one_line_too(capsys):
    """A driver paused past GRACE_S (Ctrl-Z) whose trial ran past trial_timeout_s meanwhile, taken back and finished by
    another driver: stopping it raised Optuna's UpdateFinishedTrialError, and the search ended in a traceback."""
    import types

    import optuna

    from dsnas.driver import Driver
    from dsnas.interrupts import InterruptGuard

    def finished_elsewhere(trial, reason):
        raise optuna.exceptions.UpdateFinishedTrialError("Trial#0 has already finished and can not be updated.")

    cancelled = []
    said = []
    fake = types.SimpleNamespace(
        clocks={0: types.SimpleNamespace(ran_s=lambda now: 99.0)}, running={0: object()}, stopped={}, twins={},
        recording=None, guard=InterruptGuard(), spec=types.SimpleNamespace(budget=types.SimpleNamespace(
            trial_timeout_s=30.0)), executor=types.SimpleNamespace(cancel=cancelled.append), _fail=finished_elsewhere,
        progress=types.SimpleNamespace(say=said.append))
    fake._unless_taken_back = types.MethodType(Driver._unless_taken_back, fake)
    Driver._stop_overdue(fake)
    assert cancelled == [0] and fake.running == {} and fake.clocks == {}
    assert said and said[0].startswith("  trial 0 was taken back by another driver")


def test_a_trial_queued_again_keeps_its_hyperband_bracket(tmp_path):
    """A candidate of the bracket without rungs, interrupted and resumed, ran in a bracket whose first rung could
    stop it (its bracket came from the new trial's number; its seed was kept)."""
    import optuna
    from optuna.distributions import IntDistribution
    from optuna.trial import create_trial

    from dsnas.storage import requeue

    study = optuna.create_study(directions=["maximize"])
    dist = {"x": IntDistribution(0, 3)}
    started = create_trial(state=TrialState.FAIL, params={"x": 1}, distributions=dist,
                           user_attrs={"bracket": 2, "train_seed": 7})
    waited = create_trial(state=TrialState.FAIL, params={"x": 2}, distributions=dist)  # failed before its start
    for trial in (started, waited):
        study.add_trial(trial)
    stored = study.get_trials()
    requeue(study, stored[0], seed=100, bracket=0)
    requeue(study, stored[1], seed=101, bracket=1)
    queued = [t.user_attrs for t in study.get_trials(states=(TrialState.WAITING,))]
    assert [(q["bracket"], q["train_seed"]) for q in queued] == [(2, 7), (1, 101)]
    # The driver trains the queued trial in its bracket, not in its new number's.
    from dsnas.fidelity import RungPlan
    from dsnas.spec import load_study
    from tests.table_study import write_table_study

    table = write_table_study(tmp_path, n_trials=1, fidelity='kind = "hyperband"\nmin_fraction = 0.1')
    assert main(["search", str(table)]) == 0
    spec = load_study(table)
    stored = optuna.load_study(study_name=spec.name, storage=spec.storage)
    first = stored.trials[0]
    plan = RungPlan(spec.fidelity)
    other = next(b for b in range(plan.brackets) if b != plan.bracket_of(1))
    stored.add_trial(create_trial(state=TrialState.WAITING, params=first.params, distributions=first.distributions,
                                  user_attrs={"requeued_from": 0, "attempt": 2, "bracket": other}))
    assert main(["search", str(table), "--n-trials", "2"]) == 0
    assert stored.trials[1].user_attrs["bracket"] == other


def test_a_trials_files_are_staged_beside_the_artifacts_not_in_the_temp_folder(tiny_study, monkeypatch):
    """A small or full /tmp stopped the search with a traceback after the trial had trained (its weights were
    written there first), though the study's folder had room. A staging folder a driver killed with kill -9 left
    held a copy of the weights for good: the next upload removes it once its process is gone."""
    import subprocess
    import sys

    from dsnas.storage import process_tag

    artifacts = tiny_study.parent / "tiny_artifacts"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = artifacts / f".staging-{process_tag().rsplit('-', 3)[0]}-{int(gone.stdout)}-123-0a1b2c"
    alive = artifacts / f".staging-{process_tag()}"  # another driver of this host, uploading now
    for folder in (killed, alive):
        folder.mkdir(parents=True)
        (folder / "trial9-weights.safetensors").write_bytes(b"half")
    import optuna.artifacts

    staged: list[Path] = []
    real = optuna.artifacts.upload_artifact

    def recorded(**kwargs):
        staged.append(Path(kwargs["file_path"]).parent.parent)
        return real(**kwargs)

    monkeypatch.setattr(optuna.artifacts, "upload_artifact", recorded)
    tiny_study.write_text(tiny_study.read_text().replace("n_trials = 3", "n_trials = 1"))
    assert main(["search", str(tiny_study)]) == 0
    assert staged and set(staged) == {artifacts}
    assert [p.name for p in artifacts.glob(".staging-*")] == [alive.name]  # its own removed once uploaded, too


def test_a_full_disk_stops_a_search_in_one_line_and_the_next_run_resumes(tiny_study, monkeypatch, capsys):
    """A full disk under the artifacts folder (ENOSPC) or under the study's database (SQLite's "database or disk is
    full", which Optuna wraps as "invalid data in the commit") stopped the search with a traceback, four of them
    for the database."""
    import errno
    import sqlite3

    import optuna

    from dsnas import driver

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def database_full(*args, **kwargs):
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.OperationalError as e:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the commit. This typically "
                                                         "happens due to invalid data in the commit") from e

    for full in (no_space, database_full):
        monkeypatch.setattr(driver.Driver, "_store_artifacts", full)
        assert main(["search", str(tiny_study)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0, err
        assert err.startswith("dsnas: error: a disk is full ("), err
        assert f"Fix: free space on the disk that holds {tiny_study.parent} " in err and "the search resumes" in err
    monkeypatch.undo()
    assert main(["search", str(tiny_study)]) == 0
    assert sum(t.state == TrialState.COMPLETE for t in stored(tiny_study)) == 3
    from dsnas.export import bundle

    monkeypatch.setattr(bundle, "_copy_artifacts", no_space)  # export, report and route: the same one line
    out = tiny_study.parent / "bundle"
    assert main(["export", str(tiny_study), "--pick", "max-accuracy", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"Fix: free space on the disk that holds {out} " in err, err
    assert not out.exists()


def test_an_interrupted_trial_whose_requeue_is_refused_is_taken_back_by_the_next_run(tiny_study, monkeypatch):
    """Ctrl-C during a trial, and the database refuses the copy queued again (a full disk): the trial was left FAIL,
    its reason "queued again", with nothing queued, and the next run never trained the candidate again."""
    import sqlite3

    from dsnas import driver, storage, worker

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    def database_full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(worker._Candidate, "_train", interrupted)
    monkeypatch.setattr(driver, "requeue", database_full)
    assert main(["search", str(tiny_study)]) == 2
    monkeypatch.undo()
    # The stopped driver was this test's process, which lives on: as a later command's, it is gone.
    monkeypatch.setattr(storage, "driver_gone", lambda driver: True)
    assert main(["search", str(tiny_study)]) == 0
    trials = stored(tiny_study)
    assert trials[0].state == TrialState.FAIL
    again = [t for t in trials if t.user_attrs.get("requeued_from") == 0]
    assert len(again) == 1 and again[0].params == trials[0].params and again[0].state == TrialState.COMPLETE
