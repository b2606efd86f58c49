"""Reading a study: open (or, for `dsnas search`, create) the Optuna study a study file names, and dsnas's tables
beside it. Nothing here runs a trial, checks a Ray address or a CUDA device, or imports the driver: `dsnas report`,
`export`, `dashboard` and `predictor` read a study through this module on any machine."""

from __future__ import annotations

import dataclasses
import json
import shlex
from typing import Any

from dsnas import tables
from dsnas.errors import DsnasError
from dsnas.spec import Constraints, StudySpec, TaskSpec
from dsnas.storage import (
    display_url,
    driver_gone,
    driver_identity,
    leave_write_ahead,
    open_storage,
    schema_lock,
    sqlite_file,
    stale_trials,
    storage_engine,
    study_lock,
)
from dsnas.tasks import BUILTIN_ARCH_KEYS, builtin_defaults


def open_study(spec: StudySpec, create: bool = True) -> Any:
    """Create (or only load) the study; refuse one whose objectives differ from the study file's."""
    import optuna

    db_file = sqlite_file(spec.storage)
    missing = db_file is not None and not db_file.exists()  # opening would create it
    storage = None if (missing and not create) else open_storage(spec.storage, write_ahead=create)
    if not create and (storage is None or spec.name not in optuna.study.get_all_study_names(storage)):
        raise DsnasError(f"{spec.path}: [study.name] no study {spec.name!r} is stored in {display_url(spec.storage)}. "
                         "Fix: run `dsnas search` on this study file first")
    # Only loaded where nothing is to be created: create_study(load_if_exists=True) writes (an INSERT, then reads
    # the study it found), which a read-only database role refuses, and `report` and `export` only read.
    try:
        study = optuna.create_study(study_name=spec.name, storage=storage, directions=spec.directions,
                                    load_if_exists=True) if create else optuna.load_study(study_name=spec.name,
                                                                                          storage=storage)
    except optuna.exceptions.StorageInternalError as e:  # e.g. a read-only role or transaction: Optuna's text
        cause = str(e.__cause__ or e).strip().splitlines()[0]  # blames "invalid data"; the driver's says why
        raise DsnasError(f"{spec.path}: [study] storage {display_url(spec.storage)} refused to store the study "
                         f"({cause}). Fix: search with a database user that may write there") from None
    try:
        _check_and_record(spec, study, create)
    except BaseException:
        # Refused (other objectives, settings or data): the study as it was, one file in rollback-journal mode where
        # it was (the refusal left it in write-ahead-log mode, which an account that may only read it cannot open).
        if create and (engine := storage_engine(study)) is not None:
            engine.dispose()
            leave_write_ahead(spec.storage)
        raise
    return study


def _check_and_record(spec: StudySpec, study: Any, create: bool) -> None:
    names = [o.name for o in spec.objectives]
    stored = [d.name.lower() for d in study.directions]
    if stored != spec.directions or (study.metric_names and study.metric_names != names):
        # Each with its direction on both sides: a flipped direction showed the stored names only, no difference.
        had = dict(zip(study.metric_names, stored)) if study.metric_names else stored
        raise DsnasError(f"{spec.path}: [objectives] the stored study {spec.name!r} has objectives {had}, the file "
                         f"asks for {dict(zip(names, spec.directions))}. Fix: restore the objectives, or give the "
                         "study a new [study] name")
    if create:
        if not study.metric_names:
            study.set_metric_names(names)
        with study_lock(study, spec.storage):  # a second driver starting beside it checks what this one recorded
            _check_settings(spec, study)
        _record_study(spec, study)


# The study's user attribute that keeps the settings its stored numbers were made under (study_settings), and
# the driver that recorded them (RECORDED_BY: binds while it runs, before it has a trial).
SETTINGS_ATTR = "dsnas_settings"
RECORDED_BY = "recorded_by"
# Why a changed section would make the stored numbers mean something else than the new ones.
_CHANGES = {"task": "its stored accuracies were measured on the task as it was",
            "hardware": "its stored speeds were measured, and their limits judged, as it was",
            "engine": "its stored candidates were compressed and measured as it was"}


