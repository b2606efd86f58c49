"""The latency predictor in the search: candidates predicted over a hardware limit are skipped untrained (PRUNED,
outside the budget), every prediction is checked against the measurement that follows, a large error re-fits the
predictor, and skipping pauses while the recent errors are beyond the margin."""

from __future__ import annotations

import statistics

import optuna
import pytest
from optuna.trial import TrialState

from dsnas.cli import main
from dsnas.screening import MIN_CHECKED, Screen
from dsnas.spec import PredictorSpec, load_study
from tests.table_study import row_of, write_table_study


def stored(study_file):
    spec = load_study(study_file)
    return optuna.load_study(study_name=spec.name, storage=spec.storage).trials


def skipped(trials):
    return [t for t in trials if t.user_attrs.get("pruned_by") == "predictor"]


def test_candidates_predicted_over_the_limit_are_skipped_and_do_not_count(tmp_path, capsys):
    study = write_table_study(tmp_path, n_trials=30, fidelity='kind = "none"', predictor="skip = true\nmargin = 0.2",
                              max_latency_ms=12.0)
    assert main(["search", str(study)]) == 0
    out = capsys.readouterr().out
    trials = stored(study)
    skips = skipped(trials)
    assert skips, out
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 30  # the budget is in evaluated trials
    assert len(trials) == 30 + len(skips)
    for t in skips:
        assert t.state == TrialState.PRUNED and "accuracy" not in t.user_attrs and "latency_ms" not in t.user_attrs
        assert t.user_attrs["predicted.latency_ms"] > 12.0 * 1.2
        assert row_of(t.user_attrs["arch"])["latency_ms"] > 12.0  # a right call: it was over the limit
        assert t.constraints["max_latency_ms"] == pytest.approx(t.user_attrs["predicted.latency_ms"] - 12.0)
    checked = [t for t in trials if "predictor_error.latency_ms" in t.user_attrs]
    assert checked and all(abs(t.user_attrs["predictor_error.latency_ms"]) < 0.2 for t in checked)
    # Which error trusted it: the cross-validated one until three predictions were checked in the search.
    for t in skips:
        before = sum(c.number < t.number for c in checked)
        which = "recent error" if before >= 3 else "cross-validated error (fewer than 3 checks in the search yet)"
        assert f"; the predictor's {which} " in t.user_attrs["pruned_reason"], (before, t.user_attrs["pruned_reason"])
    assert f"skipped untrained ({skips[0].user_attrs['arch_short']}): predicted latency_ms" in out
    assert main(["predictor", str(study)]) == 0
    report = capsys.readouterr().out
    assert f"in the search: {len(skips)} candidate(s) skipped untrained" in report
    assert f"latency_ms: {len(checked)} predictions checked against the measurement that followed" in report


def test_a_params_limit_is_checked_on_the_count_before_any_fit(tmp_path):
    study = write_table_study(tmp_path, n_trials=8, fidelity='kind = "none"', predictor="skip = true")
    study.write_text(study.read_text().replace("[hardware]\nbatch_sizes = [1, 32]",
                                               "[hardware]\nbatch_sizes = [1, 32]\n[hardware.constraints]\n"
                                               "max_params = 20000"))
    assert main(["search", str(study)]) == 0
    trials = stored(study)
    assert skipped(trials)
    for t in trials:
        over = row_of(t.user_attrs["arch"])["params"] > 20000
        assert (t.user_attrs.get("pruned_by") == "predictor") == over
        if over:
            assert t.user_attrs["pruned_reason"].endswith("> 20000 (counted)")


def test_a_space_all_over_the_limits_stops_after_a_hundred_skips(tmp_path, capsys):
    study = write_table_study(tmp_path, n_trials=5, fidelity='kind = "none"', predictor="skip = true")
    study.write_text(study.read_text().replace("[hardware]\nbatch_sizes = [1, 32]",
                                               "[hardware]\nbatch_sizes = [1, 32]\n[hardware.constraints]\n"
                                               "max_params = 10"))
    assert main(["search", str(study)]) == 0
    assert len(skipped(stored(study))) == 100
    assert "stopped: the predictor skipped 100 candidates in a row" in capsys.readouterr().out


