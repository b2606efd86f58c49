"""`dsnas dashboard`: what prepare() writes into the study (note, hypervolume charts, artifacts), and the real
dashboard in a real browser (Debian's chromium, driven by Playwright) showing it."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from contextlib import closing
from pathlib import Path

import pytest
from conftest import REPO, copy_study

from dsnas.errors import DsnasError

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = REPO / "test-output"
FP_A = {"host": "box-a", "device": "cpu", "cpu": "AMD EPYC", "cpu_count": 2, "torch": "2.13.0+cpu"}
FP_B = {**FP_A, "host": "box-b", "device": "cuda", "gpu": "NVIDIA H200"}


@pytest.fixture
def made_study(tiny_study):
    """A study of two completed trials measured on two devices, without the arch/profile artifacts that
    the driver uploads now (a study searched by an older dsnas): built in milliseconds, no search."""
    import optuna

    from dsnas.spec import load_study
    from dsnas.study import open_study

    spec = load_study(tiny_study)
    study = open_study(spec)
    for i, fp in enumerate((FP_A, FP_B)):
        arch = {"family": "transformer_lm", "d_model": 16 * (i + 1), "layers": [{"n_heads": 1, "ffn_ratio": 1}]}
        attrs = {"arch": arch, "arch_short": f"d{16 * (i + 1)} L1", "profile": {"fingerprint": fp},
                 "accuracy": 0.3 + 0.1 * i, "throughput_tok_s": 2000.0 - 500 * i, "latency_ms": 1.0, "feasible": 1.0}
        study.add_trial(optuna.trial.create_trial(values=[attrs["accuracy"], attrs["throughput_tok_s"]],
                                                  user_attrs=attrs))
    return spec, study


def trial_artifacts(study, trial):
    """The artifacts the dashboard lists for ``trial``, by its own code."""
    from optuna_dashboard.artifact._backend import list_trial_artifacts

    storage = study._storage
    return list_trial_artifacts(storage.get_study_system_attrs(study._study_id),
                                storage.get_trial_system_attrs(trial._trial_id), trial)


def test_prepare_writes_the_note(made_study):
    from optuna_dashboard import get_note

    from dsnas.dashboard import prepare

    spec, study = made_study
    prepare(spec, study)
    note = get_note(study)
    assert f"## dsnas study `{spec.name}`" in note and f"`{spec.path}`" in note
    assert "accuracy (maximize, `accuracy`), throughput (maximize, `throughput_tok_s`, tokens/s)" in note
    assert "| trial | accuracy | tokens/s | latency ms | architecture |" in note  # as search prints them
    assert "`latency_ms` ≤ 1000" in note and "| trials | 2 COMPLETE |" in note
    # Two devices measured the trials: both fingerprints, and a warning that says so.
    assert "2 different devices" in note and "host=`box-a`" in note and "gpu=`NVIDIA H200`" in note
    # Neither trial dominates the other: both are on the front; the reference point is stated.
    assert "| 0 | 0.3000 | 2,000 |" in note and "| 1 | 0.4000 | 1,500 |" in note  # as search and report print them
    assert "Hypervolume reference point: accuracy = " in note


def test_prepare_twice_replaces_and_keeps_user_notes(made_study):
    from optuna_dashboard import get_note, save_note
    from optuna_dashboard._custom_plot_data import get_plotly_graph_objects

    from dsnas.dashboard import CHART_IDS, USER_NOTES, prepare

    spec, study = made_study
    prepare(spec, study)
    save_note(study, get_note(study) + "my own remark\n")  # as the user would, in the dashboard
    prepare(spec, study)
    note = get_note(study)
    assert note.count("## dsnas study") == 1 and note.count(USER_NOTES) == 1
    assert note.endswith("\n\n" + USER_NOTES + "\nmy own remark\n")
    charts = get_plotly_graph_objects(study._storage.get_study_system_attrs(study._study_id))
    assert sorted(charts) == sorted(CHART_IDS.values())
    figure = json.loads(charts[CHART_IDS["n_complete"]])
    assert figure["data"][0]["x"] == [1, 2] and figure["data"][0]["y"][1] > 0


def test_a_note_written_before_dsnas_dashboard_ran_is_kept_below_the_marker(made_study):
    """A note saved in the plain Optuna dashboard has no dsnas marker: it was deleted, without a word."""
    from optuna_dashboard import get_note, save_note

    from dsnas.dashboard import USER_NOTES, prepare

    spec, study = made_study
    save_note(study, "MY OWN NOTES: the d32 runs were on battery\n")
    prepare(spec, study)
    assert get_note(study).endswith(USER_NOTES + "\nMY OWN NOTES: the d32 runs were on battery\n")
    prepare(spec, study)
    assert get_note(study).count("MY OWN NOTES") == 1


def test_the_dashboard_sees_dsnas_constraints_and_keeps_infeasible_trials_off_its_front(made_study):
    """dsnas stores constraints under their names (Optuna 5's form); optuna-dashboard read only the list form,
    showed every trial as feasible, and put an infeasible one on its Pareto front."""
    import optuna
    from optuna_dashboard import _app, _serializer

    from dsnas.dashboard import show_named_constraints

    spec, study = made_study
    attrs = {"accuracy": 0.9, "throughput_tok_s": 9000.0, "latency_ms": 2.6, "feasible": 0.0, "arch_short": "big"}
    study.add_trial(optuna.trial.create_trial(values=[0.9, 9000.0], user_attrs=attrs,
                                              system_attrs={"constraints:max_latency_ms": 1.1}))
    trials = study.get_trials()
    show_named_constraints()
    show_named_constraints()  # twice: wrapped once
    serialized = [_serializer.serialize_frozen_trial(study._study_id, t, {}) for t in trials]
    assert [s["constraints"] for s in serialized] == [[], [], [1.1]]
    front = _app.get_pareto_front_trials(trials=trials, directions=study.directions)
    assert sorted(t.number for t in front) == [0, 1]  # trial 2 dominates both, but is infeasible
    # A reused repeat of trial 1 has its values: trial 1 alone stands for them, as on search's and report's front.
    study.add_trial(optuna.trial.create_trial(values=trials[1].values, user_attrs={**trials[1].user_attrs,
                                                                                     "reused_from": 1}))
    front = _app.get_pareto_front_trials(trials=study.get_trials(), directions=study.directions)
    assert sorted(t.number for t in front) == [0, 1]


def test_prepare_backfills_artifacts_once(made_study):
    from dsnas.dashboard import backfill_artifacts, prepare
    from dsnas.storage import artifact_store

    spec, study = made_study
    prepare(spec, study)
    prepare(spec, study)
    assert backfill_artifacts(spec, study) == 0
    store = artifact_store(spec)
    for trial in study.trials:
        files = {a["filename"]: a for a in trial_artifacts(study, trial)}
        assert sorted(files) == [f"trial{trial.number}-arch.json", f"trial{trial.number}-profile.json"]
        with store.open_reader(files[f"trial{trial.number}-arch.json"]["artifact_id"]) as f:
            assert json.load(f) == trial.user_attrs["arch"]


def test_a_restart_reads_the_uploaded_artifacts_once_not_once_per_trial(made_study, monkeypatch):
    """Every trial scanned every artifact record of the study: 2,792 trials and 3,830 records took 1.3 s of each
    start, growing with the square of the study."""
    from dsnas.dashboard import backfill_artifacts

    spec, study = made_study
    backfill_artifacts(spec, study)
    scans = []

    class Counted(dict):
        def items(self):
            scans.append(1)
            return super().items()

    read = study._storage.get_study_system_attrs
    monkeypatch.setattr(study._storage, "get_study_system_attrs", lambda study_id: Counted(read(study_id)))
    assert backfill_artifacts(spec, study) == 0
    assert len(scans) == 1 and len(study.trials) == 2


def test_a_file_deleted_in_the_dashboard_is_no_traceback_at_the_next_start_nor_uploaded_again(made_study):
    """The dashboard's delete button leaves the artifact's record as null: reading its file name was a TypeError
    traceback at every later `dsnas dashboard` start."""
    from optuna_dashboard.artifact._backend import _dashboard_artifact_prefix

    from dsnas.dashboard import backfill_artifacts

    spec, study = made_study
    assert backfill_artifacts(spec, study) == 4
    trial = study.trials[0]
    profile = next(a for a in trial_artifacts(study, trial) if a["filename"] == "trial0-profile.json")
    # what DELETE /api/artifacts/<study>/<trial>/<artifact> writes
    study._storage.set_study_system_attr(study._study_id, _dashboard_artifact_prefix(trial._trial_id) +
                                         profile["artifact_id"], json.dumps(None))
    assert backfill_artifacts(spec, study) == 0
    assert [a["filename"] for a in trial_artifacts(study, trial)] == ["trial0-arch.json"]


def test_a_refused_artifact_record_leaves_no_file(made_study, monkeypatch):
    """A database that refuses the artifact's record (a read-only role) keeps no orphan file in the folder."""
    import sqlalchemy

    from dsnas.dashboard import backfill_artifacts
    from dsnas.storage import artifact_dir

    spec, study = made_study

    def refuse(*args):
        raise sqlalchemy.exc.OperationalError("UPDATE", {}, Exception("read-only transaction"))

    monkeypatch.setattr(study._storage, "set_study_system_attr", refuse)
    with pytest.raises(sqlalchemy.exc.OperationalError):
        backfill_artifacts(spec, study)
    assert not [p for p in artifact_dir(spec).rglob("*") if p.is_file()]


def test_prepare_uploads_nothing_the_driver_uploaded(tiny_study):
    from dsnas.cli import main
    from dsnas.dashboard import backfill_artifacts
    from dsnas.spec import load_study
    from dsnas.study import open_study

    tiny_study.write_text(tiny_study.read_text().replace("[study]\n", "[study]\njson_artifacts = true\n"))
    assert main(["search", str(tiny_study)]) == 0  # the driver writes the files as each trial ends
    spec = load_study(tiny_study)
    study = open_study(spec, create=False)
    assert backfill_artifacts(spec, study) == 0
    for trial in study.trials:
        names = sorted(a["filename"] for a in trial_artifacts(study, trial) if a["filename"].endswith(".json"))
        assert names == [f"trial{trial.number}-arch.json", f"trial{trial.number}-profile.json"]


def test_a_taken_port_is_one_line_with_the_fix(made_study):
    from dsnas.dashboard import serve

    spec, _ = made_study
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(DsnasError) as err:
            serve(spec, port=port)
    msg = str(err.value)
    assert "\n" not in msg and "Address already in use" in msg and f"--port {port + 1}" in msg, msg


def test_a_dashboard_stopped_while_it_prepares_cleans_up_as_when_it_serves(made_study, monkeypatch):
    """SIGTERM while preparing (slow on a large study) ended it without a word and left the study in
    write-ahead-log mode, which the docs say the last reader to end puts back."""
    import dsnas.dashboard as dashboard

    spec, study = made_study
    dashboard.storage_engine(study).dispose()  # the fixture's connection: the dashboard is the last reader
    db = spec.storage.removeprefix("sqlite:///")
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"  # as a search that ended beside it

    def preparing(spec, study):
        os.kill(os.getpid(), signal.SIGTERM)  # a service manager stops it here
        time.sleep(5)  # not reached: SIGTERM stops it as Ctrl-C does

    monkeypatch.setattr(dashboard, "_prepare_or_say_why", preparing)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        dashboard.serve(spec, port=0)
    assert signal.getsignal(signal.SIGTERM) == before
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_the_browser_test_skips_only_where_allowed(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", Path("/nonexistent/chromium"))
    monkeypatch.delenv("DSNAS_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception):
        need_browser()
    monkeypatch.setenv("DSNAS_REQUIRE_BROWSER", "1")  # CI: a missing browser is a failure
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y chromium"):
        need_browser()


def need_browser() -> None:
    """Skip without chromium, unless DSNAS_REQUIRE_BROWSER says this run (CI) must drive the browser."""
    if CHROMIUM.exists():
        return
    if os.environ.get("DSNAS_REQUIRE_BROWSER"):
        pytest.fail(f"DSNAS_REQUIRE_BROWSER is set but {CHROMIUM} is missing. Fix: apt-get install -y chromium")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium); set DSNAS_REQUIRE_BROWSER=1 to fail instead")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(server: subprocess.Popen, url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            out, err = server.communicate()
            pytest.fail(f"`dsnas dashboard` exited {server.returncode}:\n{out}\n{err}")
        try:
            with urllib.request.urlopen(url + "api/studies", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"`dsnas dashboard` did not answer at {url} within {timeout_s} s")


@pytest.mark.slow
def test_dashboard_in_a_browser(finished_study, tmp_path):
    need_browser()
    from dsnas.spec import load_study
    from dsnas.study import open_study

    study_file = copy_study(finished_study, tmp_path / "study")
    study = open_study(load_study(study_file), create=False)
    best = max(study.best_trials, key=lambda t: t.user_attrs["throughput_tok_s"])
    fingerprint = best.user_attrs["profile"]["fingerprint"]
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    # -X faulthandler: if the server does not stop, SIGABRT makes it print every thread's stack (see stopped()).
    # SIGINT at its default in the server: under `nohup ... &` the suite inherits it ignored, and a Python started
    # so never turns Ctrl-C into KeyboardInterrupt (the stacks showed the server idle in serve_forever).
    server = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "dsnas.cli", "dashboard", str(study_file),
                               "--port", str(port)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_until_serving(server, url)
        shots = browse(f"{url}dashboard/studies/{study._study_id}", study.study_name, best, fingerprint)
        server.send_signal(signal.SIGINT)  # Ctrl-C: the command stops cleanly
        out, err = stopped(server)
        assert server.returncode == 0, err
        assert f"{url}dashboard/" in out and "Ctrl-C" in out
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                server.kill()
    print("screenshots:", *shots, sep="\n  ")


def stopped(server: subprocess.Popen, timeout_s: float = 60) -> tuple[str, str]:
    """The server's output once it has exited (within a second of Ctrl-C); one still running after ``timeout_s``
    is aborted, and the test fails with the stack of each of its threads."""
    try:
        return server.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        server.send_signal(signal.SIGABRT)
        out, err = server.communicate(timeout=20)
        pytest.fail(f"the dashboard did not stop {timeout_s:g} s after Ctrl-C; its threads:\n{err[-6000:]}")


def browse(study_url: str, name: str, best, fingerprint: dict) -> list[Path]:
    """Open the study in chromium and go through its pages as a user would (the sidebar's links: a reload per
    page would cost seconds); each page must show what it is for. Returns the screenshots."""
    from playwright.sync_api import expect, sync_playwright

    SCREENSHOTS.mkdir(exist_ok=True)
    # Debian's chromium, not a Playwright download; no sandbox (CI runs as root), nothing phoning home.
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]
    steps = [  # (screenshot, what to click: the sidebar's links or a text, what the page must show)
        ("study", [], [name, "Pareto Front", "Hypervolume vs trained trials", "Hypervolume vs wall time"]),
        ("trial", [("link", "Trials (List)"), ("text", f"Trial {best.number}")],
         [f"Trial {best.number}", f"trial{best.number}-arch.json", f"trial{best.number}-profile.json",
          f"throughput_tok_s {best.user_attrs['throughput_tok_s']}"]),
        ("table", [("link", "Smart Selection")], ["User Attribute throughput_tok_s", "1–3 of 3"]),
        ("note", [("link", "Note")], [f"device={fingerprint['device']}", f"torch={fingerprint['torch']}", "Pareto front"]),
    ]
    shots = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=args)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(study_url)
            for shot, clicks, texts in steps:
                for kind, name in clicks:
                    target = page.get_by_role("link", name=name, exact=True) if kind == "link" else \
                        page.get_by_text(name, exact=True)
                    target.first.click()
                for text in texts:  # on screen, not only in the page: scrolled to, when a list is long
                    shown = page.get_by_text(text).first
                    shown.scroll_into_view_if_needed(timeout=20_000)
                    expect(shown).to_be_visible()
                shots.append(SCREENSHOTS / f"dashboard-{shot}.png")
                # The whole height, but the window's width: the trial page's long JSON attributes (the
                # profile) widen the page to thousands of pixels.
                page.evaluate("window.scrollTo(0, 0)")  # else the fixed header lands mid-picture
                height = page.evaluate("document.documentElement.scrollHeight")
                page.screenshot(path=str(shots[-1]), full_page=True, clip={"x": 0, "y": 0, "width": 1400,
                                                                           "height": height})
        finally:
            browser.close()
    return shots


