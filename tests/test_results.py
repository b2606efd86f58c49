"""Results: hypervolume with known answers, the trials DataFrame of hand-made studies, dsnas's tables
(created, upgraded from a dsnas-0.1.0 study, refused when newer), and the report folder."""

from __future__ import annotations

import itertools
import math
import random
import shutil
import warnings
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import copy_study

from dsnas.cli import main
from dsnas.errors import DsnasError
from dsnas.pareto import dominated_volume
from dsnas.results import default_reference, front, hypervolume, hypervolume_history, load
from dsnas.spec import load_study

OLD_STUDY = Path(__file__).parent / "data" / "study-dsnas-0.1.0"
MAX2 = ["maximize", "maximize"]


@pytest.mark.parametrize("points, reference, directions, expected", [
    ([[1, 1]], [0, 0], MAX2, 1.0),
    ([[2, 1], [1, 2]], [0, 0], MAX2, 3.0),  # two 2x1 boxes overlapping in a 1x1 square
    ([[2, 1], [1, 2], [1, 1]], [0, 0], MAX2, 3.0),  # a dominated point adds nothing
    ([[2, 1], [2, 1]], [0, 0], MAX2, 2.0),  # duplicates count once
    ([[1, 1], [-1, 5]], [0, 0], MAX2, 1.0),  # a point worse than the reference in one objective adds nothing
    ([[1, 3], [2, 1]], [3, 4], ["minimize", "minimize"], 2 * 1 + 1 * 2),
    ([[0.5, 10.0]], [0.0, 20.0], ["maximize", "minimize"], 0.5 * 10),
    ([[1, 1, 1]], [0, 0, 0], ["maximize"] * 3, 1.0),
    ([[2, 1, 1], [1, 2, 1], [1, 1, 2]], [0, 0, 0], ["maximize"] * 3, 3 * 2 - 3 + 1),  # inclusion-exclusion: 6-3+1
    ([[3], [1]], [0], ["maximize"], 3.0),
    ([], [0, 0], MAX2, 0.0),
])
def test_hypervolume_known_answers(points, reference, directions, expected):
    assert dominated_volume(points, reference, directions) == pytest.approx(expected)


@pytest.mark.parametrize("d", [3, 4])
def test_hypervolume_in_three_and_four_dimensions_matches_inclusion_exclusion_on_random_boxes(d):
    rng = random.Random(d)
    for _ in range(20):
        points = [[rng.randint(1, 6) for _ in range(d)] for _ in range(rng.randint(1, 6))]
        # The union of boxes [0, p] by inclusion-exclusion over every subset: their intersection is [0, min].
        exact = 0.0
        for k in range(1, len(points) + 1):
            for subset in itertools.combinations(points, k):
                exact += (-1) ** (k + 1) * math.prod(min(c) for c in zip(*subset))
        assert dominated_volume(points, [0] * d, ["maximize"] * d) == pytest.approx(exact)


def test_hypervolume_in_four_objectives_stays_fast_at_hundreds_of_points():
    """Slicing every point, dominated or not, took 2.7 s for 400 points in 4 objectives, and a report's history of
    such a study 8 minutes: only the non-dominated points of each projection are sliced now."""
    import time

    rng = random.Random(1)
    many = [[rng.random() for _ in range(4)] for _ in range(400)]
    start = time.perf_counter()
    dominated_volume(many, [0] * 4, ["maximize"] * 4)
    assert time.perf_counter() - start < 1.0  # 0.04 s here; slicing every point took 2.7 s


def test_the_hypervolume_history_equals_the_volume_recomputed_after_each_trial():
    """The history recomputes only when a trial joins the front; the rest reuse the volume."""
    import pandas as pd

    rng = random.Random(2)
    n = 60
    df = pd.DataFrame({"trial": range(n), "state": ["COMPLETE"] * n, "feasible": [rng.random() > 0.2 for _ in range(n)],
                       "accuracy": [rng.random() for _ in range(n)], "throughput_tok_s": [rng.random() for _ in range(n)],
                       "latency_ms": [rng.random() for _ in range(n)],
                       "started": pd.date_range("2026-01-01", periods=n, freq="s"),
                       "completed": pd.date_range("2026-01-01 00:00:01", periods=n, freq="s")})
    df.attrs["objectives"] = [{"name": "accuracy", "column": "accuracy", "direction": "maximize"},
                              {"name": "throughput", "column": "throughput_tok_s", "direction": "maximize"},
                              {"name": "latency", "column": "latency_ms", "direction": "minimize"}]
    reference = {"accuracy": 0.0, "throughput": 0.0, "latency": 1.0}
    history = hypervolume_history(df, reference)
    cols, directions = ["accuracy", "throughput_tok_s", "latency_ms"], ["maximize", "maximize", "minimize"]
    expected = [dominated_volume(df[cols][:k][df["feasible"][:k]].to_numpy().tolist(), [0.0, 0.0, 1.0], directions)
                for k in range(1, n + 1)]
    assert list(history["hypervolume"]) == pytest.approx(expected)
    # A reused repeat trained nothing: the axis counts trained trials (102 for 2 trained in a one-candidate study).
    df["reused_from"] = [float("nan")] * (n - 10) + [0.0] * 10
    repeated = hypervolume_history(df, reference)
    assert list(repeated["n_complete"]) == list(range(1, n - 9)) and list(repeated["trial"]) == list(range(n - 10))
    assert list(repeated["hypervolume"]) == pytest.approx(expected[:n - 10])


