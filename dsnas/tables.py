"""dsnas's own tables, in the study's database beside Optuna's: what each study measures, every
measurement a trial made (per batch size, with its dispersion and the backend that ran), and the device
fingerprints. Created on first use and upgraded in place, so a study written by an older dsnas opens."""

from __future__ import annotations

import datetime
import logging
import weakref
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
    delete,
    inspect,
    select,
    text,
)
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from dsnas._version import __version__
from dsnas.errors import DsnasError
from dsnas.profiler.device import fingerprint_id, short_hash
from dsnas.profiler.timing import TIMING_KEYS
from dsnas.storage import reading, storage_engine

# Version 0 is a database without these tables (dsnas 0.1.0): every table is created, and the
# measurements of its trials are filled in from what their user attrs hold.
SCHEMA_VERSION = 1
SOURCE_CHARS = 256  # dsnas_measurements.cached_from: the trial whose figures a reused measurement holds


class Base(DeclarativeBase):
    pass  # a metadata of our own: Optuna's tables are never created, altered or dropped from here


class SchemaVersion(Base):
    __tablename__ = "dsnas_schema"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    written_by: Mapped[str] = mapped_column(String(64))  # the dsnas version that last upgraded it


class StudyRecord(Base):
    __tablename__ = "dsnas_studies"
    study_name: Mapped[str] = mapped_column(String(512), primary_key=True)
    objectives: Mapped[list[dict[str, str]]] = mapped_column(JSON)  # [{name, metric, direction}]
    constraints: Mapped[dict[str, float]] = mapped_column(JSON)  # metric -> upper limit
    dsnas_version: Mapped[str] = mapped_column(String(64))


class Fingerprint(Base):
    __tablename__ = "dsnas_fingerprints"
    id: Mapped[str] = mapped_column(String(16), primary_key=True)  # hash of the canonical JSON
    data: Mapped[dict[str, Any]] = mapped_column(JSON)