@pytest.mark.slow
def test_the_dashboard_reads_a_sqlite_study_while_a_search_writes_it(tiny_study):
    """No "database is locked" (or any other) error on either side while both use the same SQLite file."""
    import urllib.error

    from dsnas.cli import main

    tiny_study.write_text(tiny_study.read_text().replace("n_trials = 3", "n_trials = 6"))
    base = [sys.executable, "-m", "dsnas.cli"]
    assert main(["search", str(tiny_study), "--n-trials", "1"]) == 0  # the study exists for the dashboard
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    server = subprocess.Popen([*base, "dashboard", str(tiny_study), "--port", str(port)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    search = None
    try:
        wait_until_serving(server, url)
        search = subprocess.Popen([*base, "search", str(tiny_study)], cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        answers, errors = 0, []
        while search.poll() is None:
            time.sleep(0.02)  # a browser's pace, not a busy loop: on 2 cores that starved the search it reads
            for path in ("api/studies", "api/studies/1?after=0"):
                try:
                    with urllib.request.urlopen(url + path, timeout=10) as response:
                        response.read()
                        answers += 1
                except urllib.error.HTTPError as e:
                    errors.append(f"{path}: {e.code} {e.read()[:300]!r}")
        out, err = search.communicate()
        assert search.returncode == 0, err
        assert "locked" not in err and "locked" not in out
        assert answers > 10 and not errors, errors[:3]
        print(f"{answers} dashboard answers while the search wrote 5 trials")
        # The search ended while the dashboard had the file open, so it left it in write-ahead-log mode; the
        # dashboard, stopped as a service manager stops it, puts it back: one file an account that may only
        # read it can open.
        server.terminate()
        assert server.wait(timeout=30) == 0
        with closing(sqlite3.connect(tiny_study.with_suffix(".db"))) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    finally:
        for proc in (search, server):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)
    assert "locked" not in server.communicate()[1]


@pytest.mark.slow
def test_report_page_in_a_browser(finished_study, tmp_path):
    """The report's index.html opened from disk (offline: plotly.min.js beside it) in chromium: every figure is
    drawn, with its axis labels in words, and a screenshot of the page is kept."""
    need_browser()
    from playwright.sync_api import sync_playwright

    from dsnas.cli import main

    out = tmp_path / "report"
    assert main(["report", str(finished_study), "--out", str(out)]) == 0
    SCREENSHOTS.mkdir(exist_ok=True)
    args = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=args)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto((out / "index.html").as_uri())
            page.wait_for_selector(".js-plotly-plot .main-svg", timeout=30_000)
            drawn = page.locator(".js-plotly-plot").count()
            titles = page.locator(".js-plotly-plot .g-xtitle, .js-plotly-plot .g-ytitle").all_text_contents()
            page.screenshot(path=str(SCREENSHOTS / "report.png"), full_page=True)
        finally:
            browser.close()
    assert drawn == 4  # pareto, hypervolume, hardware, roofline (3 trials try no choice value twice: no choices)
    assert any(t.startswith("throughput, tokens/s at batch 4") for t in titles), titles
    assert "arithmetic intensity, FLOPs per byte" in titles and "hypervolume, share of the ideal box" in titles
    assert (SCREENSHOTS / "report.png").stat().st_size > 50_000


def test_the_notes_front_leaves_a_figure_a_trial_did_not_store_empty():
    """A front trial without peak memory (an own task's evaluate_arch stores none) read "nan" in the note's table,
    where the report's pages leave the cell empty."""
    import datetime

    import optuna
    from optuna.trial import create_trial

    from dsnas.dashboard import _front_table
    from dsnas.results import frame

    study = optuna.create_study(directions=["maximize", "maximize"], study_name="x")
    study.set_metric_names(["accuracy", "throughput"])
    for i, (accuracy, throughput, memory) in enumerate([(0.40, 100.0, None), (0.30, 200.0, 2.0)]):
        attrs = {"arch_short": f"m{i}", "accuracy": accuracy, "throughput_tok_s": throughput, "latency_ms": 1.0}
        trial = create_trial(values=[accuracy, throughput],
                             user_attrs=attrs if memory is None else {**attrs, "peak_memory_mb": memory})
        trial.datetime_start = trial.datetime_complete = datetime.datetime(2026, 1, 1, 0, 0, i)
        study.add_trial(trial)
    rows = _front_table(frame(study))
    assert rows[2] == "| 0 | 0.4000 | 100 | 1.00 |  | m0 |" and rows[3] == "| 1 | 0.3000 | 200 | 1.00 | 2.00 | m1 |"
