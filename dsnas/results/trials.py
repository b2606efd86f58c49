"""A study as a pandas DataFrame: one row per trial, with its state, parameters, architecture,
objectives, hardware metrics (units in the column names), constraint values, durations and the
fingerprint of the device that measured it. Plus the Pareto front and hypervolume over such a frame."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dsnas.errors import DsnasError
from dsnas.pareto import dominated_volume as volume
from dsnas.pareto import dominates, front_indices
from dsnas.profiler.device import fingerprint_id
from dsnas.spec import OBJECTIVES, read_study
from dsnas.storage import display_url, open_storage, optuna_quieted, quiet_optuna, sqlite_file, storage_engine
from dsnas.trial import own_work


@dataclass(frozen=True)
class Objective:
    name: str  # as in the study file, e.g. "throughput"
    column: str  # the frame's column, the metric with its unit, e.g. "throughput_tok_s"
    direction: str  # "maximize" or "minimize"


def load(storage: str | Path, study: str | None = None) -> Any:
    """The trials of ``study`` in ``storage`` (an SQLAlchemy URL) as a DataFrame; read-only. ``storage`` may also
    be a study file (``load("studies/quickstart.toml")``): its storage and name are read from it.

    ``df.attrs["objectives"]`` lists the objectives (name, column, direction) and ``df.attrs["constraints"]``
    the hardware limits; see :func:`front` and :func:`hypervolume`."""
    with optuna_quieted():  # Optuna's own log lines: quiet for this call only
        return _load(storage, study)


def _load(storage: str | Path, study: str | None) -> Any:
    import optuna

    if str(storage).endswith(".toml"):
        spec = read_study(storage)
        storage, study = spec.storage, study or spec.name
    if study is None:
        raise DsnasError(f"load({display_url(str(storage))!r}): name the study, or give a study file (STUDY.toml). "
                         "Fix: load(url, \"my_study\")")

    quiet_optuna()
    if "://" not in str(storage):  # a database file's path, not its URL: SQLAlchemy's own error named no fix
        raise DsnasError(f"load({str(storage)!r}): storage must be a database URL or a study file. Fix: e.g. "
                         f"load(\"sqlite:///{storage}\", {study!r}), or load(\"STUDY.toml\")")
    db_file = sqlite_file(storage)
    if db_file is not None and not db_file.exists():  # opening it would create an empty database
        raise DsnasError(f"{db_file}: no such study database. Fix: run `dsnas search` first, or check the path")
    # A damaged file, or one in write-ahead-log mode where this account cannot write: one line that names it and
    # the fix, as report and export say (open_storage checks both).
    opened = open_storage(storage)
    try:
        loaded = optuna.load_study(study_name=study, storage=opened)
    except KeyError:
        names = optuna.study.get_all_study_names(opened)
        raise DsnasError(f"{display_url(storage)}: no study {study!r} (stored: {', '.join(names) or 'none'}). "
                         "Fix: name one of the stored studies") from None
    return frame(loaded)


def frame(study: Any) -> Any:
    """The DataFrame of an open Optuna study (see :func:`load`)."""
    import pandas as pd

    objectives, constraints = _study_meta(study)
    rows = [_row(t, objectives) for t in study.get_trials(deepcopy=False)]
    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame(columns=["trial", "state", "feasible"])
    df = df[_ordered(df.columns)]
    # Plain JSON in attrs, so that parquet files keep them.
    df.attrs.update(study=study.study_name, objectives=[asdict(o) for o in objectives], constraints=constraints)
    return df


def _study_meta(study: Any) -> tuple[list[Objective], dict[str, float]]:
    """Objectives and constraints as the driver recorded them, or (a study without dsnas's tables) as
    the objective names map onto dsnas's metrics."""
    from dsnas.tables import study_record  # SQLAlchemy loads on first use

    engine = storage_engine(study)
    record = study_record(engine, study.study_name) if engine is not None else None
    if record is not None:
        return [Objective(o["name"], o["metric"], o["direction"]) for o in record.objectives], record.constraints
    names = study.metric_names or [f"value_{i}" for i in range(len(study.directions))]
    objectives = [Objective(n, OBJECTIVES.get(n, (n,))[0], d.name.lower()) for n, d in zip(names, study.directions)]
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    if done:  # an Optuna study that dsnas did not write: its objectives are only in the trial values
        objectives = [o if o.column in done[0].user_attrs else Objective(o.name, f"value_{i}", o.direction)
                      for i, o in enumerate(objectives)]
    return objectives, {}


def _row(t: Any, objectives: list[Objective]) -> dict[str, Any]:
    attrs = t.user_attrs
    row: dict[str, Any] = {"trial": t.number, "state": t.state.name, "started": t.datetime_start,
                           "completed": t.datetime_complete, "duration_s": _seconds(t)}
    row.update({f"param.{k}": v for k, v in t.params.items()})
    # A repeat of an older dsnas copied its original's seconds of work (and predictor check): it did none of it.
    repeat = "reused_from" in attrs
    row.update({k: float(v) for k, v in attrs.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and not (repeat and own_work(k))})
    for obj, value in zip(objectives, t.values or []):
        row.setdefault(obj.column, value)
    for key, value in t.system_attrs.items():
        if key.startswith("constraints:"):
            row[f"constraint.{key.split(':', 1)[1]}"] = value  # value - limit: feasible when <= 0
    if "constraints" in t.system_attrs:  # Optuna's own list, for studies with a constraints_func
        for i, value in enumerate(t.system_attrs["constraints"]):
            row[f"constraint.{i}"] = value
    constraint_values = [v for k, v in row.items() if k.startswith("constraint.")]
    row["feasible"] = (bool(attrs["feasible"]) if "feasible" in attrs else all(v <= 0 for v in constraint_values)) \
        if t.state.name == "COMPLETE" else None
    row["disturbed"] = _disturbed(attrs)
    row["arch_short"] = attrs.get("arch_short")
    row["arch"] = json.dumps(attrs["arch"], sort_keys=True) if "arch" in attrs else None
    row.update(_fingerprint_columns(attrs.get("profile", {}).get("fingerprint")))
    row["memory_method"] = (attrs.get("profile") or {}).get("memory_method")  # what peak_memory_mb means
    row["fail_reason"] = attrs.get("fail_reason")
    row["pruned_by"] = attrs.get("pruned_by")  # "rung" (evaluated, counted) or "predictor" (skipped untrained)
    return row


def _disturbed(attrs: dict[str, Any]) -> bool | None:
    """Whether others' load disturbed the trial's measurement even after its retries (dsnas.profiler.disturbance):
    the ``disturbed`` metric, else (a measurement reused from the cache) its batch sizes' records; None when the
    trial stored neither (no measurement, no /proc/stat, or a study older than the flag)."""
    if isinstance(attrs.get("disturbed"), (int, float)):
        return bool(attrs["disturbed"])
    flags = [b["disturbance"].get("disturbed") for b in (attrs.get("profile") or {}).get("batches", {}).values()
             if isinstance(b.get("disturbance"), dict)]
    known = [f for f in flags if f is not None]
    return any(known) if known else None


def _seconds(t: Any) -> float | None:
    if t.datetime_start is None or t.datetime_complete is None:
        return None
    return (t.datetime_complete - t.datetime_start).total_seconds()


def _fingerprint_columns(fp: dict[str, Any] | None) -> dict[str, Any]:
    if not fp:
        return {"fingerprint": None, "fingerprint_id": None}
    if fp.get("device") == "recorded":  # figures a task's own function gave (dsnas.worker.recorded_profile)
        source = fp.get("source")
        named = ", ".join(f"{k} {v}" for k, v in source.items()) if isinstance(source, dict) else source
        return {"fingerprint": f"recorded by the task{f' ({named})' if named else ''}",
                "fingerprint_id": fingerprint_id(fp)}
    what = fp.get("gpu") or fp.get("cpu", "?")
    threads = f" x{fp['cpu_count']}" if fp.get("device") == "cpu" and fp.get("cpu_count") else ""
    text = f"{fp.get('device', '?')}: {what}{threads} on {fp.get('host', '?')}, torch {fp.get('torch', '?')}"
    return {"fingerprint": text, "fingerprint_id": fingerprint_id(fp)}


_FIRST = ["trial", "state", "feasible", "disturbed", "arch_short"]
_LAST = ["started", "completed", "duration_s", "fingerprint", "fingerprint_id", "arch", "fail_reason", "pruned_by"]


def _ordered(columns: Any) -> list[str]:
    """Identity first, then parameters, metrics and constraints (alphabetical), provenance last."""
    middle = [c for c in columns if c not in _FIRST and c not in _LAST]
    params = sorted(c for c in middle if c.startswith("param."))
    rest = sorted(c for c in middle if not c.startswith("param."))
    return [c for c in _FIRST if c in columns] + params + rest + [c for c in _LAST if c in columns]


def objectives(df: Any) -> list[Objective]:
    if "objectives" not in df.attrs:
        raise DsnasError("this DataFrame has no objectives in df.attrs. Fix: make it with dsnas.results.load")
    return [Objective(**o) for o in df.attrs["objectives"]]


def done_trials(df: Any, feasible_only: bool = True, trained_only: bool = False) -> Any:
    """The completed trials (feasible ones only, unless told); ``trained_only`` leaves out the reused repeats: each
    has its original's values, and the original stands for both. Only a study with one has the column."""
    done = df[df["state"] == "COMPLETE"]
    cols = [o.column for o in objectives(df)]
    done = done.dropna(subset=[c for c in cols if c in done.columns])
    if trained_only and "reused_from" in done.columns:
        done = done[done["reused_from"].isna()]
    return done[done["feasible"].astype(bool)] if feasible_only and len(done) else done


def front(df: Any, feasible_only: bool = True) -> Any:
    """The non-dominated completed trials (feasible ones only, unless told), best first in the first objective."""
    objs = objectives(df)
    done = done_trials(df, feasible_only, trained_only=True)
    if done.empty:  # no completed trial (all failed, or none yet): no front, and maybe no objective columns
        return done
    points = done[[o.column for o in objs]].to_numpy().tolist()
    best = done.iloc[front_indices(points, [o.direction for o in objs])]
    return best.sort_values(objs[0].column, ascending=objs[0].direction == "minimize")


def default_reference(df: Any) -> dict[str, float]:
    """A reference point a reader can state: zero for an objective to maximize whose values are not negative (no
    accuracy, no throughput), and 10% beyond the worst completed trial for one to minimize (latency, memory,
    parameters, loss have no natural worst). Never negative for figures that cannot be."""
    done = done_trials(df, feasible_only=False)
    if done.empty:
        raise DsnasError(f"study {df.attrs.get('study')!r} has no completed trial: no hypervolume to compute")
    reference = {}
    for o in objectives(df):
        values = done[o.column]
        low, high = float(values.min()), float(values.max())
        if o.direction == "maximize":
            reference[o.name] = 0.0 if low >= 0 else low - (0.1 * (high - low) or 1.0)
        else:
            reference[o.name] = high * 1.1 if high > 0 else high + (0.1 * (high - low) or 1.0)
    return reference


def ideal_box(df: Any, reference: dict[str, float]) -> float:
    """The volume between the reference and the ideal point (the best feasible value of each objective): the
    most a front could dominate, which a normalised hypervolume is a share of."""
    done = done_trials(df)
    box = 1.0
    for o in objectives(df):
        best = done[o.column].max() if o.direction == "maximize" else done[o.column].min()
        box *= max(0.0, (best - reference[o.name]) * (1 if o.direction == "maximize" else -1))
    return box


def hypervolume(df: Any, reference: dict[str, float] | None = None) -> float:
    """Hypervolume of the feasible completed trials, bounded by ``reference`` (objective name -> value;
    default: :func:`default_reference`). Units are the product of the objectives' units."""
    objs = objectives(df)
    reference = _check_reference(df, reference)
    done = done_trials(df)
    return volume(done[[o.column for o in objs]].to_numpy().tolist(), [reference[o.name] for o in objs],
                  [o.direction for o in objs])


def hypervolume_history(df: Any, reference: dict[str, float] | None = None) -> Any:
    """Hypervolume after each completed trial that trained (a reused repeat cost nothing, and counted it stretched
    the axis: 102 trials for 2 trained), in the order they completed: columns trial, n_complete, wall_s (seconds
    since the study's first trial started), hypervolume, and normalised: its share of the study's ideal box
    (:func:`ideal_box`), in [0, 1]."""
    import pandas as pd


    objs = objectives(df)
    reference = _check_reference(df, reference)
    ref = [reference[o.name] for o in objs]
    done = done_trials(df, feasible_only=False, trained_only=True).sort_values(["completed", "trial"])
    origin = df["started"].dropna().min()
    directions = [o.direction for o in objs]
    rows, points, current = [], [], 0.0
    for n, (_, t) in enumerate(done.iterrows(), start=1):
        point = [t[o.column] for o in objs]
        # Only a trial that joins the front changes the volume: the rest reuse it (the volume was computed again
        # after every trial, O(n^d) for the study, minutes at a few hundred trials of 4 objectives).
        if t["feasible"] and not any(dominates(p, point, directions) or p == point for p in points):
            points = [p for p in points if not dominates(point, p, directions)] + [point]
            current = volume(points, ref, directions)
        rows.append({"trial": t["trial"], "n_complete": n, "wall_s": (t["completed"] - origin).total_seconds(),
                     "hypervolume": current})
    history = pd.DataFrame(rows, columns=["trial", "n_complete", "wall_s", "hypervolume"])
    box = ideal_box(df, reference) if len(done_trials(df)) else 0.0
    history["normalised"] = history["hypervolume"] / box if box > 0 else float("nan")
    return history


def _check_reference(df: Any, reference: dict[str, float] | None) -> dict[str, float]:
    names = [o.name for o in objectives(df)]
    if reference is None:
        return default_reference(df)
    if sorted(reference) != sorted(names):
        raise DsnasError(f"hypervolume reference {reference}: must give a value for each objective {names}. "
                         f"Fix: e.g. {', '.join(f'{n}=...' for n in names)}")
    # A NaN or infinite corner gave a hypervolume of 0 or inf, as if measured.
    wrong = [n for n, v in reference.items() if isinstance(v, bool) or not isinstance(v, (int, float))
             or not math.isfinite(v)]
    if wrong:
        raise DsnasError(f"hypervolume reference {reference}: {wrong[0]} must be a finite number, got "
                         f"{reference[wrong[0]]!r}. Fix: e.g. {wrong[0]}=0.0")
    return reference
