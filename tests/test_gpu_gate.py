"""The gate of tests marked ``gpu`` (tests/conftest.py): skipped where torch sees no CUDA device, failed instead
under DSNAS_REQUIRE_GPU=1, where any skip of a gpu test (a skipif mark, pytest.skip in its body) fails too.

Each case runs pytest in a subprocess on a small test file beside a copy of the repository's conftest, with
CUDA_VISIBLE_DEVICES="" so that torch there sees no GPU on any machine (or a GPU faked by the test file)."""

from __future__ import annotations

import pytest
from conftest import REPO

pytest_plugins = ["pytester"]

NO_GPU = """
import pytest

def test_cpu():
    pass

@pytest.mark.gpu
def test_gpu():
    raise AssertionError("ran without a CUDA device")

@pytest.mark.gpu
@pytest.mark.skipif(True, reason="a skipif mark of its own")
def test_gpu_with_a_skipif():
    raise AssertionError("ran despite its skipif mark")

@pytest.mark.skip(reason="skipped on purpose")
def test_cpu_skipped():
    pass
"""

# Collection imports the test file before the gate asks torch, so this file's GPU is the one the gate sees.
FAKED_GPU = """
import pytest
import torch

torch.cuda.is_available = lambda: True

@pytest.mark.gpu
def test_gpu():
    pass

@pytest.mark.gpu
def test_gpu_lacks_a_capability():
    pytest.skip("fp8 needs compute capability >= 8.9")

def test_cpu_skips_itself():
    pytest.skip("a CPU test's own reason")
"""


def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, cases: str,
        require_gpu: str | None) -> pytest.RunResult:
    pytester.makeconftest((REPO / "tests" / "conftest.py").read_text())
    pytester.makeini("[pytest]\naddopts = --strict-markers\nmarkers =\n    gpu: needs an NVIDIA GPU\n")
    pytester.makepyfile(test_cases=cases)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    if require_gpu is None:
        monkeypatch.delenv("DSNAS_REQUIRE_GPU", raising=False)
    else:
        monkeypatch.setenv("DSNAS_REQUIRE_GPU", require_gpu)
    # -vv: the short summary lines are not cut to the terminal's width.
    return pytester.runpytest_subprocess("-rA", "-vv", "-p", "no:cacheprovider")


@pytest.mark.parametrize("require_gpu", [None, "0"])
def test_without_the_variable_a_gpu_test_skips_with_the_reason(pytester, monkeypatch, require_gpu):
    result = run(pytester, monkeypatch, NO_GPU, require_gpu)
    result.assert_outcomes(passed=1, skipped=3)
    result.stdout.fnmatch_lines_random([
        "SKIPPED [[]1[]] test_cases.py:*: needs an NVIDIA GPU (torch.cuda.is_available() is False)",
        "SKIPPED [[]1[]] test_cases.py:*: a skipif mark of its own",
        "SKIPPED [[]1[]] test_cases.py:*: skipped on purpose",
        "PASSED test_cases.py::test_cpu",
    ])
    assert result.ret == 0


def test_with_the_variable_a_gpu_test_fails_and_the_others_are_unaffected(pytester, monkeypatch):
    result = run(pytester, monkeypatch, NO_GPU, "1")
    result.assert_outcomes(passed=1, skipped=1, failed=2)
    result.stdout.fnmatch_lines_random([
        "FAILED test_cases.py::test_gpu - Failed: DSNAS_REQUIRE_GPU=1 is set and no CUDA device is visible "
        "(torch.cuda.is_available() is False)",
        "FAILED test_cases.py::test_gpu_with_a_skipif - Failed: DSNAS_REQUIRE_GPU=1 is set, so a gpu test may "
        "not skip, but this one skipped: a skipif mark of its own",
        "PASSED test_cases.py::test_cpu",
        "SKIPPED [[]1[]] test_cases.py:*: skipped on purpose",
    ])
    # Failures of the tests themselves (the gate stops them before their fixtures), not setup errors.
    assert "error" not in result.stdout.lines[-1]
    assert "ran without a CUDA device" not in result.stdout.str()
    assert result.ret == 1


@pytest.mark.parametrize("require_gpu", [None, "1"])
def test_a_gpu_test_that_skips_in_its_body_fails_under_the_variable(pytester, monkeypatch, require_gpu):
    result = run(pytester, monkeypatch, FAKED_GPU, require_gpu)
    if require_gpu is None:
        result.assert_outcomes(passed=1, skipped=2)
        result.stdout.fnmatch_lines_random(["SKIPPED [[]1[]] test_cases.py:*: fp8 needs compute capability >= 8.9",
                                            "SKIPPED [[]1[]] test_cases.py:*: a CPU test's own reason"])
        return
    result.assert_outcomes(passed=1, skipped=1, failed=1)
    result.stdout.fnmatch_lines_random([
        "FAILED test_cases.py::test_gpu_lacks_a_capability - Failed: DSNAS_REQUIRE_GPU=1 is set, so a gpu test may "
        "not skip, but this one skipped: fp8 needs compute capability >= 8.9",
        "PASSED test_cases.py::test_gpu",
        "SKIPPED [[]1[]] test_cases.py:*: a CPU test's own reason",
    ])
