"""NAS-Bench-201 as a dsnas task plug-in: the recorded test accuracy of a cell on one dataset and its recorded
latency on one device (../shared/benchmarks/nb201/nb201_dev.csv; its SOURCES.md gives the columns). A search over
it is a search over the 15,625 cells whose true Pareto front is known exactly, with no training: what
benchmarks/search_efficiency.py --table nb201 scores each search method on.

In a study file (the space: nb201_space.toml beside this file, whose family is benchmarks/nb201_model.py):

    [task]
    name = "nb201_task:NB201Task"
    table = "/path/to/nb201_dev.csv"
    dataset = "cifar100"        # or "imagenet16"
    device = "pixel3"           # a lat_<device>_ms column: pixel3, fpga, eyeriss, 1080ti_256, silver_4114, ...

The accuracy (%) has no per-epoch figures, so the task has one fidelity: a study on it runs without rungs. The
latency is known before training (``hardware``), as a measurement of the untrained model would give it."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Any

from nb201_model import arch_string  # the cell's name as the table writes it (the study's family builds it)

DATASETS = {"cifar100": "acc_cifar100_test", "imagenet16": "acc_imagenet16_test"}


def devices(header: list[str]) -> list[str]:
    return [c[len("lat_"):-len("_ms")] for c in header if c.startswith("lat_") and c.endswith("_ms")]


class NB201Task:
    def __init__(self, table: str, dataset: str = "cifar100", device: str = "pixel3") -> None:
        self.path = Path(table).expanduser().resolve()
        text = self.path.read_text()
        reader = csv.DictReader(text.splitlines())
        if dataset not in DATASETS:
            raise ValueError(f"{self.path.name}: dataset must be one of {list(DATASETS)}, not {dataset!r}")
        if device not in devices(reader.fieldnames or []):
            raise ValueError(f"{self.path.name}: device must be one of {devices(reader.fieldnames or [])}, "
                             f"not {device!r}")
        self.dataset, self.device = dataset, device
        accuracy, latency = DATASETS[dataset], f"lat_{device}_ms"
        self.rows = {r["arch_str"]: (float(r[accuracy]), float(r[latency])) for r in reader}
        self.sha256 = hashlib.sha256(text.encode()).hexdigest()

    def arch_defaults(self) -> dict[str, Any]:
        return {}

    def fingerprint(self) -> dict[str, Any]:
        return {"task": "nb201", "table_sha256": self.sha256, "dataset": self.dataset, "device": self.device}

    def figures(self, arch: dict[str, Any]) -> tuple[float, float]:
        """(accuracy %, latency ms) as recorded."""
        key = arch_string(arch)
        if key not in self.rows:
            raise KeyError(f"{self.path.name} has no cell {key}")
        return self.rows[key]

    def hardware(self, arch: dict[str, Any]) -> dict[str, float]:
        """What is known of a cell before it trains: its latency on the device."""
        return {"latency_ms": self.figures(arch)[1]}

    def evaluate_arch(self, arch: dict[str, Any], *, seed: int, rungs: tuple[float, ...], report: Any) -> dict:
        accuracy, latency = self.figures(arch)
        report(0, {"latency_ms": latency})
        return {"accuracy": accuracy, "latency_ms": latency}
