"""Record a fully enumerated search space for benchmarks/search_efficiency.py: every architecture of a small
transformer space trained for real on the quickstart's task (the Python standard library, byte-level) and measured
on this machine by dsnas's own worker (dsnas.worker with rungs: measured first, then the validation accuracy at
eight shares of the training budget, from 1/9 to 2/3, and at its end), one CSV row each. With the whole space known,
the true Pareto front and its hypervolume are known, so a search's progress toward them can be measured; the
recorded shares cover successive halving with eta 2 (1/4, 1/2) and eta 3 (1/9, 1/3).

The space: n_layers 1-3, d_model 32-128, n_heads 1/2/4 and ffn_ratio 1/2/4 shared by all layers: 108
architectures. Each trial runs alone in this process (training on one thread, as a Ray worker with
cpus_per_trial = 1 would; measuring with every core, as dsnas does), so the seconds it records are a trial's
cost on this machine: measuring, training (without the evaluations at the eight shares) and one evaluation.

Then every architecture is measured again --remeasure times (default 2; whole passes over the table, so that a
moment of load elsewhere on the machine falls on one pass), and each hardware figure becomes the median of its
measurements, the one taken during training included.

Run:  python benchmarks/record_table.py [--out benchmarks/data/charlm_space.csv] [--train-tokens 480000]
      [--remeasure 2]   (about 60 minutes on 2 cores, on a quiet machine; a row already in --out is kept, so an
      interrupted run resumes; --remeasure alone on a finished table only measures again)
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import platform
import sys
import time
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECORDED_AT = ("1/9", "1/6", "2/9", "1/4", "1/3", "4/9", "1/2", "2/3")  # shares of the training budget
BATCH_SIZES = (1, 32)
SPACE = {"n_layers": (1, 2, 3), "d_model": (32, 64, 96, 128), "n_heads": (1, 2, 4), "ffn_ratio": (1, 2, 4)}
COLUMNS = ("key", "n_layers", "d_model", "n_heads", "ffn_ratio", *(f"accuracy@{f}" for f in RECORDED_AT), "accuracy",
           "val_loss", "latency_ms", "throughput_tok_s", "peak_memory_mb", "params", *(
               f"{name}_bs{bs}" for bs in BATCH_SIZES for name in ("latency_ms", "flops", "bytes", "peak_memory_mb")),
           "measure_s", "train_s", "eval_s", "trial_s", "arch")


def key_of(n_layers: int, d_model: int, n_heads: int, ffn_ratio: int) -> str:
    return f"L{n_layers}-d{d_model}-h{n_heads}-f{ffn_ratio}"


def architectures(context: int) -> list[dict]:
    out = []
    for n_layers, d_model, n_heads, ffn_ratio in itertools.product(*SPACE.values()):
        out.append({"family": "transformer_lm", "d_model": d_model, "vocab_size": 256, "context": context,
                    "layers": [{"n_heads": n_heads, "ffn_ratio": ffn_ratio} for _ in range(n_layers)]})
    return out


class Recorder:
    """A rung channel that lets every trial go on and notes when it reached each rung."""

    def __init__(self) -> None:
        self.reports: list[tuple[float, object]] = []

    def ask(self, report: object) -> bool:
        self.reports.append((time.perf_counter(), report))
        return True


def eval_seconds(arch: dict, task_spec) -> float:
    """One validation pass of this architecture (the cost of reporting at a rung), median of 3."""
    import statistics

    import torch

    from dsnas.models import build
    from dsnas.tasks import make_task

    task, model = make_task(task_spec), build(arch)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        task.evaluate(model, torch.device("cpu"))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def record(arch: dict, number: int, task, hardware) -> dict:
    from dsnas.trial import TrialRequest
    from dsnas.worker import run_trial

    channel = Recorder()
    start = time.perf_counter()
    rungs = tuple(float(Fraction(f)) for f in RECORDED_AT)
    result = run_trial(TrialRequest(number, arch, task, hardware, seed=number, rungs=rungs, channel=channel))
    end = time.perf_counter()
    at = {report.rung: (t - start, report.metrics) for t, report in channel.reports}
    m = result.metrics
    layer = arch["layers"][0]
    eval_s = eval_seconds(arch, task)
    row = {"key": key_of(len(arch["layers"]), arch["d_model"], layer["n_heads"], layer["ffn_ratio"]),
           "n_layers": len(arch["layers"]), "d_model": arch["d_model"], "n_heads": layer["n_heads"],
           "ffn_ratio": layer["ffn_ratio"], "measure_s": at[0][0], "eval_s": eval_s,
           # training alone: the evaluations at the recorded shares happened inside it
           "train_s": m["train_s"] - len(RECORDED_AT) * eval_s,
           "trial_s": end - start - len(RECORDED_AT) * eval_s, "arch": json.dumps(arch, sort_keys=True)}
    row.update({f"accuracy@{f}": at[k + 1][1]["accuracy"] for k, f in enumerate(RECORDED_AT)})
    for name in COLUMNS:
        if name not in row:
            row[name] = m[name]
    return row


HARDWARE = ("latency_ms", "throughput_tok_s", "peak_memory_mb", *(
    f"{name}_bs{bs}" for bs in BATCH_SIZES for name in ("latency_ms", "peak_memory_mb")))


def remeasure(out: Path, passes: int, task, hardware) -> None:
    """Measure every architecture ``passes`` more times, as the worker does (its untrained inference form, holding
    the device alone), and keep each hardware figure's median over all its measurements."""
    import statistics

    import torch

    from dsnas.kernels.convert import untrained_inference_form
    from dsnas.models import build
    from dsnas.profiler import MeasureGate, device_key, measure
    from dsnas.tasks import make_task

    rows = list(csv.DictReader(out.open()))
    seen = {r["key"]: {name: [float(r[name])] for name in HARDWARE} for r in rows}
    cpu = torch.device("cpu")
    for n in range(passes):
        for r in rows:
            model = untrained_inference_form(build(json.loads(r["arch"])))
            with MeasureGate(device_key(cpu)).exclusive():
                metrics, _ = measure(model, make_task(task), cpu, hardware)
            for name in HARDWARE:
                seen[r["key"]][name].append(metrics[name])
        print(f"measured again: pass {n + 1} of {passes}", flush=True)
    for r in rows:
        r.update({name: statistics.median(values) for name, values in seen[r["key"]].items()})
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "data" / "charlm_space.csv"))
    parser.add_argument("--train-tokens", type=int, default=480_000)
    parser.add_argument("--remeasure", type=int, default=2, help="measurement passes after training")
    args = parser.parse_args()

    import torch

    from dsnas.profiler.device import fingerprint
    from dsnas.spec import HardwareSpec, TaskSpec

    torch.set_num_threads(1)  # training on one core, as a Ray worker with cpus_per_trial = 1
    task = TaskSpec("charlm", {"context": 64, "batch_size": 32, "train_tokens": args.train_tokens}, str(ROOT))
    hardware = HardwareSpec(device="cpu", batch_sizes=BATCH_SIZES)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {r["key"] for r in csv.DictReader(out.open())} if out.exists() else set()
    fp = fingerprint(torch.device("cpu"))
    print(f"recording {len(architectures(64))} architectures on {fp.get('cpu')} ({platform.node()}), "
          f"torch {torch.__version__}, {args.train_tokens:,} training tokens each; {len(done)} already in {out}")
    with out.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if not done:
            writer.writeheader()
        for number, arch in enumerate(architectures(64)):
            layer = arch["layers"][0]
            key = key_of(len(arch["layers"]), arch["d_model"], layer["n_heads"], layer["ffn_ratio"])
            if key in done:
                continue
            row = record(arch, number, task, hardware)
            writer.writerow(row)
            f.flush()
            print(f"{number + 1:>3}/108 {key:<16} accuracy {row['accuracy@1/9']:.3f} {row['accuracy@1/3']:.3f} "
                  f"{row['accuracy']:.4f}  {row['throughput_tok_s']:>10,.0f} tok/s  {row['latency_ms']:.2f} ms  "
                  f"{row['trial_s']:.1f} s", flush=True)
    if args.remeasure:
        remeasure(out, args.remeasure, task, hardware)


if __name__ == "__main__":
    main()
