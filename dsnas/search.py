"""The driver: Optuna ask/tell over an executor. It alone writes the study; workers only return results."""

from __future__ import annotations

import json
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsnas.errors import DsnasError
from dsnas.evaluate import EvalRequest, TrialResult, evaluate
from dsnas.executors import BaseExecutor, EvaluateFn, make_executor
from dsnas.interrupts import InterruptGuard
from dsnas.models import describe, validate
from dsnas.progress import Progress
from dsnas.spec import StudySpec
from dsnas.storage import (
    HEARTBEAT_S,
    OutageRetry,
    StorageLost,
    artifact_store,
    connection_lost,
    display_url,
    driver_identity,
    open_storage,
    recover_stale_trials,
    requeue,
    schema_lock,
    sqlite_file,
    storage_engine,
    study_lock,
)


@dataclass
class SearchOutcome:
    study: Any
    completed: int  # COMPLETE trials in the study, this run's and earlier runs'
    failed: int  # trials that failed in this run
    elapsed_s: float
    front: list[Any] = field(default_factory=list)  # feasible non-dominated FrozenTrials
    stopped_because: str = ""


def make_sampler(spec: StudySpec, n_existing: int) -> Any:
    import optuna.samplers as s

    # On resume the seed moves on, so that the sampler does not propose the first trials again.
    seed = None if spec.sampler.seed is None else (spec.sampler.seed + n_existing) % 2**32
    return {"tpe": lambda: s.TPESampler(seed=seed), "nsga2": lambda: s.NSGAIISampler(seed=seed),
            "nsga3": lambda: s.NSGAIIISampler(seed=seed), "gp": lambda: s.GPSampler(seed=seed),
            "random": lambda: s.RandomSampler(seed=seed)}[spec.sampler.name]()


def open_study(spec: StudySpec, create: bool = True) -> Any:
    """Create (or only load) the study; refuse one whose objectives differ from the study file's."""
    import optuna

    db_file = sqlite_file(spec.storage)
    missing = db_file is not None and not db_file.exists()  # opening would create it
    storage = None if (missing and not create) else open_storage(spec.storage)
    if not create and (storage is None or spec.name not in optuna.study.get_all_study_names(storage)):
        raise DsnasError(f"{spec.path}: [study.name] no study {spec.name!r} is stored in {display_url(spec.storage)}. "
                         "Fix: run `dsnas search` on this study file first")
    study = optuna.create_study(study_name=spec.name, storage=storage, directions=spec.directions,
                                load_if_exists=True)
    names = [o.name for o in spec.objectives]
    stored = [d.name.lower() for d in study.directions]
    if stored != spec.directions or (study.metric_names and study.metric_names != names):
        raise DsnasError(f"{spec.path}: [objectives] the stored study {spec.name!r} has objectives "
                         f"{study.metric_names or stored}, the file asks for {dict(zip(names, spec.directions))}. "
                         "Fix: restore the objectives, or give the study a new [study] name")
    if not study.metric_names:
        study.set_metric_names(names)
    if create:
        _record_study(spec, study)
    return study


def _record_study(spec: StudySpec, study: Any) -> None:
    """dsnas's tables beside Optuna's: created (or upgraded, for a study of an older dsnas) before any trial."""
    from dsnas.results import tables

    engine = storage_engine(study)
    with schema_lock(spec.storage):  # another driver may be creating them at this moment
        tables.ensure_schema(engine, display_url(spec.storage))
        # Also fills in a trial that was told COMPLETE when the database was lost before its measurements were
        # written (see _Driver._record); a no-op for a study whose measurements are all there.
        tables.backfill(engine, study)
    tables.record_study(engine, spec.name, [{"name": o.name, "metric": o.metric, "direction": o.direction}
                                            for o in spec.objectives], spec.hardware.constraints)


def run_study(spec: StudySpec, *, evaluate_fn: EvaluateFn = evaluate,
              progress: Progress | None = None) -> SearchOutcome:
    """Run (or resume) a study until its budget is spent."""
    from optuna.trial import TrialState

    study = open_study(spec)
    requeued = recover_stale_trials(study)
    study.sampler = make_sampler(spec, len(study.trials))
    progress = progress or Progress(spec)
    progress.start(study, requeued)
    driver = _Driver(spec, study, evaluate_fn, progress)
    with driver.guard.installed():
        try:
            stopped = driver.loop()
        except StorageLost as e:
            raise DsnasError(driver.lost_message(e)) from None
        finally:
            driver.close()
    front = driver.db("read the Pareto front", lambda: study.best_trials) if progress.completed else []
    completed = driver.db("count the completed trials", driver.count, TrialState.COMPLETE)
    return SearchOutcome(study, completed, progress.failed, progress.elapsed(), front, stopped)


