"""Which trials `dsnas export` picks (rules, the front, the knee, limits), and the bundle it writes: JSON,
safetensors, ONNX and .pt2 files that give the trial's outputs, a metrics file and a model card."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import optuna
import pytest
import torch
from conftest import copy_study
from optuna.trial import TrialState, create_trial

import dsnas
import dsnas.export
from dsnas.cli import main
from dsnas.errors import DsnasError
from dsnas.export import Limits, knee, pick_trials, read_probe, write_model_files
from dsnas.pareto import front_indices
from dsnas.spec import load_study
from dsnas.study import open_study

# (accuracy, throughput, latency_ms, peak_memory_mb, feasible) of a hand-made study whose answers are known.
# Front among the feasible: 0, 2, 1; trial 3 is dominated by 2; trial 4 dominates all but is infeasible.
TRIALS = [(0.90, 100.0, 10.0, 50.0, 1.0), (0.50, 1000.0, 1.0, 10.0, 1.0), (0.80, 800.0, 2.0, 30.0, 1.0),
          (0.30, 200.0, 5.0, 5.0, 1.0), (0.95, 2000.0, 0.5, 1.0, 0.0)]


def make_study(trials=TRIALS, memory=True):
    study = optuna.create_study(directions=["maximize", "maximize"])
    for acc, thr, lat, mem, feasible in trials:
        attrs = {"accuracy": acc, "throughput_tok_s": thr, "latency_ms": lat, "feasible": feasible}
        attrs |= {"peak_memory_mb": mem} if memory else {}
        study.add_trial(create_trial(values=[acc, thr], user_attrs=attrs))
    study.add_trial(create_trial(state=TrialState.FAIL))  # never a candidate
    return study


@pytest.fixture
def spec(tiny_study):
    return load_study(tiny_study)  # objectives: accuracy, throughput, both maximized


def numbers(trials):
    return [t.number for t in trials]


@pytest.mark.parametrize("pick, expected", [
    ("max-accuracy", 0), ("max-throughput", 1), ("knee", 2), ("min-latency", 1), ("min-peak_memory", 3),
    ("max-latency_ms", 0), ("min-peak_memory_mb", 3), ("min-accuracy", 3),
])
def test_pick_rules_on_a_known_study(spec, pick, expected):
    assert numbers(pick_trials(make_study(), spec, pick=pick)) == [expected]


@pytest.mark.parametrize("pick, expected", [("min-val_loss", 2), ("max-val_loss", 1)])
def test_pick_of_a_metric_passes_over_a_nan(spec, pick, expected):
    """An own task may report a NaN beside finite objectives: on the first trial it compared false either way, and
    both max- and min- exported that trial."""
    losses = [float("nan"), 3.0, 1.0, 2.0, 0.5]  # trial 4's is lowest, but it is infeasible
    study = optuna.create_study(directions=["maximize", "maximize"])
    for t, loss in zip(make_study().get_trials(states=(TrialState.COMPLETE,)), losses):
        study.add_trial(create_trial(values=t.values, user_attrs={**t.user_attrs, "val_loss": loss}))
    assert numbers(pick_trials(study, spec, pick=pick)) == [expected]


def test_a_pick_tied_at_the_best_value_takes_the_trial_on_the_front(spec):
    """Trials 0 and 1 are as accurate and 1 is 5x faster: max-accuracy exported trial 0, which 1 dominates."""
    tied = make_study([(0.9, 100.0, 10.0, 5.0, 1.0), (0.9, 500.0, 2.0, 5.0, 1.0), (0.5, 900.0, 1.0, 5.0, 1.0)])
    assert numbers(pick_trials(tied, spec, pick="max-accuracy")) == [1]
    assert numbers(pick_trials(tied, spec, pick="min-peak_memory")) == [1]  # a metric no objective is: the front's best


def test_front_is_every_feasible_non_dominated_trial_best_accuracy_first(spec):
    assert numbers(pick_trials(make_study(), spec, front=True)) == [0, 2, 1]


@pytest.mark.parametrize("limits, pick, expected", [
    (Limits(min_accuracy=0.6), None, [0, 2]),
    (Limits(max_latency_ms=2), "max-accuracy", [2]),
    (Limits(max_memory_mb=20), None, [1]),  # trial 1 dominates trial 3, the other one within the limit
    (Limits(max_memory_mb=20), "min-throughput", [3]),
    (Limits(min_accuracy=0.7, max_latency_ms=5), "knee", [2]),  # a one-trial front is its own knee
])
def test_limits_filter_before_the_rule(spec, limits, pick, expected):
    assert numbers(pick_trials(make_study(), spec, pick=pick, front=pick is None, limits=limits)) == expected


def test_knee_scales_each_objective_over_the_front():
    # (accuracy, latency): A and B are extremes; C is 75% of the way on accuracy and 89% on latency.
    a, b, c = (SimpleNamespace(number=n, values=v) for n, v in enumerate([(0.9, 10.0), (0.5, 1.0), (0.8, 2.0)]))
    assert knee([a, b, c], ["maximize", "minimize"]) is c
    assert knee([a], ["maximize", "minimize"]) is a
    assert knee([a, b], ["maximize", "minimize"]) is a  # a tie goes to the first: the front's best in accuracy
    assert knee([b, a], ["maximize", "minimize"]) is b  # whatever its number


def test_export_says_when_the_knee_is_a_tie(tmp_path, capsys, monkeypatch):
    """Both ends of a front of two are as far from the ideal point: the lower trial number was exported without
    a word (a model 6x slower for 0.0003 more accuracy)."""
    from dsnas.cli import _say_knee_tie

    spec = SimpleNamespace(name="s", directions=["maximize", "maximize"], objectives=[SimpleNamespace(name="accuracy")])
    two = make_study([(0.3105, 96985.0, 1.0, 1.0, 1.0), (0.3102, 614215.0, 0.2, 1.0, 1.0)])
    monkeypatch.setattr("dsnas.export.pick._within", lambda limits, trials, spec: trials)
    _say_knee_tie(two, spec, Limits())
    assert capsys.readouterr().out.strip() == ("the knee is a tie between trials 0, 1: trial 0 is the best in "
                                               "accuracy. Fix: to choose another, --trial N or --pick max-/min-METRIC")
    _say_knee_tie(make_study(), spec, Limits())  # the front of three has one knee: nothing to say
    assert capsys.readouterr().out == ""
    # Copies of one result (retrained to the same figures) are one knee, not a tie.
    _say_knee_tie(make_study([(0.3105, 96985.0, 1.0, 1.0, 1.0)] * 3), spec, Limits())
    assert capsys.readouterr().out == ""
    # Tied in accuracy too (two trials of 0.3839111328125 on a real front of three objectives), trial 0 is not
    # "the best in accuracy".
    three = SimpleNamespace(name="s", directions=["maximize", "maximize", "minimize"],
                            objectives=[SimpleNamespace(name="accuracy")])
    study = optuna.create_study(directions=three.directions)
    for values in [(0.3839, 100.0, 2.0), (0.3839, 200.0, 4.0)]:
        study.add_trial(create_trial(values=list(values), user_attrs={"feasible": 1.0}))
    _say_knee_tie(study, three, Limits())
    assert "trial 0 is the lowest number of those as good in accuracy" in capsys.readouterr().out


def test_trial_by_number_ignores_limits_and_feasibility(spec):
    assert numbers(pick_trials(make_study(), spec, trial=4, limits=Limits(min_accuracy=0.99))) == [4]


@pytest.mark.parametrize("kwargs, message", [
    ({"trial": 5}, "trial 5: no completed trial with that number in study 'tiny'. Fix: pick one of the completed trials (0, 1, 2, 3, 4)"),
    ({"pick": "best"}, "--pick best: must be knee, max-NAME or min-NAME. Fix: e.g. --pick knee"),
    ({"pick": "max-"}, "must be knee, max-NAME or min-NAME"),
    ({"pick": "max-bogus"}, "no feasible completed trial reports 'bogus' in study 'tiny'"),
    ({"pick": "knee", "limits": Limits(min_accuracy=0.99, max_latency_ms=0.1)},
     "--max-latency-ms 0.1 --min-accuracy 0.99: no feasible completed trial of study 'tiny' is within these limits; "
     "the best available: latency_ms 1, accuracy 0.9. Fix: loosen the limits"),
])
def test_pick_errors_say_the_rule_and_the_fix(spec, kwargs, message):
    with pytest.raises(DsnasError) as err:
        pick_trials(make_study(), spec, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_trial_number_not_completed_names_the_nearest_completed_ones_of_a_large_study(spec):
    """Every completed trial was named: a line of 15,000 characters for a study of 2,792."""
    study = make_study([(0.5, 10.0, 1.0, 1.0, 1.0)] * 2000)
    with pytest.raises(DsnasError) as err:
        pick_trials(study, spec, trial=2100)
    assert str(err.value).endswith("Fix: pick one of the completed trials (2000 of them; those nearest 2100: 1990, "
                                   "1991, 1992, 1993, 1994, 1995, 1996, 1997, 1998, 1999)")


def test_a_limit_on_a_metric_the_study_did_not_store_says_so(spec):
    with pytest.raises(DsnasError, match="--max-memory-mb: the trials of study 'tiny' did not store 'peak_memory_mb'"):
        pick_trials(make_study(memory=False), spec, front=True, limits=Limits(max_memory_mb=100))


def test_a_study_without_feasible_trials_says_so(spec):
    with pytest.raises(DsnasError, match=r"study 'tiny' has no feasible completed trial: of its 2 trials, 1 "
                                         r"completed, none within \[hardware.constraints\]. Fix: loosen "):
        pick_trials(make_study([(0.5, 10.0, 1.0, 1.0, 0.0)]), spec, pick="knee")


# ---- bundles of the searched tiny study ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(finished_study, tmp_path_factory):
    """One real export (ONNX and .pt2 included) shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("bundle") / "best"
    assert main(["export", str(finished_study), "--pick", "max-accuracy", "--out", str(out)]) == 0
    return out


