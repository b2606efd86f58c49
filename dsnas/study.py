"""Reading a study: open (or, for `dsnas search`, create) the Optuna study a study file names, and dsnas's tables
beside it. Nothing here runs a trial, checks a Ray address or a CUDA device, or imports the driver: `dsnas report`,
`export`, `dashboard` and `predictor` read a study through this module on any machine."""

from __future__ import annotations

from typing import Any

from dsnas import tables
from dsnas.errors import DsnasError
from dsnas.spec import StudySpec
from dsnas.storage import display_url, open_storage, schema_lock, sqlite_file, storage_engine


def open_study(spec: StudySpec, create: bool = True) -> Any:
    """Create (or only load) the study; refuse one whose objectives differ from the study file's."""
    import optuna

    db_file = sqlite_file(spec.storage)
    missing = db_file is not None and not db_file.exists()  # opening would create it
    storage = None if (missing and not create) else open_storage(spec.storage, write_ahead=create)
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
    engine = storage_engine(study)
    with schema_lock(spec.storage):  # another driver may be creating them at this moment
        tables.ensure_schema(engine, display_url(spec.storage))
        # Also fills in a trial that was told COMPLETE when the database was lost before its measurements were
        # written (see _Driver._record); a no-op for a study whose measurements are all there.
        tables.backfill(engine, study)
    tables.record_study(engine, spec.name, [{"name": o.name, "metric": o.metric, "direction": o.direction}
                                            for o in spec.objectives], spec.hardware.constraints)
