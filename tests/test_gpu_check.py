"""benchmarks/gpu_check.py: its report logic, and its dry run on the CPU (what the GPU check does without CUDA)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Loaded by path: benchmarks/ is no package, and putting it on sys.path would shadow names (kernels.py).
_spec = importlib.util.spec_from_file_location("gpu_report", REPO / "benchmarks" / "gpu_report.py")
gpu_report = importlib.util.module_from_spec(_spec)
sys.modules["gpu_report"] = gpu_report  # dataclasses look their module up by name
_spec.loader.exec_module(gpu_report)
Report, Section = gpu_report.Report, gpu_report.Section


def test_a_value_beyond_its_bound_fails_and_a_missing_one_is_unavailable_never_a_pass():
    sec = Section("limits")
    assert sec.check("bf16 GEMM", 1200.0, 0.6 * 989.4, 989.4) is False  # above the datasheet's peak: a timing bug
    assert sec.check("bf16 GEMM", 790.0, 0.6 * 989.4, 989.4) is True
    assert sec.check("GPM SM utilization", None, 80, 100) is None
    assert sec.check("energy", float("nan"), 0) is None
    assert [c.ok for c in sec.checks] == [False, True, None, None]
    assert sec.checks[0].bound == "593.6 .. 989.4"


def test_a_rate_is_judged_against_this_devices_own_peak_and_unjudged_without_one():
    """The bounds come from the device (dsnas's gpu_peaks), so an H100 PCIe is not failed by an H200's figures."""
    sec = Section("limits")
    h100_pcie = 114 * 2048 * 2 * 1.755e9 / 1e12  # 819 TFLOP/s at its max SM clock
    assert sec.within_peak("bf16 GEMM", 520.0, h100_pcie, 0.5, unit="TFLOP/s", how="114 SMs", why="w") is True
    assert sec.within_peak("bf16 GEMM", 1200.0, 1070.5, 0.5, unit="TFLOP/s", how="132 SMs", why="w") is False
    assert sec.within_peak("bf16 GEMM", 300.0, 1070.5, 0.5, unit="TFLOP/s", how="132 SMs", why="w") is False
    assert sec.within_peak("copy", 3.1, None, 0.5, unit="TB/s", how="no per-SM rate known", why="w") is None
    assert [c.ok for c in sec.checks] == [True, False, False, None]
    assert sec.checks[0].bound == "409.7 .. 819.5"
    assert "no peak to judge it: no per-SM rate known" in sec.checks[3].why


def test_sections_run_in_budget_a_raising_one_is_an_error_and_the_rest_still_run(tmp_path):
    report = Report(tmp_path)

    def fails(sec):
        sec.check("copy", 9.9, 2.4, 4.8, unit="TB/s")

    def raises(sec):
        raise RuntimeError("cuSPARSELt said no")

    report.run("a", fails, estimate_s=0, budget_s=60)
    report.run("b", raises, estimate_s=0, budget_s=60)
    report.run("c", lambda sec: sec.check("x", 1.0, 0, 2), estimate_s=0, budget_s=60)
    report.run("d", lambda sec: None, estimate_s=1e6, budget_s=60)
    report.run("e", lambda sec: None, estimate_s=0, budget_s=60, needs="needs CUDA")
    assert [s.status for s in report.sections] == ["failed", "error", "ok", "skipped", "skipped"]
    assert "would overrun --budget-s" in report.sections[3].error and report.sections[4].error == "needs CUDA"
    assert not report.ok
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["sections"][1]["error"].endswith("RuntimeError: cuSPARSELt said no")
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| a | copy | 9.9 TB/s | 2.4 .. 4.8 | **FAIL** |" in md


def test_a_rerun_of_some_sections_keeps_the_earlier_ones_and_all_skipped_is_no_pass(tmp_path):
    """`--only gain` in a check's folder (gain reads its search) overwrote the whole report with one section."""
    first = Report(tmp_path)
    first.run("search", lambda sec: sec.check("trials completed", 3.0, 2, None), estimate_s=0, budget_s=60)
    first.run("gain", lambda sec: sec.check("ratio", 0.5, 1, None), estimate_s=0, budget_s=60)
    again = Report(tmp_path, {"date": "later"})
    assert again.keep_earlier() == ["search", "gain"]
    again.run("gain", lambda sec: sec.check("ratio", 1.5, 1, None), estimate_s=0, budget_s=60)
    assert again.ok and [s.name for s in again.sections] == ["gain"]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(s["name"], s["status"]) for s in doc["sections"]] == [("search", "ok"), ("gain", "ok")]
    assert doc["sections"][0]["checks"][0]["value"] == 3.0 and doc["sections"][1]["checks"][0]["value"] == 1.5
    assert "| search | trials completed | 3 |" in (tmp_path / "gpu_check.md").read_text()
    skipped = Report(tmp_path / "other")
    skipped.run("limits", lambda sec: None, estimate_s=0, budget_s=60, needs="needs CUDA")
    assert not skipped.ok  # nothing was checked


