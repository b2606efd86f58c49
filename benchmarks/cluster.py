"""Trial throughput of `dsnas search --address` on a real Ray cluster on this machine: 2 nodes (a head and one
more node, 1 CPU each) against the baseline, 1 node (the head alone, 1 CPU).

Each run starts a fresh cluster with the `ray` CLI (tests/ray_cluster.py: loopback only, token authentication,
stopped by process id), then runs the study through the CLI in its own process, as a user does. The study: the
tiny search space of the tests, --trials trials (default 8) of byte-level LMs trained for --train-tokens tokens
(default 20000), cpus_per_trial = 1, so the 2-node cluster runs two trials at once. The random sampler (seed 0)
draws the same architectures in both runs whatever order trials finish in (TPE would not), so both runs do the
same work; measurements stop at 0.1 s per batch size (max_measure_s), or their length would follow the
machine's noise (dsnas measures until the median's confidence interval is tight, up to 3 s by default).

Throughput = completed trials per minute over the span from the first trial's start to the last trial's end,
as stored in the study; this leaves out the driver's start (imports), the same in both. Runs alternate, 1 node
then 2 nodes, --repeats times (default 1); medians are printed.

Why the ratio stays below 2 on one machine: dsnas's measurement gate is per machine (lock files in the temp
dir), so while a trial measures, no trial on the machine trains, whichever node it runs on: only training
overlaps. Both nodes also share the machine's cores with the driver and Ray's own processes, each node's first
trial pays for starting its Ray worker (importing torch), and any other dsnas run on the machine (a test suite)
takes the same gate.

Run:  python benchmarks/cluster.py [--trials 8] [--train-tokens 20000] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from ray_cluster import ray_cluster  # noqa: E402  (after the path: the tests' cluster, not a copy of it)

SPACE = """
family = "transformer_lm"
[choices]
n_layers = [1, 2]
d_model = [16, 32]
[per_layer]
n_heads = [1, 2]
ffn_ratio = [1, 2]
"""
STUDY = """
[study]
name = "cluster"
[objectives]
accuracy = "maximize"
throughput = "maximize"
[sampler]
name = "random"
seed = 0
[budget]
n_trials = {trials}
max_failures = 0
[space]
file = "{space}"
[task]
name = "charlm"
corpus_bytes = 200_000
context = 16
batch_size = 8
train_tokens = {train_tokens}
val_tokens = 512
[hardware]
device = "cpu"
batch_sizes = [1, 4]
warmup_s = 0.01
measure_s = 0.02
max_measure_s = 0.1
[fidelity]
kind = "none"  # every trial trains fully: which ones a rung stops depends on the order they finish in
[executor]
kind = "ray"
cpus_per_trial = 1
"""


def run(nodes: int, trials: int, train_tokens: int, tmp: Path) -> dict:
    """One search of a fresh study on a fresh cluster of ``nodes`` nodes: throughput and where trials ran."""
    (tmp / "space.toml").write_text(SPACE)
    study_file = tmp / "cluster.toml"
    study_file.write_text(STUDY.format(trials=trials, space=tmp / "space.toml", train_tokens=train_tokens))
    with ray_cluster(tmp / "ray", extra_nodes=nodes - 1) as cluster:
        cmd = [sys.executable, "-m", "dsnas.cli", "search", str(study_file), "--address", cluster.address]
        started = time.perf_counter()
        result = subprocess.run(cmd, env=cluster.driver_env(), capture_output=True, text=True)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(f"`dsnas search` on {nodes} node(s) failed:\n{result.stderr[-3000:]}")
        node_ids = cluster.node_ids
    done = completed_trials(study_file)
    if len(done) != trials:
        raise SystemExit(f"{len(done)} of {trials} trials completed on {nodes} node(s):\n{result.stdout[-3000:]}")
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    names = {v: k for k, v in node_ids.items()}
    per_node = {name: 0 for name in node_ids}
    for t in done:
        per_node[names[t.user_attrs["profile"]["worker"]["ray_node_id"]]] += 1
    return {"per_min": len(done) / span * 60, "span_s": span, "wall_s": wall, "per_node": per_node,
            "train_s": statistics.mean(t.user_attrs["train_s"] for t in done),
            "measure_s": statistics.mean(t.user_attrs["measure_s"] for t in done),
            "archs": [t.params for t in sorted(done, key=lambda t: t.number)]}


def completed_trials(study_file: Path) -> list:
    """The trials the search trained: a candidate drawn twice is answered from the first's result (repeats =
    "reuse"), stored complete but outside n_trials, with no profile or training time (--trials 12 stopped on "15 of
    12 trials completed")."""
    import optuna
    from optuna.trial import TrialState

    from dsnas.spec import load_study

    spec = load_study(study_file)
    study = optuna.load_study(study_name=spec.name, storage=spec.storage)
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "reused_from" not in
            t.user_attrs]


def machine() -> str:
    import ray
    import torch

    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")
    return (f"machine: {cpu}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable); "
            f"{platform.system()} {platform.release()}; load average {os.getloadavg()[0]:.2f}\n"
            f"python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--train-tokens", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    print(machine())
    print(f"study: {args.trials} trials, train_tokens {args.train_tokens}, cpus_per_trial 1, random sampler")
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(args.repeats):
        for nodes in runs:
            # Under /tmp, not $TMPDIR: Ray's sockets live in it, and a long TMPDIR stopped the run ("AF_UNIX path
            # length cannot exceed 107 bytes").
            short = "/tmp" if os.path.isdir("/tmp") else None
            with tempfile.TemporaryDirectory(prefix=f"dsnas-cluster-{nodes}-", dir=short) as tmp:
                out = run(nodes, args.trials, args.train_tokens, Path(tmp))
            runs[nodes].append(out)
            print(f"  {nodes} node(s): {out['per_min']:6.2f} trials/min  ({args.trials} trials in "
                  f"{out['span_s']:.1f} s; `dsnas search` {out['wall_s']:.1f} s; per trial: train "
                  f"{out['train_s']:.1f} s, measure {out['measure_s']:.1f} s; trials per node {out['per_node']})")
    medians = {nodes: statistics.median(r["per_min"] for r in rs) for nodes, rs in runs.items()}
    same = all(r["archs"] == runs[1][0]["archs"] for rs in runs.values() for r in rs)
    print(f"\nmedian of {args.repeats}: 1 node (baseline) {medians[1]:.2f} trials/min, "
          f"2 nodes {medians[2]:.2f} trials/min")
    pairs = ", ".join(f"{two['per_min'] / one['per_min']:.2f}" for one, two in zip(runs[1], runs[2]))
    print(f"ratio 2 nodes / 1 node: {medians[2] / medians[1]:.2f}x  (each repeat: {pairs}; same architectures "
          f"in every run: {same}); load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