def _hand_made_study(tmp_path: Path) -> str:
    """Five dsnas-like trials with known values: 0..2 feasible, 3 infeasible, 4 failed."""
    import datetime

    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    url = f"sqlite:///{tmp_path / 'hand.db'}"
    study = optuna.create_study(study_name="hand", storage=url, directions=MAX2)
    with warnings.catch_warnings():  # experimental in Optuna, and what the driver itself calls
        warnings.simplefilter("ignore")
        study.set_metric_names(["accuracy", "throughput"])
    t0 = datetime.datetime(2026, 1, 1)
    rows = [(0.5, 100.0, -1.0), (0.4, 300.0, -2.0), (0.3, 200.0, -0.5), (0.9, 900.0, 5.0)]
    for i, (acc, tput, slack) in enumerate(rows):
        trial = create_trial(
            values=[acc, tput], params={"d_model": [16, 32][i % 2]},
            distributions={"d_model": CategoricalDistribution([16, 32])},
            user_attrs={"accuracy": acc, "throughput_tok_s": tput, "latency_ms": 10.0 + slack, "feasible": float(slack <= 0),
                        "arch_short": f"arch{i}", "profile": {"fingerprint": {"device": "cpu", "cpu": "Test CPU", "cpu_count": 2}}},
            system_attrs={"constraints:max_latency_ms": slack})
        trial.datetime_start = t0 + datetime.timedelta(seconds=10 * i)
        trial.datetime_complete = t0 + datetime.timedelta(seconds=10 * i + 5)
        study.add_trial(trial)
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"fail_reason": "boom"}))
    return url


def test_a_repeat_an_older_dsnas_stored_has_none_of_its_originals_work(tmp_path):
    """An older dsnas's repeat copied its original's train_s, trial_s and predictor check: the trial table
    showed them as its own, and summing train_s counted the work twice."""
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import create_trial

    url = _hand_made_study(tmp_path)
    study = optuna.load_study(study_name="hand", storage=url)
    work = {"train_s": 8.0, "trial_s": 10.0, "predicted.latency_ms": 9.0, "rung1.accuracy": 0.4}
    figures = {**study.trials[0].user_attrs, **work}
    for reused in ({}, {"reused_from": 5}):  # trial 5, and its repeat as an older dsnas stored it
        study.add_trial(create_trial(values=study.trials[0].values, params=study.trials[0].params,
                                     distributions={"d_model": CategoricalDistribution([16, 32])},
                                     user_attrs={**figures, **reused}))
    df = load(url, "hand").set_index("trial")
    assert all(df.loc[6, k] != df.loc[6, k] for k in work)  # NaN: none of its own
    assert [df.loc[5, k] for k in work] == list(work.values())
    assert df.loc[6, "accuracy"] == df.loc[5, "accuracy"]  # its figures, as its original's


def test_load_gives_one_row_per_trial_with_units_constraints_and_fingerprint(tmp_path):
    df = load(_hand_made_study(tmp_path), "hand")
    assert list(df["trial"]) == [0, 1, 2, 3, 4]
    assert list(df["state"]) == ["COMPLETE"] * 4 + ["FAIL"]
    assert list(df["feasible"][:4]) == [True, True, True, False] and df["feasible"][4] is None
    assert list(df["throughput_tok_s"][:4]) == [100.0, 300.0, 200.0, 900.0]
    assert list(df["constraint.max_latency_ms"][:4]) == [-1.0, -2.0, -0.5, 5.0]
    assert list(df["param.d_model"][:4]) == [16, 32, 16, 32]
    assert df["duration_s"][0] == 5.0 and df["fail_reason"][4] == "boom"
    assert df["fingerprint"][0] == "cpu: Test CPU x2 on ?, torch ?" and df["fingerprint_id"][0]
    assert df.attrs["objectives"] == [{"name": "accuracy", "column": "accuracy", "direction": "maximize"},
                                      {"name": "throughput", "column": "throughput_tok_s", "direction": "maximize"}]


def test_front_and_hypervolume_of_a_hand_made_study(tmp_path):
    df = load(_hand_made_study(tmp_path), "hand")
    # Trial 3 dominates everything but is infeasible; 2 is dominated by 1.
    assert list(front(df)["trial"]) == [0, 1]
    assert list(front(df, feasible_only=False)["trial"]) == [3]
    reference = {"accuracy": 0.0, "throughput": 0.0}
    assert hypervolume(df, reference) == pytest.approx(0.5 * 100 + 0.4 * 300 - 0.4 * 100)
    history = hypervolume_history(df, reference)
    assert list(history["trial"]) == [0, 1, 2, 3]
    assert list(history["wall_s"]) == [5.0, 15.0, 25.0, 35.0]
    assert list(history["hypervolume"]) == pytest.approx([50.0, 130.0, 130.0, 130.0])
    # Zero accuracy and zero throughput: a reference a reader can state, never negative.
    assert default_reference(df) == {"accuracy": 0.0, "throughput": 0.0}
    # Normalised to the ideal box (best feasible accuracy 0.5 x best feasible throughput 300).
    assert history["normalised"].iloc[-1] == pytest.approx(hypervolume(df, reference) / (0.5 * 300))
    with pytest.raises(DsnasError, match="must give a value for each objective"):
        hypervolume(df, {"accuracy": 0.0})