def study_settings(spec: StudySpec) -> dict[str, Any]:
    """What a study's stored numbers mean depends on, JSON-ready: the task (accuracy), the batch sizes, threads,
    timing protocol and limits (speeds, feasibility, the front) and the engine (what a candidate ships as). Not the
    device, which each measurement's fingerprint records, nor ``kernels``, an extra table that changes no figure."""
    hardware = {k: v for k, v in dataclasses.asdict(spec.hardware).items() if k not in ("device", "kernels")}
    settings = {"task": {"name": spec.task.name, **spec.task.params}, "hardware": hardware,
                "engine": dataclasses.asdict(spec.engine)}
    return json.loads(json.dumps(settings, default=str))


def _check_settings(spec: StudySpec, study: Any) -> None:
    """Record the study file's settings at a study's first run; refuse to resume a study with trials stored under
    other ones, before any work, since the old and the new trials would then share a front without being alike.
    A study of an older dsnas that has trials but no record keeps none: this run's file may have been edited since
    them, and recording it would make exports carry, and resumes demand, settings no trial ran under. A trial
    another driver runs now binds as a finished one does (its result will be stored under the recorded settings);
    one a stopped driver left RUNNING does not (it is queued again, to run under these)."""
    from optuna.trial import TrialState

    now, stored = study_settings(spec), study.user_attrs.get(SETTINGS_ATTR)
    recorder = stored.pop(RECORDED_BY, None) if isinstance(stored, dict) else None
    if stored == now:
        return
    done: list[Any] = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    stale = {trial.number for trial, _ in stale_trials(study)}
    done += [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if t.number not in stale]
    # A driver of this host that recorded them and still runs binds too, before its first trial (it may be
    # probing the engine): two drivers started together each ran trials under its own settings, one recorded.
    me = driver_identity()
    if recorder and recorder.get("host") == me["host"] and recorder.get("pid") != me["pid"] \
            and not driver_gone(recorder):
        done.append(recorder)
    if not stored and done:
        said = inferred_differences(spec, done)  # what its trials still say of the settings they ran under
        if said:
            key, was, wanted = said[0]
            raise DsnasError(f"{spec.path}: [{key}] the stored study {spec.name!r} was searched with {_toml(was)} "
                             f"(as its trials say: its dsnas recorded no settings), the file now says "
                             f"{_toml(wanted)}; {_CHANGES[key.split('.')[0]]}. Fix: restore "
                             f"{key.rsplit('.', 1)[-1]} = {_toml(was)}, or give the study a new [study] name")
        return
    was_set, now_set = (_comparable(stored, like=now), _comparable(now, like=stored)) if stored else (None, None)
    if was_set and now_set:
        _threads_as_measured(was_set, now_set, done)
    if was_set != now_set and done:
        key, was, wanted = _first_difference(was_set, now_set)
        section = key.split(".")[0]
        leaf = key.rsplit(".", 1)[-1]
        restore = f"remove {leaf}" if was is None else f"restore {leaf} = {_toml(was)}"
        raise DsnasError(f"{spec.path}: [{key}] the stored study {spec.name!r} was searched with {_toml(was)}, the "
                         f"file now says {_toml(wanted)}; {_CHANGES[section]}. Fix: {restore}, or give the study a "
                         "new [study] name")
    study.set_user_attr(SETTINGS_ATTR, {**now, RECORDED_BY: me})


def inferred_differences(spec: StudySpec, trials: list[Any]) -> list[tuple[str, Any, Any]]:
    """Where the study file differs from what a study's trials say of the settings they ran under, for a study of
    an older dsnas, which recorded none (it resumed under other batch sizes or another context without a word, and
    mixed the two on one front): the batch sizes they were measured at, and the task's values their architectures
    carry (a built-in task's context, image size). Each (key, theirs, the file's), where every trial says the same."""
    said: dict[str, set[str]] = {}
    # The task's values as the file gives them, or as the task takes them where the file leaves one out (a context
    # line deleted was the default 64 against trials of 32: not compared, resumed, exported, and verify crashed).
    params = {**builtin_defaults(spec.task.name), **spec.task.params}
    for trial in trials:
        attrs = getattr(trial, "user_attrs", None) or {}
        profile = attrs.get("profile") or {}
        arch, batches = attrs.get("arch"), profile.get("batches")
        # (A task's own figures, "recorded", may say some batch sizes only: no evidence of what was asked.)
        if isinstance(batches, dict) and batches and profile.get("backend") != "recorded":
            said.setdefault("hardware.batch_sizes", set()).add(json.dumps(sorted(int(b) for b in batches)))
        for key in BUILTIN_ARCH_KEYS.get(spec.task.name, ()):
            if isinstance(arch, dict) and key in arch and key in params:
                said.setdefault(f"task.{key}", set()).add(json.dumps(arch[key]))
    now = {"hardware.batch_sizes": sorted(spec.hardware.batch_sizes), **{f"task.{k}": v for k, v in params.items()}}
    return [(key, json.loads(next(iter(values))), now[key]) for key, values in said.items()
            if len(values) == 1 and json.loads(next(iter(values))) != now[key]]