DRIFTING = '''
from table_task import TableTask


class DriftingTable(TableTask):
    """The table, on a device that becomes 3x slower after its first drift_after measurements."""

    def __init__(self, table, drift_after):
        super().__init__(table)
        self.drift_after, self.measured = drift_after, 0

    def hardware(self, arch, batch_sizes=None):
        out = super().hardware(arch)
        self.measured += 1
        if self.measured > self.drift_after:
            out = {k: v * 3 if k.startswith("latency_ms") else v / 3 if k == "throughput_tok_s" else v
                   for k, v in out.items()}
        return out
'''


def test_drift_re_fits_the_predictor_and_pauses_skipping(tmp_path, capsys):
    (tmp_path / "drifting.py").write_text(DRIFTING)
    study = write_table_study(tmp_path, n_trials=40, fidelity='kind = "none"', max_latency_ms=12.0,
                              predictor="skip = true\nmargin = 0.2\nrefit_error = 0.3\nrecent = 5",
                              task="drifting:DriftingTable", task_extra="drift_after = 14")
    assert main(["search", str(study)]) == 0
    out = capsys.readouterr().out
    trials = sorted(stored(study), key=lambda t: t.number)
    refits = [t for t in trials if "predictor_refit" in t.user_attrs]
    assert refits, out
    first = refits[0]
    assert first.user_attrs["predictor_error.latency_ms"] == pytest.approx(-2 / 3, abs=0.1)  # 3x slower
    assert "beyond refit_error 30%): the predictor is re-fitted before the next candidate" in out
    # After a few misses in a row it forgets the old device and learns again; then it predicts well once more.
    drifted = [t for t in refits if "it now learns only from trial" in t.user_attrs["predictor_refit"]]
    assert len(drifted) == 1 and drifted[0].number <= first.number + 3
    checked = [t for t in trials if "predictor_error.latency_ms" in t.user_attrs]
    assert all(abs(t.user_attrs["predictor_error.latency_ms"]) < 0.1 for t in checked[-3:]), out
    # Replay the guard: every skip was made while the median of the last held-out errors was within the margin.
    errors: list[float] = []
    for t in trials:
        if t.user_attrs.get("pruned_by") == "predictor" and len(errors) >= MIN_CHECKED:
            assert statistics.median(errors[-5:]) <= 0.2, t.number
        if "predictor_error.latency_ms" in t.user_attrs:
            errors.append(abs(t.user_attrs["predictor_error.latency_ms"]))
    # and skipping came back once it was right again
    assert any(t.number > drifted[0].number for t in skipped(trials)), out


class _Stub:
    predictor = PredictorSpec(margin=0.2, refit_error=0.3, refit_every=4, recent=3)

    class hardware:  # noqa: N801  (a stand-in for HardwareSpec)
        batch_sizes = (1, 32)

        class constraints:  # noqa: N801
            @staticmethod
            def items():
                return [("latency_ms", 10.0)]


