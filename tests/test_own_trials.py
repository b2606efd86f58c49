"""A user's own evaluation function as the task (``evaluate_arch``): dsnas builds no model, stores what the function
returns as figures it did not measure, and fails a trial whose function omits an objective or raises."""

from __future__ import annotations

import json

import optuna
import pytest
from optuna.trial import TrialState

import dsnas
from dsnas.cli import main
from dsnas.errors import DsnasError
from dsnas.spec import load_study
from dsnas.storage import artifact_dir
from dsnas.study import open_study
from dsnas.tables import measurements
from tests.table_study import row_of, write_table_study

PLUGIN = '''
class Partial:
    """Reports no throughput; raises for one architecture; never calls report (no rungs of its own)."""

    def arch_defaults(self):
        return {"vocab_size": 256, "context": 16}

    def fingerprint(self):
        return {"task": "partial"}

    def evaluate_arch(self, arch, *, seed, rungs, report):
        if arch["d_model"] == 64:
            raise RuntimeError("this one cannot be evaluated")
        return {"accuracy": 0.5, "latency_ms": 1.0, "latency_ms_bs1": 1.0}


def make():
    return Partial()
'''


def test_a_table_task_runs_a_search_whose_figures_say_where_they_came_from(tmp_path):
    study = write_table_study(tmp_path, n_trials=6, fidelity='kind = "none"')
    assert main(["search", str(study)]) == 0
    spec = load_study(study)
    trials = optuna.load_study(study_name=spec.name, storage=spec.storage).trials
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)
    # No model, and json_artifacts off (the default): not one file per trial beside the study.
    assert not any(artifact_dir(spec).rglob("*")) and not any(k.endswith("_artifact") for k in trials[0].user_attrs)
    for t in trials:
        assert t.user_attrs["latency_ms_bs32"] == row_of(t.user_attrs["arch"])["latency_ms_bs32"]
        profile = t.user_attrs["profile"]
        assert profile["fingerprint"]["device"] == "recorded" and profile["backend"] == "recorded"
        assert "dsnas did not measure them" in profile["measured_by"]
        assert profile["task"]["table"] == "table.csv" and "worker" in profile
    rows = measurements(open_study(spec, create=False))
    assert set(rows["backend"]) == {"recorded"} and sorted(set(rows["batch_size"])) == [1, 32]
    assert (rows["repeats"] == 1).all()  # one recorded figure per batch size, not a measured distribution
    # Said so where the report names the device (it read "recorded: ? on ?, torch ?")
    from dsnas.results import load

    fingerprints = set(load(study)["fingerprint"])
    assert len(fingerprints) == 1 and fingerprints.pop().startswith("recorded by the task (")


def test_an_evaluated_trial_exports_its_architecture_and_metrics_and_says_it_has_no_model(tmp_path, capsys):
    study = write_table_study(tmp_path, n_trials=2, fidelity='kind = "none"')
    assert main(["search", str(study)]) == 0
    capsys.readouterr()
    assert main(["export", str(study), "--trial", "1", "--out", str(tmp_path / "b")]) == 0
    assert "its architecture and metrics (the task's own function evaluated it: there is no model)" in \
        capsys.readouterr().out
    doc = json.loads((tmp_path / "b" / "arch.json").read_text())
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())["metrics"]
    assert doc["model"] is False and metrics["latency_ms_bs32"] == row_of(doc["arch"])["latency_ms_bs32"]
    with pytest.raises(DsnasError, match="holds an architecture and its metrics, no model"):
        dsnas.load(str(tmp_path / "b"))


def test_an_evaluation_function_that_omits_an_objective_or_raises_fails_that_trial(tmp_path):
    (tmp_path / "partial.py").write_text(PLUGIN)
    study = write_table_study(tmp_path, n_trials=4, task="partial:make")
    study.write_text(study.read_text().replace(f'table = "{tmp_path / "table.csv"}"', "")
                     .replace("n_trials = 4", "n_trials = 4\nmax_failures = 3"))
    assert main(["search", str(study)]) == 1  # every trial of the run failed
    spec = load_study(study)
    trials = optuna.load_study(study_name=spec.name, storage=spec.storage).trials
    assert trials and all(t.state == TrialState.FAIL for t in trials)
    reasons = {t.user_attrs["fail_reason"] for t in trials}
    assert any("no measurement of ['throughput_tok_s']" in r and "objective throughput needs 'throughput_tok_s'" in r
               for r in reasons), reasons
    assert all("no measurement" in r or "RuntimeError: this one cannot be evaluated" in r for r in reasons), reasons


