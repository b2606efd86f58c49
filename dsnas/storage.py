"""The study's storage: Optuna's RDB storage with heartbeats, the artifact store for weights, and
recovery of trials that a stopped driver left RUNNING."""

from __future__ import annotations

import datetime
import hashlib
import os
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dsnas.errors import DsnasError
from dsnas.spec import StudySpec

HEARTBEAT_S = 10
GRACE_S = 60  # a RUNNING trial whose driver sent no heartbeat for this long is stale


def quiet_optuna() -> None:
    """dsnas prints its own progress; Optuna's per-trial log lines and the ask/tell heartbeat warning are noise."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


CONNECT_TIMEOUT_S = 10  # a server that accepts and never answers must not hang the driver


def open_storage(url: str) -> Any:
    from optuna.storages import RDBStorage
    from sqlalchemy.engine import make_url

    quiet_optuna()
    backend = make_url(url).get_backend_name()
    engine_kwargs = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}} if backend == "postgresql" else {}
    try:
        # Two drivers opening a new database at once would both create Optuna's tables and collide (PostgreSQL
        # checks type and table names at commit); the first creates them while the other waits.
        with schema_lock(url, engine_kwargs):
            # Heartbeats are recorded by the driver for its running trials; recover_stale_trials reads them.
            return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                              grace_period=GRACE_S)
    except Exception as e:  # SQLAlchemy or driver errors: the database cannot be opened
        raise DsnasError(f"cannot open the storage {display_url(url)}: {_first_line(e)}. Fix: check that the "
                         "server runs and the URL, user and password (PGPASSWORD for PostgreSQL) are right") from None


def _first_line(e: BaseException) -> str:
    """A driver error in one line, without SQLAlchemy's background link."""
    text = str(getattr(e, "orig", None) or e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


@contextmanager
def schema_lock(url: str, engine_kwargs: dict[str, Any] | None = None) -> Iterator[None]:
    """While held, no other dsnas creates or upgrades tables in this PostgreSQL database (an advisory lock on a
    connection of its own); elsewhere a no-op (SQLite serializes schema changes itself)."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    if make_url(url).get_backend_name() != "postgresql":
        yield
        return
    engine = create_engine(url, poolclass=_null_pool(), **(engine_kwargs or {}))
    try:
        with _server_lock(engine, "SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)", "dsnas:schema"):
            yield
    finally:
        engine.dispose()


@contextmanager
def _server_lock(engine: Any, take: str, give: str, key: str) -> Iterator[None]:
    """A lock held by the database server for one connection of ours (PostgreSQL's take a 64-bit number)."""
    from sqlalchemy import text

    arg = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True) if "advisory" in take \
        else key[:64]
    with engine.connect() as conn:
        conn.execute(text(take), {"k": arg})
        try:
            yield
        finally:
            conn.execute(text(give), {"k": arg})


def _null_pool() -> Any:
    from sqlalchemy.pool import NullPool

    return NullPool


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL (None for a server database)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return Path(parsed.database) if parsed.get_backend_name() == "sqlite" and parsed.database else None


def display_url(url: str) -> str:
    """The storage URL as it may be printed: without its password."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def artifact_dir(spec: StudySpec) -> Path:
    """Trained weights and probes live beside the study file, one folder per study."""
    return spec.base_dir / f"{spec.name}_artifacts"


def artifact_store(spec: StudySpec) -> Any:
    from optuna.artifacts import FileSystemArtifactStore

    path = artifact_dir(spec)
    path.mkdir(exist_ok=True)
    return FileSystemArtifactStore(str(path))


def driver_identity() -> dict[str, Any]:
    """Who is running a trial: host, pid and the pid's start time (so a reused pid is not mistaken)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _start_time(os.getpid())}


def _start_time(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _driver_gone(driver: dict[str, Any]) -> bool:
    """True when the driver ran on this host and its process no longer exists."""
    if driver.get("host") != socket.gethostname():
        return False  # another machine's driver: only its heartbeat can tell
    pid = int(driver.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return bool(driver.get("pid_start")) and _start_time(pid) != driver["pid_start"]


def recover_stale_trials(study: Any) -> list[int]:
    """Mark FAIL, with the reason, and queue again (same parameters) the trials a stopped driver left RUNNING;
    returns their numbers.

    A driver of this host that no longer runs is known dead at once; a driver elsewhere is dead when its
    heartbeats stopped for GRACE_S. A trial that never got a driver attribute is stale after GRACE_S."""
    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    heartbeat_stale = set(storage._get_stale_trial_ids(study._study_id))
    now = datetime.datetime.now()
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        driver = trial.user_attrs.get("driver")
        if driver and _driver_gone(driver):
            reason = f"its driver (pid {driver['pid']} on {driver['host']}) stopped while the trial ran"
        elif trial._trial_id in heartbeat_stale:
            reason = f"its driver sent no heartbeat for {GRACE_S} s"
        elif not driver and trial.datetime_start and (now - trial.datetime_start).total_seconds() > GRACE_S:
            reason = "its driver stopped before it could dispatch the trial"
        else:
            continue
        storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason + "; queued again")
        try:
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another driver recovered it first
        requeue(study, trial)
        recovered.append(trial.number)
    return recovered


def requeue(study: Any, trial: Any) -> int:
    """Queue a failed trial again with the same parameters (the next ask takes it); returns its attempt number."""
    import optuna
    from optuna.trial import TrialState

    attempt = int(trial.user_attrs.get("attempt", 1)) + 1
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={"requeued_from": trial.number, "attempt": attempt}, system_attrs={"failed_trial": trial.number}))
    return attempt


def storage_engine(study: Any) -> Any:
    """The SQLAlchemy engine under an Optuna study (None for in-memory or journal storages): dsnas's own
    tables live in the same database."""
    storage = study._storage
    storage = getattr(storage, "_backend", storage)  # Optuna wraps RDBStorage in a cache
    return getattr(storage, "engine", None)


@contextmanager
def study_lock(study: Any, url: str) -> Iterator[None]:
    """Exclusive across every driver of this study while the block runs (a check of the budget and the ask that
    follows it). PostgreSQL: an advisory lock, so drivers on other machines wait too; MySQL: GET_LOCK; SQLite: a
    lock file beside the database (SQLite is one machine's anyway)."""
    engine = storage_engine(study)
    backend = engine.url.get_backend_name() if engine is not None else ""
    key = f"dsnas:{study.study_name}"
    if backend == "postgresql":
        with _server_lock(engine, "SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)", key):
            yield
    elif backend in ("mysql", "mariadb"):
        with _server_lock(engine, "SELECT GET_LOCK(:k, -1)", "SELECT RELEASE_LOCK(:k)", key):
            yield
    elif (db_file := sqlite_file(url)) is not None:
        import fcntl

        with open(f"{db_file}.dsnas-lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    else:
        yield  # in-memory or another backend: one driver only