def test_load_a_plain_optuna_study_and_bad_names(tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path / 'plain.db'}"
    study = optuna.create_study(study_name="plain", storage=url, directions=["minimize", "maximize"])
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)), n_trials=4)
    df = load(url, "plain")
    assert {"value_0", "value_1", "param.x", "param.y"} <= set(df.columns)
    assert len(front(df)) >= 1
    with pytest.raises(DsnasError, match=r"no study 'nope' \(stored: plain\)"):
        load(url, "nope")
    with pytest.raises(DsnasError, match="no such study database"):
        load(f"sqlite:///{tmp_path / 'missing.db'}", "plain")
    assert not (tmp_path / "missing.db").exists()
    # A database's path for its URL was SQLAlchemy's "Could not parse"; a text reference value a TypeError.
    with pytest.raises(DsnasError, match=r"storage must be a database URL or a study file. Fix: e.g. "
                                         r"load\(.sqlite:///"):
        load(str(tmp_path / "plain.db"), "plain")
    with pytest.raises(DsnasError, match="value_0 must be a finite number, got '0'. Fix: e.g. value_0=0.0"):
        hypervolume(df, {"value_0": "0", "value_1": 0})
    with pytest.raises(DsnasError, match="value_1 must be a finite number, got -inf. Fix: e.g. value_1=0.0"):
        hypervolume(df, {"value_0": 0.0, "value_1": float("-inf")})


def test_load_leaves_optuna_s_own_logging_and_warnings_as_they_were(tmp_path):
    """A notebook's own study.optimize() printed nothing after dsnas.results.load: its verbosity was set for good."""
    import warnings

    import optuna

    url = f"sqlite:///{tmp_path / 'plain.db'}"
    optuna.logging.set_verbosity(optuna.logging.INFO)
    optuna.create_study(study_name="plain", storage=url).optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    filters = list(warnings.filters)
    try:
        load(url, "plain")
        assert optuna.logging.get_verbosity() == optuna.logging.INFO
        assert warnings.filters == filters
        from dsnas.cli import main  # and a command called from a notebook

        (tmp_path / "plain.toml").write_text(f'[study]\nname = "plain"\nstorage = "{url}"\n[space]\nfile = "s.toml"\n')
        (tmp_path / "s.toml").write_text('family = "transformer_lm"\n[choices]\nd_model = [16]\n')
        main(["report", str(tmp_path / "plain.toml"), "--out", str(tmp_path / "report")])
        assert optuna.logging.get_verbosity() == optuna.logging.INFO
        assert warnings.filters == filters
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)


def _old_study(tmp_path: Path) -> Path:
    shutil.copytree(OLD_STUDY, tmp_path / "old")
    return tmp_path / "old" / "tiny.toml"


def test_a_study_made_by_dsnas_0_1_0_reports_without_being_written(tmp_path, capsys):
    study_file = _old_study(tmp_path)
    before = (study_file.parent / "tiny.db").read_bytes()
    assert main(["report", str(study_file), "--out", str(tmp_path / "report")]) == 0
    assert "Pareto front of" in capsys.readouterr().out
    assert (study_file.parent / "tiny.db").read_bytes() == before  # reading never upgrades
    measured = (tmp_path / "report" / "measurements.csv").read_text().splitlines()
    assert len(measured) == 1 + 2 * 2  # header, 2 trials x 2 batch sizes, from the stored profiles


def test_resuming_a_dsnas_0_1_0_study_creates_the_tables_and_fills_them_in(tmp_path):
    import sqlalchemy as sa

    from dsnas import tables
    from dsnas.spec import load_study
    from dsnas.study import open_study

    spec = load_study(_old_study(tmp_path))
    engine = sa.create_engine(spec.storage)
    assert tables.schema_version(engine) == 0
    study = open_study(spec)
    assert tables.schema_version(engine) == tables.SCHEMA_VERSION
    rows = tables.measurements(study)
    assert sorted(zip(rows["trial_number"], rows["batch_size"])) == [(0, 1), (0, 4), (1, 1), (1, 4)]
    assert (rows["latency_ms_p10"] <= rows["latency_ms_median"]).all()
    assert tables.study_record(engine, "tiny").objectives[1]["metric"] == "throughput_tok_s"
    open_study(spec)  # opening again writes nothing twice
    assert len(tables.measurements(study)) == 4
    assert len(study.trials) == 2  # Optuna's own rows untouched


def test_a_study_made_again_under_a_deleted_ones_name_shows_its_own_measurements(finished_study, tmp_path):
    """dsnas_measurements is keyed by the study's name: after optuna.delete_study (the dashboard's delete button)
    a new study of that name showed the deleted one's figures for its trials and never stored its own."""
    import optuna

    from dsnas import tables
    from dsnas.spec import load_study
    from dsnas.storage import storage_engine
    from dsnas.study import open_study

    spec = load_study(copy_study(finished_study, tmp_path / "copy"))
    old = open_study(spec)
    assert len(tables.measurements(old)) == 3 * 2
    optuna.delete_study(study_name=spec.name, storage=spec.storage)
    new = open_study(spec)
    assert len(tables.measurements(new)) == 0  # none of the deleted study's
    profile = old.trials[0].user_attrs["profile"]
    tables.record_measurements(storage_engine(new), spec.name, 0, profile, {})  # its trial 0, measured
    rows = tables.measurements(new)
    assert len(rows) == 2 and list(rows["trial_number"]) == [0, 0]


