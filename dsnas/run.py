"""Running a study: open (or resume) the Optuna study, its sampler and dsnas's tables, then drive it with
dsnas.driver until the budget is spent. The driver alone writes the study; workers only return results."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dsnas.driver import Driver
from dsnas.errors import DsnasError, SpecError
from dsnas.progress import Progress
from dsnas.spec import StudySpec, sampler_class, study_callbacks
from dsnas.storage import (
    StorageLost,
    check_artifacts_writable,
    leave_write_ahead,
    optuna_quieted,
    recover_stale_trials,
    requeue_orphans,
    storage_engine,
    study_lock,
)
from dsnas.study import open_study, release_settings
from dsnas.tasks import BUILTIN_TASKS, make_task, runs_own_trials
from dsnas.trial import TrialFn
from dsnas.worker import run_trial


@dataclass
class SearchOutcome:
    study: Any
    completed: int  # COMPLETE trials in the study, this run's and earlier runs'
    failed: int  # trials that failed in this run
    elapsed_s: float
    front: list[Any] = field(default_factory=list)  # feasible non-dominated FrozenTrials
    stopped_because: str = ""
    pruned: int = 0  # PRUNED trials in the study: stopped at a rung, or skipped by the predictor
    reused: int = 0  # of the COMPLETE ones, repeats answered from an earlier trial's result (trained once)
    evaluated_now: int = 0  # trials of this run that completed or were stopped at a rung or skipped (not failed)
    first_failure: str = ""  # the first failed trial's reason in this run

    @property
    def all_failed(self) -> bool:
        """This run's trials all failed: the study's setup is broken, not its candidates."""
        return self.failed > 0 and self.evaluated_now == 0


def check_executor_installed(spec: StudySpec) -> None:
    """Ray is imported by the Ray executor alone, so that a machine without it (a GPU box that cannot take its
    ~80 MB wheel) still runs local studies; a study that asks for Ray there is refused before any work starts."""
    import importlib.util


    if spec.executor.kind == "ray" and importlib.util.find_spec("ray") is None:
        raise SpecError(str(spec.path), "executor.kind", "the ray executor needs the ray package, which is not "
                        "installed here", "ray", 'pip install ray, or set kind = "local" (or pass --executor local)')


def make_sampler(spec: StudySpec, n_existing: int, say: Callable[[str], None] = print, run: int = 0) -> Any:
    """The study's sampler. On resume the seed moves on, so that the sampler does not propose the first trials
    again; ``run`` (driver_run) moves it apart for each driver: two started together on one study saw the same
    count of trials, and proposed the same candidates in lockstep."""
    seed = None if spec.sampler.seed is None else (spec.sampler.seed + n_existing + DRIVER_SEED_STEP * run) % 2**32
    if spec.sampler.name == "dsnas" and spec.space.file is None:
        say('the "dsnas" sampler (the default) models an architecture by the choices of a space file; a [space] '
            "callable declares none, so this run uses TPE (Optuna's default) instead")
        return sampler_class("tpe")(seed=seed)
    return sampler_class(spec.sampler.name)(seed=seed, **spec.sampler.settings)


# How far apart the seeds of two drivers' samplers are (a prime, far beyond any study's trial count).
DRIVER_SEED_STEP = 1_000_003
DRIVER_RUNS_ATTR = "dsnas_driver_runs"  # the study's count of the driver runs that started on it


def driver_run(study: Any, spec: StudySpec) -> int:
    """How many driver runs started on this study before this one (0 for the first: its seed is the study
    file's), counted under the study's lock so that two drivers starting together get different numbers."""
    if storage_engine(study) is None:  # a study in memory: no other driver can see it
        return 0
    with study_lock(study, spec.storage):
        runs = int(study.user_attrs.get(DRIVER_RUNS_ATTR, 0))
        study.set_user_attr(DRIVER_RUNS_ATTR, runs + 1)
    return runs


def _check_arguments(sampler: Any, callbacks: Any) -> list[Any]:
    """dsnas.search's own sampler and callbacks, as [study] callbacks are checked: before the study is opened (a
    string or a class for a sampler failed inside Optuna and left the asked trials RUNNING)."""
    import optuna

    if sampler is not None and not isinstance(sampler, optuna.samplers.BaseSampler):
        raise DsnasError(f"sampler={sampler!r}: must be an Optuna sampler object. Fix: e.g. "
                         "sampler=optuna.samplers.TPESampler(seed=0), or name one in the study file's [sampler]")
    if isinstance(callbacks, (str, bytes)) or not hasattr(callbacks, "__iter__"):
        raise DsnasError(f"callbacks={callbacks!r}: must be a list of callables (study, frozen_trial). Fix: e.g. "
                         "callbacks=[my_callback]")
    callbacks = list(callbacks)
    wrong = [c for c in callbacks if not callable(c)]
    if wrong:
        raise DsnasError(f"callbacks: {wrong[0]!r} is not callable; each must be a callable (study, frozen_trial). "
                         "Fix: pass the function itself")
    return callbacks


def _stores_files(spec: StudySpec) -> bool:
    """Whether the trials write into the study's artifacts folder: weights, unless the task evaluates
    architectures itself (it returns none), and JSON copies where [study] json_artifacts asks."""
    if spec.json_artifacts or spec.task.name in BUILTIN_TASKS:
        return True
    return not runs_own_trials(make_task(spec.task))  # made once per process: the driver's is this one


def run_study(spec: StudySpec, *, trial_fn: TrialFn = run_trial, progress: Progress | None = None,
              callbacks: Sequence[Callable[[Any, Any], None]] = (), study: Any = None,
              sampler: Any = None) -> SearchOutcome:
    """Run (or resume) a study until its budget is spent. ``callbacks``: Optuna-style ``(study, frozen_trial)``
    callables, called in the driver after each finished trial is stored, after the study file's [study] ones.
    ``study``: an Optuna study to drive instead of the one [study] storage holds, e.g. an in-memory one for a
    benchmark's thousands of short searches (dsnas's own tables, the measurement cache among them, are then not
    kept). ``sampler``: an Optuna sampler of one's own, used instead of the one [sampler] names."""
    with optuna_quieted():  # Optuna's own log lines: quiet for this call only
        return _run_study(spec, trial_fn, progress, callbacks, study, sampler)


