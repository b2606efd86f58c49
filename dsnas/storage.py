"""The study's storage: Optuna's RDB storage with heartbeats, the artifact store for weights, and
recovery of trials that a stopped driver left RUNNING."""

from __future__ import annotations

import datetime
import os
import socket
import warnings
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


def open_storage(url: str) -> Any:
    from optuna.storages import RDBStorage

    quiet_optuna()
    try:
        # Heartbeats are recorded by the driver for its running trials; recover_stale_trials reads them.
        return RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
    except Exception as e:  # SQLAlchemy or driver errors: the database cannot be opened
        raise DsnasError(f"cannot open the storage {display_url(url)}: {type(e).__name__}: {e}") from None


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
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
            user_attrs={"requeued_from": trial.number}, system_attrs={"failed_trial": trial.number}))
        recovered.append(trial.number)
    return recovered


def storage_engine(study: Any) -> Any:
    """The SQLAlchemy engine under an Optuna study (None for in-memory or journal storages): dsnas's own
    tables live in the same database."""
    storage = study._storage
    storage = getattr(storage, "_backend", storage)  # Optuna wraps RDBStorage in a cache
    return getattr(storage, "engine", None)
