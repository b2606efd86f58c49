"""A study over a synthetic table of results, through benchmarks/table_task.py (a user's evaluation function):
searches of dozens of trials in seconds, with results known in advance, for testing multi-fidelity and the predictor."""

from __future__ import annotations

import csv
import itertools
import json
import math
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARES = ("1/9", "1/6", "2/9", "1/4", "1/3", "4/9", "1/2", "2/3")
SPACE = """
family = "transformer_lm"
[choices]
n_layers = [1, 2, 3]
d_model = [16, 32, 64]
n_heads = [1, 2]
ffn_ratio = [1, 2]
"""
STUDY = """
[study]
name = "table"
[objectives]
accuracy = "maximize"
throughput = "maximize"
[sampler]
name = "{sampler}"
seed = 0
[budget]
n_trials = {n_trials}
repeats = "{repeats}"
[space]
file = "space.toml"
[task]
name = "{task}"
table = "{table}"
{task_extra}
[hardware]
batch_sizes = [1, 32]
{constraints}
[executor]
kind = "{executor}"
[fidelity]
{fidelity}
[predictor]
{predictor}
"""


def synthetic_row(n_layers: int, d_model: int, n_heads: int, ffn_ratio: int) -> dict:
    """Accuracy grows with size and saturates, but depth hurts a narrow model (so some models are dominated: slower
    and less accurate); latency is a power law of FLOPs (so a predictor can learn it)."""
    arch = {"family": "transformer_lm", "d_model": d_model, "vocab_size": 256, "context": 16,
            "layers": [{"n_heads": n_heads, "ffn_ratio": ffn_ratio} for _ in range(n_layers)]}
    params = n_layers * (4 + 2 * ffn_ratio) * d_model ** 2 + 272 * d_model
    accuracy = 0.30 + 0.08 * (1 - math.exp(-params / 40_000)) + 0.004 * n_heads - 0.03 * (n_layers - 1) * (d_model < 64)
    row = {"arch": json.dumps(arch, sort_keys=True), "accuracy": accuracy, "val_loss": 3.0 - 2 * accuracy,
           "params": params}
    for i, share in enumerate(SHARES):  # each model keeps its rank on the way (more or less: n_heads helps late)
        row[f"accuracy@{share}"] = 0.30 + (accuracy - 0.30 - 0.004 * n_heads) * (0.5 + 0.06 * i)
    for bs in (1, 32):
        flops = 2 * params * bs * 16
        row[f"flops_bs{bs}"], row[f"bytes_bs{bs}"] = flops, 4 * params + 64 * bs * d_model * n_layers
        row[f"latency_ms_bs{bs}"] = 2e-4 * flops ** 0.8
        row[f"peak_memory_mb_bs{bs}"] = (4 * params + 4096 * bs * d_model) / 2**20
    row["latency_ms"] = row["latency_ms_bs1"]
    row["throughput_tok_s"] = 32 * 16 / (row["latency_ms_bs32"] / 1e3)
    row["peak_memory_mb"] = row["peak_memory_mb_bs32"]
    return row


def rows() -> list[dict]:
    return [synthetic_row(*combo) for combo in itertools.product((1, 2, 3), (16, 32, 64), (1, 2), (1, 2))]


def write_table_study(folder: Path, *, n_trials: int = 20, sampler: str = "random", executor: str = "local",
                      fidelity: str = 'kind = "successive_halving"', predictor: str = "skip = false",
                      max_latency_ms: float | None = None, task: str = "table_task:TableTask",
                      task_extra: str = "", repeats: str = "retrain") -> Path:
    """The study file (with its space, the table and the plug-in beside it). ``repeats`` is "retrain" here, not
    dsnas's default: on the table's 36 architectures a random sampler repeats often, and the tests of halving and
    the predictor count trials that ran; tests/test_repeats.py tests "reuse"."""
    shutil.copy(REPO / "benchmarks" / "table_task.py", folder / "table_task.py")
    table = folder / "table.csv"
    data = rows()
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(data[0]))
        writer.writeheader()
        writer.writerows(data)
    (folder / "space.toml").write_text(SPACE)
    constraints = "" if max_latency_ms is None else f"[hardware.constraints]\nmax_latency_ms = {max_latency_ms}"
    study = folder / "table.toml"
    study.write_text(STUDY.format(sampler=sampler, n_trials=n_trials, task=task, table=table, task_extra=task_extra,
                                  constraints=constraints, executor=executor, fidelity=fidelity, predictor=predictor,
                                  repeats=repeats))
    return study


def row_of(arch: dict) -> dict:
    key = json.dumps(arch, sort_keys=True)
    return next(r for r in rows() if r["arch"] == key)