@pytest.mark.slow
def test_the_checks_search_is_the_shipped_gpu_study_at_the_checks_budget(tmp_path):
    """On a GPU the check searches studies/engine_gpu.toml as a user would (its space, task shape and batch sizes),
    only with fewer trials and tokens, so that what the check finds holds for the shipped study."""
    code = ("import sys; from pathlib import Path; sys.path.insert(0, 'benchmarks'); import gpu_check; "
            "run = gpu_check.Run.__new__(gpu_check.Run); run.dry, run.device = False, gpu_check.torch.device('cuda'); "
            f"print(run._study_text(Path({str(tmp_path)!r})))")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-4000:]
    check, shipped = tomllib.loads(run.stdout), tomllib.loads((REPO / "studies" / "engine_gpu.toml").read_text())
    assert Path(check["space"]["file"]) == (REPO / "studies" / shipped["space"]["file"]).resolve()
    assert check["hardware"]["batch_sizes"] == shipped["hardware"]["batch_sizes"]
    assert max(check["hardware"]["batch_sizes"]) >= 256  # batch 32 was launch-bound on the H200
    for key in ("context", "batch_size"):
        assert check["task"][key] == shipped["task"][key]
    assert check["budget"]["n_trials"] < shipped["budget"]["n_trials"]
    assert check["task"]["train_tokens"] < shipped["task"]["train_tokens"]
    assert check["executor"]["kind"] == shipped["executor"]["kind"] == "local"  # no Ray on the GPU machine


