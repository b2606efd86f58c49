"""benchmarks/nb201_efficiency.py's scoring, on a table in NAS-Bench-201's format that the test writes (the real
one lives outside the repository): the reference point SOURCES.md prescribes, the true front's hypervolume, the
hypervolume share of a search's evaluated cells after each evaluation, and the summary cells."""

from __future__ import annotations

import csv
import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest

from dsnas.pareto import dominated_volume

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    # By path: benchmarks/ is no package, and on sys.path its kernels.py would shadow the package of that name that
    # transformers imports.
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load("nb201_efficiency")
model = load("nb201_model")
EDGES, OPS, arch_string = model.EDGES, model.OPS, model.arch_string

def write_table(path: Path) -> list[dict]:
    """Every cell, with an accuracy that grows with its convolutions and a latency that is their cost."""
    rng = np.random.RandomState(0)
    rows = []
    for i, ops in enumerate(itertools.product(OPS, repeat=6)):
        arch = dict(zip(EDGES, ops))
        convs = sum(op.startswith("nor_conv") for op in ops) + sum(op == "nor_conv_3x3" for op in ops)
        row = {"idx": i, "arch_str": arch_string(arch),
               "acc_cifar100_test": 40 + 3 * convs + rng.uniform(0, 4) - 8 * (ops[5] == "none"),
               "acc_imagenet16_test": 20 + 2 * convs + rng.uniform(0, 3)}
        for device in bench.DEVICES:
            row[f"lat_{device}_ms"] = 1 + convs * (1.5 if device == "fpga" else 1.0) + rng.uniform(0, 0.5)
        rows.append(row)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    path = tmp_path_factory.mktemp("nb201") / "nb201.csv"
    return path, write_table(path)


def test_reference_point_and_true_hypervolume_are_those_sources_md_gives(table):
    path, rows = table
    reference, true_hv = bench.problem(path, "cifar100", "fpga")
    accuracy = np.array([r["acc_cifar100_test"] for r in rows])
    latency = np.array([r["lat_fpga_ms"] for r in rows])
    assert reference == pytest.approx([np.percentile(accuracy, 15), np.median(latency)])
    points = np.column_stack([accuracy, latency]).tolist()
    inside = [p for p in points if p[0] > reference[0] and p[1] < reference[1]]
    # Brute force: the area under the staircase of the cells inside the reference box.
    best = {}
    for a, lat in inside:
        best[lat] = max(best.get(lat, -np.inf), a)
    area, top = 0.0, reference[0]
    edges = sorted(best) + [reference[1]]
    for lat, nxt in zip(edges, edges[1:]):
        top = max(top, best[lat])
        area += (top - reference[0]) * (nxt - lat)
    assert true_hv == pytest.approx(area, rel=1e-9)


@pytest.fixture
def importable(monkeypatch):
    """benchmarks/ on sys.path for one test (the study names nb201_task and nb201_model), then off again."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))


def test_a_search_is_scored_by_the_hypervolume_of_its_evaluated_cells(table, importable):
    path, rows = table
    result = bench.one_search(("cifar100", "pixel3", "random", 0, 80, str(path), 60.0))
    assert result["evaluations"] == 80 and result["trials"] >= 80
    shares = [share for _, _, share in result["curve"]]
    assert shares == sorted(shares) and 0 < shares[-1] <= 1
    evaluations = [n for n, _, _ in result["curve"]]
    assert evaluations == sorted(evaluations) and evaluations[-1] <= 80
    # The last share, recomputed from the evaluated cells' front: each a cell of the table.
    reference, true_hv = bench.problem(path, "cifar100", "pixel3")
    cells = {(r["acc_cifar100_test"], r["lat_pixel3_ms"]) for r in rows}
    assert all(tuple(p) in cells for p in result["front"])
    volume = dominated_volume(result["front"], reference, ["maximize", "minimize"])
    assert volume / true_hv == pytest.approx(shares[-1])


def test_dsnas_stops_once_it_reaches_95_percent(table, importable):
    path, _ = table
    result = bench.one_search(("cifar100", "fpga", "dsnas", 0, 600, str(path), 120.0))
    assert result["curve"][-1][2] >= 0.95 and result["stopped"] == "a callback (or the sampler, out of candidates) called study.stop()"
    assert result["evaluations"] < 600 and result["proposal_s_median"] is not None


def test_summary_cells():
    assert bench.cell([10, 20, None], 600) == "20 [10, >600]"
    assert bench.cell([None, None, 30], 600) == ">600 [30, >600]"
    assert bench.cell([None, None], 600) == ">600 (none)"
    assert bench.ratio(50, 200, 600) == "0.25x"
    assert bench.ratio(50, float("inf"), 600).startswith("<0.08x")
    assert bench.ratio(float("inf"), 480, 600) == ">1.25x (dsnas's median did not reach it in 600)"  # was "infx"
    assert bench.first_reaching([(3, 0.1, 0.5), (9, 0.2, 0.91), (12, 0.3, 0.96)], 0.95) == (12, 0.3)
    assert bench.ratio_interval([10] * 10, [20] * 10, 600) == (0.5, 0.5)  # no spread, no doubt
    # ours: 10 seeds at 10..19 (median 14.5); theirs: 29 or 30 (median 29.5): a resampled median of ours lies
    # within 10-19 and of theirs within 29-30, so every ratio within [10/30, 19/29], and the point ratio inside
    low, high = bench.ratio_interval(list(range(10, 20)), [29] * 5 + [30] * 5, 600)
    assert 10 / 30 <= low < 14.5 / 29.5 < high <= 19 / 29
    assert bench.ratio_interval([5, float("inf")], [600, 600], 600)[1] == 1.0  # not reached counts as the budget


def test_a_resumed_run_reuses_only_searches_that_answer_its_budget():
    """A quick 20-evaluation run then the real 600-evaluation one in the same --out: the short searches were kept
    and reported as not reaching a level within 600. Kept now: the same budget and time limit, or a search that
    reached the last level within the new budget (it stopped there)."""
    short = {"evaluations": 20, "budget": 20, "timeout_s": 300.0, "curve": [[20, 1.0, 0.8]]}
    assert not bench.resumable(short, 600, 300.0)
    assert bench.resumable(short, 20, 300.0) and not bench.resumable(short, 20, 60.0)
    reached = {"evaluations": 40, "budget": 100, "timeout_s": 300.0, "curve": [[40, 1.0, 0.96]]}
    assert bench.resumable(reached, 600, 60.0) and not bench.resumable(reached, 30, 300.0)
    assert not bench.resumable(reached, 600, 0.5)  # it reached the level after 1 s: not within 0.5 s
    assert not bench.resumable({"evaluations": 20, "curve": [[20, 1.0, 0.5]]}, 20, 300.0)  # an old line: no budget


def test_a_mistyped_pair_is_one_line_naming_the_datasets_and_devices(table):
    with pytest.raises(SystemExit, match=r"--pairs: \['cifar10/pixel3'\] are not DATASET/DEVICE"):
        bench.main(["--csv", str(table[0]), "--pairs", "cifar10/pixel3", "--report-only"])