class _Driver:
    def __init__(self, spec: StudySpec, study: Any, evaluate_fn: EvaluateFn, progress: Progress) -> None:
        from dsnas.space import make_sampler as make_space
        from dsnas.tasks import make_task

        self.spec, self.study, self.progress = spec, study, progress
        self.sample = make_space(spec.space.file, spec.space.callable, spec.base_dir)
        self.task_arch = make_task(spec.task).arch_defaults()
        self.evaluate_fn = evaluate_fn
        self._executor: BaseExecutor | None = None  # started on the first dispatch (a spent budget starts no Ray)
        self.artifacts: Any = None  # created on the first trial that returns weights
        self.running: dict[int, Any] = {}  # trial number -> optuna Trial
        self.deadlines: dict[int, float] = {}  # trial number -> when it must have finished (trial_timeout_s)
        self.identity = driver_identity()
        self.guard = InterruptGuard()
        # A Ctrl-C held back by the guard (see interrupts.py) must not wait for the database to come back.
        self.outage = OutageRetry(spec.storage, spec.budget.storage_outage_s,
                                  lambda text: print(text, file=progress.out, flush=True),
                                  interrupted=lambda: self.guard.pending)
        self.recording: int | None = None  # the trial whose finished result is being stored
        self.started = time.monotonic()
        self._beat_stop = threading.Event()
        threading.Thread(target=self._heartbeats, name="dsnas-heartbeat", daemon=True).start()

    def loop(self) -> str:
        while True:
            while (self._stop_reason() is None and self.db("read the study", self._room)
                   and len(self.running) < self.executor.slots):
                with self.guard.writing():
                    if not self._dispatch():
                        break  # another driver took the last place in the budget
            if not self.running:
                return self._stop_reason() or "the rest of the budget is running in other drivers"
            for number, outcome in self.executor.wait(timeout=1.0):
                with self.guard.writing():
                    self._record(self.running[number], outcome)
            self._stop_overdue()

    def _stop_overdue(self) -> None:
        """Fail the trials that ran past trial_timeout_s; the executor kills their workers."""
        now = time.monotonic()
        for number in [n for n, deadline in self.deadlines.items() if now > deadline and n in self.running]:
            with self.guard.writing():
                self.executor.cancel(number)
                self._fail(self.running[number], f"ran longer than trial_timeout_s = "
                                                 f"{self.spec.budget.trial_timeout_s:g} s; its worker was stopped")

    @property
    def executor(self) -> BaseExecutor:
        if self._executor is None:
            self._executor = make_executor(self.spec, self.evaluate_fn)
        return self._executor

    def db(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, a storage operation, run through a database outage (see storage.OutageRetry)."""
        survived = len(self.outage.outages_s)
        result = self.outage.call(what, fn, *args, **kwargs)
        if len(self.outage.outages_s) > survived:
            # Time spent waiting for the database is not the trials' time: their results may have waited too.
            for number in self.deadlines:
                self.deadlines[number] += self.outage.outages_s[-1]
        return result

    def count(self, *states: Any) -> int:
        """Trials of the study in these states, whichever driver runs them: the budget is the study's."""
        return len(self.study.get_trials(deepcopy=False, states=states))

    def _stop_reason(self) -> str | None:
        from optuna.trial import TrialState

        budget, n_trials = self.spec.budget, self.spec.budget.n_trials
        if n_trials is not None and self.db("read the study", self.count, TrialState.COMPLETE) >= n_trials:
            return f"{budget.n_trials} trials completed"
        if budget.timeout_s is not None and time.monotonic() - self.started >= budget.timeout_s:
            return f"the timeout of {budget.timeout_s:g} s passed"
        max_failures = budget.max_failures if budget.max_failures is not None else (budget.n_trials or 10)
        if self.progress.failed > max_failures:
            return f"{self.progress.failed} trials failed (max_failures = {max_failures})"
        return None

    def _room(self) -> bool:
        """Whether the budget has room for one more trial, counting the trials every driver is running."""
        from optuna.trial import TrialState

        n_trials = self.spec.budget.n_trials
        return n_trials is None or self.count(TrialState.COMPLETE, TrialState.RUNNING) < n_trials

    def _dispatch(self) -> bool:
        """Start one trial; False when the budget had no room left once the study was locked."""
        from dsnas.results import tables

        trial = self.db("start a trial", self._take_place)
        if trial is None:
            return False
        self.running[trial.number] = trial  # from here on, an interrupt fails it (see close)
        try:
            # Sampling again after a lost connection is harmless: a parameter stored once is returned as stored.
            arch = {**self.db(f"sample trial {trial.number}", self.sample, trial), **self.task_arch}
            validate(arch)
        except StorageLost:
            raise
        except Exception as e:  # a space that cannot produce a valid candidate fails this trial only
            self._fail(trial, f"the search space gave no valid architecture: {type(e).__name__}: {e}")
            return True
        short = describe(arch)
        self.db(f"store trial {trial.number}", self._set_attrs, trial, {"arch": arch, "arch_short": short})
        # The same model measured before:
        cached = self.db("read the measurement cache", tables.cached_figures, storage_engine(self.study), arch)
        self.executor.submit(EvalRequest(trial.number, arch, self.spec.task, self.spec.hardware,
                                         seed=self.spec.seed + trial.number, cached=cached, engine=self.spec.engine))
        if self.spec.budget.trial_timeout_s is not None:
            self.deadlines[trial.number] = time.monotonic() + self.spec.budget.trial_timeout_s
        self.progress.started(trial.number, short, self.running)
        return True

    def _take_place(self) -> Any:
        """Check the budget and take a trial, under the study's lock (two drivers never both take the last
        place); None when there is no room. Run again after a lost connection, it first looks for the trial the
        failed try may have created (its answer lost on the way back) rather than leave it RUNNING forever."""
        with study_lock(self.study, self.spec.storage):
            trial = self._orphan() if self.outage.retrying else None
            if trial is None:
                if not self._room():
                    return None
                trial = self.study.ask()
            trial.set_user_attr("driver", self.identity)  # under the lock: a RUNNING trial without it is an orphan
        return trial

    def _orphan(self) -> Any:
        """A RUNNING trial that nobody runs: no driver recorded, or this driver but not running here."""
        import optuna
        from optuna.trial import TrialState

        for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            driver = frozen.user_attrs.get("driver")
            if frozen.number not in self.running and (not driver or driver == self.identity):
                return optuna.trial.Trial(self.study, frozen._trial_id)  # what study.ask() returns
        return None

    @staticmethod
    def _set_attrs(trial: Any, attrs: dict[str, Any]) -> None:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)

    def _tell(self, trial: Any, values: list[float] | None = None, state: Any = None) -> None:
        """Finish a trial; told again after a lost connection, a trial the first try finished is left as it is."""
        self.db(f"store trial {trial.number}", lambda: self.study.tell(
            trial, values, state=state, skip_if_finished=self.outage.retrying))

    def _record(self, trial: Any, outcome: TrialResult | BaseException) -> None:
        from dsnas.results import tables

        if isinstance(outcome, BaseException):
            reason = f"{type(outcome).__name__}: {outcome}"
            attempt = int(trial.user_attrs.get("attempt", 1))
            if self.executor.lost_worker(outcome) and attempt <= self.spec.budget.retries:
                self._fail(trial, f"its worker died ({reason}); queued again (retries = {self.spec.budget.retries})")
                self.db(f"queue trial {trial.number} again", requeue, self.study, trial)
            else:
                self._fail(trial, reason)
            return
        metrics = outcome.metrics
        missing = [o.metric for o in self.spec.objectives if o.metric not in metrics]
        missing += [m for m, _ in self.spec.hardware.constraints.items() if m not in metrics]
        if missing:
            why = outcome.profile.get("memory_unavailable", "the worker did not report them")
            self._fail(trial, f"no measurement of {missing} ({why})")
            return
        self.recording = trial.number
        feasible = all(metrics[m] <= limit for m, limit in self.spec.hardware.constraints.items())
        self.db(f"store trial {trial.number}", self._store_figures, trial, outcome, feasible)
        self._store_artifacts(trial, outcome)
        values = [metrics[o.metric] for o in self.spec.objectives]
        self._tell(trial, values)
        self.deadlines.pop(trial.number, None)
        self.db(f"store trial {trial.number}'s measurements", tables.record_measurements, storage_engine(self.study),
                self.spec.name, trial.number, outcome.profile, metrics, arch=trial.user_attrs["arch"])
        self.recording = None
        del self.running[trial.number]
        self.progress.finished(trial.number, values, feasible, self.running)

    def _store_figures(self, trial: Any, outcome: TrialResult, feasible: bool) -> None:
        """Metrics, profile and constraints as the trial's attributes (written again after a lost connection)."""
        self._set_attrs(trial, {**outcome.metrics, "profile": outcome.profile})
        for metric, limit in self.spec.hardware.constraints.items():
            trial.set_constraint(f"max_{metric}", outcome.metrics[metric] - limit)  # feasible when <= 0
        trial.set_user_attr("feasible", float(feasible))

    def _store_artifacts(self, trial: Any, outcome: TrialResult) -> None:
        """Weights and probe (safetensors), and the architecture and profile (JSON) that the dashboard shows."""
        from optuna.artifacts import upload_artifact

        self.artifacts = self.artifacts or artifact_store(self.spec)
        files = {"arch": json.dumps(trial.user_attrs["arch"], indent=2).encode(),
                 "profile": json.dumps(outcome.profile, indent=2).encode(),
                 "weights": outcome.weights, "probe": outcome.probe}

        def upload(path: Path, name: str) -> None:
            trial.set_user_attr(f"{name}_artifact", upload_artifact(
                artifact_store=self.artifacts, file_path=str(path), study_or_trial=trial))

        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                if data is not None:
                    suffix = "json" if name in ("arch", "profile") else "safetensors"
                    path = Path(tmp) / f"trial{trial.number}-{name}.{suffix}"
                    path.write_bytes(data)
                    # Uploaded again after a lost connection, the first try's file may stay behind, unreferenced.
                    self.db(f"store trial {trial.number}'s {name}", upload, path, name)

    def _fail(self, trial: Any, reason: str) -> None:
        from optuna.trial import TrialState

        with self.guard.writing():
            self.db(f"store trial {trial.number}", trial.set_user_attr, "fail_reason", reason[:2000])
            self._tell(trial, state=TrialState.FAIL)
        del self.running[trial.number]
        self.deadlines.pop(trial.number, None)
        self.progress.failed_trial(trial.number, reason, self.running)

    def _heartbeats(self) -> None:
        storage = self.study._storage
        while not self._beat_stop.wait(HEARTBEAT_S / 2):
            for trial in list(self.running.values()):
                try:
                    storage.record_heartbeat(trial._trial_id)
                except Exception as e:
                    if not connection_lost(e):
                        raise
                    break  # the main thread reports the outage when it next writes; beat again when it is over

    def lost_message(self, lost: StorageLost) -> str:
        """One line: the database is gone, what that cost (the results not stored), and what to do."""
        cut = [n for n in self.running if n != self.recording]
        cost = [f"the result of trial {self.recording}, which had finished"] if self.recording in self.running else []
        if cut:
            cost.append(f"trial{'s' * (len(cut) > 1)} {', '.join(map(str, cut))}, which "
                        f"{'were' if len(cut) > 1 else 'was'} running (stopped)")
        them = "them" if len(self.running) > 1 else "it"
        lost_part = (f"not stored: {' and '.join(cost)}; {'they stay' if them == 'them' else 'it stays'} RUNNING in "
                     f"the study, and the next `dsnas search` marks {them} FAIL and runs {them} again") if cost \
            else "no trial was running"
        return (f"{lost.summary}; the search stopped, {lost_part}; trials stored before are intact. Fix: start the "
                "database server or repair the network, then run the same command to resume; to wait longer, "
                "raise [budget] storage_outage_s")

    def close(self) -> None:
        """Stop the heartbeats and the executor's work; fail what was running (interrupted), unless the database
        is gone (then it stays RUNNING, and the next run re-queues it)."""
        self._beat_stop.set()
        try:
            if self._executor is not None:
                self._executor.cancel_all()
        finally:
            for trial in list(self.running.values()) if self.outage.given_up is None else []:
                self._fail(trial, "the search was interrupted while the trial ran")
            if self._executor is not None:
                self._executor.close()
