"""`dsnas dashboard`: the Optuna dashboard on the study's storage, prepared first with a study note (what
measured the trials, the Pareto front), hypervolume charts, and each trial's architecture and profile as files."""

from __future__ import annotations

import errno
import io
import json
import logging
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from dsnas import results
from dsnas.errors import DsnasError
from dsnas.progress import column_titles, format_metric
from dsnas.spec import StudySpec
from dsnas.storage import artifact_store, display_url, leave_write_ahead, storage_engine
from dsnas.tasks import throughput_unit

log = logging.getLogger("dsnas.dashboard")

# Fixed chart ids: saving a chart under the same id replaces it, so a restart never adds a copy.
CHART_IDS = {"n_complete": "dsnas-hypervolume-trials", "wall_s": "dsnas-hypervolume-time"}
# The note is dsnas's; whatever the user writes below this line in the dashboard is kept on restart.
USER_NOTES = "---\n*Your notes below this line are kept when `dsnas dashboard` starts again.*"
# The Optuna dashboard's own key for a trial's artifact kept in the study's attributes: the only place a
# finished trial can still get one (Optuna refuses to change any attribute of a finished trial).
TRIAL_ARTIFACT_KEY = "dashboard:artifacts:{trial_id}:"
# What a finished trial lacks is uploaded under the names the driver gives new trials.
ARTIFACT_KINDS = ("arch", "profile")


def serve(spec: StudySpec, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Prepare the study, then serve the dashboard until Ctrl-C."""
    from optuna_dashboard import wsgi

    from dsnas.study import open_study  # SQLAlchemy loads on first use

    study = open_study(spec, create=False)
    show_named_constraints()
    app = wsgi(study._storage, artifact_store=artifact_store(spec))
    # Bind before preparing or printing anything: a taken port is then one clear error and no half-started
    # server. (optuna_dashboard.run_server would print bottle's banner first and log every request.)
    try:
        server = make_server(host, port, app, server_class=_ThreadingServer, handler_class=_QuietHandler)
    except OSError as e:
        raise DsnasError(_bind_error(host, port, e)) from None
    with server:
        # SIGTERM stops it, and the cleanup below runs, from here on: stopped while preparing (slow on a large
        # study), it left the study in write-ahead-log mode and ended without a word.
        stop = _stop_on_sigterm()
        try:
            _prepare_or_say_why(spec, study)
            url = f"http://{host}:{server.server_port}/dashboard/"  # the port the system gave, for --port 0
            log.info(f"dashboard of study {spec.name!r}: {url} (Ctrl-C to stop)")
            try:
                server.serve_forever()
            except KeyboardInterrupt:
                print()  # the shell's prompt starts on its own line after ^C
        finally:
            stop()
            server.server_close()
            # A search that ended while this server read the study left it in write-ahead-log mode (it puts it back
            # only where nobody has it open); the last reader to close does, so that the study is one file again.
            if (engine := storage_engine(study)) is not None:
                engine.dispose()
            leave_write_ahead(spec.storage)


def _prepare_or_say_why(spec: StudySpec, study: Any) -> None:
    """prepare(), which writes into the study (its note, charts and the artifacts it lacks): a database user that
    may only read (as report and export allow) got 40 lines of traceback ending in Optuna's 'invalid data'."""
    import optuna
    import sqlalchemy

    try:
        prepare(spec, study)
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.DBAPIError) as e:
        cause = str(e.__cause__ or e).strip().splitlines()[0]
        raise DsnasError(f"{spec.path}: [study] storage {display_url(spec.storage)} refused what the dashboard writes "
                         f"into the study before it serves (its note, charts and artifacts: {cause}). Fix: run "
                         "dsnas dashboard as a database user that may write, or read the study with dsnas report"
                         ) from None


