"""Running a study: open (or resume) the Optuna study, its sampler and dsnas's tables, then drive it with
dsnas.driver until the budget is spent. The driver alone writes the study; workers only return results."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dsnas.driver import Driver
from dsnas.errors import DsnasError
from dsnas.evaluate import evaluate
from dsnas.executors import EvaluateFn
from dsnas.progress import Progress
from dsnas.spec import StudySpec
from dsnas.storage import (
    StorageLost,
    display_url,
    open_storage,
    recover_stale_trials,
    schema_lock,
    sqlite_file,
    storage_engine,
)


@dataclass
class SearchOutcome:
    study: Any
    completed: int  # COMPLETE trials in the study, this run's and earlier runs'
    failed: int  # trials that failed in this run
    elapsed_s: float
    front: list[Any] = field(default_factory=list)  # feasible non-dominated FrozenTrials
    stopped_because: str = ""
    pruned: int = 0  # PRUNED trials in the study: stopped at a rung, or skipped by the predictor


def check_executor_installed(spec: StudySpec) -> None:
    """Ray is imported by the Ray executor alone, so that a machine without it (a GPU box that cannot take its
    ~80 MB wheel) still runs local studies; a study that asks for Ray there is refused before any work starts."""
    import importlib.util

    from dsnas.errors import SpecError

    if spec.executor.kind == "ray" and importlib.util.find_spec("ray") is None:
        raise SpecError(str(spec.path), "executor.kind", "the ray executor needs the ray package, which is not "
                        "installed here", "ray", 'pip install ray, or set kind = "local" (or pass --executor local)')


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

    check_executor_installed(spec)
    study = open_study(spec)
    requeued = recover_stale_trials(study)
    study.sampler = make_sampler(spec, len(study.trials))
    progress = progress or Progress(spec)
    progress.start(study, requeued)
    driver = Driver(spec, study, evaluate_fn, progress)
    with driver.guard.installed():
        try:
            stopped = driver.loop()
        except StorageLost as e:
            raise DsnasError(driver.lost_message(e)) from None
        finally:
            driver.close()
    front = driver.db("read the Pareto front", lambda: study.best_trials) if progress.completed else []
    completed = driver.db("count the completed trials", driver.count, TrialState.COMPLETE)
    pruned = driver.db("count the pruned trials", driver.count, TrialState.PRUNED)
    return SearchOutcome(study, completed, progress.failed, progress.elapsed(), front, stopped, pruned)