def test_the_dry_run_checks_every_section_that_needs_no_cuda(tmp_path):
    """About 90 s on 2 cores: the engine in a model, training with a forced fp16 overflow, a 3-trial search
    with halving on the local executor (no Ray), export, verify, profile and compile, all on the CPU."""
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {s["name"]: s["status"] for s in doc["sections"]}
    assert status == {"doctor": "ok", "limits": "skipped", "engine": "ok", "training": "ok", "search": "ok",
                      "gain": "ok", "profile": "ok", "compile": "ok"}
    checks = {c["name"]: c for s in doc["sections"] for c in s["checks"]}
    # Every CPU-runnable layer type inside the model, close to fp32 (fp8 has no CPU kernel: a row, not a check).
    for label in ("fp32", "bf16", "fp16", "int8 int8-static", "int8 torch-dynamic", "2:4 fp32", "2:4 int8 int8-static"):
        assert checks[f"{label}: logits vs fp32, relative L2"]["ok"], label
    assert checks["fp16: fallbacks of the overflowed layer"]["value"] == 1
    assert checks["fp16: fallbacks of the other layers"]["value"] == 0
    assert checks["trials completed"]["value"] >= 2 and checks["trials failed"]["value"] == 0
    assert checks["ray was not imported"]["ok"]
    assert checks["verify probe logits"]["ok"] and checks["verify accuracy"]["ok"]
    assert "needs CUDA" in next(s["error"] for s in doc["sections"] if s["name"] == "limits")
    assert "| engine | ok |" in (tmp_path / "gpu_check.md").read_text()
    # A rerun of one section profiles the bundle the search exported, and keeps the other sections' results.
    script = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)]
    run = subprocess.run([*script, "--only", "profile"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {s["name"]: s["status"] for s in doc["sections"]} == status
    typo = subprocess.run([*script, "--only", "profile,engin"], capture_output=True, text=True, timeout=600)
    assert typo.returncode == 2 and "--only names no section engin" in typo.stderr


def test_every_section_fits_the_default_budget_at_its_estimate():
    """The estimates added up to 425 s against a default --budget-s of 420: the last section (compile) was skipped
    whenever the others took as long as estimated."""
    import ast
    import re

    source = (REPO / "benchmarks" / "gpu_check.py").read_text()  # read: importing it runs the benchmark's imports
    default = float(re.search(r'"--budget-s", type=float, default=(\d+)', source).group(1))
    estimates = re.search(r"ESTIMATE_S = (\{.*?\})\n", source, re.S).group(1)
    total = sum(gpu for gpu, _ in ast.literal_eval(estimates).values())
    assert total <= default, (total, default)


def test_a_gain_pair_that_fails_is_a_row_with_its_reason_and_the_others_are_still_compared(tmp_path, monkeypatch):
    """One engine candidate or twin that raised (a TrialError on the device) ended the whole gain section: the rows
    already measured were lost, on a GPU run of 15 minutes in all."""
    from types import SimpleNamespace

    import dsnas.spec
    import dsnas.study
    import dsnas.trial
    import dsnas.worker
    from dsnas.errors import TrialError

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    before = set(sys.modules)
    import gpu_check

    benchmarks = str(REPO / "benchmarks")
    for name in set(sys.modules) - before:  # benchmarks/kernels.py as "kernels" would shadow the PyPI package
        if (getattr(sys.modules[name], "__file__", None) or "").startswith(benchmarks):  # (transformers imports
            del sys.modules[name]  # it) for the rest of this process; gpu_check keeps its own references

    def trial(number):
        return SimpleNamespace(number=number, state=SimpleNamespace(name="COMPLETE"),
                               user_attrs={"arch_short": f"a{number}", "arch": {"layers": [{"precision": "bf16"}]}})

    monkeypatch.setattr(dsnas.spec, "load_study", lambda path: SimpleNamespace(task=None, hardware=None, seed=0,
                                                                               engine=None))
    monkeypatch.setattr(dsnas.study, "open_study", lambda spec, create: SimpleNamespace(trials=[trial(1), trial(2)]))
    monkeypatch.setattr(dsnas.trial, "TrialRequest", lambda **kwargs: kwargs)

    def run_trial(request):
        if request["trial"] == 1 and request["arch"]["layers"][0]["precision"] == "bf16":
            raise TrialError("fp8 matmuls need a CUDA GPU of compute capability >= 8.9")
        fp32 = request["arch"]["layers"][0]["precision"] == "fp32"
        return SimpleNamespace(metrics={"accuracy": 0.4, "throughput_tok_s": 100.0 if fp32 else 200.0})

    monkeypatch.setattr(dsnas.worker, "run_trial", run_trial)
    run = gpu_check.Run.__new__(gpu_check.Run)
    run.out, run.dry = tmp_path, False
    sec = gpu_check.Section("gain")
    run.gain(sec)
    rows = sec.tables[0]["rows"]
    assert [r[0] for r in rows] == [1, 2] and rows[0][-1] == "failed" and rows[1][-1] == "2"
    failed = [c for c in sec.checks if c.ok is False]
    assert len(failed) == 1 and "trial 1: engine twin" in failed[0].name and "compute capability" in failed[0].value
    ratio = next(c for c in sec.checks if c.name.startswith("median throughput ratio"))
    assert ratio.value == 2.0 and ratio.ok