def _stop_on_sigterm() -> Callable[[], None]:
    """SIGTERM (a service manager, `kill`) stops the server as Ctrl-C does, through the cleanup after it; returns
    what puts the old handler back. Only the main thread may set one (a test serving from another leaves it)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, old)


def _bind_error(host: str, port: int, e: OSError) -> str:
    if e.errno == errno.EADDRINUSE:
        fix = f"pass another port, e.g. --port {port + 1}, or stop the program that uses {port}"
    elif e.errno == errno.EACCES:
        fix = "ports below 1024 need root: pass e.g. --port 8080"
    else:
        fix = "pass --host 127.0.0.1 (this machine) or an address of this machine"
    return f"cannot listen on {host}:{port}: {e.strerror or e}. Fix: {fix}"


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a browser holding a connection open does not delay Ctrl-C


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: Any) -> None:
        pass  # the page polls the API every few seconds: a line per request would bury the URL line


def prepare(spec: StudySpec, study: Any) -> None:
    """Write what the dashboard shows beside Optuna's own pages. Idempotent: a rerun replaces the note and
    the charts, and uploads artifacts only for trials that have none yet."""
    from optuna_dashboard import save_note

    from dsnas.study import as_searched, edited_since  # SQLAlchemy loads on first use

    if not study.metric_names:
        study.set_metric_names([o.name for o in spec.objectives])
    backfill_artifacts(spec, study)
    df = results.frame(study)  # the same frame `dsnas report` reads, so both show the same front
    reference = save_hypervolume_charts(study, df)
    # The note shows the limits the study was searched under, which judged its front, and says where the file's
    # differ: it showed an edited limit above a front that broke it.
    edited = edited_since(spec, study)
    if edited:
        log.warning(f"dsnas: note: {edited}")
    note = study_note(as_searched(spec, study), study, df, reference)
    save_note(study, (f"**Note:** {edited}\n\n" if edited else "") + note + _kept_user_notes(study))


def _kept_user_notes(study: Any) -> str:
    """What the user wrote below dsnas's marker; a note without the marker is all the user's (written in the
    Optuna dashboard before `dsnas dashboard` first ran), and is kept whole below it: it was deleted."""
    from optuna_dashboard import get_note

    before, marker, tail = get_note(study).partition(USER_NOTES)
    mine = tail if marker else ("\n" + before.strip() + "\n" if before.strip() else "\n")
    return "\n" + USER_NOTES + mine  # the blank line keeps `---` a rule, not a heading


def show_named_constraints() -> None:
    """Let the Optuna dashboard see dsnas's constraints. dsnas stores each under its name (Optuna 5's form,
    ``constraints:max_latency_ms``); optuna-dashboard reads only the older list form, so it drew every infeasible
    trial as feasible and put it on its Pareto front. Its trial serializer is given the constraints Optuna reads,
    and its front takes the feasible trials only, without reused repeats (as dsnas's front does). A dashboard
    without these functions is left as it is."""
    from optuna_dashboard import _app, _serializer

    serialize = getattr(_serializer, "serialize_frozen_trial", None)
    front = getattr(_app, "get_pareto_front_trials", None)
    if serialize is None or front is None or getattr(serialize, "dsnas", False):
        return

    def serialize_with_constraints(study_id: int, trial: Any, study_system_attrs: dict[str, Any]) -> dict[str, Any]:
        out = serialize(study_id, trial, study_system_attrs)
        if not out.get("constraints") and trial.constraints:
            out["constraints"] = list(trial.constraints.values())
        return out

    def feasible_front(trials: list[Any], directions: list[Any]) -> list[Any]:
        # A reused repeat has its original's values: the original alone stands for them, as on dsnas's front.
        return front(trials=[t for t in trials if all(c <= 0 for c in t.constraints.values())
                             and "reused_from" not in t.user_attrs], directions=directions)

    serialize_with_constraints.dsnas = True  # type: ignore[attr-defined]
    _serializer.serialize_frozen_trial = serialize_with_constraints
    _app.get_pareto_front_trials = feasible_front


def study_note(spec: StudySpec, study: Any, df: Any, reference: dict[str, float] | None) -> str:
    """The study note in Markdown: where the study lives, what it optimizes, what measured it, its front."""
    unit = throughput_unit(spec.task)  # the column is throughput_tok_s whatever the task counts
    objectives = ", ".join(f"{o.name} ({o.direction}, `{o.metric}`"
                           f"{', ' + unit if o.metric == 'throughput_tok_s' else ''})" for o in spec.objectives)
    constraints = ", ".join(f"`{m}` ≤ {v:g}" for m, v in spec.hardware.constraints.items()) or "none"
    states = df["state"].value_counts().sort_index()
    lines = [f"## dsnas study `{spec.name}`", "", "| | |", "|---|---|",
             f"| study file | `{spec.path}` |", f"| storage | `{display_url(spec.storage)}` |",
             f"| objectives | {objectives} |", f"| constraints | {constraints} |",
             f"| trials | {', '.join(f'{n} {s}' for s, n in states.items()) or 'none yet'} |", "",
             "### Measured on", "", *_fingerprint_lines(study.get_trials(deepcopy=False)), "",
             "### Pareto front (feasible, non-dominated)", "", *_front_table(df, unit), ""]
    if reference:
        point = ", ".join(f"{name} = {value:.6g}" for name, value in reference.items())
        lines += [f"Hypervolume reference point: {point} (charts on the study's page).", ""]
    # Optuna's pages follow a running search; this note and the charts are written once, at start.
    lines += [f"*Written by `dsnas dashboard` at {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; "
              "start it again to bring this note and the hypervolume charts up to date.*", ""]
    return "\n".join(lines)


def _fingerprint_lines(trials: list[Any]) -> list[str]:
    """One line per distinct device fingerprint, with how many trials it measured: numbers measured on
    different machines are not comparable, and the note must make a mix visible."""
    seen = Counter(json.dumps(t.user_attrs["profile"]["fingerprint"], sort_keys=True)
                   for t in trials if "fingerprint" in t.user_attrs.get("profile", {}))
    if not seen:
        return ["no measured trial yet"]
    warn = [f"**{len(seen)} different devices measured these trials: compare numbers within one device.**", ""]
    rows = [f"- {n} trial{'s' * (n != 1)}: " + ", ".join(f"{k}=`{v}`" for k, v in json.loads(fp).items())
            for fp, n in seen.most_common()]
    return (warn if len(seen) > 1 else []) + rows


def _front_table(df: Any, unit: str = "tokens/s") -> list[str]:
    front = results.front(df) if _has_completed(df) else None
    if front is None or front.empty:
        return ["no feasible completed trial yet"]
    columns = [o.column for o in results.objectives(df)]
    columns += [c for c in ("latency_ms", "peak_memory_mb") if c in front.columns and c not in columns]
    titles = column_titles(unit)  # as search prints them
    rows = ["| trial | " + " | ".join(titles.get(c, c) for c in columns) + " | architecture |",
            "|---:|" + "---:|" * len(columns) + "---|"]
    for _, t in front.iterrows():
        # a trial without a figure (an own task's evaluate_arch that stores no peak memory) shows an empty cell,
        # as the report's pages do, not "nan"
        rows.append(f"| {t['trial']} | " + " | ".join(format_metric(c, t[c]) if t[c] == t[c] else ""
                                                     for c in columns) +
                    f" | {t['arch_short']} |")
    return rows


def _has_completed(df: Any) -> bool:
    return not results.done_trials(df, feasible_only=False).empty


def save_hypervolume_charts(study: Any, df: Any) -> dict[str, float] | None:
    """Hypervolume against completed trials and against wall time, as two saved plotly charts (the
    dashboard has no hypervolume chart of its own); returns the reference point (None: nothing completed)."""
    import plotly.graph_objects as go
    from optuna_dashboard import save_plotly_graph_object

    if not _has_completed(df):
        return None
    reference = results.default_reference(df)
    history = results.hypervolume_history(df, reference=reference)
    titles = {"n_complete": "trained trials", "wall_s": "wall time since the study started (s)"}
    for column, chart_id in CHART_IDS.items():
        # Plain lists: readable JSON in the storage (plotly 6 would store numpy columns as base64 arrays).
        figure = go.Figure(go.Scatter(x=history[column].tolist(), y=history["hypervolume"].tolist(),
                                      mode="lines+markers", line_shape="hv", name="hypervolume"))
        figure.update_layout(title=f"Hypervolume vs {titles[column]}", xaxis_title=titles[column],
                             yaxis_title="hypervolume of the feasible front")
        save_plotly_graph_object(study, figure, graph_object_id=chart_id)
    return reference


def backfill_artifacts(spec: StudySpec, study: Any) -> int:
    """Upload the architecture and profile JSON of completed trials that lack them (trials searched before the
    driver uploaded them); returns how many files it uploaded."""
    from optuna.trial import TrialState

    storage, study_id = study._storage, study._study_id
    # Each trial's uploaded file names, gathered in one pass: read by a scan of every attribute per trial, the study's
    # 3,830 artifacts were scanned 2,792 times at every start (quadratic in the study's size).
    uploaded_by: dict[str, set[str]] = {}
    deleted: set[str] = set()  # trials whose user deleted a file: left as the user left them, not uploaded again
    head = TRIAL_ARTIFACT_KEY.split("{", 1)[0]  # "dashboard:artifacts:", then TRIAL_ID:ARTIFACT_ID
    for key, value in storage.get_study_system_attrs(study_id).items():
        if key.startswith(head):
            trial_id = key[len(head):].split(":", 1)[0]
            meta = json.loads(value)
            if meta is None:  # the dashboard's delete leaves a record of null: the next start was a TypeError
                deleted.add(trial_id)
                continue
            uploaded_by.setdefault(trial_id, set()).add(meta["filename"])
    store = None  # the artifact folder is created only when something is uploaded
    uploaded = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if str(trial._trial_id) in deleted:
            continue
        prefix = TRIAL_ARTIFACT_KEY.format(trial_id=trial._trial_id)
        have = uploaded_by.get(str(trial._trial_id), set())
        for kind in ARTIFACT_KINDS:
            filename = f"trial{trial.number}-{kind}.json"
            if f"{kind}_artifact" in trial.user_attrs or filename in have or kind not in trial.user_attrs:
                continue  # uploaded by the driver, by an earlier backfill, or nothing to upload
            store = store or artifact_store(spec)
            artifact_id = str(uuid.uuid4())
            store.write(artifact_id, io.BytesIO(json.dumps(trial.user_attrs[kind], indent=2).encode()))
            # optuna.artifacts.upload_artifact would write the trial's attributes, which a finished trial refuses.
            meta = {"artifact_id": artifact_id, "filename": filename, "mimetype": "application/json",
                    "encoding": None}
            try:
                storage.set_study_system_attr(study_id, prefix + artifact_id, json.dumps(meta))
            except BaseException:  # a database that refuses the write (a read-only role) keeps no file beside it
                store.remove(artifact_id)
                raise
            uploaded += 1
    return uploaded