def test_an_in_memory_study_with_a_sampler_of_ones_own_stops_when_a_callback_says(tmp_path):
    """The Python API as a benchmark uses it: an Optuna study in memory (no database file is written), a sampler
    passed in, and a callback that calls study.stop() as under Optuna's optimize(): the running trial finishes, no
    new one starts, and the outcome says why."""
    import io

    from dsnas.progress import Progress
    from dsnas.run import run_study

    spec = load_study(write_table_study(tmp_path, n_trials=20, fidelity='kind = "none"'))
    study = optuna.create_study(directions=spec.directions)
    seen = []

    def stop_after_three(study, trial):
        seen.append(trial.number)
        if len(seen) == 3:
            study.stop()

    outcome = run_study(spec, progress=Progress(spec, out=io.StringIO()), study=study,
                        sampler=optuna.samplers.RandomSampler(seed=3), callbacks=[stop_after_three])
    assert outcome.stopped_because == "a callback (or the sampler, out of candidates) called study.stop()"
    assert len(study.trials) == 3 and all(t.state == TrialState.COMPLETE for t in study.trials)
    assert isinstance(study.sampler, optuna.samplers.RandomSampler)
    assert not list(tmp_path.glob("*.db")) and not list(tmp_path.glob("*_artifacts"))
    # A second run on the same study starts afresh: the stop of the first does not stop it.
    again = run_study(spec, progress=Progress(spec, out=io.StringIO()), study=study,
                      sampler=optuna.samplers.RandomSampler(seed=4))
    assert again.stopped_because.startswith("20 trials")


ODD = '''
import numpy as np


class Odd:
    """Accuracy nan for d_model 16, inf for 32, a fraction for 64."""

    def arch_defaults(self):
        return {"vocab_size": 256, "context": 16}

    def fingerprint(self):
        return {"task": "odd"}

    def evaluate_arch(self, arch, *, seed, rungs, report):
        accuracy = {16: float("nan"), 32: float("inf"), 64: 0.5}[arch["d_model"]]
        return {"accuracy": accuracy, "throughput_tok_s": 1000.0 / arch["d_model"], "latency_ms_bs1": 1.0,
                "latency_ms_bs32": 2.0}


class NumpyFingerprint(Odd):
    def fingerprint(self):
        return {"task": "odd", "rows": np.int64(3)}


class ScalarMean(Odd):
    def preprocessing(self):
        return {"input": "(N, 16) token ids", "mean": 0.0, "std": 1.0}


class ClassesByName(Odd):
    def preprocessing(self):
        return {"classes": {"cat": 0, "dog": 1}}


class NoFingerprint:
    def arch_defaults(self):
        return {}

    def evaluate_arch(self, arch, *, seed, rungs, report):
        return {}


def raises(path="data.csv"):
    raise FileNotFoundError(f"{path} not found")
'''


def test_a_nan_or_infinite_accuracy_fails_its_trial_with_the_rule_and_the_search_goes_on(tmp_path):
    """A nan accuracy was stored by Optuna as a FAIL without a reason, and the next repeat of that architecture
    stopped the driver with a TypeError on every run; an infinite one took the whole front."""
    (tmp_path / "odd.py").write_text(ODD)
    study = write_table_study(tmp_path, n_trials=12, task="odd:Odd", fidelity='kind = "none"')
    study.write_text(study.read_text().replace(f'table = "{tmp_path / "table.csv"}"', "")
                     .replace("n_trials = 12", "n_trials = 12\nmax_failures = 12"))
    assert main(["search", str(study)]) == 0
    spec = load_study(study)
    trials = optuna.load_study(study_name=spec.name, storage=spec.storage).trials
    by_width = {}
    for t in trials:
        by_width.setdefault(t.user_attrs["arch"]["d_model"], set()).add((t.state, t.user_attrs.get("fail_reason")))
    assert by_width[16] == {(TrialState.FAIL, "objective accuracy is nan: the task's figures must be finite numbers "
                                              "(a task whose training diverged, or whose evaluate() reports nan)")}
    assert by_width[32] == {(TrialState.FAIL, "objective accuracy is inf: the task's figures must be finite numbers "
                                              "(a task whose training diverged, or whose evaluate() reports nan)")}
    assert {state for state, _ in by_width[64]} == {TrialState.COMPLETE}


