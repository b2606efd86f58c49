"""Faults injected into real searches, and what each cost: survived or not, completed trials lost (must be
0), duplicates (must be 0), and the recovery time (wall time beyond a fault-free run of the same study).

Every scenario runs `dsnas search` as a subprocess on the same small study (charlm, 4 trials, Ray executor
unless said) in a fresh folder:

  baseline        no fault
  worker crash    the first trial's worker process exits abruptly (os._exit, as SIGKILL or an OOM kill would);
                  the trial fails and runs again ([budget] retries = 1)
  trial hangs     the first trial never returns; trial_timeout_s = 20 fails it and kills its worker
  divergence      the first trial's loss becomes NaN: a FAIL trial with the reason, the search goes on
  driver killed   the driver gets SIGKILL at a random moment, three times in a row (local executor), and
                  the same command is run again after each; the last run finishes the budget

Run:  python benchmarks/reliability.py [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

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
name = "rel"
seed = 0
[objectives]
accuracy = "maximize"
throughput = "maximize"
[budget]
n_trials = 4
max_failures = 4
{budget}
[space]
file = "space.toml"
[task]
name = "{task}"
{task_params}
corpus_bytes = 200_000
context = 32
batch_size = 16
train_tokens = 40_000
val_tokens = 2048
[hardware]
device = "cpu"
batch_sizes = [1, 8]
warmup_s = 0.02
measure_s = 0.05
[executor]
kind = "{executor}"
cpus_per_trial = 1
"""


def make_study(folder: Path, fault: str | None, executor: str = "ray", budget: str = "") -> Path:
    (folder / "space.toml").write_text(SPACE)
    task, params = "charlm", ""
    if fault:
        task = "dsnas.tasks.faults:faulty_charlm"
        params = f'fault = "{fault}"\nmarker = "{folder / "marker.txt"}"'
    path = folder / "rel.toml"
    path.write_text(STUDY.format(task=task, task_params=params, executor=executor, budget=budget))
    return path


def search(study: Path, timeout: float = 900) -> tuple[int, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dsnas.cli", "search", str(study)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    return done.returncode, time.perf_counter() - started


def outcome(study: Path) -> dict[str, int]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    trials = optuna.load_study(study_name="rel", storage=f"sqlite:///{study.parent / 'rel.db'}").trials
    states = [t.state.name for t in trials]
    return {"complete": states.count("COMPLETE"), "fail": states.count("FAIL"), "running": states.count("RUNNING")}


def completed_values(study: Path) -> dict[int, tuple[float, ...]]:
    import optuna

    db = study.parent / "rel.db"
    if not db.exists():
        return {}
    try:
        trials = optuna.load_study(study_name="rel", storage=f"sqlite:///{db}").trials
    except KeyError:
        return {}
    return {t.number: tuple(t.values) for t in trials if t.state.name == "COMPLETE"}


def scenario(fault: str | None, budget: str = "") -> tuple[bool, dict[str, int], float]:
    with tempfile.TemporaryDirectory() as tmp:
        study = make_study(Path(tmp), fault, budget=budget)
        code, wall = search(study)
        counts = outcome(study)
        survived = code == 0 and counts["complete"] == 4 and counts["running"] == 0
        return survived, {**counts, "lost": 0, "duplicates": max(0, counts["complete"] - 4)}, wall


def driver_kills(rng: random.Random, kills: int = 3) -> tuple[bool, dict[str, int], float]:
    """SIGKILL the driver at a random moment, `kills` times; then let it finish. Lost: a trial COMPLETE
    before a kill that is not COMPLETE with the same values after the last run."""
    with tempfile.TemporaryDirectory() as tmp:
        study = make_study(Path(tmp), None, executor="local")
        cmd = [sys.executable, "-m", "dsnas.cli", "search", str(study)]
        seen: dict[int, tuple[float, ...]] = {}
        wall = 0.0
        for _ in range(kills):
            started = time.perf_counter()
            driver = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(2.0, 12.0))
            driver.send_signal(signal.SIGKILL)
            driver.wait()
            wall += time.perf_counter() - started
            seen.update(completed_values(study))
        code, last = search(study)
        wall += last
        final = completed_values(study)
        lost = sum(1 for n, v in seen.items() if final.get(n) != v)
        counts = outcome(study)
        survived = code == 0 and counts["complete"] == 4 and counts["running"] == 0 and lost == 0
        return survived, {**counts, "lost": lost, "duplicates": max(0, counts["complete"] - 4)}, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    rows = [("baseline", *scenario(None))]
    rows.append(("worker crash", *scenario("crash_once", "retries = 1")))
    rows.append(("trial hangs", *scenario("hang_once", "trial_timeout_s = 20")))
    rows.append(("divergence", *scenario("diverge_once")))
    rows.append(("driver killed x3", *driver_kills(rng)))
    base = rows[0][3]
    print(f"{'fault':18} {'survived':>8} {'complete':>8} {'failed':>6} {'lost':>4} {'dups':>4} {'wall s':>7} "
          f"{'recovery s':>10}")
    for name, survived, counts, wall in rows:
        print(f"{name:18} {'yes' if survived else 'NO':>8} {counts['complete']:>8} {counts['fail']:>6} "
              f"{counts['lost']:>4} {counts['duplicates']:>4} {wall:>7.1f} {wall - base:>+10.1f}")
    print("recovery = wall time beyond the fault-free baseline; the driver-kill row runs the local executor, "
          "the others Ray (which starts anew in each run)")


if __name__ == "__main__":
    main()