def release_settings(study: Any) -> None:
    """This driver's run ended: its record of the settings binds no longer by it (a notebook's process lives on
    after dsnas.search returns, and refused another run's fixed settings where no trial had been stored); its
    trials, stored or running elsewhere, still bind."""
    stored = study.user_attrs.get(SETTINGS_ATTR)
    recorder = stored.get(RECORDED_BY) if isinstance(stored, dict) else None
    me = driver_identity()
    if isinstance(recorder, dict) and (recorder.get("host"), recorder.get("pid")) == (me["host"], me["pid"]):
        study.set_user_attr(SETTINGS_ATTR, {k: v for k, v in stored.items() if k != RECORDED_BY})


def edited_since(spec: StudySpec, study: Any) -> str:
    """One line where the study file's task, hardware (limits included) or engine differ from those its study was
    searched with, "" where they agree or none were recorded. `report`, `export` and `dashboard` read the study as
    searched (its stored figures and feasibility): a limit edited since judged nothing, and they said so nowhere."""
    stored = study.user_attrs.get(SETTINGS_ATTR)
    if not stored:
        return ""
    from optuna.trial import TrialState

    now = study_settings(spec)
    was, wanted = _comparable(stored, like=now), _comparable(now, like=stored)
    if was != wanted:  # the trials are read only where threads may explain the difference
        _threads_as_measured(was, wanted, study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if was == wanted:
        return ""
    key, before, after = _first_difference(was, wanted)
    return (f"{spec.path}: [{key}] is {_toml(after)} in the file, but the study was searched with {_toml(before)}: "
            "its figures and which trials are feasible are the search's. Fix: restore it, or search a new study "
            "([study] name) under the new setting")


def _comparable(settings: dict[str, Any], like: dict[str, Any]) -> dict[str, Any]:
    """The task's keys as they are (an added or removed one is a change), the hardware's and the engine's only
    where ``like`` has them too: a field a dsnas upgrade adds or drops is not the user's change."""
    task, other = settings.get("task"), like.get("task")
    if isinstance(task, dict) and isinstance(other, dict) and task != other and task.get("name") == other.get("name"):
        # A built-in task's key left out runs at its default: `lr = 0.003` written out (or a line of the default
        # deleted) changes no trial, and the resume was refused ("searched with (not set), the file now says 0.003").
        task = {**builtin_defaults(str(task.get("name"))), **task}
    return {"task": task,
            **{part: {k: v for k, v in (settings.get(part) or {}).items() if k in (like.get(part) or {})}
               for part in ("hardware", "engine")}}


def _threads_as_measured(was: dict[str, Any], now: dict[str, Any], trials: list[Any]) -> None:
    """Take ``threads`` left out on one side as the count every trial measured with, where the other side writes
    that count out: left out, a measurement uses the CPUs the process may use, so `threads = 2` written out on the
    2-CPU machine that searched changes no number (the resume was refused: "searched with (not set)"), nor does
    that line deleted there (left out, this machine's count is used)."""
    from dsnas.profiler.capabilities import usable_cpus  # reads /proc and the cgroup

    searched, wanted = was["hardware"].get("threads"), now["hardware"].get("threads")
    if "threads" not in was["hardware"] or (searched is None) == (wanted is None):
        return
    # Of the trials that measured: a repeat answered from an earlier trial and a candidate the predictor skipped
    # keep no profile, and counted as a trial of another count they refused the resume of any study that had one.
    profiles = [((getattr(t, "user_attrs", None) or {}).get("profile") or {}) for t in trials]
    used = {profile["threads"] for profile in profiles if "threads" in profile}
    if searched is None and used == {wanted}:
        was["hardware"]["threads"] = wanted
    elif wanted is None and used == {searched} and usable_cpus() == searched:
        now["hardware"]["threads"] = searched


def _first_difference(stored: Any, now: Any, key: str = "") -> tuple[str, Any, Any]:
    if isinstance(stored, dict) and isinstance(now, dict):
        for name in [*stored, *(k for k in now if k not in stored)]:
            if stored.get(name) != now.get(name):
                return _first_difference(stored.get(name), now.get(name), f"{key}.{name}" if key else name)
    return key, stored, now


def _toml(value: Any) -> str:
    return "(not set)" if value is None else json.dumps(value)


def as_searched(spec: StudySpec, study: Any) -> StudySpec:
    """``spec`` with the task, hardware and engine its study was searched with (recorded at its first run), where the
    study file was edited since: what an exported bundle must carry to be measured again as its trial was."""
    stored = study.user_attrs.get(SETTINGS_ATTR)
    if not stored:  # an older dsnas's study: what its trials say (an edited context was exported, and verify crashed)
        from optuna.trial import TrialState

        said = inferred_differences(spec, study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        params = {**spec.task.params, **{k[5:]: was for k, was, _ in said if k.startswith("task.")}}
        batches = next((tuple(was) for k, was, _ in said if k == "hardware.batch_sizes"), spec.hardware.batch_sizes)
        return dataclasses.replace(spec, task=dataclasses.replace(spec.task, params=params),
                                   hardware=dataclasses.replace(spec.hardware, batch_sizes=batches))
    task = dict(stored["task"])
    # Only the fields this dsnas has (a study recorded by another version may have more, or fewer).
    known = {f.name for f in dataclasses.fields(spec.hardware)} - {"constraints"}
    hardware = {k: v for k, v in stored["hardware"].items() if k in known}
    if "batch_sizes" in hardware:
        hardware["batch_sizes"] = tuple(hardware["batch_sizes"])
    limits = {f.name for f in dataclasses.fields(Constraints)}
    constraints = Constraints(**{k: v for k, v in stored["hardware"].get("constraints", {}).items() if k in limits})
    # And the engine: `dsnas profile --trial N` of a study whose int8_backend was edited since built its INT8 layers
    # with the file's backend, not the search's.
    engine = {k: v for k, v in (stored.get("engine") or {}).items() if k in {f.name for f in
                                                                             dataclasses.fields(spec.engine)}}
    return dataclasses.replace(spec, task=TaskSpec(task.pop("name"), task, spec.task.base_dir),
                               hardware=dataclasses.replace(spec.hardware, **hardware, constraints=constraints),
                               engine=dataclasses.replace(spec.engine, **engine))


def _record_study(spec: StudySpec, study: Any) -> None:
    """dsnas's tables beside Optuna's: created (or upgraded, for a study of an older dsnas) before any trial."""
    engine = storage_engine(study)
    with schema_lock(spec.storage):  # another driver may be creating them at this moment
        tables.ensure_schema(engine, display_url(spec.storage))
        tables.forget_deleted(engine, study)
        # Also fills in a trial that was told COMPLETE when the database was lost before its measurements were
        # written (see _Driver._record); a no-op for a study whose measurements are all there.
        tables.backfill(engine, study)
        tables.record_study(engine, spec.name, [{"name": o.name, "metric": o.metric, "direction": o.direction}
                                                for o in spec.objectives], spec.hardware.constraints)


def nothing_to_use(spec: StudySpec, study: Any, feasible: bool = False) -> str:
    """Why ``study`` has no completed (``feasible``: feasible completed) trial, and the fix, as one line: "run a
    search first" sent a user whose every trial a rung or the predictor had stopped to a search that stopped at once
    (its budget spent)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    what = "feasible completed" if feasible else "completed"
    stopped = [t for t in trials if t.state == TrialState.PRUNED]
    done = sum(t.state == TrialState.COMPLETE for t in trials)
    if not stopped and not done:
        return (f"{spec.path}: study {spec.name!r} has no {what} trial yet. Fix: run `dsnas search "
                f"{shlex.quote(str(spec.path))}` first")
    told = f"; {len(stopped)} stopped before training ended, trial {stopped[0].number}: " \
        f"{stopped[0].user_attrs.get('pruned_reason', 'no reason stored')}" if stopped else ""
    over = f"{done} completed, none within [hardware.constraints]" if feasible and done else f"{done} completed"
    return (f"{spec.path}: study {spec.name!r} has no {what} trial: of its {len(trials)} trials, {over}{told}. Fix: "
            "loosen [hardware.constraints] if its limits stopped them, or raise [budget] n_trials and run `dsnas "
            f"search {shlex.quote(str(spec.path))}` again")
