"""Multi-fidelity in real searches: trials report at rungs, the driver stops the dominated ones as PRUNED (never
COMPLETE with a partial accuracy), candidates over a hardware limit stop before training; with the local and the
Ray executor, on a table of results and on the real charlm task."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from dsnas.cli import main
from dsnas.fidelity import RungJudge, decide
from dsnas.spec import load_study
from tests.table_study import row_of, write_table_study


def stored(study_file):
    spec = load_study(study_file)
    return spec, optuna.load_study(study_name=spec.name, storage=spec.storage).trials


def replay_decisions(spec, trials):
    """Every stored rung decision, made again from the rung values the driver had seen when it made it."""
    records = sorted(((t.user_attrs[k]["at"], t, int(k[4:])) for t in trials for k in t.user_attrs
                      if k.startswith("rung") and k[4:].isdigit() and int(k[4:]) > 0), key=lambda r: r[0])
    seen: dict[tuple[int, int], dict[int, list[float]]] = {}
    margins = RungJudge(spec).margins
    for _, trial, rung in records:
        record = trial.user_attrs[f"rung{rung}"]
        peers = seen.setdefault((trial.user_attrs.get("bracket", 0), rung), {})
        again = decide(trial.number, record["values"], dict(peers), spec.directions, spec.fidelity.eta,
                       spec.fidelity.min_trials, margins)
        assert (again.go, again.reason) == (record["go"], record["reason"]), trial.number
        peers[trial.number] = record["values"]
    return len(records)


def check_pruned_and_complete(spec, trials, n_trials):
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(pruned) + len(done) == n_trials == len(trials)
    assert pruned and done
    for t in pruned:
        assert t.values is None and "accuracy" not in t.user_attrs  # no partial accuracy recorded as the result
        assert t.user_attrs["pruned_by"] == "rung"
        last = t.user_attrs[f"rung{t.user_attrs['pruned_at']}"]
        assert not last["go"] and last["reason"] == t.user_attrs["pruned_reason"]
        assert t.user_attrs["latency_ms"] == row_of(t.user_attrs["arch"])["latency_ms"]  # measured: kept
    for t in done:
        row = row_of(t.user_attrs["arch"])
        assert t.values == [row["accuracy"], row["throughput_tok_s"]] and t.user_attrs["accuracy"] == row["accuracy"]
        rungs = [k for k in t.user_attrs if k.startswith("rung") and k[4:].isdigit()]
        assert all(t.user_attrs[k]["go"] for k in rungs)
        for k in rungs:
            if k != "rung0":  # what the trial had at the rung: the table's accuracy at that share
                assert t.user_attrs[f"{k}.accuracy"] < row["accuracy"]
    return pruned, done


def test_halving_prunes_dominated_trials_at_rungs_locally(tmp_path, capsys):
    study = write_table_study(tmp_path, n_trials=24,
                              fidelity='kind = "successive_halving"\neta = 3\nmin_fraction = 0.1\nmin_trials = 3')
    assert main(["search", str(study)]) == 0
    out = capsys.readouterr().out
    spec, trials = stored(study)
    pruned, done = check_pruned_and_complete(spec, trials, 24)
    assert replay_decisions(spec, trials) > len(pruned)
    assert all(t.user_attrs["pruned_at"] >= 1 for t in pruned)  # no limits in this study: nothing stops at rung 0
    assert "rungs at 11%, 33% of the training budget" in out and f"({len(pruned)} pruned)" in out
    assert "pruned at rung 1 (11% of the budget): dominated" in out or "pruned at rung 2 (33% of the budget): " \
        "dominated" in out


def test_a_candidate_over_a_hardware_limit_stops_before_training(tmp_path, capsys):
    study = write_table_study(tmp_path, n_trials=16, max_latency_ms=15.0)
    assert main(["search", str(study)]) == 0
    spec, trials = stored(study)
    over = [t for t in trials if row_of(t.user_attrs["arch"])["latency_ms"] > 15.0]
    assert over
    for t in over:
        assert t.state == TrialState.PRUNED and t.user_attrs["pruned_at"] == 0
        assert "over the hardware limits before training (latency_ms" in t.user_attrs["pruned_reason"]
        assert "rung1" not in t.user_attrs and t.user_attrs["trained_fraction"] == 0.0
        assert t.constraints["max_latency_ms"] > 0  # stored, so the sampler learns where the limit is
    assert "pruned before training: over the hardware limits" in capsys.readouterr().out


def test_without_pruning_every_candidate_trains_and_an_infeasible_one_completes(tmp_path):
    study = write_table_study(tmp_path, n_trials=10, fidelity='kind = "none"', max_latency_ms=15.0)
    assert main(["search", str(study)]) == 0
    _, trials = stored(study)
    assert {t.state for t in trials} == {TrialState.COMPLETE}
    assert not any(k.startswith("rung") for t in trials for k in t.user_attrs)
    assert any(t.user_attrs["feasible"] == 0.0 for t in trials)


def test_hyperband_spreads_trials_over_brackets_and_its_last_bracket_is_never_stopped_at_a_rung(tmp_path):
    study = write_table_study(tmp_path, n_trials=34,
                              fidelity='kind = "hyperband"\neta = 3\nmin_fraction = 0.1\nmin_trials = 2')
    assert main(["search", str(study)]) == 0
    spec, trials = stored(study)
    brackets = {t.number: t.user_attrs["bracket"] for t in trials}
    assert sorted(set(brackets.values())) == [0, 1, 2]
    for t in trials:
        rungs = sorted(int(k[4:]) for k in t.user_attrs if k.startswith("rung") and k[4:].isdigit())
        assert rungs[-1] <= {0: 2, 1: 1, 2: 0}[t.user_attrs["bracket"]]
        if t.user_attrs["bracket"] == 1 and len(rungs) > 1:  # its one rung is at 1/3 of the budget
            assert t.user_attrs["rung1"]["fraction"] == pytest.approx(1 / 3)
    assert all(t.state == TrialState.COMPLETE for t in trials if t.user_attrs["bracket"] == 2)
    replay_decisions(spec, trials)


def test_a_resumed_search_counts_pruned_trials_toward_the_budget(tmp_path, capsys):
    study = write_table_study(tmp_path, n_trials=12)
    assert main(["search", str(study)]) == 0
    _, first = stored(study)
    pruned = sum(t.state == TrialState.PRUNED for t in first)
    assert pruned
    assert main(["search", str(study), "--n-trials", "16"]) == 0
    out = capsys.readouterr().out
    _, second = stored(study)
    assert len(second) == 16 and f"resuming: {12 - pruned} completed and {pruned} pruned trials" in out


@pytest.mark.slow
def test_halving_with_the_ray_executor_decides_in_the_driver(tmp_path):
    study = write_table_study(tmp_path, n_trials=16, executor="ray", max_latency_ms=30.0,
                              fidelity='kind = "successive_halving"\neta = 3\nmin_trials = 2')
    assert main(["search", str(study)]) == 0
    spec, trials = stored(study)
    pruned, done = check_pruned_and_complete(spec, trials, 16)
    replay_decisions(spec, trials)
    workers = {t.user_attrs["profile"]["worker"]["pid"] for t in trials}
    assert len(workers) >= 1 and all("ray_node_id" in t.user_attrs["profile"]["worker"] for t in trials)


@pytest.mark.slow
def test_real_training_stops_at_a_rung_and_keeps_its_measurement(tiny_study):
    """The charlm task trains rung by rung in its Ray worker: measured first (the untrained inference form), then
    stopped or trained on; a completed trial's rungs are its own training's accuracy on the way."""
    from dsnas.study import open_study
    from dsnas.tables import measurements

    tiny_study.write_text(tiny_study.read_text().replace("n_trials = 3", "n_trials = 6")
                          .replace("train_tokens = 2048", "train_tokens = 8192").replace('kind = "local"', 'kind = "ray"')
                          .replace('kind = "none"', 'kind = "successive_halving"\neta = 2\nmin_fraction = 0.25\n'
                                                   'min_trials = 2'))
    assert main(["search", str(tiny_study)]) == 0
    spec, trials = stored(tiny_study)
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED} and len(trials) == 6
    for t in trials:
        assert t.user_attrs["profile"]["measured_on"].startswith("the untrained inference form")
        assert t.user_attrs["latency_ms"] > 0 and t.user_attrs["measure_s"] > 0
        assert t.user_attrs["rung1"]["fraction"] == 0.25 and 0 < t.user_attrs["rung1.accuracy"] < 1
        if t.state == TrialState.COMPLETE:
            assert t.user_attrs["rung2"]["fraction"] == 0.5 and t.user_attrs["accuracy"] == t.values[0]
        else:
            assert "accuracy" not in t.user_attrs and t.user_attrs["trained_fraction"] in (0.25, 0.5)
    stored_rows = measurements(open_study(spec, create=False))
    assert set(stored_rows["trial_number"]) == {t.number for t in trials}  # pruned ones' measurements too
    replay_decisions(spec, trials)