def _run_study(spec: StudySpec, trial_fn: TrialFn, progress: Progress | None,
               callbacks: Sequence[Callable[[Any, Any], None]], study: Any, sampler: Any) -> SearchOutcome:
    from optuna.trial import TrialState

    check_executor_installed(spec)
    callbacks = _check_arguments(sampler, callbacks)
    ours = study is None
    if ours and _stores_files(spec):
        check_artifacts_writable(spec)
    study = study if study is not None else open_study(spec)
    try:
        requeued = recover_stale_trials(study) + requeue_orphans(study)
        progress = progress or Progress(spec)
        study.sampler = sampler if sampler is not None else make_sampler(spec, len(study.trials), progress.say,
                                                                         driver_run(study, spec))
        progress.start(study, requeued)
        driver = Driver(spec, study, trial_fn, progress, [*study_callbacks(spec), *callbacks])
        with driver.guard.installed():
            try:
                stopped = driver.loop()
            except StorageLost as e:
                raise DsnasError(driver.lost_message(e)) from None
            finally:
                driver.close()
        if ours:
            _release(study)  # before the storage is let go below: a write would open it again
        # The study's counts: with drivers side by side, this driver's own missed the others' trials and repeats.
        done = driver.db("read the completed trials", study.get_trials, deepcopy=False, states=(TrialState.COMPLETE,))
        completed, reused = len(done), sum("reused_from" in t.user_attrs for t in done)
        # The study's front, also where other drivers completed every trial of it. A reused repeat has its original's
        # values: the original alone stands for them on the front.
        front = [t for t in driver.db("read the Pareto front", lambda: study.best_trials) if "reused_from" not in
                 t.user_attrs] if completed else []
        pruned = driver.db("count the pruned trials", driver.count, TrialState.PRUNED)
        if ours and (engine := storage_engine(study)) is not None:
            engine.dispose()  # the study file as one file again, for whoever reads it next (a later read reconnects)
            leave_write_ahead(spec.storage)
        return SearchOutcome(study, completed, progress.failed, progress.elapsed(), front, stopped, pruned,
                             reused, progress.evaluated_this_run(), progress.first_failure)
    except BaseException:
        if ours:
            _release(study)
            if (engine := storage_engine(study)) is not None:  # one file again, as after a finished search
                engine.dispose()
                leave_write_ahead(spec.storage)
        raise


def _release(study: Any) -> None:
    """This run's record of the settings binds no longer by this process (see release_settings)."""
    try:
        release_settings(study)
    except Exception:  # a database lost meanwhile: the record then binds only while this process lives
        pass