def test_observe_flags_a_refit_on_a_large_error_and_every_refit_every_measurements():
    screen = Screen(_Stub, study=None, counts=lambda arch: None)
    screen.stale = False
    attrs, said = screen.observe(1, {"latency_ms": 5.0}, {"latency_ms": 5.5})
    assert attrs == {"predictor_error.latency_ms": pytest.approx(5 / 5.5 - 1)} and not said and not screen.stale
    attrs, said = screen.observe(2, {"latency_ms": 5.0}, {"latency_ms": 10.0})
    assert screen.stale and "-50%" in said and attrs["predictor_refit"] == said
    assert screen.drift_from is None  # one miss is a re-fit, not a drift
    screen.stale, screen.since_fit = False, 0
    for number in range(3, 7):
        screen.observe(number, {}, {"latency_ms": 1.0})
    assert screen.stale  # refit_every = 4 new measurements
    _, said = screen.observe(7, {"latency_ms": 5.0}, {"latency_ms": 12.0})  # two of the last three missed
    assert screen.drift_from == 2 and "it now learns only from trial 2 on" in said
    screen.cv_error["latency"] = 0.01
    assert not screen.trusted("latency_ms")  # after a drift, only held-out checks of the new fit restore trust
    for number in (8, 9, 10):
        screen.observe(number, {"latency_ms": 5.0}, {"latency_ms": 5.1})
    assert screen.trusted("latency_ms")


def test_trust_follows_the_recent_held_out_errors_then_the_cross_validation():
    screen = Screen(_Stub, study=None, counts=lambda arch: None)
    assert not screen.trusted("latency_ms")  # nothing known yet
    screen.cv_error["latency"] = 0.05
    assert screen.trusted("latency_ms")
    for number, error in enumerate((0.5, 0.6, 0.4)):
        screen.errors["latency_ms"].append((number, error))
    assert not screen.trusted("latency_ms") and screen.recent_error("latency_ms") == 0.5
    for number, error in enumerate((0.01, 0.02), start=3):
        screen.errors["latency_ms"].append((number, error))  # recent = 3: the large ones age out
    assert screen.recent_error("latency_ms") == 0.02 and screen.trusted("latency_ms")


def test_the_search_record_checks_each_prediction_once_and_no_repeat():
    """A reused repeat carried its original's prediction and check: `dsnas predictor` printed 225 checks where 18
    candidates had been predicted and then measured."""
    from dsnas.screening import search_record

    study = optuna.create_study(directions=["maximize"])
    checked = {"latency_ms": 10.0, "predicted.latency_ms": 11.0, "predictor_error.latency_ms": 0.1}
    study.add_trial(optuna.trial.create_trial(values=[0.5], user_attrs=checked))
    study.add_trial(optuna.trial.create_trial(values=[0.6], user_attrs={**checked, "latency_ms": 20.0,
                                                                         "predicted.latency_ms": 19.0}))
    for _ in range(5):
        study.add_trial(optuna.trial.create_trial(values=[0.5], user_attrs={**checked, "reused_from": 0}))
    assert "latency_ms: 2 predictions checked" in search_record(study)


@pytest.mark.parametrize("backend", ["int8-static", "torch-dynamic"])
def test_the_predictor_counts_a_candidate_as_its_trial_measures_it(tiny_study, backend):
    """The screen counted every INT8 layer as torch's dynamic kernel: a study pinned to int8-static (or one whose
    "auto" picked it) had its predictions made on bytes 2.5 times fewer than its trials record, the figure the
    predictor was fitted on. Counted with the study's backend, the count is the trial's."""
    from dsnas.screening import arch_counter
    from dsnas.tasks import make_task

    space = tiny_study.parent / "tiny_space.toml"
    space.write_text(space.read_text() + 'precision = ["int8"]\n')
    tiny_study.write_text(tiny_study.read_text().replace("n_trials = 3", "n_trials = 1").replace(
        "[executor]", f'[engine]\nint8_backend = "{backend}"\n[executor]'))
    assert main(["search", str(tiny_study)]) == 0
    spec = load_study(tiny_study)
    (trial,) = [t for t in stored(tiny_study) if t.state == TrialState.COMPLETE]
    counted = arch_counter(make_task(spec.task), spec.hardware.batch_sizes, spec.engine.int8_backend)(
        trial.user_attrs["arch"])
    for bs in spec.hardware.batch_sizes:
        assert counted[f"bytes_bs{bs}"] == trial.user_attrs[f"bytes_bs{bs}"]
        assert counted[f"flops_bs{bs}"] == trial.user_attrs[f"flops_bs{bs}"]