class Measurement(Base):
    __tablename__ = "dsnas_measurements"
    __table_args__ = (UniqueConstraint("study_name", "trial_number", "batch_size", "dtype", "backend"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_name: Mapped[str] = mapped_column(String(512), index=True)
    trial_number: Mapped[int] = mapped_column(Integer)
    fingerprint_id: Mapped[str] = mapped_column(ForeignKey("dsnas_fingerprints.id"))
    batch_size: Mapped[int] = mapped_column(Integer)
    dtype: Mapped[str] = mapped_column(String(32))
    backend: Mapped[str] = mapped_column(String(64))  # what actually ran, e.g. eager-fp32
    threads: Mapped[int | None] = mapped_column(Integer, nullable=True)
    latency_ms_median: Mapped[float] = mapped_column(Float)
    latency_ms_p10: Mapped[float] = mapped_column(Float)
    latency_ms_p90: Mapped[float] = mapped_column(Float)
    latency_spread: Mapped[float] = mapped_column(Float)  # (p90 - p10) / median
    repeats: Mapped[int] = mapped_column(Integer)
    latency_ms_p25: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_ms_p75: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_ci_rel: Mapped[float | None] = mapped_column(Float, nullable=True)  # median's 95% CI half-width
    device_latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)  # CUDA events
    throughput_tok_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    # 64-bit: a GPU's 2 GiB peak at batch 32 overflowed PostgreSQL's INTEGER (see _widen for older tables)
    peak_memory_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    gflop_s: Mapped[float | None] = mapped_column(Float, nullable=True)  # counted FLOPs / median latency
    gb_s: Mapped[float | None] = mapped_column(Float, nullable=True)  # counted bytes / median latency
    energy_per_call_j: Mapped[float | None] = mapped_column(Float, nullable=True)  # NVML, steady window
    sm_util: Mapped[float | None] = mapped_column(Float, nullable=True)  # GPM, steady window
    dram_bw_util: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The measurement cache's key (with fingerprint, batch size and dtype), and where a reused figure came from.
    arch_hash: Mapped[str | None] = mapped_column(String(16), index=True, nullable=True)
    dsnas_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    cached_from: Mapped[str | None] = mapped_column(String(SOURCE_CHARS), nullable=True)
    timing: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # every statistic of the protocol
    figures: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # every figure of this batch size
    measured_at: Mapped[datetime.datetime | None] = mapped_column(DateTime, nullable=True)


def arch_hash(arch: dict[str, Any]) -> str:
    return short_hash(arch)


def schema_version(engine: Any) -> int:
    """The dsnas schema of a database: 0 when it has no dsnas tables yet. Once current it stays current (a newer
    dsnas would upgrade it only where this one refuses to run), so that is remembered per engine: the driver asks
    once a trial."""
    if engine in _CURRENT:
        return SCHEMA_VERSION
    if not inspect(engine).has_table(SchemaVersion.__tablename__):
        return 0
    with Session(engine) as session:
        row = session.get(SchemaVersion, 1)
        version = row.version if row else 0
    if version == SCHEMA_VERSION:
        _CURRENT.add(engine)
    return version


_CURRENT: weakref.WeakSet[Any] = weakref.WeakSet()  # engines whose database has the current schema


def ensure_schema(engine: Any, url: str) -> int:
    """Create or upgrade dsnas's tables; returns the version found before. A database from a newer dsnas
    is refused rather than written to by code that does not know its tables."""
    found = schema_version(engine)
    if found > SCHEMA_VERSION:
        raise DsnasError(f"{url}: its dsnas tables have schema version {found}, this dsnas {__version__} "
                         f"knows up to {SCHEMA_VERSION}. Fix: upgrade dsnas (pip install -U dsnas)")
    if found < SCHEMA_VERSION:
        try:
            Base.metadata.create_all(engine)  # only the tables that are missing; one transaction on SQLite
        except DBAPIError:  # another driver created them between the check and the CREATE: they exist now
            Base.metadata.create_all(engine)
        with Session(engine) as session, session.begin():
            merge_racing(session, SchemaVersion(id=1, version=SCHEMA_VERSION, written_by=__version__))
    _widen(engine)
    return found


_WIDENED: weakref.WeakSet[Any] = weakref.WeakSet()  # engines whose peak_memory_bytes is 64-bit already

_WIDEN = {"postgresql": "ALTER TABLE dsnas_measurements ALTER COLUMN peak_memory_bytes TYPE BIGINT",
          "mysql": "ALTER TABLE dsnas_measurements MODIFY peak_memory_bytes BIGINT NULL"}


def _widen(engine: Any) -> None:
    """peak_memory_bytes was a 32-bit INTEGER where the database has one (PostgreSQL, MySQL): a trial's 2 GiB peak
    failed its insert after the trial was told COMPLETE, and every resume's backfill failed the same way. The
    column is made 64-bit in place (the schema is otherwise the same, so an older dsnas still reads it); SQLite's
    INTEGER is 64-bit already."""
    statement = _WIDEN.get("mysql" if engine.dialect.name == "mariadb" else engine.dialect.name)
    if statement is None or engine in _WIDENED:
        return
    columns = {c["name"]: c["type"] for c in inspect(engine).get_columns(Measurement.__tablename__)}
    if "peak_memory_bytes" in columns and not isinstance(columns["peak_memory_bytes"], BigInteger):
        try:
            with engine.begin() as connection:
                connection.execute(text(statement))
        except DBAPIError as e:
            # A team member's role may write rows but not alter the owner's table: searching went on before the
            # widening, and must go on (a peak of 2 GiB or more is then left out of the table, kept in the trial).
            _NARROW.add(engine)
            cause = str(e.orig or e).strip().splitlines()[0]
            logging.getLogger("dsnas.search").warning(
                f"dsnas: warning: dsnas_measurements.peak_memory_bytes is a 32-bit column and this database user "
                f"may not widen it ({cause}); a peak of 2 GiB or more is kept in its trial but not in that table. "
                f"Fix: have the table's owner run once: {statement}")
            return
    _WIDENED.add(engine)


_NARROW: weakref.WeakSet[Any] = weakref.WeakSet()  # engines whose peak_memory_bytes is 32-bit, and stays so
INT32_MAX = 2**31 - 1


def merge_racing(session: Session, row: Base) -> None:
    """``session.merge(row)``, safe when another driver on the same study inserts the same key between merge's
    read and its insert (two drivers record the same device fingerprint at once): the loser's insert fails in
    its savepoint, and the merge again finds the winner's row and updates it."""
    for attempt in range(2):
        try:
            with session.begin_nested():
                session.merge(row)
            return
        except IntegrityError:
            if attempt:
                raise


def record_study(engine: Any, name: str, objectives: list[dict[str, str]], constraints: Any) -> None:
    with Session(engine) as session, session.begin():
        merge_racing(session, StudyRecord(study_name=name, objectives=objectives,
                                          constraints=dict(constraints.items()), dsnas_version=__version__))


def study_record(engine: Any, name: str) -> StudyRecord | None:
    if schema_version(engine) < 1:
        return None
    with Session(engine) as session:
        return session.get(StudyRecord, name)


def measurement_rows(study_name: str, trial_number: int, profile: dict[str, Any], metrics: dict[str, Any],
                     measured_at: datetime.datetime | None,
                     arch: dict[str, Any] | None = None) -> tuple[Fingerprint | None, list[Measurement]]:
    """One row per batch size of a trial's profile (as the driver stores it in the trial's user attrs)."""
    batches = profile.get("batches") or {}
    if not batches:
        return None, []
    fp = Fingerprint(id=fingerprint_id(profile.get("fingerprint", {})), data=profile.get("fingerprint", {}))
    cache = profile.get("cache", {})
    source = cache.get("from") if cache.get("hit") else None
    measured_at = _when(profile.get("measured_at")) or _utc(measured_at)
    rows = []
    for bs, stats in sorted(batches.items(), key=lambda kv: int(kv[0])):
        timing = {k: v for k, v in stats.items() if k in TIMING_KEYS}
        figures = {k: v for k, v in stats.items() if k not in TIMING_KEYS}
        peak = stats.get("peak_bytes") or (stats["peak_memory_mb"] * 2**20 if stats.get("peak_memory_mb") else None)
        rows.append(Measurement(
            study_name=study_name, trial_number=trial_number, fingerprint_id=fp.id, batch_size=int(bs),
            dtype=profile.get("dtype", "float32"), backend=profile.get("backend", "unknown"),
            threads=profile.get("threads"), latency_ms_median=stats["median_ms"], latency_ms_p10=stats["p10_ms"],
            latency_ms_p90=stats["p90_ms"], latency_spread=stats["spread"], repeats=stats["repeats"],
            latency_ms_p25=stats.get("p25_ms"), latency_ms_p75=stats.get("p75_ms"),
            latency_ci_rel=stats.get("ci_rel"), device_latency_ms=stats.get("device_median_ms"),
            throughput_tok_s=metrics.get(f"throughput_tok_s_bs{bs}"), peak_memory_bytes=None if peak is None
            else int(peak), gflop_s=stats.get("gflop_s"), gb_s=stats.get("gb_s"),
            energy_per_call_j=stats.get("window_energy_per_call_j"), sm_util=stats.get("window_sm_util"),
            dram_bw_util=stats.get("window_dram_bw_util"), arch_hash=arch_hash(arch) if arch else None,
            dsnas_version=profile.get("fingerprint", {}).get("dsnas"),
            cached_from=_fitted(source and (cache.get("from_by_batch") or {}).get(str(bs), source), SOURCE_CHARS),
            timing=timing,
            figures=figures, measured_at=measured_at))
    return fp, rows


def _fitted(text: str | None, chars: int) -> str | None:
    """``text`` cut to a column of ``chars`` characters, its end marked. Each row names its own batch size's source
    (a study's name and trial): the sources of every batch size reused, joined, overflowed PostgreSQL's column
    (value too long for character varying(256)) after the trial was told COMPLETE; a long study name still may."""
    return text if text is None or len(text) <= chars else text[:chars - 1] + "\u2026"


def _when(stamp: Any) -> datetime.datetime | None:
    """The profile's own time of measuring (ISO 8601), as the column's naive UTC; None where it has none."""
    try:
        return _utc(datetime.datetime.fromisoformat(stamp)) if isinstance(stamp, str) else None
    except ValueError:
        return None


def _utc(when: datetime.datetime | None) -> datetime.datetime | None:
    """Naive UTC, as every measured_at is stored; a naive time is local (Optuna's trial times are)."""
    return None if when is None else when.astimezone(datetime.timezone.utc).replace(tzinfo=None)


def cached_figures(engine: Any, arch: dict[str, Any]) -> dict[str, Any]:
    """The measurement cache: what this dsnas measured of ``arch`` before, in any study of this database, per
    device fingerprint id: {fingerprint_id: {"batches": {bs: {"figures", "timing", "profile" (its labels: backend,
    dtype, threads, measured_at), "source"}}}}. The worker reuses the entry of its own fingerprint (and measurement
    key, threads included) instead of measuring again."""
    if engine is None or schema_version(engine) < SCHEMA_VERSION:  # None: a study in memory keeps no tables
        return {}
    m = Measurement
    query = (select(m.fingerprint_id, m.threads, m.backend, m.dtype, m.batch_size, m.figures, m.timing,
                    m.study_name, m.trial_number, m.measured_at)
             .where(m.arch_hash == arch_hash(arch), m.dsnas_version == __version__, m.cached_from.is_(None),
                    m.figures.is_not(None))
             .order_by(m.id))
    out: dict[str, Any] = {}
    with reading(engine) as connection:  # one round trip on PostgreSQL
        for row in connection.execute(query):  # later measurements of the same key replace earlier ones
            entry = out.setdefault(row.fingerprint_id, {"batches": {}})
            # Each batch size labelled as the measurement it holds (labels kept per entry were the first, then the
            # last row's: a 1-thread batch 4 was reused as another study's 2-thread batch 1, and named as it).
            labels = {"backend": row.backend, "dtype": row.dtype, "threads": row.threads}
            if row.measured_at is not None:  # a reused figure keeps the time it was measured at
                labels["measured_at"] = row.measured_at.replace(tzinfo=datetime.timezone.utc).isoformat()
            entry["batches"][str(row.batch_size)] = {"figures": row.figures, "timing": row.timing, "profile": labels,
                                                     "source": f"study {row.study_name} trial {row.trial_number}"}
    return out


def record_measurements(engine: Any, study_name: str, trial_number: int, profile: dict[str, Any],
                        metrics: dict[str, Any], measured_at: datetime.datetime | None = None,
                        arch: dict[str, Any] | None = None) -> None:
    fp, rows = measurement_rows(study_name, trial_number, profile, metrics, measured_at, arch)
    if fp is None or engine is None:  # None: a study in memory keeps no tables
        return
    if engine in _NARROW:  # (see _widen)
        for row in rows:
            if row.peak_memory_bytes is not None and row.peak_memory_bytes > INT32_MAX:
                row.peak_memory_bytes = None
    with Session(engine) as session, session.begin():
        merge_racing(session, fp)
        exists = select(Measurement.id).where(Measurement.study_name == study_name,
                                              Measurement.trial_number == trial_number)
        if session.execute(exists).first() is None:  # a re-run of the backfill writes nothing twice
            session.add_all(rows)


def forget_deleted(engine: Any, study: Any) -> int:
    """Remove the measurements stored under the name of a study that has no trial yet: they are a deleted study's
    (optuna.delete_study, the dashboard's delete button) of that name, and are keyed by name. A new study of the
    name then showed the old trials' figures for its own, and never wrote its own (record_measurements writes a
    trial's rows once). A study's trials are always stored before their measurements. Returns the rows removed."""
    if study.get_trials(deepcopy=False):
        return 0
    with Session(engine) as session, session.begin():
        gone = session.execute(delete(Measurement).where(Measurement.study_name == study.study_name))
    return gone.rowcount or 0


def backfill(engine: Any, study: Any) -> int:
    """Measurements of completed trials that have none in dsnas_measurements (a study from dsnas 0.1.0);
    returns how many trials were filled in."""
    from optuna.trial import TrialState

    with Session(engine) as session:
        have = set(session.scalars(select(Measurement.trial_number).where(
            Measurement.study_name == study.study_name).distinct()))
    filled = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if trial.number not in have and "profile" in trial.user_attrs:
            record_measurements(engine, study.study_name, trial.number, trial.user_attrs["profile"],
                                trial.user_attrs, trial.datetime_complete, trial.user_attrs.get("arch"))
            filled += 1
    return filled


def measurements(study: Any) -> Any:
    """Every measurement of an open Optuna study as a DataFrame (one row per trial and batch size), from
    dsnas_measurements; for a study that predates the table, from its trials' stored profiles."""
    import pandas as pd

    engine = storage_engine(study)
    rows: list[Measurement] = []
    fingerprints: dict[str, dict[str, Any]] = {}
    if engine is not None and schema_version(engine) >= 1:
        with Session(engine) as session:
            rows = list(session.scalars(select(Measurement).where(Measurement.study_name == study.study_name)
                                        .order_by(Measurement.trial_number, Measurement.batch_size)))
            fingerprints = {f.id: f.data for f in session.scalars(select(Fingerprint))}
    if not rows:
        for trial in study.get_trials(deepcopy=False):
            fp, made = measurement_rows(study.study_name, trial.number, trial.user_attrs.get("profile", {}),
                                        trial.user_attrs, trial.datetime_complete)
            rows += made
            if fp is not None:
                fingerprints[fp.id] = fp.data
    columns = [c.name for c in Measurement.__table__.columns if c.name not in ("id", "study_name", "timing",
                                                                                 "figures")]
    df = pd.DataFrame([{c: getattr(r, c) for c in columns} for r in rows], columns=columns)
    data = [fingerprints.get(f, {}) for f in df["fingerprint_id"]]
    df["device"] = [fp.get("gpu") or fp.get("cpu") for fp in data]
    return df
