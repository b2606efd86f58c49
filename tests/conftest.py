"""Shared fixtures: a tiny study (a search that takes seconds) written into tmp_path; and the gate of tests marked
``gpu``: skipped where torch sees no CUDA device, failed instead under DSNAS_REQUIRE_GPU=1."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from dsnas.errors import SpecError

REPO = Path(__file__).resolve().parent.parent
# The CPU ceilings cache (dsnas.profiler.ceilings) of this test session, not the user's: set before any worker
# process starts, so Ray workers inherit it.
os.environ.setdefault("DSNAS_CACHE_DIR", tempfile.mkdtemp(prefix="dsnas-test-cache-"))

REQUIRE_GPU = "DSNAS_REQUIRE_GPU"
NO_GPU = "needs an NVIDIA GPU (torch.cuda.is_available() is False)"
NO_GPU_REQUIRED = f"{REQUIRE_GPU}=1 is set and no CUDA device is visible (torch.cuda.is_available() is False)"


def _gpu_required() -> bool:
    return os.environ.get(REQUIRE_GPU) == "1"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A ``gpu`` test skips where torch sees no CUDA device (under DSNAS_REQUIRE_GPU=1 that skip then fails: see
    pytest_runtest_makereport)."""
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu:
        return
    import torch  # here, not at the top: importing conftest stays cheap, and CPU-only runs never ask CUDA

    if not torch.cuda.is_available():
        for item in gpu:
            item.add_marker(pytest.mark.skip(reason=NO_GPU))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    """Under DSNAS_REQUIRE_GPU=1 a ``gpu`` test that skips (a skipif mark, pytest.skip in its body, a capability
    the device lacks) fails, with the skip's reason in the failure."""
    required = _gpu_required() and item.get_closest_marker("gpu") is not None
    if required and call.excinfo is not None and call.excinfo.errisinstance(pytest.skip.Exception):
        reason = call.excinfo.value.msg
        # On the machine meant to have the GPU, a skip would hide that the GPU checks never ran.
        call.excinfo = _failure(NO_GPU_REQUIRED if reason == NO_GPU else
                                f"{REQUIRE_GPU}=1 is set, so a gpu test may not skip, but this one skipped: {reason}")
    report = yield
    message = getattr(call.excinfo.value, "msg", None) if call.excinfo is not None else None
    if required and report.failed and str(message).startswith(f"{REQUIRE_GPU}=1 is set"):
        report.dsnas_gpu_required = True  # shown as FAILED, not ERROR, when it happened in setup
    return report


@pytest.hookimpl(tryfirst=True)
def pytest_report_teststatus(report: pytest.TestReport) -> tuple[str, str, str] | None:
    # A setup-time failure counts as an error in pytest's words; this one is the test's own verdict (no GPU).
    if report.when == "setup" and getattr(report, "dsnas_gpu_required", False):
        return "failed", "F", "FAILED"
    return None


def _failure(message: str) -> pytest.ExceptionInfo[BaseException]:
    try:
        pytest.fail(message, pytrace=False)
    except pytest.fail.Exception:
        return pytest.ExceptionInfo.from_current()
    raise AssertionError("pytest.fail returned")


TINY_SPACE = """
family = "transformer_lm"
[choices]
n_layers = [1, 2]
d_model = [16, 32]
[per_layer]
n_heads = [1, 2]
ffn_ratio = [1, 2]
"""

TINY_STUDY = """
[study]
name = "tiny"
seed = 0
[objectives]
accuracy = "maximize"
throughput = "maximize"
[sampler]
name = "tpe"
seed = 0
[budget]
n_trials = 3
max_failures = 3
[space]
file = "{space}"
[task]
name = "charlm"
corpus_bytes = 200_000
context = 16
batch_size = 8
train_tokens = 2048
val_tokens = 512
[hardware]
device = "cpu"
batch_sizes = [1, 4]
warmup_s = 0.01
measure_s = 0.02
[hardware.constraints]
max_latency_ms = 1000
[executor]
kind = "local"
[fidelity]
kind = "none"  # every trial trains fully: the tests of other features count completed trials
"""


