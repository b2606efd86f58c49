"""benchmarks/hardware_gain.py's comparison at equal accuracy, on hand-made fronts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load(name: str):
    # Loaded by path: benchmarks/ is no package, and putting it on sys.path would shadow names (kernels.py).
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


hardware_gain = _load("hardware_gain")


def test_between_two_front_points_the_throughput_is_that_of_a_mix_of_them():
    """Half the inputs to each of 100k and 50k tokens/s: each token costs (1/100k + 1/50k) / 2 s, 66,667 tokens/s,
    at the mean accuracy. A straight line said 75,000, flattering whichever front was interpolated more."""
    front = [(0.38, 100_000.0, "a"), (0.40, 50_000.0, "b")]
    assert hardware_gain.throughput_at(front, 0.39) == pytest.approx(200_000 / 3)
    assert hardware_gain.throughput_at(front, 0.395) == pytest.approx(1 / (0.25 / 100_000 + 0.75 / 50_000))
    assert hardware_gain.throughput_at(front, 0.38) == pytest.approx(100_000)
    assert hardware_gain.throughput_at(front, 0.37) == 100_000  # below the front: its least accurate point serves
    assert hardware_gain.throughput_at(front, 0.41) is None  # above it: nothing reaches that accuracy


def test_the_levels_compared_are_the_ones_both_fronts_reach():
    base = {"front": [(0.40, 50_000.0, "fp32 big"), (0.38, 100_000.0, "fp32 small")]}
    engine = {"front": [(0.41, 120_000.0, "bf16 big"), (0.39, 200_000.0, "bf16 small")]}
    rows = hardware_gain.compare(base, engine)
    assert [level for level, *_ in rows] == pytest.approx([0.39, 0.395, 0.40])
    level, b, d, ratio = rows[0]  # 0.39: a mix on the fp32 front, the engine's own point
    assert b == pytest.approx(200_000 / 3) and d == pytest.approx(200_000) and ratio == pytest.approx(3.0)