def test_a_database_from_a_newer_dsnas_is_refused(tmp_path):
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    from dsnas import tables
    from dsnas.spec import load_study
    from dsnas.study import open_study

    spec = load_study(_old_study(tmp_path))
    open_study(spec)
    engine = sa.create_engine(spec.storage)
    with Session(engine) as session, session.begin():
        session.get(tables.SchemaVersion, 1).version = tables.SCHEMA_VERSION + 1
    with pytest.raises(DsnasError, match=r"schema version 2, this dsnas .* knows up to 1\. Fix: upgrade dsnas"):
        open_study(spec)


def test_two_drivers_recording_the_same_fingerprint_at_once_both_store(tmp_path, monkeypatch):
    """The race CI met with two drivers on PostgreSQL: both read "no such fingerprint", both insert it. Made
    deterministic here: the second driver's read misses the row the first committed an instant before."""
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    from dsnas import tables

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'race.db'}")
    tables.ensure_schema(engine, "race.db")
    profile = {"fingerprint": {"cpu": "x"}, "batches": {"1": {"median_ms": 1.0, "p10_ms": 0.9, "p90_ms": 1.1,
                                                                "spread": 0.1, "repeats": 5}}}
    tables.record_measurements(engine, "s", 0, profile, {})  # the first driver's trial: the fingerprint is new
    real_get, missed = Session.get, []

    def stale_get(self, cls, key, **kw):  # the read that ran before the first driver committed
        if cls is tables.Fingerprint and not missed:
            missed.append(key)
            return None
        return real_get(self, cls, key, **kw)

    monkeypatch.setattr(Session, "get", stale_get)
    tables.record_measurements(engine, "s", 1, profile, {})  # the second driver's trial
    assert missed, "the stale read was not exercised"
    with Session(engine) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(tables.Fingerprint)) == 1
        trials = session.scalars(sa.select(tables.Measurement.trial_number)).all()
    assert sorted(trials) == [0, 1]


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)


