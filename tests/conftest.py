"""Shared fixtures: a tiny study (a search that takes seconds) written into tmp_path."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from dsnas.errors import SpecError

REPO = Path(__file__).resolve().parent.parent
# The CPU ceilings cache (dsnas.profiler.ceilings) of this test session, not the user's: set before any worker
# process starts, so Ray workers inherit it.
os.environ.setdefault("DSNAS_CACHE_DIR", tempfile.mkdtemp(prefix="dsnas-test-cache-"))

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
[pruning]
kind = "none"  # every trial trains fully: the tests of other features count completed trials
"""


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