@pytest.mark.parametrize("factory, rule", [
    ("odd:NumpyFingerprint", "the task's fingerprint() must return JSON values (str, int, float, bool, lists and "
                             "dicts of them), to be stored with each trial (Object of type int64 is not JSON "
                             "serializable)"),
    ("odd:NoFingerprint", "the task must have the methods of dsnas.tasks.RunsOwnTrials (arch_defaults, "
                          "fingerprint); NoFingerprint has no fingerprint"),
    ("odd:raises", "the factory must build the task (FileNotFoundError: data.csv not found)"),
    # An export read these after the whole search and ended in a TypeError from the card.
    ("odd:ScalarMean", "the task's preprocessing() 'mean' must be a list of numbers, one per channel, got 0.0"),
    ("odd:ClassesByName", "the task's preprocessing() 'classes' must be a list of names (str), output index i the "
                          "i-th, got dict"),
])
def test_a_task_without_what_dsnas_calls_is_one_line_before_any_trial(tmp_path, capsys, factory, rule):
    (tmp_path / "odd.py").write_text(ODD)
    study = write_table_study(tmp_path, n_trials=2, task=factory, fidelity='kind = "none"')
    study.write_text(study.read_text().replace(f'table = "{tmp_path / "table.csv"}"', ""))
    assert main(["search", str(study)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dsnas: error: {study}: [task.name] {rule}") and "Fix: " in err and "\n" not in err
    assert not list(tmp_path.glob("*.db"))  # nothing stored: refused before the study was made


@pytest.mark.slow
def test_drivers_started_together_on_a_new_sqlite_study_all_run(tmp_path):
    """Optuna's tables and dsnas's were created by each driver at once: about one driver in three stopped with
    "database is locked" or "table trial_params already exists". Two rounds of three drivers on a new file each (nine drivers caught it
    nearly always, six about nine times in ten)."""
    import subprocess
    import sys

    for round_ in range(2):
        folder = tmp_path / str(round_)
        folder.mkdir()
        study = write_table_study(folder, n_trials=6, fidelity='kind = "none"')
        drivers = [subprocess.Popen([sys.executable, "-m", "dsnas.cli", "-q", "search", str(study)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
        ends = [(d.wait(timeout=300), d.stderr.read()) for d in drivers]
        assert [rc for rc, _ in ends] == [0, 0, 0], [err[-800:] for _, err in ends]
        spec = load_study(study)
        trials = optuna.load_study(study_name=spec.name, storage=spec.storage).trials
        assert [t.state for t in trials] == [TrialState.COMPLETE] * 6


def test_an_infeasible_trial_says_which_limit_it_broke_and_by_how_much(tmp_path):
    """The line said "(infeasible)" alone: "latency 0.60" over a limit of 0.6 read as within it, and a broken limit
    on a figure that is no objective was not shown at all."""
    import io

    from dsnas.progress import Progress
    from dsnas.run import run_study

    spec = load_study(write_table_study(tmp_path, n_trials=6, fidelity='kind = "none"', max_latency_ms=5.0))
    out = io.StringIO()
    run_study(spec, progress=Progress(spec, out=out))
    study = optuna.load_study(study_name="table", storage=spec.storage)
    over = [t for t in study.trials if t.state == TrialState.COMPLETE and not t.user_attrs["feasible"]]
    assert over  # the table's latencies are mostly above 5 ms
    for t in over:
        line = next(line for line in out.getvalue().splitlines() if f"trial {t.number} done" in line)
        assert line.endswith(f"(infeasible: latency_ms {t.user_attrs['latency_ms']:.4g} > 5)")
