"""No repeated work: a candidate the sampler proposes again under the same task, training budget, engine and
measurement settings is answered from the stored result, visibly, and does not count toward n_trials."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState
from table_study import write_table_study

from dsnas.cli import main
from dsnas.results import front, load
from dsnas.spec import load_study


def trials_of(study_file):
    spec = load_study(study_file)
    return spec, optuna.load_study(study_name=spec.name, storage=spec.storage).get_trials()


def test_a_repeat_is_answered_from_the_stored_result_and_the_budget_counts_trained_candidates(tmp_path, capsys):
    # 36 architectures, 30 trained candidates asked for: a random sampler proposes many of them again.
    study = write_table_study(tmp_path, n_trials=30, fidelity='kind = "none"', repeats="reuse")
    assert main(["search", str(study)]) == 0
    out = capsys.readouterr().out
    spec, trials = trials_of(study)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    trained = [t for t in done if "reused_from" not in t.user_attrs]
    reused = [t for t in done if "reused_from" in t.user_attrs]
    assert len(trained) == 30 and reused, "the sampler proposed no repeat: the test says nothing"
    keys = [t.user_attrs["evaluation_key"] for t in trained]
    assert len(set(keys)) == len(keys)  # nothing trained twice
    by_number = {t.number: t for t in trials}
    for t in reused:
        original = by_number[int(t.user_attrs["reused_from"])]
        assert original.number < t.number and "reused_from" not in original.user_attrs
        assert t.values == original.values and t.user_attrs["arch"] == original.user_attrs["arch"]
        assert t.user_attrs["evaluation_key"] == original.user_attrs["evaluation_key"]
        assert "profile" not in t.user_attrs  # nothing was measured for it
        assert "trial_s" in original.user_attrs and not {"trial_s", "train_s", "measure_s"} & set(t.user_attrs)
        # Nor how the original ran: its seed (a repeat copied it, and a queued-again repeat lost its own).
        assert "train_seed" in original.user_attrs and "train_seed" not in t.user_attrs
    assert f"trial {reused[0].number} is trial {int(reused[0].user_attrs['reused_from'])} again" in out
    assert f"({len(reused)} of them repeats whose results were reused)" in out
    df = load(spec.storage, spec.name)  # the trial table says which rows are reused, and from which trial
    assert sorted(df.loc[df["reused_from"].notna(), "trial"]) == sorted(t.number for t in reused)
    assert df.loc[df["reused_from"].notna(), "reused_from"].isin([t.number for t in trained]).all()
    assert front(df)["reused_from"].isna().all()  # the original stands for its repeats on the front
    # Resumed, the index of what was trained is read back from the study: still nothing trained twice.
    assert main(["search", str(study), "--n-trials", "33"]) == 0
    _, trials = trials_of(study)
    keys = [t.user_attrs["evaluation_key"] for t in trials
            if t.state == TrialState.COMPLETE and "reused_from" not in t.user_attrs]
    assert len(keys) == 33 and len(set(keys)) == 33


def test_retrain_trains_a_repeat_again_and_an_exhausted_space_stops_with_the_reason(tmp_path, capsys):
    retrain = write_table_study(tmp_path, n_trials=40, fidelity='kind = "none"', repeats="retrain")
    assert main(["search", str(retrain)]) == 0
    _, trials = trials_of(retrain)
    keys = [t.user_attrs["evaluation_key"] for t in trials if t.state == TrialState.COMPLETE]
    assert len(keys) == 40 and len(set(keys)) < 40 and not any("reused_from" in t.user_attrs for t in trials)
    capsys.readouterr()
    exhausted = tmp_path / "exhausted"
    exhausted.mkdir()
    study = write_table_study(exhausted, n_trials=60, fidelity='kind = "none"', repeats="reuse")  # > 36 archs
    assert main(["search", str(study)]) == 0
    out = capsys.readouterr().out
    assert "candidates in a row that were already evaluated: the space is (nearly) exhausted" in out
    _, trials = trials_of(study)
    trained = [t for t in trials if t.state == TrialState.COMPLETE and "reused_from" not in t.user_attrs]
    assert len(trained) <= 36


@pytest.mark.parametrize("bad", ['"again"', "true"])
def test_repeats_takes_reuse_or_retrain(tmp_path, bad, capsys):
    study = write_table_study(tmp_path, n_trials=3)
    study.write_text(study.read_text().replace('repeats = "retrain"', f"repeats = {bad}"))
    assert main(["search", str(study)]) == 2
    assert "[budget.repeats]" in capsys.readouterr().err


def test_the_search_efficiency_benchmark_counts_a_reused_repeat_as_no_evaluation_and_no_cost():
    """benchmarks/search_efficiency.py scores a search by its evaluated (trained) candidates and their recorded
    cost; a repeat answered from the stored result trains nothing, so it must add neither."""
    import importlib.util
    from pathlib import Path
    from types import SimpleNamespace

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "search_efficiency.py"
    spec = importlib.util.spec_from_file_location("search_efficiency", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = {"trial_s": 10.0, "eval_s": 1.0, "measure_s": 0.5, "train_s": 8.0}
    trained = SimpleNamespace(state=TrialState.COMPLETE, user_attrs={"rung1": {"fraction": 1 / 3}})
    reused = SimpleNamespace(state=TrialState.COMPLETE, user_attrs={"rung1": {"fraction": 1 / 3}, "reused_from": 0})
    assert bench.trial_cost(trained, row, 0.02) == (11.0, True)  # trained, and one validation pass at its rung
    assert bench.trial_cost(reused, row, 0.02) == (0.0, False)


def _one_candidate_search(tmp_path, evaluate: str, n_trials: int, workers: int, capsys):
    """A search under Ray of a space of one candidate, whose table task's evaluation sleeps 2 s, then runs
    ``evaluate`` (lines of Python): every proposal after the first is that candidate again. (output, trials)."""
    (tmp_path / "twin_task.py").write_text(
        "import time\nfrom pathlib import Path\nfrom table_task import TableTask\n\n\nclass TwinTask(TableTask):\n"
        "    def evaluate_arch(self, arch, **kwargs):\n        time.sleep(2.0)\n" + evaluate +
        "        return super().evaluate_arch(arch, **kwargs)\n")
    study = write_table_study(tmp_path, n_trials=n_trials, sampler="tpe", executor="ray", task="twin_task:TwinTask",
                              fidelity='kind = "none"', repeats="reuse")
    study.write_text(study.read_text().replace('kind = "ray"', f'kind = "ray"\nworkers = {workers}'))
    (tmp_path / "space.toml").write_text(
        'family = "transformer_lm"\n[choices]\nn_layers = [1]\nd_model = [16]\nn_heads = [1]\nffn_ratio = [1]\n')
    assert main(["search", str(study)]) == 0  # stopped once the sampler proposes nothing new
    return capsys.readouterr().out, trials_of(study)[1]


@pytest.mark.slow
def test_a_candidate_proposed_while_it_trains_waits_for_its_result(tmp_path, capsys):
    """With two workers, Optuna's samplers propose a running candidate again: it was trained twice at once, counted
    twice toward n_trials and listed twice on the front."""
    out, trials = _one_candidate_search(tmp_path, "", n_trials=2, workers=2, capsys=capsys)
    trained = [t for t in trials if t.state == TrialState.COMPLETE and "reused_from" not in t.user_attrs]
    assert [t.number for t in trained] == [0], out  # trained once
    assert "trial 1 is trial 0 again, which is running: it waits for its result" in out
    assert trials[1].state == TrialState.COMPLETE and trials[1].user_attrs["reused_from"] == 0
    assert trials[1].values == trials[0].values


@pytest.mark.slow
def test_trials_waiting_for_a_twin_that_failed_train_it_once(tmp_path, capsys):
    """Each trial that waited for a twin which then failed started the candidate at once: trained twice at once
    again. And waiting trials took no place, so the driver made 201 of them and read no result meanwhile."""
    fails_once = ("        marker = Path(__file__).with_name('failed_once')\n"
                  "        if not marker.exists():\n            marker.touch()\n            raise RuntimeError('flaky')\n")
    out, trials = _one_candidate_search(tmp_path, fails_once, n_trials=3, workers=3, capsys=capsys)
    assert trials[0].state == TrialState.FAIL
    trained = [t for t in trials if t.state == TrialState.COMPLETE and "reused_from" not in t.user_attrs]
    assert [t.number for t in trained] == [1], out  # trained once, by the first trial that waited
    assert "trial 2 is trial 0 again, which is running: it waits for its result" in out, out
    assert trials[2].user_attrs["reused_from"] == 1
    # Each in a place of the three: at most two wait at once (with two places for them, the driver made 201).
    assert out.count("which is running: it waits for its result") <= 3, out


def _two_drivers(tmp_path, evaluate: str, b_args: list[str], between) -> tuple[str, str, list]:
    """Driver A, then driver B, on one SQLite study of one candidate (local executor each): A's trial 0 trains it,
    its evaluation waiting for a file ``go`` and then running ``evaluate`` (lines of Python); B starts once trial 0
    runs, and proposes it again. ``between(trials_db)`` runs once B's trial 1 is sampled, then ``go`` is written.
    (A's output, B's output, the stored trials)."""
    import sqlite3
    import subprocess
    import sys
    import time
    from contextlib import closing

    (tmp_path / "twin_task.py").write_text(
        "import time\nfrom pathlib import Path\nfrom table_task import TableTask\n\n\nclass TwinTask(TableTask):\n"
        "    def evaluate_arch(self, arch, **kwargs):\n        while not Path(__file__).with_name('go').exists():\n"
        "            time.sleep(0.05)\n" + evaluate + "        return super().evaluate_arch(arch, **kwargs)\n")
    study = write_table_study(tmp_path, n_trials=1, sampler="tpe", task="twin_task:TwinTask",
                              fidelity='kind = "none"', repeats="reuse")
    (tmp_path / "space.toml").write_text(
        'family = "transformer_lm"\n[choices]\nn_layers = [1]\nd_model = [16]\nn_heads = [1]\nffn_ratio = [1]\n')
    db = tmp_path / "table.db"

    def sampled(number: int, key: str) -> bool:  # read-only: Optuna's storage here would write beside the drivers
        if not db.exists():
            return False
        try:
            with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
                return bool(conn.execute(
                    "SELECT 1 FROM trials t JOIN trial_user_attributes a ON a.trial_id = t.trial_id WHERE "
                    "t.number = ? AND t.state = 'RUNNING' AND a.key = ?", (number, key)).fetchone())
        except sqlite3.OperationalError:
            return False  # no tables yet, or a writer holds the lock

    def wait_until(done, *drivers) -> None:
        deadline = time.monotonic() + 120
        while not done():
            assert all(d.poll() is None for d in drivers) and time.monotonic() < deadline, \
                [d.communicate() for d in drivers]
            time.sleep(0.1)

    cmd = [sys.executable, "-m", "dsnas.cli", "search", str(study)]
    a = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    b = None
    try:
        wait_until(lambda: sampled(0, "evaluation_key"), a)  # A trains it
        b = subprocess.Popen(cmd + b_args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: sampled(1, "driver"), a, b)
        time.sleep(1.0)  # B compares trial 1 with the running ones
        between(db)
        (tmp_path / "go").touch()
        a_out, a_err = a.communicate(timeout=120)
        b_out, b_err = b.communicate(timeout=120)
    finally:
        for driver in (a, b):
            if driver is not None and driver.poll() is None:
                driver.kill()
    assert a.returncode == 0 and b.returncode == 0, (a_err[-2000:], b_err[-2000:])
    return a_out, b_out, trials_of(study)[1]


@pytest.mark.slow
def test_a_candidate_another_driver_trains_waits_for_its_result_even_if_it_is_taken_back_meanwhile(tmp_path):
    """Two drivers trained the same candidate at once (each looked among its own running trials only), and both
    were listed on the front. And a waiting trial that another driver took back (this one paused past GRACE_S)
    stopped the search with Optuna's UpdateFinishedTrialError when its twin's result came."""

    def taken_back(db) -> None:  # what another driver's recover_stale_trials does, through its own storage
        storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
        study_id = storage.get_study_id_from_name("table")
        trial = next(t for t in storage.get_all_trials(study_id) if t.number == 1)
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)

    _, b_out, trials = _two_drivers(tmp_path, "", ["--n-trials", "2"], taken_back)
    assert "trial 1 is trial 0 again, which another driver is running: it waits for its result" in b_out, b_out
    assert "trial 1 was taken back by another driver" in b_out, b_out
    trained = [t.number for t in trials if t.state == TrialState.COMPLETE and "reused_from" not in t.user_attrs]
    assert trained == [0] and trials[1].state == TrialState.FAIL


@pytest.mark.slow
@pytest.mark.parametrize("twin", ["fails after it", "runs on past it"])
def test_a_trial_waiting_for_a_twin_is_queued_again_once_the_timeout_passes(tmp_path, twin):
    """"No new trial starts after timeout_s": a trial waiting for its twin started training once the twin failed,
    20 s past the timeout; and one waiting for another driver's twin waited on past it, its driver idle."""
    import sqlite3
    import time
    from contextlib import closing

    fails_once = ("        marker = Path(__file__).with_name('failed_once')\n"
                  "        if not marker.exists():\n            marker.touch()\n            raise RuntimeError('flaky')\n")

    def stopped_waiting(db) -> None:  # B gives trial 1 up while A's trial 0 still runs
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
                if conn.execute("SELECT state FROM trials WHERE number = 1").fetchone()[0] == "FAIL":
                    return
            time.sleep(0.2)
        raise AssertionError("B still waits for trial 0 a minute past its timeout")

    # B's timeout passes while it waits (it ran 1 s before this, and 5 s more here, or until it gives up).
    evaluate, between = (fails_once, lambda db: time.sleep(5.0)) if twin == "fails after it" else ("", stopped_waiting)
    _, b_out, trials = _two_drivers(tmp_path, evaluate, ["--n-trials", "2", "--timeout", "5"], between)
    assert trials[1].state == TrialState.FAIL
    assert trials[1].user_attrs["fail_reason"] == ("the search stopped (the timeout of 5 s passed) while the trial "
                                                   "waited for trial 0; queued again")
    assert "trial 1 started" not in b_out and "failed 0" in b_out, b_out  # it never ran: not a failure
    requeued = [t for t in trials if t.user_attrs.get("requeued_from") == 1]
    if twin == "fails after it":
        assert trials[0].state == TrialState.FAIL
        assert len(requeued) == 1 and requeued[0].state == TrialState.COMPLETE  # A trained it, once
    else:
        assert trials[0].state == TrialState.COMPLETE and [t.state for t in requeued] == [TrialState.WAITING]


def test_the_stop_line_counts_the_repeats_other_drivers_stored_too(tmp_path, capsys):
    """With two drivers side by side each said how many of the study's completed trials were repeats from its own
    count (1 and 2, where the study held 3)."""
    from optuna.trial import create_trial

    import dsnas

    study = write_table_study(tmp_path, n_trials=2, fidelity='kind = "none"', repeats="reuse")

    def another_driver(st, frozen) -> None:  # stores a repeat of the first trial while this driver runs
        if frozen.number == 0:
            st.add_trial(create_trial(state=TrialState.COMPLETE, values=frozen.values, params=frozen.params,
                                      distributions=frozen.distributions,
                                      user_attrs={"arch": frozen.user_attrs["arch"], "reused_from": 0}))

    outcome = dsnas.search(str(study), callbacks=[another_driver])
    stored = [t for t in trials_of(study)[1] if t.state == TrialState.COMPLETE]
    assert outcome.reused == sum("reused_from" in t.user_attrs for t in stored) >= 1
    assert outcome.completed == len(stored)
