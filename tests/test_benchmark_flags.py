"""Benchmarks' bad flags: one line from argparse (exit status 2) before any work, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *flags], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize(("script", "flags", "said"), [
    ("predictor_check.py", ["--trials", "0"], "--trials must be at least 1, got 0"),
    ("predictor_check.py", ["--folds", "1"], "--folds must be at least 2, got 1"),
    ("gpu_co_tenant.py", ["soon"], "argument seconds: invalid float value: 'soon'"),
])
def test_a_bad_flag_is_one_line_naming_it(script, flags, said):
    """predictor_check --trials 0 wrote its study file, then failed in the study's own check with a traceback;
    gpu_co_tenant took no --help and ended any flag in a ValueError traceback."""
    run = _run(script, *flags)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and said in run.stderr.splitlines()[-1]


def test_gpu_co_tenant_says_how_it_is_called():
    run = _run("gpu_co_tenant.py", "--help")
    assert run.returncode == 0 and "seconds" in run.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here")
def test_passes_on_cuda_without_a_gpu_is_one_line():
    """`passes.py --device cuda` on a machine without CUDA ended in torch's AssertionError traceback."""
    run = _run("passes.py", "--device", "cuda")
    assert run.returncode == 2
    assert run.stderr.splitlines()[-1].endswith("--device cuda: no CUDA GPU here (torch %s); use --device cpu"
                                                % torch.__version__)