def test_report_writes_tables_images_and_a_page(finished_study, tmp_path, capsys):
    import matplotlib.image
    import pandas as pd

    out = tmp_path / "report"
    assert main(["report", str(finished_study), "--out", str(out), "--reference", "accuracy=0,throughput=0"]) == 0
    printed = capsys.readouterr().out
    assert "reference accuracy=0, throughput=0" in printed
    # The front's titles as `search` prints them, throughput in the task's unit (it printed throughput_tok_s).
    header = next(line for line in printed.splitlines() if "architecture" in line).split()
    assert header[:4] == ["trial", "architecture", "accuracy", "tokens/s"] and "throughput_tok_s" not in printed
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 3 and {"accuracy", "throughput_tok_s", "gflop_s", "fingerprint"} <= set(trials.columns)
    assert len(pd.read_parquet(out / "trials.parquet")) == 3
    assert len(pd.read_csv(out / "measurements.csv")) == 3 * 2
    for name in ("pareto", "hypervolume", "hardware", "roofline", "choices"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(out / f"{name}.png").shape[0] > 100
        assert (out / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"
    # The figures say in words what they plot, with units and conditions (SVG keeps text as text).
    svg = {name: (out / f"{name}.svg").read_text() for name in ("pareto", "hypervolume", "roofline", "choices")}
    device = trials["fingerprint"][0].split(" on ")[0]
    assert "throughput, tokens/s at batch 4, " + device in svg["pareto"]
    assert "accuracy (charlm validation split)" in svg["pareto"]
    assert "hypervolume, share of the ideal box" in svg["hypervolume"] and "accuracy 0, throughput 0" in svg[
        "hypervolume"]
    assert "arithmetic intensity, FLOPs per byte" in svg["roofline"] and "GB/s (measured here)" in svg["roofline"]
    assert "Architecture choices, largest effect first" in svg["choices"]
    page = (out / "index.html").read_text()
    assert "at batch 4, " + device in page and "Roofline" in page  # the same labels on the page (JSON escapes "/")
    parser = _Tags()
    parser.feed(page)
    assert parser.tags.count("table") == 2 and "Plotly.newPlot" in page and "plotly.min.js" in page
    front_table = page.split("<h2>Pareto front")[1].split("</table>")[0]  # titled as printed: not tokens/s for all
    assert "<th>tokens/s</th>" in front_table and "<th>architecture</th>" in front_table
    assert "throughput_tok_s" not in front_table and "arch_short" not in front_table
    assert (out / "plotly.min.js").stat().st_size > 1_000_000


def test_a_report_stopped_half_way_leaves_the_last_report_whole(finished_study, tmp_path, monkeypatch, capsys):
    """Ctrl-C while the figures were drawn left the last report's page beside this one's tables and half its
    figures: the new report is drawn aside and moved in only once whole."""
    import dsnas.results.report as report

    out = tmp_path / "report"
    assert main(["report", str(finished_study), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    drawn = report.write_pngs

    def stopped(v, folder):
        drawn(v, folder)
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_pngs", stopped)
    with pytest.raises(KeyboardInterrupt):
        report.write_report(load_study(finished_study), out, "accuracy=0,throughput=0")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing of the stopped one, no stage left
    monkeypatch.undo()
    # A report killed (SIGTERM, kill -9) cannot clean up: its stage is removed by the next report, once it is gone.
    import socket
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = out / f".report-{socket.gethostname()}-{int(gone.stdout)}-123-0a1b2c"
    (killed / "pareto.png").parent.mkdir()
    (killed / "pareto.png").write_bytes(b"half")
    assert main(["report", str(finished_study), "--out", str(out), "--reference", "accuracy=0,throughput=0"]) == 0
    assert "reference accuracy=0, throughput=0" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(before)


def test_a_report_goes_only_into_a_new_or_empty_folder_or_an_earlier_reports(finished_study, tmp_path, capsys):
    """`--out` of a bundle wrote 20 files into it (export then refused the folder as no bundle's), and of the
    study's folder replaced any index.html or trials.csv of the user's there."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "index.html").write_text("my own page", encoding="utf-8")
    assert main(["report", str(finished_study), "--out", str(mine)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"dsnas: error: --out {mine}: holds files that are not a dsnas report's (index.html), and a report's files "
        "would replace their namesakes there. Fix: name a new folder, or an earlier report's, with --out")
    assert [p.name for p in mine.iterdir()] == ["index.html"]
    assert (mine / "index.html").read_text(encoding="utf-8") == "my own page"
    # The default folder is named as such, not as --out's; a report stopped while its files were moved in (tables,
    # no page yet) left a folder the next report still takes.
    from conftest import copy_study

    from dsnas.results.report import MARK

    study = copy_study(finished_study, tmp_path / "copy")
    default = study.parent / "reports" / "tiny"
    default.mkdir(parents=True)
    (default / "notes.txt").write_text("mine", encoding="utf-8")
    assert main(["report", str(study)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"dsnas: error: {default}: holds files that are not a dsnas report's (notes.txt), and a report's files would "
        "replace their namesakes there. Fix: move them elsewhere, or name another folder with --out")
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / MARK).touch()
    (stopped / "trials.csv").write_text("trial\n", encoding="utf-8")
    assert main(["report", str(finished_study), "--out", str(stopped)]) == 0
    assert (stopped / "index.html").is_file()


def test_report_errors_are_one_line(finished_study, tmp_path, capsys):
    assert main(["report", str(finished_study), "--out", str(tmp_path / "r"), "--reference", "accuracy=0"]) == 2
    err = capsys.readouterr().err
    assert "--reference accuracy=0: must give one finite number for each objective" in err and err.count("\n") == 1
    # accuracy=-inf printed "hypervolume inf", nan a hypervolume of 0; a name given twice kept its last number.
    for bad in ("accuracy=-inf,throughput=0", "accuracy=nan,throughput=0", "accuracy=0,accuracy=0.2,throughput=0"):
        assert main(["report", str(finished_study), "--out", str(tmp_path / "r"), "--reference", bad]) == 2
        assert capsys.readouterr().err == (f"dsnas: error: --reference {bad}: must give one finite number for each "
                                           "objective ['accuracy', 'throughput']. Fix: --reference "
                                           "accuracy=...,throughput=...\n")
    fresh = tmp_path / "fresh.toml"
    fresh.write_text(finished_study.read_text().replace('name = "tiny"', 'name = "never_run"'))
    assert main(["report", str(fresh)]) == 2
    assert "no study 'never_run'" in capsys.readouterr().err


def test_a_study_run_on_a_cluster_reads_on_a_machine_without_its_ray_or_gpu(finished_study, tmp_path, capsys,
                                                                              no_model_files):
    """Reading a study runs nothing: with an [executor] address no Ray cluster answers at, a CUDA device this machine
    lacks and a task plug-in it cannot import, the study still reports, exports, loads, and its predictor fits;
    only `dsnas search` checks those, each in one line."""
    import dsnas
    from dsnas import results

    study = copy_study(finished_study, tmp_path / "laptop")
    text = study.read_text()
    text = text.replace('device = "cpu"', 'device = "cuda"').replace('kind = "local"', 'kind = "ray"\naddress = '
                                                                   '"127.0.0.1:1"')
    study.write_text(text)
    assert main(["report", str(study), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "trials.csv").is_file()
    assert main(["export", str(study), "--pick", "max-accuracy", "--out", str(tmp_path / "bundle")]) == 0
    assert dsnas.load(str(tmp_path / "bundle"))(torch_batch()).shape[-1] == 256
    frame = results.load(f"sqlite:///{study.parent / 'tiny.db'}", "tiny")
    assert len(frame) == 3
    capsys.readouterr()
    main(["predictor", str(study), "--folds", "2"])  # 3 trials may be too few to fit: then it says so, in one line
    said = capsys.readouterr()
    assert "executor" not in said.err and "cuda" not in said.err and "Traceback" not in said.err, said
    assert main(["search", str(study)]) == 2
    err = capsys.readouterr().err
    assert "[executor.address] no Ray cluster answers there" in err or "[hardware.device]" in err, err
    # a task that does not import here: reading still works, searching says which module
    study.write_text(text.replace('name = "charlm"', 'name = "not_here_module:make"').replace(
        "corpus_bytes = 200_000\ncontext = 16\nbatch_size = 8\ntrain_tokens = 2048\nval_tokens = 512\n", ""))
    assert main(["report", str(study), "--out", str(tmp_path / "report2")]) == 0
    assert main(["search", str(study)]) == 2
    assert "[task.name] must name an importable callable (ModuleNotFoundError" in capsys.readouterr().err


def torch_batch():
    import torch

    return torch.randint(0, 256, (1, 16))


def test_load_takes_a_study_file(finished_study):
    from dsnas.spec import read_study

    spec = read_study(finished_study)
    by_file, by_url = load(finished_study), load(spec.storage, spec.name)
    assert list(by_file["trial"]) == list(by_url["trial"]) and len(by_file) == 3
    assert by_file["accuracy"].tolist() == by_url["accuracy"].tolist()


def test_load_refuses_a_write_ahead_study_it_cannot_read_in_one_line(finished_study, tmp_path, monkeypatch):
    """The Python API says what report and export say: SQLite cannot read a write-ahead-log file in a folder this
    account cannot write, and its own error was "attempt to write a readonly database"."""
    import os
    import sqlite3
    from contextlib import closing

    from dsnas import storage

    study = copy_study(finished_study, tmp_path / "study")
    db_file = study.with_suffix(".db")
    with closing(sqlite3.connect(db_file)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
    real_access = os.access
    monkeypatch.setattr(storage.os, "access", lambda path, mode: False if Path(path) == db_file.parent
                        and mode == os.W_OK else real_access(path, mode))
    with pytest.raises(DsnasError, match="write-ahead-log mode") as err:
        load(study)
    assert "\n" not in str(err.value) and str(db_file) in str(err.value)


def _in_memory(directions, names, rows, states=None, attrs=None):
    """An Optuna study in memory with dsnas's attribute names, one trial per row of objective values; ``attrs``:
    more user attributes of every trial."""
    import datetime

    import optuna
    from optuna.trial import TrialState, create_trial

    from dsnas.results import frame

    study = optuna.create_study(directions=list(directions), study_name="x")
    study.set_metric_names(list(names))
    start = datetime.datetime(2026, 1, 1)
    for i, values in enumerate(rows):
        state = (states or {}).get(i, TrialState.COMPLETE)
        trial = create_trial(state=state, values=list(values) if state == TrialState.COMPLETE else None,
                             user_attrs={"arch_short": f"m{i}", **dict(zip(("accuracy", "throughput_tok_s",
                                                                             "val_loss"), values)),
                                         **(attrs or {})})
        trial.datetime_start, trial.datetime_complete = (start + datetime.timedelta(seconds=i),
                                                         start + datetime.timedelta(seconds=i + 1))
        study.add_trial(trial)
    return frame(study)


def test_the_front_of_a_study_without_a_completed_trial_is_empty():
    """It was a pandas KeyError (no objective columns), where hypervolume says so in one line."""
    from optuna.trial import TrialState

    df = _in_memory(("maximize", "maximize"), ("accuracy", "throughput"), [()], {0: TrialState.FAIL})
    assert front(df).empty
    with pytest.raises(DsnasError, match="has no completed trial"):
        hypervolume(df)


def test_the_printed_front_shows_every_objective():
    """A third objective was left out of the printed and HTML front, so the row it puts there looked dominated."""
    from dsnas.results.plots import views
    from dsnas.results.report import _summary_frame

    df = _in_memory(("maximize", "maximize", "minimize"), ("accuracy", "throughput", "loss"),
                    [(0.40, 1000.0, 1.9), (0.38, 900.0, 1.5), (0.30, 2000.0, 2.5)])
    reference = default_reference(df)
    shown = _summary_frame(views(df, hypervolume_history(df, reference), reference))
    assert sorted(shown["trial"]) == [0, 1, 2]  # trial 1 is there for its loss
    assert {"accuracy", "throughput_tok_s", "val_loss"} <= set(shown.columns)


def test_the_printed_front_shows_the_latency_a_row_is_on_it_for():
    """At two decimals both latencies read 0.33, and trial 1 (less accurate, slower in throughput) looked dominated by
    trial 0 though it is on the front for its 2.4% lower latency."""
    import datetime
    from types import SimpleNamespace

    import optuna
    from optuna.trial import create_trial

    from dsnas.results import frame
    from dsnas.results.plots import views
    from dsnas.results.report import _front_text, _summary_frame

    study = optuna.create_study(directions=["maximize", "maximize", "minimize"], study_name="x")
    study.set_metric_names(["accuracy", "throughput", "latency"])
    for i, (accuracy, throughput, latency) in enumerate([(0.3055, 279840.0, 0.334), (0.3050, 279000.0, 0.326)]):
        trial = create_trial(values=[accuracy, throughput, latency], user_attrs={
            "arch_short": f"m{i}", "accuracy": accuracy, "throughput_tok_s": throughput, "latency_ms": latency})
        trial.datetime_start = trial.datetime_complete = datetime.datetime(2026, 1, 1, 0, 0, i)
        study.add_trial(trial)
    df = frame(study)
    reference = default_reference(df)
    spec = SimpleNamespace(task=SimpleNamespace(name="charlm"))
    lines = _front_text(_summary_frame(views(df, hypervolume_history(df, reference), reference)), spec).splitlines()
    assert [line.split()[-1] for line in lines[1:]] == ["0.334", "0.326"]


def test_the_summary_of_a_study_without_a_feasible_trial_says_so():
    """Its share of the ideal box was printed as 'nan%'."""
    from types import SimpleNamespace

    from dsnas.results.plots import views
    from dsnas.results.report import summary

    df = _in_memory(("maximize", "maximize"), ("accuracy", "throughput"), [(0.4, 1000.0), (0.3, 2000.0)],
                    attrs={"feasible": 0.0})
    reference = default_reference(df)
    v = views(df, hypervolume_history(df, reference), reference)
    spec = SimpleNamespace(name="x", path="x.toml", task=SimpleNamespace(name="charlm"))
    text = summary(spec, df, v, [Path("r/index.html")])
    line = text.splitlines()[0]
    assert "nan" not in line and "hypervolume 0 " in line and "no feasible trial" in line
    # Where the front goes, a sentence as search prints it, not pandas' "Empty DataFrame / Columns: [...]".
    assert text.splitlines()[1] == "no feasible completed trial: the Pareto front is empty"
    assert "Empty DataFrame" not in text


def test_each_measurement_row_says_when_it_was_measured(finished_study):
    """A live study's measured_at column was empty: only a backfilled row had a time."""
    import datetime

    from dsnas import tables
    from dsnas.spec import load_study
    from dsnas.study import open_study

    study = open_study(load_study(finished_study), create=False)
    rows = tables.measurements(study)
    trials = {t.number: t for t in study.trials}
    second = datetime.timedelta(seconds=1)
    for row in rows.itertuples():
        trial = trials[row.trial_number]
        # Optuna's trial times are naive local; measured_at is naive UTC
        start, end = (tables._utc(t) for t in (trial.datetime_start, trial.datetime_complete))
        assert row.measured_at is not None
        if row.cached_from is None:  # measured by this trial, while it ran
            assert start - second <= row.measured_at <= end + second
        else:  # reused: the time of the measurement it reuses, before this trial
            assert row.measured_at <= start + second


def test_a_choice_offered_by_width_ranks_as_one_choice():
    """bf16 offered at widths 96 and 128 only: precision was sampled as layer0.precision@96 and @128 (and fixed at
    fp32 at 32 and 64), each column a part of the trials, and it dropped out of the figure."""
    import json

    import pandas as pd

    from dsnas.results.plots import rank_choices

    rows = []
    for i in range(24):
        d, precision = (32, 64, 96, 128)[i % 4], ("fp32", "bf16")[(i // 4) % 2]
        precision = precision if d >= 96 else "fp32"
        rows.append({"param.d_model": d, "accuracy": 0.3 + d / 1000,
                     "throughput_tok_s": 1e5 / d * (3.0 if precision == "bf16" else 1.0),
                     "arch": json.dumps({"d_model": d, "layers": [{"precision": precision}]}),
                     **({f"param.layer0.precision@{d}": precision} if d >= 96 else {})})
    ranked = dict(rank_choices(pd.DataFrame(rows), ["accuracy", "throughput_tok_s"]))
    assert set(ranked) == {"param.d_model", "param.layer0.precision"}
    assert ranked["param.layer0.precision"]["throughput_tok_s"] > 0.1


def test_a_study_whose_every_trial_a_limit_stopped_says_so_and_not_run_a_search(tmp_path, capsys):
    """Every candidate over the latency limit, all PRUNED at rung 0: report and export said "run `dsnas search`
    first", and that search stopped at once, its budget spent."""
    from table_study import write_table_study

    from dsnas.cli import main

    study = write_table_study(tmp_path, n_trials=3, max_latency_ms=1e-6)
    assert main(["search", str(study)]) == 0
    capsys.readouterr()
    for command in (["report", str(study)], ["export", str(study), "--pick", "knee"]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "of its 3 trials, 0 completed; 3 stopped before training ended, trial 0: over the hardware " in err
        assert "latency_ms" in err and "Fix: loosen [hardware.constraints]" in err, err


def test_a_study_whose_peak_memory_two_definitions_measured_says_so():
    """A study resumed across a dsnas upgrade held peak memory by two definitions (0.34 MiB against 5.3 MiB for
    models of one size) in one column and under one limit, without a word."""
    from types import SimpleNamespace

    import pandas as pd

    from dsnas.results.report import _memory_note

    spec = SimpleNamespace(path=Path("my studies/s.toml"))
    df = pd.DataFrame({"trial": [0, 1, 2, 3], "state": ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL"],
                       "peak_memory_mb": [0.34, 5.3, 5.4, None],
                       "memory_method": [None, "weights+profiler_cpu_allocation_peak",
                                         "weights+profiler_cpu_allocation_peak", "rss"]})
    note = _memory_note(spec, df)
    assert note.startswith("peak memory: measured by 2 definitions in this study (not recorded: trial 0; "
                           "weights+profiler_cpu_allocation_peak: trials 1, 2)"), note
    assert "`dsnas profile 'my studies/s.toml' --trial N`" in note
    assert _memory_note(spec, df[df["trial"] > 0]) == ""  # one definition: nothing to say
    # A reused repeat (repeats = "reuse", the default) holds its original's figure and records no method of its
    # own: it is not a second definition.
    repeat = pd.DataFrame({"trial": [0, 1, 2], "state": ["COMPLETE"] * 3, "peak_memory_mb": [5.3, 5.4, 5.4],
                           "memory_method": ["weights+profiler_cpu_allocation_peak"] * 2 + [None],
                           "reused_from": [None, None, 1]})
    assert _memory_note(spec, repeat) == ""


def test_the_disturbed_note_names_the_measured_trials_not_their_reused_repeats():
    """A reused repeat measured nothing: it carries its original's flag, and the note said it was "measured while
    other processes took the CPUs" (9 of the 35 trials it named on a busy machine)."""
    from types import SimpleNamespace

    import pandas as pd

    from dsnas.results.report import _disturbed_note

    spec = SimpleNamespace(path=Path("s.toml"))
    df = pd.DataFrame({"trial": [0, 1, 2, 3], "state": ["COMPLETE"] * 4, "disturbed": [True, False, True, True],
                       "reused_from": [None, None, 0, None]})
    assert _disturbed_note(spec, df).startswith("disturbed: trials 0, 3 measured while other processes took")
    assert _disturbed_note(spec, df[df["trial"] < 3]).startswith("disturbed: trial 0 measured while")


def test_read_commands_say_where_the_study_file_was_edited_since_the_search(finished_study, tmp_path, capsys):
    """A limit edited after the search judged no trial: report, export and the dashboard kept the stored limit (as
    they must: the trials' feasibility is the search's) without a word, and the dashboard's note showed the new
    limit above a front that broke it. Each now says so, and the note shows the limit the search used."""
    from dsnas.dashboard import prepare
    from dsnas.spec import load_study
    from dsnas.study import open_study

    study_file = copy_study(finished_study, tmp_path / "s")
    study_file.write_text(study_file.read_text().replace("max_latency_ms = 1000", "max_latency_ms = 0.001"))
    said = "[hardware.constraints.max_latency_ms] is 0.001 in the file, but the study was searched with 1000.0"
    assert main(["report", str(study_file), "--out", str(tmp_path / "r")]) == 0
    assert said in capsys.readouterr().out and said in (tmp_path / "r" / "index.html").read_text()
    assert main(["export", str(study_file), "--pick", "knee", "--out", str(tmp_path / "e")]) == 0
    assert said in capsys.readouterr().err
    spec = load_study(study_file)
    study = open_study(spec, create=False)
    prepare(spec, study)
    from optuna_dashboard import get_note

    note = get_note(study)
    assert said in note and "`latency_ms` ≤ 1000" in note and "≤ 0.001" not in note.split(said)[1]
    study_file.write_text(study_file.read_text().replace("max_latency_ms = 0.001", "max_latency_ms = 1000"))
    assert main(["report", str(study_file), "--out", str(tmp_path / "r")]) == 0
    assert "in the file, but the study was searched with" not in capsys.readouterr().out


def test_the_report_says_how_many_completed_trials_were_reused_repeats():
    """"102 complete trials" where 2 were trained and 100 answered from them: the repeats are said."""
    import pandas as pd

    from dsnas.results.report import _counts

    df = pd.DataFrame({"state": ["COMPLETE"] * 4 + ["FAIL"], "reused_from": [None, None, 0.0, 1.0, None]})
    assert _counts(df) == "4 complete, 1 fail trials (2 of the complete ones are repeats whose results were reused)"
    assert _counts(df.drop(columns="reused_from")) == "4 complete, 1 fail trials"


def test_the_report_says_how_many_pruned_trials_the_predictor_skipped(tmp_path):
    """"33 pruned" where the search said "26 pruned": the other 7 were skipped untrained, and counted nothing."""
    from dsnas.results.report import _counts
    from tests.table_study import write_table_study

    study = write_table_study(tmp_path, n_trials=16, max_latency_ms=20.0, predictor="skip = true",
                              fidelity='min_fraction = 0.111')
    assert main(["search", str(study)]) == 0
    df = load(study)
    skipped = int((df["pruned_by"] == "predictor").sum())
    assert skipped and (df["pruned_by"] == "rung").any()
    assert f"{skipped} of the pruned ones skipped untrained by the predictor" in _counts(df)


def test_the_pages_table_of_all_trials_shows_each_figure_as_the_front_above_it_does():
    """In 4 significant digits, trial 3's 270,720 parameters read 2.707e+05 and its 14,657 tokens/s 1.466e+04 below
    a front that showed 270,720 and 14,657."""
    import pandas as pd

    from dsnas.results.report import _all_trials_html

    df = pd.DataFrame({"trial": [3, 1], "state": ["COMPLETE", "PRUNED"], "arch": ["{}", "{}"],
                       "accuracy": [0.3875732421875, float("nan")], "throughput_tok_s": [14657.23, 11525.0],
                       "latency_ms": [0.802208, 450.22], "params": [270720.0, 102016.0], "flops_bs1": [18087936.0, 1.0]})
    page = _all_trials_html(df)
    cells = [c.split("<")[0] for c in page.split("<td>")[1:]]
    assert cells[:7] == ["3", "COMPLETE", "0.3876", "14,657", "0.802", "270,720", "1.809e+07"]
    assert cells[7:10] == ["1", "PRUNED", ""]  # no accuracy: an empty cell, as before
