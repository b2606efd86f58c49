"""Optuna-style callbacks (study, frozen_trial), from the study file and from the Python API: called in the driver
after each finished trial is stored, with the trial as stored; one that raises is reported and the search goes on."""

from __future__ import annotations

import json

import optuna
from optuna.trial import TrialState

from dsnas.cli import main
from dsnas.spec import load_study

CALLBACKS = '''
import json
from pathlib import Path

LOG = Path(__file__).with_name("callback.jsonl")


def record(study, trial):
    with LOG.open("a") as f:
        f.write(json.dumps({"study": study.study_name, "number": trial.number, "state": trial.state.name,
                            "values": trial.values, "arch": trial.user_attrs.get("arch_short")}) + "\\n")


def broken(study, trial):
    raise RuntimeError("the tracking server is down")
'''


def test_study_file_callbacks_see_every_stored_trial_and_one_that_raises_stops_nothing(tiny_study, capsys):
    (tiny_study.parent / "cbs.py").write_text(CALLBACKS)
    tiny_study.write_text(tiny_study.read_text().replace("[study]\n", '[study]\ncallbacks = ["cbs:record", '
                                                                      '"cbs:broken"]\n'))
    assert main(["search", str(tiny_study)]) == 0
    out = capsys.readouterr().out
    spec = load_study(tiny_study)
    trials = optuna.load_study(study_name=spec.name, storage=spec.storage).get_trials()
    seen = [json.loads(line) for line in (tiny_study.parent / "callback.jsonl").read_text().splitlines()]
    assert [s["number"] for s in seen] == sorted(t.number for t in trials)  # each trial once, as it finished
    for s in seen:
        stored = trials[s["number"]]
        assert (s["study"], s["state"], s["values"], s["arch"]) == \
            ("tiny", stored.state.name, stored.values, stored.user_attrs["arch_short"])
    assert all(t.state == TrialState.COMPLETE for t in trials) and len(trials) == 3
    assert out.count("callback broken raised RuntimeError: the tracking server is down") == 3
    assert "the search goes on" in out


def test_python_api_callbacks_run_after_the_study_files(tiny_study):
    import dsnas

    calls = []
    outcome = dsnas.search(str(tiny_study), callbacks=[lambda study, trial: calls.append((trial.number,
                                                                                           trial.values))],
                           n_trials=2)
    assert [n for n, _ in calls] == [t.number for t in outcome.study.get_trials()]
    assert [v for _, v in calls] == [t.values for t in outcome.study.get_trials()]


def test_a_callback_that_is_not_there_is_a_one_line_error_before_any_trial(tiny_study, capsys):
    tiny_study.write_text(tiny_study.read_text().replace("[study]\n", '[study]\ncallbacks = ["nowhere:log"]\n'))
    assert main(["search", str(tiny_study)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "[study.callbacks] must name an importable callable (ModuleNotFoundError" in err[0]
    tiny_study.write_text(tiny_study.read_text().replace('callbacks = ["nowhere:log"]', 'callbacks = "cbs"'))
    assert main(["search", str(tiny_study)]) == 2
    assert "[study.callbacks]" in capsys.readouterr().err
    assert not (tiny_study.parent / "tiny.db").exists() or not optuna.load_study(
        study_name="tiny", storage=f"sqlite:///{tiny_study.parent / 'tiny.db'}").trials


def test_optuna_integrations_mlflow_callback_logs_every_trial_read_back_from_mlflow(tiny_study):
    """The tool users log to, unchanged: optuna-integration's MLflowCallback in [study] callbacks, an MLflow store in
    a local SQLite file, and each trial's objectives and parameters read back from it."""
    import mlflow

    store = f"sqlite:///{tiny_study.parent / 'mlflow.db'}"
    (tiny_study.parent / "tracking.py").write_text(
        "from optuna_integration.mlflow import MLflowCallback\n"
        f"log = MLflowCallback(tracking_uri={store!r}, metric_name=['accuracy', 'throughput'])\n")
    tiny_study.write_text(tiny_study.read_text().replace("[study]\n", '[study]\ncallbacks = ["tracking:log"]\n'))
    assert main(["search", str(tiny_study)]) == 0
    spec = load_study(tiny_study)
    trials = optuna.load_study(study_name=spec.name, storage=spec.storage).get_trials(states=(TrialState.COMPLETE,))
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(experiment_names=[spec.name]).sort_values("metrics.accuracy")
    assert len(runs) == len(trials) == 3
    logged = sorted(zip(runs["metrics.accuracy"], runs["metrics.throughput"]))
    assert logged == sorted((t.values[0], t.values[1]) for t in trials)
    param = next(c for c in runs.columns if c.startswith("params.layer0."))
    assert sorted(runs[param]) == sorted(str(t.params[param.removeprefix("params.")]) for t in trials)


def test_python_api_arguments_are_checked_before_the_study_is_opened(tiny_study):
    """A string or a class for a sampler failed inside Optuna and left the asked trials RUNNING (the next run
    waited a minute for them); callbacks=None was a TypeError, callbacks=[1] warned at every trial."""
    import pytest

    import dsnas
    from dsnas.errors import DsnasError

    for sampler, message in (("tpe", "sampler='tpe': must be an Optuna sampler object"),
                             (optuna.samplers.TPESampler, "must be an Optuna sampler object")):
        with pytest.raises(DsnasError, match=message):
            dsnas.search(str(tiny_study), sampler=sampler)
    for callbacks, message in ((None, "callbacks=None: must be a list of callables"),
                               ([1], "callbacks: 1 is not callable")):
        with pytest.raises(DsnasError, match=message):
            dsnas.search(str(tiny_study), callbacks=callbacks)
    assert not (tiny_study.parent / "tiny.db").exists()  # refused before the study was opened


def test_a_sampler_that_runs_out_of_candidates_ends_the_search(tmp_path):
    """GridSampler calls study.stop() from after_trial once its grid is done: inside the driver's tell that raised
    'Study.stop is supposed to be invoked inside an objective function or a callback', and closing then failed a
    finished trial (UpdateFinishedTrialError), the caller got a traceback."""
    import dsnas
    from tests.conftest import TINY_STUDY

    (tmp_path / "space.toml").write_text('family = "transformer_lm"\n[choices]\nn_layers = 1\nd_model = [8, 16]\n'
                                         '[per_layer]\nn_heads = 1\nffn_ratio = 1\n')
    study = tmp_path / "grid.toml"
    study.write_text(TINY_STUDY.format(space=tmp_path / "space.toml").replace("n_trials = 3", "n_trials = 5"))
    grid = optuna.samplers.GridSampler({"d_model": [8, 16]}, seed=0)
    outcome = dsnas.search(str(study), sampler=grid)
    assert "called study.stop()" in outcome.stopped_because
    assert sorted(t.params["d_model"] for t in outcome.study.trials) == [8, 16]
    assert all(t.state == TrialState.COMPLETE for t in outcome.study.trials)