def test_bundle_files_and_metadata(bundle, finished_study):
    assert sorted(p.name for p in bundle.iterdir()) == ["README.md", "arch.json", "metrics.json", "model.onnx",
                                                       "model.pt2", "probe.safetensors", "weights.safetensors"]
    arch = json.loads((bundle / "arch.json").read_text())
    assert arch["_type"] == "dsnas.bundle" and arch["_version"] == 2 and arch["arch"]["family"] == "transformer_lm"
    assert arch["task"]["name"] == "charlm" and arch["task"]["params"]["context"] == 16
    assert arch["hardware"] == {"batch_sizes": [1, 4], "threads": None, "warmup_s": 0.01, "measure_s": 0.02,
                                "max_measure_s": 3.0, "ci_tolerance": 0.05, "cuda_graphs": False, "steady_s": 1.0}
    # verify times the bundle with the search's whole protocol; a bundle that recorded two of its keys, with the
    # defaults for the rest.
    from dsnas.export.bundle import recorded_hardware
    from dsnas.spec import HardwareSpec

    study_hw = HardwareSpec(batch_sizes=(1, 4), warmup_s=0.01, measure_s=0.02)
    assert recorded_hardware(arch, bundle / "arch.json") == study_hw
    custom = {**arch["hardware"], "max_measure_s": 9.0, "ci_tolerance": 0.02, "cuda_graphs": True}
    assert recorded_hardware({**arch, "hardware": custom}, bundle / "arch.json") == HardwareSpec(
        batch_sizes=(1, 4), warmup_s=0.01, measure_s=0.02, max_measure_s=9.0, ci_tolerance=0.02, cuda_graphs=True)
    old = {k: arch["hardware"][k] for k in ("batch_sizes", "threads", "warmup_s", "measure_s")}
    assert recorded_hardware({**arch, "hardware": old}, bundle / "arch.json") == study_hw
    assert arch["study"] == "tiny" and arch["dsnas_version"] == dsnas.__version__
    metrics = json.loads((bundle / "metrics.json").read_text())
    assert metrics["objectives"]["accuracy"] == metrics["metrics"]["accuracy"]
    assert metrics["fingerprint"] == metrics["profile"]["fingerprint"] and metrics["fingerprint"]["device"] == "cpu"
    exports = metrics["exports"]
    assert {k: exports[k] for k in ("onnx", "pt2")} == {"onnx": "model.onnx", "pt2": "model.pt2"}
    check = exports["onnx_check"]  # an fp32 model in onnxruntime: its logits to float rounding
    assert check["ok"] and check["max_abs_diff"] <= 1e-3 and check["top1_agreement"] == 1.0
    assert check["rule"] == "max |difference| <= 0.001"  # fp32: to float rounding (int8, fp16: the predictions)
    assert check["onnxruntime_latency_ms_bs4"] > 0 and check["dsnas_latency_ms_bs4"] == metrics["metrics"][
        "latency_ms_bs4"]


