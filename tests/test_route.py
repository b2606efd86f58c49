"""Routing over the front: thresholds of least cost within the accuracy bound, the cost a cascade pays, serving only
the escalated rows on, and a route bundle from a searched study served by dsnas.load_route."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from torch import nn

import dsnas
from dsnas.cli import main
from dsnas.errors import DsnasError
from dsnas.route import (
    Z95,
    CostCurve,
    Route,
    cascade_assign,
    cascade_cost,
    check_members,
    choose_thresholds,
    lost,
    scores,
)
from tests.conftest import TINY_STUDY, copy_study


@pytest.fixture(scope="module")
def routable(tmp_path_factory: pytest.TempPathFactory):
    """A study of two models that differ in cost and accuracy alike (d8 and d192, two layers each, 32k training
    tokens: 0.34 and 0.40 on the calibration half at 7x the cost here, far beyond a noisy host's timing spread),
    so that routing has something to trade; ~10 s."""
    root = tmp_path_factory.mktemp("routable")
    (root / "space.toml").write_text('family = "transformer_lm"\n[choices]\nn_layers = 2\nd_model = [8, 192]\n'
                                     '[per_layer]\nn_heads = 2\nffn_ratio = 2\n')
    study = root / "tiny.toml"
    study.write_text(TINY_STUDY.format(space=root / "space.toml").replace("n_trials = 3", "n_trials = 2")
                     .replace("train_tokens = 2048", "train_tokens = 32768").replace('name = "tpe"', 'name = "dsnas"'))
    assert main(["search", str(study)]) == 0
    return study


def test_scores_of_a_sequence_model_are_means_over_the_sequence():
    logits = torch.tensor([[[9.0, 0.0], [0.0, 9.0]], [[9.0, 0.0], [9.0, 0.0]]])  # (2 inputs, 2 steps, 2 classes)
    right, conf = scores(logits, torch.tensor([[0, 1], [0, 1]]))
    assert right.tolist() == [1.0, 0.5]
    top = torch.softmax(torch.tensor([9.0, 0.0]), 0).max().item()
    assert conf == pytest.approx(torch.tensor([top, top]))


def test_the_loss_bound_is_the_smoothed_binomial_one():
    n = 180
    right = torch.ones(2, n)
    served = torch.zeros(n, dtype=torch.long)  # all served by the cheap stage, which made no mistake here
    rate = 1 / (n + 2)
    assert lost(served, right) == pytest.approx(Z95 * math.sqrt(n * rate * (1 - rate)) / n)  # 0.91 %, not 0
    assert lost(torch.ones(n, dtype=torch.long), right) == 0.0  # all to the last stage loses nothing
    right[0, :9] = 0  # 9 of the cheap stage's answers are wrong where the last is right ...
    right[1, 9:12] = 0  # ... and 3 right where the last is wrong: a net loss of 6
    diff = torch.tensor([1.0] * 9 + [-1.0] * 3 + [0.0] * (n - 12))
    rate = 7 / (n + 2)
    spread = max(diff.var(correction=0).item(), rate * (1 - rate))
    assert lost(served, right) == pytest.approx((6 + Z95 * math.sqrt(n * spread)) / n)


def test_the_lower_bound_of_the_loss_is_below_the_point_loss_and_the_upper_one():
    from dsnas.route import lost_at_least

    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        n = 400
        right = (torch.rand(3, n, generator=gen) > torch.tensor([[0.4], [0.3], [0.2]])).float()
        served = torch.randint(0, 3, (n,), generator=gen)
        point = (right[-1].mean() - right.gather(0, served[None])[0].mean()).item()
        assert lost_at_least(served, right) <= point + 1e-9 <= lost(served, right) + 2e-9
    assert lost_at_least(torch.full((n,), 2), right) == 0.0  # all to the last stage loses nothing


def test_the_bundle_serves_the_cheaper_route_that_held_its_target_on_the_report_half():
    """A learned router whose tau was chosen on the inputs it was fitted to lost 5 points where 0.5 were allowed,
    and the bundle served it, being cheaper, without a word: a route the report half shows to lose more than its
    target is not served, and the route says so."""
    from dsnas.route import RouteReport, _served

    n = 1000
    right = torch.ones(2, n)
    right[0, :100] = 0  # the cheap model is wrong on 10% where the most accurate is right
    cheap_everywhere = torch.zeros(n, dtype=torch.long)  # loses 10 points
    careful = torch.ones(n, dtype=torch.long)
    careful[500:] = 0  # the cheap model only where it is right: loses nothing
    report = RouteReport(unit="ms")
    report.add("cascade", 1.0, 3.0, [0.5, 0.5])
    report.add("learned router", 0.9, 1.0, [1.0, 0.0])
    serve, notes = _served(report, {"cascade": careful, "learned router": cheap_everywhere}, right, 0.005)
    assert serve == "cascade" and len(notes) == 1 and notes[0].startswith("the learned router lost at least 0.0")
    serve, _ = _served(report, {"cascade": careful, "learned router": careful}, right, 0.005)
    assert serve == "learned router"  # both hold: the cheaper
    assert _served(report, {"cascade": cheap_everywhere, "learned router": cheap_everywhere}, right, 0.005)[0] is None
    # A learned router that found no tau runs its first model and sends every input on: it loses nothing, and was
    # served though it cost more than the most accurate model alone.
    report.add("learned router", 1.0, 1.2, [0.0, 1.0])
    serve, notes = _served(report, {"cascade": cheap_everywhere, "learned router": careful}, right, 0.005, alone=1.0)
    assert serve is None and notes[0].startswith("the learned router costs 1.2 ms per input, no less than the "
                                                 "most accurate model alone (1 ms): not served")


def test_thresholds_send_sure_inputs_to_the_cheap_model_at_the_least_cost():
    gen = torch.Generator().manual_seed(0)
    n = 4000
    conf0 = torch.rand(n, generator=gen)
    right0 = (conf0 > 0.3).float()  # the cheap model is right exactly where it is confident
    right = torch.stack([right0, torch.ones(n)])
    conf = torch.stack([conf0, torch.ones(n)])
    curves = [CostCurve(((1, 1.0), (32, 32.0)), 32), CostCurve(((1, 4.0), (32, 128.0)), 32)]  # 1 and 4 per row
    thresholds, cost = choose_thresholds(conf, right, curves, drop=0.01)
    served = cascade_assign(conf, thresholds)
    share0 = (served == 0).float().mean().item()
    grid = torch.quantile(conf0, torch.linspace(0, 1, 21)).tolist()
    below = max(q for q in grid if q < thresholds[0])  # the next cheaper threshold would lose too much
    assert thresholds[0] in grid and lost(served, right) <= 0.01 < lost(cascade_assign(conf, [below]), right)
    assert 0.25 < thresholds[0] < 0.35  # about where the cheap model starts being right
    assert cost == pytest.approx(1.0 + (1 - share0) * 4.0)  # every input pays the first, escalated ones both
    assert cascade_cost(served, thresholds, curves) == pytest.approx(cost)
    everything_on = torch.ones(n, dtype=torch.long)
    assert cascade_cost(everything_on, [math.inf], curves) == pytest.approx(4.0)  # a skipped stage is not paid


def test_rows_that_reach_a_stage_in_small_batches_cost_more_per_row():
    curve = CostCurve(((1, 0.5), (32, 1.0)), 32)  # ms per call: mostly fixed cost
    assert curve.per_input(1.0) == pytest.approx(1.0 / 32)
    call = 0.5 + (3.2 - 1) * 0.5 / 31  # 10% of 32 rows: a call of 3.2 rows
    assert curve.per_input(0.1) == pytest.approx(call / 32)  # five times 10% of the full-batch cost
    assert curve.per_input(0.01) == pytest.approx(0.5 * 0.32 / 32)  # a third of the batches run one row


class Scripted(nn.Module):
    """Logits fixed per input id (the input's first column), and a count of the rows it saw."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table, self.rows = table, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        return self.table[x[:, 0].long()]


def test_a_route_runs_only_the_escalated_rows_on_and_returns_the_serving_models_logits():
    sure, unsure = torch.tensor([8.0, 0.0]), torch.tensor([0.1, 0.0])
    cheap = Scripted(torch.stack([sure, unsure, sure, unsure]))
    big = Scripted(torch.tensor([[0.0, 5.0]] * 4))
    route = Route([cheap, big], "cascade", [0.9])
    out = route(torch.arange(4)[:, None])
    assert cheap.rows == 4 and big.rows == 2  # only the two unsure rows went on
    assert route.last_served.tolist() == [0, 1, 0, 1]
    assert torch.equal(out[0], sure) and torch.equal(out[1], torch.tensor([0.0, 5.0]))
    skipping = Route([cheap, big], "cascade", [math.inf])
    skipping(torch.arange(4)[:, None])
    assert cheap.rows == 4 and big.rows == 6  # a skipped stage is not run


def test_members_of_different_tasks_are_refused(tmp_path):
    doc = {"trial": 1, "task": {"name": "charlm", "params": {"context": 16}}, "arch": {"vocab_size": 256}}
    with pytest.raises(DsnasError, match="trial 2 was trained on another task or task parameters than trial 1"):
        check_members(tmp_path, [doc, {**doc, "trial": 2, "task": {"name": "charlm", "params": {"context": 32}}}])
    with pytest.raises(DsnasError, match="trial 2 has vocab_size 128 and trial 1 256"):
        check_members(tmp_path, [doc, {**doc, "trial": 2, "arch": {"vocab_size": 128}}])


def test_a_searched_study_routes_and_the_bundle_serves(routable, tmp_path, capsys, no_model_files, monkeypatch):
    study = copy_study(routable, tmp_path / "s")
    out = study.parent / "routes" / "tiny"  # the default folder, where the report finds it
    assert main(["route", str(study), "--max-accuracy-drop", "0.01"]) == 0
    said = capsys.readouterr().out
    assert "cascade" in said and "learned router" in said and f"route bundle: {out}" in said
    text = (out / "route.json").read_text()
    assert f"serves: the {'cascade' if json.loads(text)['serve'] == 'cascade' else 'learned router'}" in said
    assert "Infinity" not in text and "NaN" not in text  # standard JSON: an infinite threshold is "inf"
    doc = json.loads(text)
    costs = [m["cost_per_input"] for m in doc["members"]]
    assert costs == sorted(costs) and len(doc["members"]) == 2 and doc["left_out"] == []
    for m in doc["members"]:  # a member's cost is its measured latency per input at the largest batch size
        metrics = json.loads((out / m["bundle"] / "metrics.json").read_text())["metrics"]
        assert m["cost_per_input"] == pytest.approx(metrics["latency_ms_bs4"] / 4)
    route = dsnas.load_route(str(out))
    from dsnas.export.bundle import read_bundle, recorded_task_spec
    from dsnas.tasks import make_task

    x, _ = make_task(recorded_task_spec(read_bundle(out / doc["members"][0]["bundle"]))).eval_inputs()
    logits = route(x)
    for s, model in enumerate(route.models):  # each row holds the logits of the model that served it
        rows = (route.last_served == s).nonzero().flatten()
        if len(rows):
            with torch.inference_mode():
                assert torch.allclose(logits[rows], model(x[rows]).float(), atol=1e-5)
    capsys.readouterr()
    # Verified here: each member's probe, the route's accuracy on the report half as recorded (the same models and
    # thresholds on the same inputs: exactly), and its time per input (a tiny model: a wide tolerance).
    assert main(["verify", str(out), "--latency-tol", "3"]) == 0
    said = capsys.readouterr().out
    kind = "cascade" if doc["serve"] == "cascade" else "learned router"
    assert said.count(" probe ") == 2 and re.search(rf"{kind} accuracy .* \+0\.0000 +ok", said), said
    # Timed here, where it was timed (or, on a busy machine, said to be disturbed).
    assert re.search(rf"{kind} ms/input .* (ok \(tol x4\)|disturbed (now|when the route was made))", said), said
    assert re.search(r"task data .* same", said), said
    # Timed while others took the CPUs (two busy processes read 7x the time, and failed it without a word): timed
    # again, at most 3 times, then shown and not compared.
    from dsnas.profiler import disturbance

    class Busy(disturbance.MachineWindow):
        def __exit__(self, *exc):
            super().__exit__(*exc)
            self.share = disturbance.Share(0.6, 0.0)

    with monkeypatch.context() as patched:
        patched.setattr("dsnas.route.MachineWindow", Busy)
        assert main(["verify", str(out), "--latency-tol", "3"]) == 0
    said = capsys.readouterr().out
    assert re.search(rf"{kind} ms/input .* disturbed now \(others took 60% of the CPUs\): not compared", said), said
    # A member measured on a GPU (a GPU study's front, routed on the CPU): its probe's tolerance is another
    # device's, as `dsnas verify` of the member gives it; and data other than the members trained on is no verdict.
    member = out / doc["members"][0]["bundle"]
    metrics = json.loads((member / "metrics.json").read_text())
    from safetensors.torch import load_file, save_file

    probe = load_file(member / "probe.safetensors")
    save_file({**probe, "logits": probe["logits"] + 2e-4}, member / "probe.safetensors")
    metrics["fingerprint"]["device"] = "cuda"
    (member / "metrics.json").write_text(json.dumps(metrics))
    last = out / doc["members"][-1]["bundle"] / "metrics.json"
    metrics = json.loads(last.read_text())
    metrics["profile"]["task"]["corpus_sha256"] = "0" * 64
    last.write_text(json.dumps(metrics))
    assert main(["verify", str(out), "--latency-tol", "3"]) == 0
    said = capsys.readouterr().out
    assert re.search(rf"trial {doc['members'][0]['trial']} probe .* ok \(atol 0.001\)", said), said
    assert re.search(rf"{kind} accuracy .* other data: not compared", said), said
    assert re.search(r"task data .* differs \(corpus_sha256\)", said), said
    save_file(probe, member / "probe.safetensors")
    # Another machine serves at another speed: its time is shown, not compared (it failed on any other machine).
    doc["timed_on"]["cpu"] = "Another CPU"
    (out / "route.json").write_text(json.dumps(doc))
    assert main(["verify", str(out)]) == 0
    assert re.search(rf"{kind} ms/input .* other device \(cpu differ\): not compared", capsys.readouterr().out)
    assert main(["verify", str(out), "--device", "cuda"]) == 2  # it was verified on the CPU without a word
    assert "a route is verified on the CPU, where `dsnas route` timed it" in capsys.readouterr().err
    # A run that writes no route leaves the route there as it was: one ending "nothing to route" after its
    # exports deleted a member (the route no longer loaded), and a folder of other files is refused whole.
    before = sorted((p.relative_to(out), p.read_bytes() if p.is_file() else b"") for p in out.rglob("*"))
    monkeypatch.setattr("dsnas.route._rising", lambda members, acc, unit="": ([0], ["left out trial 9: why"]))
    assert main(["route", str(study), "--max-accuracy-drop", "0.01"]) == 0
    assert "one model is left, so there is nothing to route" in capsys.readouterr().out
    monkeypatch.undo()
    assert sorted((p.relative_to(out), p.read_bytes() if p.is_file() else b"") for p in out.rglob("*")) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]  # no work folder left beside it
    dsnas.load_route(str(out))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    assert main(["route", str(study), "--out", str(tmp_path / "mine")]) == 2
    assert "holds files that are not a dsnas route's (notes.txt)" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    assert main(["route", str(study), "--out", str(tmp_path / "mine" / "notes.txt")]) == 2  # it was moved aside
    assert "a route is a folder, and this is a file" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    # The report draws the route beside the front.
    assert main(["report", str(study), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert (tmp_path / "report" / "route.png").stat().st_size > 10_000 and "Routing over the front" in page


def test_where_neither_route_holds_its_target_the_bundle_serves_the_most_accurate_model_and_says_so(
        routable, tmp_path, capsys, monkeypatch):
    study = copy_study(routable, tmp_path / "s")
    monkeypatch.setattr("dsnas.route.lost_at_least", lambda served, right: 1.0)  # both shown to lose everything
    out = tmp_path / "route"
    assert main(["route", str(study), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    doc = json.loads((out / "route.json").read_text())
    assert doc["serve"] == "cascade" and all(t == "inf" for t in doc["cascade"]["thresholds"])
    assert "serves: the cascade" in said and "neither route held its target on the report half" in said
    assert "no cheaper stage was shown" not in said  # it was shown, on the calibration half: the report half failed it
    rows = {r["route"]: r for r in doc["table"]}
    best = rows[f"trial {doc['members'][-1]['trial']} alone"]
    assert "cascade (not served)" in rows and rows["cascade"]["accuracy"] == best["accuracy"]
    monkeypatch.undo()
    assert main(["verify", str(out), "--latency-tol", "100"]) == 0  # what it serves is what its table says


def test_a_front_of_one_is_a_notice_and_an_unreachable_target_names_the_best(routable, tmp_path, capsys):
    study = copy_study(routable, tmp_path / "s")
    assert main(["route", str(study), "--trials", "0", "--out", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out.strip() == ("dsnas route: --trials names 1 model: there is nothing to route (a "
                                               "route needs at least two models of different cost)")
    assert main(["route", str(study), "--trials", "0,1", "--target-accuracy", "0.99", "--out",
                 str(tmp_path / "r")]) == 2
    assert re.search(r"--target-accuracy 0.99 is above the most accurate model's 0\.\d+ on the calibration half: "
                     r"the best reachable is 0\.\d+", capsys.readouterr().err)


def test_a_route_says_where_its_costs_were_measured_disturbed_and_where_the_file_was_edited(routable, tmp_path,
                                                                                          capsys):
    """Its members' recorded costs, measured while others took the CPUs (34x the time measured in the same run),
    chose its thresholds without a word; and a study file edited since the search went unsaid, as export says it."""
    import sqlite3
    from contextlib import closing

    study = copy_study(routable, tmp_path / "s")
    with closing(sqlite3.connect(study.with_suffix(".db"))) as db, db:
        db.execute("UPDATE trial_user_attributes SET value_json = '1.0' WHERE key = 'disturbed' AND trial_id = "
                   "(SELECT trial_id FROM trials WHERE number = 0)")
    study.write_text(study.read_text().replace("max_latency_ms = 1000", "max_latency_ms = 900"))
    assert main(["route", str(study), "--max-accuracy-drop", "0.01", "--out", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr()
    # (Trial 1 too where the search itself ran on a busy machine.)
    assert re.search(r"note: the recorded costs of trials? 0(, 1)? were measured while other processes took the CPUs",
                     printed.out), printed.out
    assert "dsnas: note: " in printed.err and "[hardware.constraints.max_latency_ms] is 900" in printed.err
    assert 0 in json.loads((tmp_path / "r" / "route.json").read_text())["disturbed_costs"]


def test_an_infeasible_trial_that_trials_names_is_routed_and_said(routable, tmp_path, capsys):
    """--trials of a trial over the study's limits built and served a route of it without a word."""
    import sqlite3
    from contextlib import closing

    study = copy_study(routable, tmp_path / "s")
    with closing(sqlite3.connect(study.with_suffix(".db"))) as db, db:
        for key, value in (("feasible", "0.0"), ("latency_ms", "1500.0")):
            db.execute(f"UPDATE trial_user_attributes SET value_json = '{value}' WHERE key = '{key}' AND trial_id = "
                       "(SELECT trial_id FROM trials WHERE number = 0)")
    assert main(["route", str(study), "--trials", "0,1", "--max-accuracy-drop", "0.01", "--out",
                 str(tmp_path / "r")]) == 0
    assert ("note: trial 0 is infeasible: latency_ms 1500 > 1000 ([hardware.constraints] the study was searched "
            "under): --trials named it") in capsys.readouterr().out


def test_a_trial_named_twice_is_one_model_and_a_bad_list_is_one_line(routable, tmp_path, capsys):
    """--trials 1,1 once built a route of one model twice (its router paying for it twice); 1,x a traceback."""
    study = copy_study(routable, tmp_path / "s")
    assert main(["route", str(study), "--trials", "1,1", "--out", str(tmp_path / "r")]) == 0
    assert "--trials names 1 model: there is nothing to route" in capsys.readouterr().out
    assert main(["route", str(study), "--trials", "1,x"]) == 2
    assert capsys.readouterr().err.strip() == ("dsnas: error: --trials 1,x: must be trial numbers separated by "
                                               "commas. Fix: e.g. --trials 3,7")


@pytest.mark.parametrize("flag, value", [("--max-accuracy-drop", "-1"), ("--target-accuracy", "nan"),
                                         ("--target-accuracy", "1.5"), ("--max-accuracy-drop", "inf")])
def test_an_accuracy_bound_outside_0_1_is_one_line(routable, tmp_path, capsys, flag, value):
    """-1 and nan were taken: a negative drop asks the route to beat its best member, nan compares false."""
    assert main(["route", str(routable), flag, value, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dsnas: error: {flag} ") and "must be" in err and "in [0, 1]. Fix: e.g." in err
    assert "\n" not in err and not (tmp_path / "r").exists()


def test_a_member_costlier_and_not_more_accurate_than_a_cheaper_one_is_left_out_saying_why():
    """A cascade falls back to its costliest stage: that one must be the most accurate. A costlier, less accurate
    member was taken as the most accurate (the costliest) one, and the accuracy bound held against it."""
    from types import SimpleNamespace

    from dsnas.route import _rising

    members = [SimpleNamespace(trial=t, cost=c) for t, c in ((4, 1.0), (7, 2.0), (2, 3.0), (9, 4.0))]
    keep, left_out = _rising(members, [0.30, 0.35, 0.33, 0.40])
    assert keep == [0, 1, 3]
    assert left_out == ["left out trial 2: it costs more than trial 7 (3 vs 2 per input) and is not more "
                        "accurate on the calibration half (0.3300 vs 0.3500)"]
    members[2].cost = 2.0  # as costly: not "more"
    assert _rising(members, [0.30, 0.35, 0.33, 0.40], "ms")[1][0].startswith(
        "left out trial 2: it costs as much as trial 7 (2 vs 2 ms per input)")
    assert _rising(members, [0.40, 0.35, 0.33, 0.40])[0] == [0]  # the cheapest is best: nothing to route


def test_only_the_members_a_route_keeps_are_exported(routable, tmp_path, capsys, monkeypatch):
    """A route keeps MAX_STAGES members, thinned by cost: every front model was exported and loaded first (about
    2 s each here: 65 s for a route over 32 trials, 10 s once thinned first)."""
    import optuna
    from optuna.trial import create_trial

    import dsnas.route

    study = copy_study(routable, tmp_path / "s")
    stored = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study.with_suffix('.db')}")
    costly = stored.trials[1]
    for share in (0.5, 0.6, 0.7, 0.8):  # the costly model again, at costs between the two, a little less accurate
        attrs = {k: v * share if k.startswith("latency_ms") else v for k, v in costly.user_attrs.items()}
        attrs["accuracy"] -= (1 - share) / 100
        stored.add_trial(create_trial(params=costly.params, distributions=costly.distributions,
                                      values=[attrs["accuracy"], *costly.values[1:]], user_attrs=attrs))
    exported = []
    real = dsnas.route.export_trial
    monkeypatch.setattr(dsnas.route, "export_trial",
                        lambda spec, study, frozen, out: exported.append(frozen.number) or real(spec, study, frozen, out))
    assert main(["route", str(study), "--trials", "0,1,2,3,4,5", "--out", str(tmp_path / "r")]) == 0
    assert sorted(exported) == [0, 1, 3, 4]  # by cost 0, 2, 3, 4, 5, 1: the cheapest, the costliest, two between


def test_thinning_keeps_the_most_accurate_member_where_it_is_not_the_costliest(routable, tmp_path, capsys):
    """A route keeps the cheapest and the most accurate member. Five named trials whose most accurate was the third
    by cost lost it to thinning (the costliest was taken for the most accurate), and the route of the d8 model's
    costlier copies said there was nothing to route."""
    import optuna
    from optuna.trial import create_trial

    from dsnas.route import _thin

    assert _thin(list("abcdef"), [0.1, 0.2, 0.5, 0.3, 0.4, 0.45]) == list("abc")  # the costlier ones after it go
    assert _thin(list("abcdefg"), [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.4]) == list("acdf")
    assert _thin(list("abcdef"), [0.1, 0.2, None, 0.3, 0.4, 0.5]) == list("acdf")  # unknown: by cost, as before
    study = copy_study(routable, tmp_path / "s")
    stored = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study.with_suffix('.db')}")
    cheap, costly = stored.trials[0], stored.trials[1]
    ratio = costly.user_attrs["latency_ms_bs4"] / cheap.user_attrs["latency_ms_bs4"]  # at the largest batch size
    for share in (0.5 * ratio, 1.05 * ratio, 1.1 * ratio):  # the cheap model again: one cheaper, two costlier
        attrs = {k: v * share if k.startswith("latency_ms") else v for k, v in cheap.user_attrs.items()}
        stored.add_trial(create_trial(params=cheap.params, distributions=cheap.distributions, values=cheap.values,
                                      user_attrs=attrs))
    assert main(["route", str(study), "--trials", "0,1,2,3,4", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "nothing to route" not in out
    assert re.search(r"left out trial 3: it costs more than trial 1 \(.* ms per input\) and was not more accurate in "
                     r"the search \(0\.\d{4} vs 0\.\d{4}\)", out)  # said, as a costlier member is
    assert [m["trial"] for m in json.loads((tmp_path / "r" / "route.json").read_text())["members"]] == [0, 1]
