"""Recovery of trials that a stopped driver left RUNNING: a dead local pid, silent heartbeats, no driver at all;
and a damaged SQLite file, refused with the command that recovers it."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import optuna
import pytest
from conftest import copy_study
from optuna.trial import TrialState

from dsnas import storage as dsnas_storage
from dsnas.cli import main
from dsnas.errors import DsnasError


def test_stale_trials_are_failed_with_a_reason_and_queued_again(tmp_path, monkeypatch):
    monkeypatch.setattr(dsnas_storage, "GRACE_S", 1)
    monkeypatch.setattr(dsnas_storage, "HEARTBEAT_S", 1)
    storage = dsnas_storage.open_storage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(storage=storage, directions=["maximize", "maximize"])
    me = dsnas_storage.driver_identity()

    elsewhere = study.ask({"x": optuna.distributions.CategoricalDistribution([1, 2])})
    elsewhere.set_user_attr("driver", {**me, "host": "another-machine"})
    study._storage.record_heartbeat(elsewhere._trial_id)
    undispatched = study.ask()
    silent = study.ask()  # its driver elsewhere died before its first heartbeat, or the host was renamed
    silent.set_user_attr("driver", {**me, "host": "old-container-3f2a"})
    alive = study.ask()
    alive.set_user_attr("driver", me)
    time.sleep(2.2)  # past the grace period
    study._storage.record_heartbeat(alive._trial_id)
    dead = study.ask()
    dead.set_user_attr("driver", {**me, "pid": 2**22 + 12345})  # above the kernel's pid limit: never alive
    dead.set_user_attr("train_seed", 7)

    recovered = dsnas_storage.recover_stale_trials(study)

    assert recovered == sorted([elsewhere.number, undispatched.number, silent.number, dead.number])
    by_number = {t.number: t for t in study.get_trials()}
    assert by_number[alive.number].state == TrialState.RUNNING
    reasons = {n: by_number[n].user_attrs["fail_reason"] for n in recovered}
    assert "no heartbeat for 1 s" in reasons[elsewhere.number]
    assert "before it could dispatch" in reasons[undispatched.number]
    assert "on old-container-3f2a sent no heartbeat in the 1 s since the trial started" in reasons[silent.number]
    assert f"pid {2**22 + 12345}" in reasons[dead.number]
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert sorted(t.user_attrs["requeued_from"] for t in waiting) == recovered
    assert [t.params for t in waiting if t.user_attrs["requeued_from"] == elsewhere.number] == [{"x": elsewhere.params["x"]}]
    assert dsnas_storage.recover_stale_trials(study) == []  # nothing twice
    again = next(t for t in waiting if t.user_attrs["requeued_from"] == dead.number)
    assert again.user_attrs["train_seed"] == 7  # trained again with the seed it had: a resume reproduces the run


def test_a_trial_another_driver_recovers_first_is_left_to_it(tmp_path, monkeypatch):
    """Two drivers resuming at once: the other failed the trial between this one's reading it RUNNING and writing
    its reason, and this driver stopped with UpdateFinishedTrialError."""
    storage = dsnas_storage.open_storage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(storage=storage, directions=["maximize", "maximize"])
    dead = study.ask()
    dead.set_user_attr("driver", {**dsnas_storage.driver_identity(), "pid": 2**22 + 12345})
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    study._storage.set_trial_state_values(dead._trial_id, state=TrialState.FAIL)  # the other driver, first
    monkeypatch.setattr(study, "get_trials", lambda **kwargs: running)  # as this driver read them, before
    assert dsnas_storage.recover_stale_trials(study) == []


def test_a_trial_failed_to_be_queued_again_whose_copy_never_was_is_queued_at_the_next_start(tmp_path):
    """A driver that failed a trial "queued again" (claiming it) and stopped before queuing its copy (kill -9, a
    full disk) left the candidate untrained for good: the next recovery queues it, once."""
    storage = dsnas_storage.open_storage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(storage=storage, directions=["maximize", "maximize"])
    orphan = study.ask({"x": optuna.distributions.CategoricalDistribution([1, 2])})
    orphan.set_user_attr("fail_reason", "its worker died (ActorDiedError); queued again (retries = 1)")
    study.tell(orphan, state=TrialState.FAIL)
    plain = study.ask()
    plain.set_user_attr("fail_reason", "RuntimeError: diverged")  # failed for good: not queued
    study.tell(plain, state=TrialState.FAIL)
    assert dsnas_storage.requeue_orphans(study) == [orphan.number]
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [(t.user_attrs["requeued_from"], t.params) for t in waiting] == [(orphan.number, orphan.params)]
    assert dsnas_storage.requeue_orphans(study) == []  # once


# A damaged SQLite file: the commands refuse it in one line that names the file and the recovery, and never
# write to it (whatever it still holds can be copied out only while it is left as it is).

def _damaged_copy(finished_study: Path, dest: Path, damage: Callable[[Path], None]) -> tuple[Path, Path, bytes]:
    study = copy_study(finished_study, dest)
    db_file = study.with_suffix(".db")
    _checkpoint(db_file)
    damage(db_file)
    return study, db_file, db_file.read_bytes()


def _checkpoint(db_file: Path) -> None:
    """Move the write-ahead log of a copied study into its file, as SQLite does when a search's last connection
    closes (the fixture's search ran in this process, whose pool may keep the log open): the damage then hits
    pages that are read, not pages the log holds newer copies of."""
    with closing(sqlite3.connect(db_file)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _truncate_to_half(db_file: Path) -> None:
    os.truncate(db_file, db_file.stat().st_size // 2)


def _overwrite_page_of(table: str) -> Callable[[Path], None]:
    """Overwrites the first page of ``table``: a page that opening the study does not read."""
    def damage(db_file: Path) -> None:
        with closing(sqlite3.connect(db_file)) as conn:
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
        with db_file.open("r+b") as f:
            f.seek((root - 1) * page_size)
            f.write(b"\xa5" * page_size)
    return damage


@pytest.mark.parametrize("damage, detail", [
    (_truncate_to_half, "database disk image is malformed"),
    (_overwrite_page_of("trial_user_attributes"), "quick_check: "),
], ids=["truncated", "overwritten-page"])
@pytest.mark.parametrize("command", [["report"], ["export", "--pick", "knee"], ["search"]],
                         ids=["report", "export", "search"])
def test_a_damaged_sqlite_file_is_refused_with_the_recovery_command(finished_study, tmp_path, capsys, damage, detail,
                                                                     command):
    study, db_file, before = _damaged_copy(finished_study, tmp_path / "study", damage)

    assert main([command[0], str(study), *command[1:]]) == 2

    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert last.startswith(f"dsnas: error: {db_file}: the study database is damaged ({detail}"), last
    assert "dsnas wrote nothing to it" in last
    assert f"`sqlite3 {db_file} .recover | sqlite3 {tmp_path / 'study' / 'tiny-recovered.db'}`" in last
    assert f"sqlite3 {db_file} .dump | sed" in last
    assert f'[study] storage = "sqlite:///{tmp_path / "study" / "tiny-recovered.db"}"' in last
    assert "password" not in last
    assert db_file.read_bytes() == before


def test_a_file_that_is_not_a_database_is_refused(tmp_path, finished_study, capsys):
    """Not "damaged", with commands that "recovered" it: sqlite3 .recover of a study's TOML file made an empty
    database, which the fix then named as the study's storage (a search there started the study again)."""
    db_file = tmp_path / "s.db"
    db_file.write_bytes(b"not SQLite at all\n" * 400)

    with pytest.raises(DsnasError, match=r"s\.db: \[study\] storage must name a SQLite database, and this file is not "
                                         r"one \(it begins b'not SQLite at al', not SQLite's header\)"):
        dsnas_storage.open_storage(f"sqlite:///{db_file}")
    assert db_file.read_bytes() == b"not SQLite at all\n" * 400
    study = tmp_path / "s.toml"  # storage names the study file itself
    study.write_text(finished_study.read_text().replace('name = "tiny"', f'name = "tiny"\nstorage = "sqlite:///{study}"'))
    assert main(["report", str(study)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dsnas: error: {study}: [study] storage must name a SQLite database") and "recover" not in err


def test_damage_met_after_opening_is_named_too(finished_study, tmp_path):
    """The disk fails during a run: the read that meets the damaged page raises DamagedDatabase, not Optuna's
    StorageInternalError about a commit."""
    study_file = copy_study(finished_study, tmp_path / "study")
    db_file = study_file.with_suffix(".db")
    _checkpoint(db_file)
    storage = dsnas_storage.open_storage(f"sqlite:///{db_file}")
    study = optuna.load_study(study_name="tiny", storage=storage)
    _overwrite_page_of("trial_user_attributes")(db_file)
    storage.engine.dispose()  # a new connection: no page cached from before the damage

    with pytest.raises(dsnas_storage.DamagedDatabase) as caught:
        study.get_trials()
    assert "database disk image is malformed" in str(caught.value)
    assert "wrote nothing" not in str(caught.value)  # the run wrote to it before the damage


def test_a_locked_file_is_not_called_damaged():
    locked = sqlite3.OperationalError("database is locked")
    assert dsnas_storage._damage(locked) is None
    assert dsnas_storage._damage(sqlite3.DatabaseError("database disk image is malformed")) is not None


def check_set_user_attrs(url: str) -> None:
    """set_user_attrs on an RDB storage: every attribute and constraint as Optuna's own setters store them (a key
    written twice keeps the last value), and a finished trial refused."""
    import optuna.exceptions

    study = optuna.create_study(storage=url, directions=["maximize", "minimize"])
    trial = study.ask()
    dsnas_storage.set_user_attrs(trial, {"arch": {"d_model": 64}, "latency_ms": 1.5})
    dsnas_storage.set_user_attrs(trial, {"latency_ms": 2.5, "feasible": 1.0}, {"max_latency_ms": -0.5})
    reference = study.ask()  # the same through Optuna's setters, one by one
    for key, value in {"arch": {"d_model": 64}, "latency_ms": 2.5, "feasible": 1.0}.items():
        reference.set_user_attr(key, value)
    reference.set_constraint("max_latency_ms", -0.5)
    assert trial.user_attrs == {"arch": {"d_model": 64}, "latency_ms": 2.5, "feasible": 1.0}
    study.tell(trial, [1.0, 2.0])
    study.tell(reference, [1.0, 2.0])
    ours, theirs = study.get_trials()
    assert ours.user_attrs == theirs.user_attrs
    assert ours.system_attrs == theirs.system_attrs and theirs.system_attrs  # the constraint is there
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        dsnas_storage.set_user_attrs(trial, {"late": 1})
    assert "late" not in study.get_trials()[0].user_attrs


def test_set_user_attrs_stores_what_optuna_would_on_sqlite(tmp_path):
    check_set_user_attrs(f"sqlite:///{tmp_path / 'attrs.db'}")


def check_budget_count(url: str) -> None:
    """BudgetCount against a count of every trial, read by two drivers' counters as trials start, finish in each
    state (a reused repeat and a predictor's skip are not counted), and are queued and taken again, beside another
    study in the same database whose trials take the ids in between."""
    import random

    rng = random.Random(0)
    study = optuna.create_study(storage=url, study_name="counted", directions=["maximize"])
    other = optuna.create_study(storage=url, study_name="beside", directions=["maximize"])
    counters = [dsnas_storage.BudgetCount(), dsnas_storage.BudgetCount()]
    counters[1].FULL_EVERY = 10**9  # never starts over: the kept counts must stay right by themselves
    running: list[optuna.trial.Trial] = []

    def expected() -> dict[str, int]:
        trials = study.get_trials(deepcopy=False)
        return {"trained": sum(t.state == TrialState.COMPLETE and "reused_from" not in t.user_attrs for t in trials),
                "pruned": sum(t.state == TrialState.PRUNED and t.user_attrs.get("pruned_by") != "predictor"
                              for t in trials),
                "running": sum(t.state == TrialState.RUNNING for t in trials)}

    for step in range(300):
        if rng.random() < 0.3:
            other.tell(other.ask(), 1.0)
        if len(running) < 6 and rng.random() < 0.6:
            if rng.random() < 0.1:
                study.enqueue_trial({})
            running.append(study.ask())
        elif running:
            trial = running.pop(rng.randrange(len(running)))  # finished in any order: a long trial stays below
            end = rng.choice(["trained", "reused", "rung", "skipped", "failed"])
            if end == "reused":
                trial.set_user_attr("reused_from", 0)
            if end in ("rung", "skipped"):
                trial.set_user_attr("pruned_by", "predictor" if end == "skipped" else "rung")
            state = {"rung": TrialState.PRUNED, "skipped": TrialState.PRUNED, "failed": TrialState.FAIL}
            study.tell(trial, None if end in state else 1.0, state=state.get(end))
        counter = counters[step % 2]
        assert counter.read(study) == expected(), step
    assert expected()["trained"] > 20 and expected()["pruned"] > 10
    assert counters[1].low > 0  # the finished trials below are kept, not read again


def test_the_budget_count_of_a_sqlite_study_matches_a_count_of_every_trial(tmp_path):
    check_budget_count(f"sqlite:///{tmp_path / 'budget.db'}")


def _journal_mode(db_file: Path) -> str:
    with closing(sqlite3.connect(db_file)) as conn:
        return conn.execute("PRAGMA journal_mode").fetchone()[0]


def test_a_search_writes_ahead_and_leaves_its_sqlite_file_as_one_file(tiny_study):
    """One synced log file per commit while it runs, instead of the file and a rollback journal (see
    storage._write_ahead); at its end the rollback journal again, so that an account that may only read the study
    can open it (SQLite reads a write-ahead-log file only where it may write beside it)."""
    import dsnas

    db_file = tiny_study.with_suffix(".db")
    during = []
    dsnas.search(tiny_study, callbacks=[lambda study, trial: during.append(_journal_mode(db_file))])
    assert during and set(during) == {"wal"}
    assert _journal_mode(db_file) == "delete" and not Path(f"{db_file}-wal").exists()


def test_a_search_that_ends_beside_a_reader_leaves_the_file_in_write_ahead_mode(tiny_study):
    """Another process holding the study open (a dashboard, a second driver) keeps the mode: the last one puts it
    back. Nothing waits on it."""
    import dsnas

    db_file = tiny_study.with_suffix(".db")
    readers = []

    def hold_open(study, trial):
        if not readers:
            readers.append(sqlite3.connect(db_file))
            readers[0].execute("SELECT 1 FROM trials").fetchall()
    dsnas.search(tiny_study, callbacks=[hold_open])
    try:
        assert _journal_mode(db_file) == "wal"
    finally:
        readers[0].close()
    dsnas_storage.leave_write_ahead(f"sqlite:///{db_file}")
    assert _journal_mode(db_file) == "delete"


def test_a_study_that_may_only_be_read_is_read_without_its_lock_file(finished_study, tmp_path, capsys):
    """`report` and `export` only read: a study in a folder this account may not write (a lock file it cannot
    make; here a folder in its place, which no account can open) is read, not refused."""
    study = copy_study(finished_study, tmp_path / "study")
    lock = Path(f"{study.with_suffix('.db')}.dsnas-lock")
    lock.unlink(missing_ok=True)
    lock.mkdir()
    assert main(["report", str(study), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "index.html").is_file()


def test_a_report_that_cannot_be_written_where_it_goes_says_so_in_one_line(finished_study, tmp_path, capsys):
    """An account that may only read a study gets past its lock file (above), then met the report folder: a
    traceback from mkdir. Now one line naming the folder and --out, before any figure is drawn."""
    study = copy_study(finished_study, tmp_path / "study")
    (tmp_path / "a file").write_text("not a folder")
    assert main(["report", str(study), "--out", str(tmp_path / "a file" / "report")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the report cannot be written there" in err and "--out" in err, err


def test_a_write_ahead_study_in_a_folder_this_account_cannot_write_is_refused_in_one_line(finished_study, tmp_path,
                                                                                         monkeypatch):
    study = copy_study(finished_study, tmp_path / "study")
    db_file = study.with_suffix(".db")
    with closing(sqlite3.connect(db_file)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
    real_access = os.access
    monkeypatch.setattr(dsnas_storage.os, "access",
                        lambda path, mode: False if Path(path) == db_file.parent and mode == os.W_OK
                        else real_access(path, mode))
    with pytest.raises(dsnas_storage.DsnasError) as err:
        dsnas_storage.open_storage(f"sqlite:///{db_file}")
    msg = str(err.value)
    assert "\n" not in msg and "write-ahead-log mode" in msg and "PRAGMA journal_mode=DELETE" in msg, msg


def test_the_driver_reads_the_budget_once_per_trial(tmp_path, monkeypatch):
    """Whether the budget has room is read under the study's lock as each trial is taken; the stop check before
    each dispatch does not read it again (a query of the study per trial less: see Driver.loop). Only the first
    dispatch, the stop reason once nothing runs, and a dispatch refused by a full budget read it besides."""
    from table_study import write_table_study

    reads = []
    read = dsnas_storage.BudgetCount.read
    monkeypatch.setattr(dsnas_storage.BudgetCount, "read", lambda self, study: reads.append(1) or read(self, study))
    study = write_table_study(tmp_path, n_trials=20, fidelity='kind = "none"')
    assert main(["search", str(study)]) == 0
    assert 20 <= len(reads) <= 20 + 4, f"{len(reads)} reads of the budget for 20 trials"
    reads.clear()
    assert main(["search", str(study)]) == 0  # resumed with the budget spent: it stops at once
    assert len(reads) <= 2  # before any dispatch (nothing is settled or started), and for the stop reason


def test_a_search_whose_weights_folder_cannot_be_made_is_refused_before_it_trains(tiny_study, tmp_path, monkeypatch,
                                                                                   capsys):
    """The database elsewhere, the study's folder read-only: a trial trained, then the search ended in a traceback
    and the trial was lost. Now one line before anything is opened or trained."""
    db = tmp_path / "elsewhere" / "tiny.db"
    db.parent.mkdir()
    tiny_study.write_text(tiny_study.read_text().replace("[study]", f'[study]\nstorage = "sqlite:///{db}"', 1))
    real_access = os.access
    monkeypatch.setattr(dsnas_storage.os, "access",
                        lambda path, mode: False if Path(path) == tiny_study.parent else real_access(path, mode))
    assert main(["search", str(tiny_study)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tiny_artifacts" in err and "cannot make it there" in err, err
    assert not db.exists() and not (tiny_study.parent / "tiny_artifacts").exists()


def test_a_study_whose_task_evaluates_architectures_itself_needs_no_weights_folder(tmp_path, monkeypatch):
    """Its task returns no weights: with its database elsewhere, it searches from a folder this account may only
    read, as it did before the weights-folder check (and with json_artifacts, which writes there, it is refused)."""
    from table_study import write_table_study

    (tmp_path / "study").mkdir()
    study = write_table_study(tmp_path / "study", n_trials=3, fidelity='kind = "none"')
    db = tmp_path / "elsewhere" / "table.db"
    db.parent.mkdir()
    text = study.read_text()
    study.write_text(text.replace("[study]", f'[study]\nstorage = "sqlite:///{db}"', 1))
    real_access = os.access
    monkeypatch.setattr(dsnas_storage.os, "access",
                        lambda path, mode: False if Path(path) == study.parent else real_access(path, mode))
    assert main(["search", str(study)]) == 0
    assert not list(study.parent.glob("*_artifacts"))
    study.write_text(text.replace("[study]", f'[study]\nstorage = "sqlite:///{db}"\njson_artifacts = true', 1))
    assert main(["search", str(study), "--n-trials", "4"]) == 2


def test_a_driver_that_finished_no_trial_of_its_own_gives_the_studys_front(tmp_path):
    """A second driver that waited for the first's trial printed "the Pareto front is empty", and dsnas.search
    returned front=[], though the study had a front: it read it only where its own count had a completed trial."""
    import threading
    import time

    import optuna
    from table_study import write_table_study

    import dsnas
    from dsnas.spec import load_study
    from dsnas.study import open_study

    study_file = write_table_study(tmp_path, n_trials=1, fidelity='kind = "none"')
    spec = load_study(study_file)
    first = open_study(spec)
    theirs = first.ask()  # the first driver's trial, running (this process stands for that driver: alive)
    first._storage.set_trial_user_attr(theirs._trial_id, "driver", dsnas_storage.driver_identity())

    def finish() -> None:
        time.sleep(2)
        optuna.load_study(study_name=spec.name, storage=spec.storage).tell(theirs.number, [1.0] * len(spec.objectives))
    threading.Thread(target=finish, daemon=True).start()
    outcome = dsnas.search(study_file)
    assert outcome.completed == 1 and [t.number for t in outcome.front] == [theirs.number]


def test_only_a_worker_death_uses_up_a_retry_when_a_trial_is_queued_again():
    """A trial queued again after Ctrl-C (or from a stopped driver) counted as a retry: with retries = 1, its
    worker's death on the resumed run was not retried, and the candidate was never trained."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.create_study()
    trial = study.ask()
    trial.suggest_categorical("x", [1, 2])
    study.tell(trial, state=TrialState.FAIL)
    dsnas_storage.requeue(study, study.trials[-1], seed=7)  # interrupted: no retry used
    interrupted = study.trials[-1]
    assert interrupted.user_attrs == {"requeued_from": 0, "attempt": 2, "worker_deaths": 0, "train_seed": 7}
    again = study.ask()  # the queued trial, run and its worker dead
    study.tell(again, state=TrialState.FAIL)
    dsnas_storage.requeue(study, study.trials[again.number], worker_death=True)
    assert study.trials[-1].user_attrs["worker_deaths"] == 1 and study.trials[-1].user_attrs["attempt"] == 3
    assert study.trials[-1].params == {"x": interrupted.params["x"]}