def test_model_card_says_what_where_how(bundle):
    card = (bundle / "README.md").read_text()
    arch = json.loads((bundle / "arch.json").read_text())["arch"]
    for text in ("# tiny trial", "`transformer_lm`", "| accuracy |", "objective, maximize", " ms |", "tokens/s",
                 "Feasible: yes", "Device fingerprint:", "Batch sizes [1, 4]", "spread", "model.onnx", "model.pt2",
                 'dsnas.load("best")', "onnxruntime", "runs pickle inside", "never unpickles", str(arch["d_model"])):
        assert text in card, text


def test_the_card_of_an_infeasible_trial_names_the_limit_it_broke(spec):
    """"Feasible: no" beside the limits left the reader to find the figure, where 0.6009 ms over 0.6 reads as within."""
    import dataclasses

    from dsnas.export.card import model_card
    from dsnas.spec import Constraints

    limited = dataclasses.replace(spec, hardware=dataclasses.replace(spec.hardware, constraints=Constraints(
        max_latency_ms=0.6, max_params=80000)))
    frozen = SimpleNamespace(number=0, user_attrs={"arch": {"family": "transformer_lm"}, "arch_short": "d16 L1"})
    metrics = {"metrics": {"latency_ms": 0.600927, "params": 8304.0, "feasible": 0.0}, "profile": {},
               "fingerprint": {}, "exports": {}}
    card = model_card(limited, frozen, metrics, "b0")
    assert "Feasible: no: latency_ms 0.6009 > 0.6 (constraints: latency_ms <= 0.6, params <= 80000)." in card


def test_loaded_model_gives_the_trials_logits(bundle):
    model = dsnas.load(bundle)
    probe = read_probe(bundle)
    with torch.inference_mode():
        logits = model(probe["input"])
    # The same weights on the same input: the trial's own logits, up to summation order on the same machine.
    torch.testing.assert_close(logits, probe["logits"], rtol=0, atol=1e-5)
    assert model.head.weight.data_ptr() == model.tok.weight.data_ptr()  # tied weights stay tied


