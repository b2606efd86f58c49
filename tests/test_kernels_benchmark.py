"""benchmarks/kernels.py's flags (no timing runs)."""

from __future__ import annotations

import pytest
from conftest import load_benchmark

kernels_benchmark = load_benchmark("kernels", as_name="kernels_benchmark")  # "kernels" is a PyPI package


def test_thread_counts_are_read_and_a_bad_one_is_one_line_naming_the_flag():
    """`--threads 1,x` ended in a ValueError traceback, `--threads 0` in torch's RuntimeError after the header."""
    assert kernels_benchmark.parse_args(["--quick", "--threads", "1, 2"]).threads == [1, 2]
    for bad in ("1,x", "0", "2,-1", ""):
        with pytest.raises(SystemExit, match=rf"--threads {bad}: each thread count must be a positive integer"):
            kernels_benchmark.parse_args(["--threads", bad])
