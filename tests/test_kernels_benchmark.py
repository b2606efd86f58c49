"""benchmarks/kernels.py's flags (no timing runs)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Loaded by path and under another name: benchmarks/ is no package, and a module named "kernels" would shadow the
# PyPI package of that name.
_spec = importlib.util.spec_from_file_location("kernels_benchmark", REPO / "benchmarks" / "kernels.py")
kernels_benchmark = importlib.util.module_from_spec(_spec)
sys.modules["kernels_benchmark"] = kernels_benchmark  # dataclasses look their module up by name
_spec.loader.exec_module(kernels_benchmark)


def test_thread_counts_are_read_and_a_bad_one_is_one_line_naming_the_flag():
    """`--threads 1,x` ended in a ValueError traceback, `--threads 0` in torch's RuntimeError after the header."""
    assert kernels_benchmark.parse_args(["--quick", "--threads", "1, 2"]).threads == [1, 2]
    for bad in ("1,x", "0", "2,-1", ""):
        with pytest.raises(SystemExit, match=rf"--threads {bad}: each thread count must be a positive integer"):
            kernels_benchmark.parse_args(["--threads", bad])