def test_onnx_gives_torchs_logits_at_any_batch_size(bundle):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    model, probe = dsnas.load(bundle), read_probe(bundle)["input"]
    for batch in (probe[:1], torch.cat([probe, probe, probe[:1]])):  # 1 and 5: the batch dimension is dynamic
        (logits,) = session.run(None, {"input": batch.numpy()})
        with torch.inference_mode():
            torch.testing.assert_close(torch.from_numpy(logits), model(batch), rtol=1e-4, atol=1e-4)


def test_pt2_loads_with_torch_export_and_gives_the_same_logits(bundle):
    program = torch.export.load(bundle / "model.pt2")  # torch's own format: pickle inside, a file we wrote
    probe = read_probe(bundle)
    model = dsnas.load(bundle)
    for batch in (probe["input"][:1], torch.cat([probe["input"], probe["input"][:1]])):  # a dynamic batch dimension
        with torch.inference_mode():
            torch.testing.assert_close(program.module()(batch), model(batch), rtol=1e-5, atol=1e-5)


def test_export_by_trial_number_and_pick_picks_the_best(finished_study, tmp_path, no_model_files):
    spec = load_study(finished_study)
    # Of trials as accurate (512 validation bytes: ties happen), the faster one: on the front
    best = max(open_study(spec, create=False).trials, key=lambda t: (t.user_attrs["accuracy"],
                                                                      t.user_attrs["throughput_tok_s"]))
    assert main(["export", str(finished_study), "--trial", str(best.number), "--out", str(tmp_path / "a")]) == 0
    assert main(["export", str(finished_study), "--pick", "max-accuracy", "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "weights.safetensors").read_bytes() == (tmp_path / "b" / "weights.safetensors").read_bytes()


def test_export_front_writes_one_bundle_per_front_trial(finished_study, tmp_path, no_model_files, capsys):
    study_file = copy_study(finished_study, tmp_path / "copy")  # --front writes exports/ beside the study file
    assert main(["export", str(study_file), "--front"]) == 0
    out = capsys.readouterr().out
    spec = load_study(study_file)
    done = [t for t in open_study(spec, create=False).trials if t.state == TrialState.COMPLETE and t.user_attrs["feasible"]]
    front = sorted(done[i].number for i in front_indices([t.values for t in done], spec.directions))
    exported = sorted(int(p.name.removeprefix("tiny-trial")) for p in (tmp_path / "copy" / "exports").iterdir())
    assert exported == front and out.count("exported trial") == len(front)


def test_export_front_with_out_writes_the_bundles_into_that_folder(finished_study, tmp_path, no_model_files):
    """--out with --front once went unheeded: the bundles went to exports/ beside the study file instead."""
    assert main(["export", str(finished_study), "--front", "--out", str(tmp_path / "front")]) == 0
    names = sorted(p.name for p in (tmp_path / "front").iterdir())
    assert names and all(name.startswith("tiny-trial") for name in names)
    assert not (finished_study.parent / "exports").exists()


def test_a_failed_export_leaves_the_earlier_bundle_there_as_it_was(finished_study, tmp_path, no_model_files, capsys):
    """A bundle is built beside its folder and put in place whole: an export that fails part-way (here, a trial
    whose probe file is gone) once left one trial's weights beside another's architecture."""
    study_file = copy_study(finished_study, tmp_path / "copy")
    spec = load_study(study_file)
    done = sorted(t.number for t in open_study(spec, create=False).trials if t.state == TrialState.COMPLETE)
    out = tmp_path / "bundle"
    assert main(["export", str(study_file), "--trial", str(done[0]), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    broken = next(t for t in open_study(spec, create=False).trials if t.number == done[1])
    probe = tmp_path / "copy" / "tiny_artifacts" / broken.user_attrs["probe_artifact"]
    probe.unlink()
    capsys.readouterr()
    assert main(["export", str(study_file), "--trial", str(done[1]), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"tiny_artifacts: trial {done[1]}'s probe (" in err and "is not there" in err
    assert "Fix: keep the tiny_artifacts folder beside the study file" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing of trial done[1] got in
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "copy"]  # no half-built folder left
    dsnas.load(out)
    # Over it, a whole export replaces every file: none of the earlier trial's is left.
    assert main(["export", str(study_file), "--trial", str(done[2]), "--out", str(out)]) == 0
    assert json.loads((out / "arch.json").read_text())["trial"] == done[2]
    assert f"trial {done[2]}" in (out / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "copy"]


def test_a_stored_weights_file_cut_short_is_named_as_the_studys_not_the_bundles(finished_study, tmp_path, capsys):
    """A weights file truncated in the study's artifacts folder (a copy of the study cut short) was named as the
    bundle's copy, "OUT/weights.safetensors ... Fix: re-export the trial", and a second export met the same file."""
    study_file = copy_study(finished_study, tmp_path / "copy")
    spec = load_study(study_file)
    trial = next(t for t in open_study(spec, create=False).trials if t.state == TrialState.COMPLETE)
    weights = tmp_path / "copy" / "tiny_artifacts" / trial.user_attrs["weights_artifact"]
    weights.write_bytes(weights.read_bytes()[:5000])
    capsys.readouterr()
    out = tmp_path / "bundle"
    assert main(["export", str(study_file), "--trial", str(trial.number), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"dsnas: error: {weights}: trial {trial.number}'s weights, as "
                                                    "the search stored it, is not a readable safetensors file ("), err
    assert "Fix: restore the study's tiny_artifacts folder from a whole copy, or export another trial" in err
    assert not out.exists()


def test_export_into_a_file_or_an_unwritable_place_is_a_one_line_error(finished_study, tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("not a folder")
    assert main(["export", str(finished_study), "--pick", "knee", "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"dsnas: error: {target}: a bundle is a folder, and this is a file. Fix: name a folder with --out"
    assert main(["export", str(finished_study), "--pick", "knee", "--out", str(target / "under")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "the bundle cannot be written there" in err and "Fix: name a folder" in err


def test_export_refuses_a_folder_that_is_not_a_bundle_and_leaves_it_as_it_was(finished_study, tmp_path, capsys,
                                                                                 no_model_files, monkeypatch):
    """`--out mymodels` moved a folder of other files aside and deleted it; `--out .` gave a traceback. Only an
    earlier bundle (or an empty folder) is replaced; the bundle's folder is readable as the umask says, not 0700."""
    mine = tmp_path / "mymodels"
    (mine / "other").mkdir(parents=True)
    (mine / "notes.txt").write_text("precious")
    assert main(["export", str(finished_study), "--pick", "knee", "--out", str(mine)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds files that are not a dsnas bundle's (notes.txt, other)" in err
    assert "Fix: name a new folder, or an earlier bundle, with --out" in err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "other"]
    (tmp_path / "empty").mkdir()
    old = os.umask(0o022)
    try:
        assert main(["export", str(finished_study), "--pick", "knee", "--out", str(tmp_path / "empty")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "empty" / "arch.json").is_file() and (tmp_path / "empty").stat().st_mode & 0o777 == 0o755
    (tmp_path / "empty" / "arch.json").write_text('{"_type": "dsnas.bu')  # damaged: load says to export again
    assert main(["export", str(finished_study), "--pick", "knee", "--out", str(tmp_path / "empty")]) == 0
    monkeypatch.chdir(tmp_path / "empty")  # replacing the bundle that holds the current folder
    assert main(["export", str(finished_study), "--pick", "knee", "--out", "."]) == 2
    assert "holds the current folder, which cannot be replaced. Fix: run it" in capsys.readouterr().err
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")  # an empty current folder: a traceback after all the work
    assert main(["export", str(finished_study), "--pick", "knee", "--out", "."]) == 2
    assert "holds the current folder" in capsys.readouterr().err


def test_load_names_a_bad_device_in_one_line(bundle):
    with pytest.raises(DsnasError, match="device='gpu': must be auto, cpu, cuda or cuda:N"):
        dsnas.load(bundle, device="gpu")
    assert next(dsnas.load(bundle, device="auto").parameters()).device.type == ("cuda" if torch.cuda.is_available()
                                                                               else "cpu")
    # torch's own device objects, as torch's calls take them (refused in one line before, as not a string)
    assert next(dsnas.load(bundle, device=torch.device("cpu")).parameters()).device.type == "cpu"
    with pytest.raises(DsnasError, match=r"device='meta': must be auto, cpu, cuda or cuda:N"):
        dsnas.load(bundle, device=torch.device("meta"))


def test_the_card_says_when_onnxruntime_disagrees_with_the_trial():
    from dsnas.export.card import _files_section

    check = {"ok": False, "top1_agreement": 0.984, "max_abs_diff": 0.015, "rule": "top-1 agreement >= 0.99"}
    text = "\n".join(_files_section({"onnx": "model.onnx", "pt2": "model.pt2", "int8": "4 INT8 layers",
                                      "onnx_check": check}))
    assert "**Its logits disagree with the trial's** (onnxruntime: top-1 agreement 98.4%" in text
    assert "quantized at the calibrated range" in text and "`dsnas.load` rebuilds" in text


def test_the_card_says_when_onnxruntime_could_not_run_the_file_and_offers_no_snippet_that_fails():
    """A bf16 convolution has no onnxruntime CPU kernel: export knew (not checked), but the card listed model.onnx
    as if checked and gave an InferenceSession snippet that fails with NOT_IMPLEMENTED."""
    from dsnas.export.card import _files_section, _loading_section

    why = "onnxruntime cannot run it on the CPU (NOT_IMPLEMENTED: Conv(22)): not checked"
    exports = {"onnx": "model.onnx", "pt2": "model.pt2", "onnx_check": {"ok": None, "why": why}}
    assert f"**Its logits were not checked**: {why}." in "\n".join(_files_section(exports))
    loading = "\n".join(_loading_section("b", exports, compiled=False))
    assert "InferenceSession" not in loading and "a CPU session of it fails" in loading
    missing = {**exports, "onnx_check": {"ok": None, "why": "onnxruntime not installed (pip install onnxruntime)"}}
    assert "InferenceSession" in "\n".join(_loading_section("b", missing, compiled=False))  # it may well run


def test_the_bundle_carries_the_settings_the_study_was_searched_with(finished_study, tmp_path, no_model_files):
    """A study file edited after its search (a batch size, the task's context) once went into the bundle, and
    verify then measured the trial under settings it never ran with."""
    study_file = copy_study(finished_study, tmp_path / "copy")
    study_file.write_text(study_file.read_text().replace("batch_sizes = [1, 4]", "batch_sizes = [1, 8]")
                          .replace("context = 16", "context = 32").replace("measure_s = 0.02", "measure_s = 0.5"))
    out = tmp_path / "bundle"
    assert main(["export", str(study_file), "--pick", "knee", "--out", str(out)]) == 0
    doc = json.loads((out / "arch.json").read_text())
    assert doc["hardware"]["batch_sizes"] == [1, 4] and doc["hardware"]["measure_s"] == 0.02
    assert doc["task"]["params"]["context"] == 16
    assert "Batch sizes [1, 4]" in (out / "README.md").read_text()


def test_export_errors(finished_study, capsys):
    assert main(["export", str(finished_study), "--trial", "99"]) == 2
    assert "no completed trial with that number" in capsys.readouterr().err
    assert main(["export", str(finished_study), "--pick", "best"]) == 2
    assert "must be knee, max-NAME or min-NAME" in capsys.readouterr().err
    assert main(["export", str(finished_study)]) == 2
    assert "exactly one of --trial N, --pick RULE and --front" in capsys.readouterr().err
    assert main(["export", str(finished_study), "--pick", "knee", "--min-accuracy", "0.999"]) == 2
    assert "--min-accuracy 0.999: no feasible completed trial" in capsys.readouterr().err


def test_a_failed_export_format_is_recorded_with_its_reason(finished_study, tmp_path, monkeypatch, capsys):
    def no_export(*args, **kwargs):
        raise RuntimeError("unsupported operator\nsecond line")

    monkeypatch.setattr(torch.export, "export", no_export)
    out = tmp_path / "b"
    assert main(["export", str(finished_study), "--pick", "max-accuracy", "--out", str(out)]) == 0
    exports = json.loads((out / "metrics.json").read_text())["exports"]
    assert exports["pt2"] == "unavailable: torch.export failed (RuntimeError: unsupported operator second line)"
    assert exports["onnx"].startswith("unavailable: the ONNX exporter needs torch.export")
    assert not (out / "model.pt2").exists() and not (out / "model.onnx").exists()
    card = (out / "README.md").read_text()
    assert "- not written: `model.pt2` — unavailable: torch.export failed" in card
    assert "onnxruntime" not in card and "torch.export.load" not in card  # no example for a file that is not there
    said = capsys.readouterr().out  # export says what it wrote, and why not the rest
    assert "  model.pt2: unavailable: torch.export failed (RuntimeError" in said
    assert "  model.onnx: unavailable: the ONNX exporter needs torch.export" in said
    dsnas.load(out)  # the bundle itself is whole


def test_without_onnx_installed_the_pt2_is_still_written(tmp_path, monkeypatch):
    from dsnas.models import build

    monkeypatch.setattr(dsnas.export.formats, "onnx_missing", lambda: ["onnxscript"])
    model = build({"family": "transformer_lm", "d_model": 8, "layers": [{"n_heads": 1, "ffn_ratio": 1}],
                   "vocab_size": 256, "context": 4}).eval()
    status = write_model_files(model, torch.zeros(2, 4, dtype=torch.long), tmp_path)
    assert status == {"pt2": "model.pt2",
                      "onnx": "unavailable: onnxscript not installed. Fix: pip install 'dsnas[onnx]'"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2"]


def test_export_of_a_study_never_searched_says_so_and_writes_nothing(tiny_study, capsys):
    assert main(["export", str(tiny_study), "--pick", "max-accuracy"]) == 2
    assert "no study 'tiny' is stored" in capsys.readouterr().err
    assert sorted(p.name for p in tiny_study.parent.iterdir()) == ["tiny.toml", "tiny_space.toml"]


def test_an_int8_and_2_4_winner_exports_qdq_onnx_that_onnxruntime_agrees_with(tmp_path, capsys):
    """INT8 layers in QDQ form (the form TensorRT and onnxruntime take), 2:4 weights with their zeros in place:
    onnxruntime's predictions on the probe agree with the trial's, and export says what it wrote."""
    import onnx
    from onnx import numpy_helper

    from tests.conftest import TINY_SPACE, TINY_STUDY

    (tmp_path / "space.toml").write_text(TINY_SPACE.replace("n_layers = [1, 2]", "n_layers = [1]") +
                                         'precision = ["int8"]\nsparsity = ["2:4"]\n')
    study = tmp_path / "i8.toml"
    study.write_text(TINY_STUDY.format(space=tmp_path / "space.toml").replace("n_trials = 3", "n_trials = 1"))
    assert main(["search", str(study)]) == 0
    capsys.readouterr()
    assert main(["export", str(study), "--trial", "0", "--out", str(tmp_path / "b")]) == 0
    said = capsys.readouterr().out
    exports = json.loads((tmp_path / "b" / "metrics.json").read_text())["exports"]
    assert exports["onnx"] == "model.onnx" and exports["onnx_check"]["ok"]
    assert exports["onnx_check"]["top1_agreement"] >= 0.99
    assert "int8: 4 INT8 layers as QuantizeLinear/DequantizeLinear" in said and "onnxruntime: agrees" in said
    assert "sparsity: 4 2:4 layers with their zeros in place" in said
    # model.pt2 loads in a fresh process after the import the card names (without it, torch.export.load failed).
    card = (tmp_path / "b" / "README.md").read_text()
    assert "`import torch.ao.quantization.fx._decomposed` before `torch.export.load`" in card
    load = ("import torch, torch.ao.quantization.fx._decomposed, sys, safetensors.torch as st\n"
            "x = st.load_file(sys.argv[1] + '/probe.safetensors')['input']\n"
            "torch.export.load(sys.argv[1] + '/model.pt2').module()(x)")
    run = subprocess.run([sys.executable, "-c", load, str(tmp_path / "b")], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    graph = onnx.load(str(tmp_path / "b" / "model.onnx")).graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) == 4  # one per INT8 layer's input
    weights = [numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8
               and len(t.dims) == 2]
    assert len(weights) == 4
    for w in weights:  # every group of 4 inputs keeps at most 2 weights
        assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()


def test_the_qdq_form_clips_an_input_beyond_the_calibrated_range_as_the_shipped_kernel_does():
    """The exported form quantized with quant_min -128, so an input below -amax acted as -128 steps where QAT and the
    int8 kernels clip at -127: the QDQ model then differed from the shipped one wherever the calibrator clipped."""
    import copy

    from dsnas.export.formats import _qdq_linear
    from dsnas.kernels.convert import convert
    from dsnas.kernels.linear import EngineLinear

    torch.manual_seed(0)
    layer = EngineLinear(64, 16, precision="int8").eval()
    layer.act_amax.fill_(1.0)
    layer.qat = True
    x = torch.zeros(2, 64)
    x[0, 0], x[1, 0] = -5.0, 5.0  # beyond the calibrated range, on each side
    with torch.no_grad():
        trained = layer(x)
        shipped = copy.deepcopy(layer)
        convert(shipped, int8_backend="int8-static")
        exported = _qdq_linear(shipped)(x)
    assert torch.allclose(exported, trained, atol=1e-5), (exported - trained).abs().max()
    assert torch.allclose(exported, shipped(x).float(), atol=1e-3)


def test_the_model_files_of_a_model_without_its_int8_masters_are_one_line_naming_the_fix(tmp_path):
    """dsnas.load frees the fp32 masters the QDQ form is quantized from: write_model_files of a loaded INT8 model was
    an AttributeError on None. It says so, writes nothing, and leaves the model running its measured kernels."""
    from dsnas.kernels.convert import shed_training_form, untrained_inference_form
    from dsnas.models import build

    model = untrained_inference_form(build({"family": "transformer_lm", "d_model": 8, "vocab_size": 256, "context": 4,
                                            "layers": [{"n_heads": 1, "ffn_ratio": 1, "precision": "int8"}]}),
                                     int8_backend="int8-static")
    shed_training_form(model)
    kernel = model.blocks[0].qkv.inference
    with pytest.raises(DsnasError, match=r"INT8 layer 'blocks.0.qkv' holds no fp32 master weight .*\. Fix: load "
                                         r"the model with dsnas.load\(bundle, training_form=True\)"):
        write_model_files(model, torch.zeros(2, 4, dtype=torch.long), tmp_path)
    assert model.blocks[0].qkv.inference is kernel and not list(tmp_path.iterdir())


def test_an_export_takes_the_preprocessing_its_trial_recorded(monkeypatch):
    """Export rebuilt the task to ask for its preprocessing: class names and statistics of the data as it is at
    export time (a class folder added since gave 3 names to a 2-class model), and a charlm export failed once its
    corpus had moved. A trial records it now; an older trial's is asked of the task only where its data is the same."""
    from dsnas.export import bundle

    monkeypatch.setattr("dsnas.tasks.make_task", lambda spec: pytest.fail("the task was built"))
    spec = SimpleNamespace(task=SimpleNamespace(name="images"))
    recorded = {"input": "(N, 1, 8, 8)", "mean": [0.5], "std": [0.2], "classes": ["cat", "dog"]}
    trial = SimpleNamespace(number=3, user_attrs={"profile": {"preprocessing": recorded, "task": {"sha": "a"}}})
    assert bundle._preprocessing(spec, trial) == (recorded, None)
    older = SimpleNamespace(number=4, user_attrs={"profile": {"task": {"corpus_sha256": "a"}}})
    assert bundle._preprocessing(SimpleNamespace(task=SimpleNamespace(name="charlm")), older) == (None, None)

    class Images:
        def fingerprint(self):
            return {"sha": "b"}

        def preprocessing(self):
            return {"classes": ["bird", "cat", "dog"]}
    monkeypatch.setattr("dsnas.tasks.make_task", lambda spec: Images())
    older = SimpleNamespace(number=5, user_attrs={"profile": {"task": {"sha": "a"}}})
    found, why = bundle._preprocessing(spec, older)
    assert found is None and why == ("unknown: trial 5 did not record it (an older dsnas), and the task's data is no "
                                     "longer what it trained on")
    same = SimpleNamespace(number=6, user_attrs={"profile": {"task": {"sha": "b"}}})
    assert bundle._preprocessing(spec, same) == ({"classes": ["bird", "cat", "dog"]}, None)


def test_work_folders_a_killed_export_left_are_removed_by_the_next_and_no_other(tmp_path):
    """An export killed with kill -9 left its hidden work folder (as large as a bundle) beside the bundle for good.
    The next export or route into that place removes those of a process of this host that is gone, and leaves a
    live process's, another host's and an older dsnas's."""
    import socket
    import subprocess
    import sys

    from dsnas.export.bundle import built_beside
    from dsnas.storage import driver_identity

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    me, host = driver_identity(), socket.gethostname()
    out = tmp_path / "quick-start"  # a name with a dash, as a study's default bundle name has
    abandoned = tmp_path / f".quick-start.{host}-{dead_pid}-123-0a1b2c"
    alive = tmp_path / f".quick-start.{host}-{me['pid']}-{me['pid_start']}-3d4e5f"
    elsewhere = tmp_path / f".quick-start.other-host-{dead_pid}-123-6a7b8c"
    older = tmp_path / ".quick-start.9f8e7d6c5b4a"
    other_bundle = tmp_path / f".quick.{host}-{dead_pid}-123-0a1b2c"  # beside another bundle's place: not ours
    for folder in (abandoned, alive, elsewhere, older, other_bundle):
        (folder / "weights.safetensors").parent.mkdir()
        (folder / "weights.safetensors").write_bytes(b"x" * 100)
    with built_beside(out, "bundle") as work:
        (work / "arch.json").write_text("{}")
        assert work.name.startswith(f".quick-start.{host}-{me['pid']}-")
    assert (out / "arch.json").is_file() and not abandoned.exists()
    assert alive.exists() and elsewhere.exists() and older.exists() and other_bundle.exists()


def test_an_earlier_bundle_is_never_lost_to_an_interrupted_swap(tmp_path, monkeypatch):
    """Ctrl-C while the new bundle took the earlier one's place deleted the earlier one with the work folder; kill
    -9 there left it under a hidden name for good. Ctrl-C now puts it back; after kill -9, the next export does."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from dsnas.export.bundle import _remove_abandoned, put_in_place

    out, work = tmp_path / "bundle", tmp_path / ".bundle.work"
    for folder, text in ((out, "earlier"), (work, "new")):
        folder.mkdir()
        (folder / "arch.json").write_text(text)
    rename = Path.rename

    def interrupted(self, target):
        if self == work:
            raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        put_in_place(work, out)
    monkeypatch.undo()
    assert (out / "arch.json").read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".bundle.work", "bundle"]  # nothing aside left behind
    # Killed between moving the earlier bundle aside and moving the new one in: the next run puts it back.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    aside = tmp_path / f".bundle.old.{socket.gethostname()}-{int(gone.stdout)}-123-0a1b2c"
    out.rename(aside)
    _remove_abandoned(out)
    assert (out / "arch.json").read_text() == "earlier" and not aside.exists()


def test_a_limit_beside_a_named_trial_and_a_study_file_given_as_a_bundle_are_one_line(finished_study, capsys):
    """`export --trial 0 --max-latency-ms 0.0001` exported trial 0 with its limit unread and nothing said; `verify
    STUDY.toml` said "no such bundle folder" of a file that is there."""
    assert main(["export", str(finished_study), "--trial", "0", "--max-latency-ms", "0.0001"]) == 2
    assert capsys.readouterr().err.strip() == (
        "dsnas: error: --max-latency-ms limits which trials --pick and --front choose from; --trial 0 names one. "
        "Fix: leave out --max-latency-ms, or use --pick or --front with it")
    afile = finished_study.parent / "afile"
    afile.write_text("", encoding="utf-8")
    assert main(["export", str(finished_study), "--front", "--out", str(afile)]) == 2  # before any bundle is built
    assert capsys.readouterr().err.strip() == (f"dsnas: error: --out {afile}: with --front, names the folder the "
                                               "bundles go into, and this is a file. Fix: name a folder with --out")
    assert main(["verify", str(finished_study)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"dsnas: error: {finished_study}: a file, not a bundle folder. Fix: give the folder `dsnas export` wrote "
        f"(`dsnas export {finished_study} --pick knee` writes one)")


def test_python_m_dsnas_is_the_dsnas_command():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "dsnas", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith(dsnas.__version__), done