@pytest.fixture
def steady_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host's speed reads as its fastest: for a test of what happens to an undisturbed measurement (the
    measurement cache reuses only those), on a shared machine whose speed may drift. Others' CPU share is still
    read (dsnas.profiler.disturbance); tests/test_host_speed.py tests the probe itself."""
    from dsnas.profiler import host_speed

    monkeypatch.setattr(host_speed, "slowdown", lambda reference: None if reference is None else 1.0)


@pytest.fixture
def no_model_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bundles exported without model.pt2 and model.onnx, for tests of what else a bundle holds: torch.export, the
    ONNX exporter and onnxruntime's timing took 6 s a bundle of a tiny int8 model here. tests/test_export.py
    tests those files."""
    without_model_files(monkeypatch)


def without_model_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """What no_model_files does, for a fixture of a wider scope (with its own pytest.MonkeyPatch)."""
    from dsnas.export import bundle

    monkeypatch.setattr(bundle, "write_model_files", lambda *a: {"onnx": "unavailable: not written by this test"})


@pytest.fixture
def measure_beside(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``run(start, stop, hardware)``: dsnas.profiler.measure of a small MLP at batch 8 with ``start()`` called at
    the model's first call (competitors for the CPUs) and ``stop()`` once the timed attempts are over, when peak
    memory is measured (a profiled call is slow to start on starved CPUs). The wait for a disturbance to pass is
    cut to 0.2 s: the competitors never stop by themselves, so waiting longer proves nothing."""
    import importlib

    import torch

    from dsnas.profiler import disturbance, measure

    measure_module = importlib.import_module("dsnas.profiler.measure")  # the module, not the function
    monkeypatch.setattr(disturbance, "MAX_SETTLE_S", 0.2)

    def run(start: Any, stop: Any, hardware: Any) -> tuple[dict[str, float], dict[str, Any]]:
        started: list[bool] = []
        real_peak = measure_module.peak_memory
        monkeypatch.setattr(measure_module, "peak_memory", lambda *a: stop() or real_peak(*a))

        class Model(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.body = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))

            def forward(self, x: Any) -> Any:
                if not started:
                    started.append(True)
                    start()
                return self.body(x)

        class Task:
            tokens_per_example = 1

            def example_batch(self, bs: int, device: Any) -> Any:
                return torch.ones(bs, 64)

        try:
            return measure(Model(), Task(), torch.device("cpu"), hardware)
        finally:
            stop()

    return run


@pytest.fixture
def tiny_study(tmp_path: Path) -> Path:
    """A study file whose 3 trials train byte-level LMs for 2k tokens each: seconds, not minutes."""
    space = tmp_path / "tiny_space.toml"
    space.write_text(TINY_SPACE)
    study = tmp_path / "tiny.toml"
    study.write_text(TINY_STUDY.format(space=space))
    return study


@pytest.fixture(scope="session")
def finished_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny study, searched once per test session (local executor, 3 trials). Read-only: a test that
    writes to it copies the folder first (see copy_study)."""
    from dsnas.cli import main

    root = tmp_path_factory.mktemp("finished")
    (root / "tiny_space.toml").write_text(TINY_SPACE)
    study = root / "tiny.toml"
    study.write_text(TINY_STUDY.format(space=root / "tiny_space.toml"))
    assert main(["search", str(study)]) == 0
    return study


def copy_study(study: Path, dest: Path) -> Path:
    """A writable copy of a searched study folder (study file, space, database, artifacts)."""
    import shutil

    shutil.copytree(study.parent, dest, dirs_exist_ok=True)
    copied = dest / study.name
    # The space file is named by absolute path inside the study file: point it at the copy.
    copied.write_text(copied.read_text().replace(str(study.parent), str(dest)))
    return copied


def check_message(err: BaseException, where: str | Path, key: str, rule: str, fix: str | None = None) -> str:
    """``err`` is a SpecError whose one-line message is ``WHERE: [KEY] RULE...`` (and ``. Fix: FIX...``)."""
    assert isinstance(err, SpecError), repr(err)
    msg = str(err)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{where}: [{key}] "), msg
    assert err.key == key
    assert rule in msg, msg
    if fix is not None:
        assert ". Fix: " in msg, msg
        assert fix in msg.split(". Fix: ", 1)[1], msg
    return msg


def load_benchmark(name: str, as_name: str | None = None) -> Any:
    """benchmarks/NAME.py as a module, loaded by path (benchmarks/ is no package, and putting it on sys.path would
    shadow names: a module named "kernels" would shadow the PyPI package of that name), registered under
    ``as_name`` (default NAME): dataclasses look their module up by name."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(as_name or name, Path(__file__).resolve().parent.parent /
                                                  "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[as_name or name] = module
    spec.loader.exec_module(module)
    return module
