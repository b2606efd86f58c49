"""benchmarks/hardware_gain.py's comparison at equal accuracy, on hand-made fronts."""

from __future__ import annotations

import sys

import pytest
from conftest import load_benchmark

hardware_gain = load_benchmark("hardware_gain")


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


def test_the_default_run_reseeds_before_it_removes_the_studies_and_survives_an_fp32_front_below_the_reference(
        tmp_path, monkeypatch, capsys):
    """Without --keep, each study's folder was removed as soon as it was scored, and reseeding then read the
    removed study file: the run failed after both searches (about 14 minutes). An fp32 front below the reference
    accuracy divided by a zero hypervolume."""
    made = []

    def run(variant, folder):
        study = folder / "studies" / "engine_cpu.toml"
        study.parent.mkdir(parents=True)
        study.write_text("")
        made.append(folder)
        front = [(0.42, 300_000.0, "bf16")] if variant == "dsnas" else [(0.29, 100_000.0, "fp32")]
        return {"variant": variant, "wall_s": 1.0, "front": front, "hv": 0.0 if variant == "fp32" else 36_000.0,
                "offer": {}, "archs": {}, "study": study}

    def reseeded(result, seeds, trained):
        assert result["study"].is_file()  # still there
        return result

    monkeypatch.setattr(hardware_gain, "run", run)
    monkeypatch.setattr(hardware_gain, "reseeded", reseeded)
    monkeypatch.setattr(hardware_gain.tempfile, "mkdtemp", lambda prefix: str(tmp_path / f"{prefix}{len(made)}"))
    monkeypatch.setattr(sys, "argv", ["hardware_gain.py", "--seeds", "1"])
    hardware_gain.main()
    out = capsys.readouterr().out
    assert "no ratio (the fp32 front lies below the reference accuracy)" in out
    assert out.strip().splitlines()[-1] == "median throughput ratio at equal accuracy (dsnas / fp32, 1 levels): 3.00x"
    assert len(made) == 2 and not any(folder.exists() for folder in made)  # removed at the end


def test_scoring_kept_studies_again_counts_the_repeats_both_variants_kept_and_refuses_none(tmp_path):
    """`--scored DIR` on a folder with no kept study printed 'none (no equal-accuracy level both fronts reach ...)'
    and exited 0, as if two fronts had been compared; a repeat kept for one variant alone ended in a traceback."""
    with pytest.raises(SystemExit, match=r"--scored .*: no repeat that --keep kept there .* Fix: pass the folder"):
        hardware_gain.kept_repeats(tmp_path / "mistyped")
    for folder in ("fp32-0", "dsnas-0", "dsnas-1"):  # the second repeat's fp32 search never finished
        (tmp_path / folder / "studies").mkdir(parents=True)
        (tmp_path / folder / "studies" / "engine_cpu.db").write_bytes(b"")
    assert hardware_gain.kept_repeats(tmp_path) == 1
