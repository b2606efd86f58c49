"""A search over a table of recorded results, as a dsnas task plug-in. It uses only the documented protocol of a
user's own evaluation function (dsnas.tasks.RunsOwnTrials) and imports nothing from dsnas: a table of one's own
(from benchmarks/record_table.py, or any CSV with the same columns) is enough to benchmark dsnas's search on it.

In a study file:

    [task]
    name = "table_task:TableTask"      # this file beside the study file, or on PYTHONPATH
    table = "/path/to/charlm_space.csv"
    hardware_known = true              # false: the hardware figures are measured at rung 0, not known in advance

The CSV has one row per architecture: ``arch`` (the architecture as JSON, as the search space produces it with
the task's fixed keys), ``accuracy`` (at the end of training), ``accuracy@1/9``, ``accuracy@1/3``, ... (at those
shares of the training budget, for multi-fidelity), the hardware figures (``latency_ms``, ``throughput_tok_s``,
``peak_memory_mb``, ``params`` and per batch size ``latency_ms_bsN``, ``flops_bsN``, ``bytes_bsN``,
``peak_memory_mb_bsN``) and ``val_loss``."""

from __future__ import annotations

import csv
import hashlib
import json
from fractions import Fraction
from pathlib import Path
from typing import Any

HARDWARE = ("latency_ms", "throughput_tok_s", "peak_memory_mb", "params")
PER_BATCH = ("latency_ms", "flops", "bytes", "peak_memory_mb")


class TableTask:
    def __init__(self, table: str, hardware_known: bool = True) -> None:
        self.path = Path(table).expanduser().resolve()
        text = self.path.read_text()
        self.rows = {_key(json.loads(r["arch"])): r for r in csv.DictReader(text.splitlines())}
        if not self.rows:
            raise ValueError(f"{self.path}: no rows")
        self.sha256 = hashlib.sha256(text.encode()).hexdigest()
        first = next(iter(self.rows.values()))
        self.shares = {Fraction(c.split("@", 1)[1]): c for c in first if c.startswith("accuracy@")}
        archs = [json.loads(r["arch"]) for r in self.rows.values()]
        # The keys every row has alike (vocabulary, context) are what the task fixes, as charlm does.
        self.fixed = {k: v for k, v in archs[0].items() if k != "family" and all(a.get(k) == v for a in archs)}
        if not hardware_known:  # as on dsnas's built-in tasks: a sampler must model the figures, not look them up
            self.hardware = None

    def arch_defaults(self) -> dict[str, Any]:
        return dict(self.fixed)

    def fingerprint(self) -> dict[str, Any]:
        return {"task": "table", "table": self.path.name, "table_sha256": self.sha256, "rows": len(self.rows)}

    def row(self, arch: dict[str, Any]) -> dict[str, str]:
        found = self.rows.get(_key(arch))
        if found is None:
            raise KeyError(f"{self.path.name} has no row for this architecture: {json.dumps(arch, sort_keys=True)}")
        return found

    def hardware(self, arch: dict[str, Any], batch_sizes: Any = None) -> dict[str, float]:
        row = self.row(arch)
        out = {name: float(row[name]) for name in HARDWARE}
        out.update({c: float(row[c]) for c in row if any(c.startswith(f"{p}_bs") for p in PER_BATCH) and row[c]})
        return out

    def evaluate_arch(self, arch: dict[str, Any], *, seed: int, rungs: tuple[float, ...], report: Any) -> dict:
        # The class's hardware(), which a subclass may override, also when hardware_known = false hides it
        row, hardware = self.row(arch), type(self).hardware(self, arch)
        report(0, hardware)  # the figures known before training: a trial over a hardware limit stops here
        for k, share in enumerate(rungs, start=1):
            report(k, {"accuracy": float(row[self._column(share)])})
        return {**hardware, "accuracy": float(row["accuracy"]), "val_loss": float(row["val_loss"])}

    def count_arch(self, arch: dict[str, Any], batch_sizes: tuple[int, ...]) -> dict[str, float]:
        """The counts the latency predictor reads, as recorded."""
        row = self.row(arch)
        out = {"params": float(row["params"])}
        for bs in batch_sizes:
            out[f"flops_bs{bs}"], out[f"bytes_bs{bs}"] = float(row[f"flops_bs{bs}"]), float(row[f"bytes_bs{bs}"])
        return out

    def _column(self, share: float) -> str:
        for recorded, column in self.shares.items():
            if abs(float(recorded) - share) < 1e-9:
                return column
        raise KeyError(f"{self.path.name} records accuracy at {', '.join(map(str, sorted(self.shares)))} of the "
                       f"budget, not at {share:.4g}: set [fidelity] eta and min_fraction to rungs the table has")


def _key(arch: dict[str, Any]) -> str:
    return json.dumps(arch, sort_keys=True)
