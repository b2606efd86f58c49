"""Faults injected into real searches, and what each cost: survived or not, completed trials lost (must be
0), duplicates (must be 0), and the recovery time (wall time beyond a fault-free run of the same study).

Every scenario runs `dsnas search` as a subprocess on the same small study (charlm, 4 trials, Ray executor
unless said) in a fresh folder:

  baseline        no fault
  worker crash    the first trial's worker process exits abruptly (os._exit, as SIGKILL would); the trial
                  fails and runs again ([budget] retries = 1)
  OOM kill        the first trial's worker joins a memory cgroup of 64 MiB and allocates until the kernel's OOM
                  killer ends it; the trial fails as "out of memory" and runs again (retries = 1). Skipped, with
                  the reason, where this process may not create a memory cgroup
  db outage       the study on a PostgreSQL server of its own (tests/test_db_outage.py), stopped with
                  `pg_ctl stop -m fast` once the first trial is stored, started again --outage-s later; the
                  driver retries with backoff and goes on. Compared with a fault-free run on the same server
                  (baseline PostgreSQL), not with the SQLite baseline
  trial hangs     the first trial never returns; trial_timeout_s = 20 fails it and kills its worker
  divergence      the first trial's loss becomes NaN: a FAIL trial with the reason, the search goes on
  driver killed   the driver gets SIGKILL at a random moment, three times in a row (local executor), and
                  the same command is run again after each; the last run finishes the budget

Run:  python benchmarks/reliability.py [--seed 0] [--outage-s 5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

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
{storage}
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


def make_study(folder: Path, fault: str | None, executor: str = "ray", budget: str = "", task_params: str = "",
               storage: str | None = None) -> Path:
    (folder / "space.toml").write_text(SPACE)
    task, params = "charlm", ""
    if fault:
        task = "dsnas.tasks.faults:faulty_charlm"
        params = f'fault = "{fault}"\nmarker = "{folder / "marker.txt"}"\n{task_params}'
    path = folder / "rel.toml"
    path.write_text(STUDY.format(task=task, task_params=params, executor=executor, budget=budget,
                                 storage=f"storage = {json.dumps(storage)}" if storage else ""))
    return path


def storage_of(study: Path, url: str | None) -> str:
    return url or f"sqlite:///{study.parent / 'rel.db'}"


def search(study: Path, timeout: float = 900) -> tuple[int, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dsnas.cli", "search", str(study)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    return done.returncode, time.perf_counter() - started


def outcome(study: Path, url: str | None = None) -> dict[str, int]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    trials = optuna.load_study(study_name="rel", storage=storage_of(study, url)).trials
    states = [t.state.name for t in trials]
    return {"complete": states.count("COMPLETE"), "fail": states.count("FAIL"), "running": states.count("RUNNING")}


def completed_values(study: Path, url: str | None = None) -> dict[int, tuple[float, ...]]:
    import optuna

    if url is None and not (study.parent / "rel.db").exists():
        return {}
    try:
        trials = optuna.load_study(study_name="rel", storage=storage_of(study, url)).trials
    except KeyError:
        return {}
    return {t.number: tuple(t.values) for t in trials if t.state.name == "COMPLETE"}


def scenario(fault: str | None, budget: str = "", task_params: str = "") -> tuple[bool, dict[str, int], float]:
    with tempfile.TemporaryDirectory() as tmp:
        study = make_study(Path(tmp), fault, budget=budget, task_params=task_params)
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


def oom_kill() -> tuple[bool, dict[str, int], float] | str:
    """The OOM-kill scenario, or why it cannot run here."""
    from dsnas.tasks.faults import memory_cgroup, memory_cgroup_supported

    ok, why = memory_cgroup_supported()
    if not ok:
        return why
    with memory_cgroup(limit_mb=64) as cgroup:
        return scenario("oom_once", "retries = 1", f'cgroup = "{cgroup}"')


def db_outage(down_s: float) -> list[tuple[str, bool, dict[str, int], float]] | str:
    """Two runs on a private PostgreSQL server, each on a new database: a fault-free baseline, and one whose
    server is stopped for ``down_s`` once the first trial is stored (or why they cannot run here)."""
    from test_db_outage import PrivatePostgres, postgres_binaries

    binaries = postgres_binaries()
    if binaries is None:
        return "no PostgreSQL server binaries (/usr/lib/postgresql/*/bin): apt-get install postgresql"
    server = PrivatePostgres(binaries)
    try:
        server.start()
        return [("baseline PostgreSQL", *postgres_run(server, None)), ("db outage", *postgres_run(server, down_s))]
    finally:
        server.destroy()


def postgres_run(server: Any, down_s: float | None) -> tuple[bool, dict[str, int], float]:
    """Lost: a trial COMPLETE before the stop that is not COMPLETE with the same values at the end."""
    url = server.create_database()
    with tempfile.TemporaryDirectory() as tmp:
        study = make_study(Path(tmp), None, storage=url)
        log = Path(tmp) / "search.log"
        started = time.perf_counter()
        with log.open("w") as out:
            driver = subprocess.Popen([sys.executable, "-m", "dsnas.cli", "search", str(study)], cwd=ROOT,
                                      stdout=out, stderr=subprocess.STDOUT)
        before: dict[int, tuple[float, ...]] = {}
        if down_s is not None:
            while "done 1/" not in log.read_text() and driver.poll() is None:
                time.sleep(0.05)
            before = completed_values(study, url)
            server.stop()
            time.sleep(down_s)
            server.start()
        code = driver.wait(timeout=900)
        wall = time.perf_counter() - started
        text = log.read_text()
        final = completed_values(study, url)
        lost = sum(1 for n, v in before.items() if final.get(n) != v)
        counts = outcome(study, url)
        survived = code == 0 and counts["complete"] == 4 and counts["running"] == 0 and lost == 0
        if down_s is not None:
            survived &= "database lost" in text and "database back" in text
            back = [line.strip() for line in text.splitlines() if "database back after" in line]
            print(f"db outage: server down {down_s:g} s; driver: {back[0] if back else 'never saw it come back'}")
        return survived, {**counts, "lost": lost, "duplicates": max(0, counts["complete"] - 4)}, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--outage-s", type=float, default=5.0, help="how long the database server is down")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    rows = [("baseline", *scenario(None))]
    rows.append(("worker crash", *scenario("crash_once", "retries = 1")))
    skipped = {}
    oom = oom_kill()
    if isinstance(oom, str):
        skipped["OOM kill"] = oom
    else:
        rows.append(("OOM kill", *oom))
    outage = db_outage(args.outage_s)
    if isinstance(outage, str):
        skipped["db outage"] = outage
    else:
        rows += outage
    rows.append(("trial hangs", *scenario("hang_once", "trial_timeout_s = 20")))
    rows.append(("divergence", *scenario("diverge_once")))
    rows.append(("driver killed x3", *driver_kills(rng)))
    walls = {name: wall for name, _, _, wall in rows}
    print(f"{'fault':20} {'survived':>8} {'complete':>8} {'failed':>6} {'lost':>4} {'dups':>4} {'wall s':>7} "
          f"{'recovery s':>10}")
    for name, survived, counts, wall in rows:
        base = walls["baseline PostgreSQL" if name in ("db outage", "baseline PostgreSQL") else "baseline"]
        print(f"{name:20} {'yes' if survived else 'NO':>8} {counts['complete']:>8} {counts['fail']:>6} "
              f"{counts['lost']:>4} {counts['duplicates']:>4} {wall:>7.1f} {wall - base:>+10.1f}")
    for name, why in skipped.items():
        print(f"{name:20} {'skipped':>8}  {why}")
    print("recovery = wall time beyond the fault-free baseline; the driver-kill row runs the local executor, "
          "the others Ray (which starts anew in each run); the db-outage row is compared with the PostgreSQL baseline "
          "(the others with the SQLite one), and its recovery includes the time the server was down")


if __name__ == "__main__":
    main()
