"""Per-trial orchestration overhead of dsnas (ask, dispatch, storage writes, bookkeeping), measured against
plain-Optuna baselines in the same run, with an evaluation that does no work at all.

Four variants, each run for N trials (--trials, default 40) with a fresh SQLite study, --repeats times (default 3):

  A            plain Optuna ask/tell: RDBStorage on a new SQLite file, TPE (seed 0), maximize/maximize
  dsnas-local  dsnas.run.run_study with executor "local" and a trivial trial_fn
  B            plain Optuna ask/tell + direct Ray tasks (num_cpus=1, max_retries=0), 2 in flight via ray.wait
  dsnas-ray    dsnas.run.run_study with executor "ray" (cpus_per_trial = 1: 2 slots on Ray's 2 CPUs)

Both baselines suggest the same parameters as dsnas's transformer_lm space (sampled by dsnas.space), so TPE does
the same work in every variant, and all variants report the same fake metrics (a function of the trial's seed).
Each timing covers creating the storage and study through the last tell, divided by N; for dsnas it is the
whole run_study call (the study spec is loaded before the clock starts). Ray is started once, before B and
dsnas-ray, and its start-up and first-task warm-up are not timed. One untimed warm-up run of each variant
(5 trials) pays for imports first. Prints the medians per trial and the ratios dsnas-local / A and dsnas-ray / B.
Variants run interleaved, so other load on the machine (shown as the load average) skews the absolute numbers
more than the ratios.

Run:  python benchmarks/overhead.py [--trials 40] [--repeats 3] [--profile]
      (--profile: also print the top costs of one dsnas-local run under cProfile)
      python benchmarks/overhead.py --sizes 100,1000,5000 [--sampler nsga2] [--postgres URL] [--repeats 1]
      (the per-trial time as the study grows, A against dsnas-local only: see growth())
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from dsnas.space import load_space_file  # noqa: E402  (after the path: runnable without installing dsnas)

SPACE_FILE = ROOT / "search_spaces" / "transformer_lm.toml"
SPACE = load_space_file(SPACE_FILE)
MAX_LATENCY_MS = 50.0
STUDY_TOML = """
[study]
name = "overhead"
seed = 0
[objectives]
accuracy = "maximize"
throughput = "maximize"
[sampler]
name = "tpe"
seed = 0
[budget]
repeats = "retrain"  # every proposal is one tell, as in the baselines (a reused repeat is not counted in n_trials)
[space]
file = "{space}"
[task]
name = "charlm"
corpus_bytes = 200_000
[hardware]
device = "cpu"
[hardware.constraints]
max_latency_ms = {max_latency}
[executor]
cpus_per_trial = 1
"""


def fake_metrics(seed: int) -> dict[str, float]:
    """What a trial 'measured': deterministic in the seed, latency always under the limit."""
    rng = random.Random(seed)
    return {"accuracy": rng.uniform(0.2, 0.6), "throughput_tok_s": rng.uniform(1e4, 1e6),
            "latency_ms": rng.uniform(1.0, MAX_LATENCY_MS - 1), "params": float(rng.randrange(10_000, 10**6))}


def trivial_evaluate(request):  # dsnas's trial_fn: no model, no weights, no probe
    from dsnas.trial import TrialResult

    return TrialResult(metrics=fake_metrics(request.seed))


def suggest(trial) -> None:
    """The same Optuna parameters a dsnas trial gets: dsnas's own sampling of the space file, settled as dsnas
    settles it here (settle_space)."""
    SPACE.sample(trial)


def settle_space() -> None:
    """Give the baselines the space as dsnas samples it on this machine. Its `engine = "auto"` choices are decided
    by the device's engine probe: where bf16 pays (an AMX CPU), each layer has one Optuna parameter more, and every
    parameter costs Optuna storage reads and writes. One single-trial dsnas run settles the offer (the probe is
    cached per device), and the baselines sample the space resolved by it."""
    global SPACE
    import optuna

    from dsnas.engine_offer import OFFER_ATTR, offered_space

    with tempfile.TemporaryDirectory(prefix="dsnas-overhead-settle-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'settle.db'}"
        stamps_dsnas(1, Path(tmp), url, "tpe")
        offer = optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url).user_attrs.get(OFFER_ATTR)
    if offer:
        SPACE = offered_space(SPACE, offer)
        print(f"space as dsnas settles it here: precision {offer['precision']}, sparsity {offer['sparsity']}")


def new_study(workdir: Path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{workdir / 'plain.db'}")
    return optuna.create_study(storage=storage, directions=["maximize", "maximize"],
                               sampler=optuna.samplers.TPESampler(seed=0))


def tell(study, trial, metrics: dict[str, float]) -> None:
    # The latency limit as dsnas stores it: Optuna 5's samplers read it, so both do the same constrained search.
    trial.set_constraint("max_latency_ms", metrics["latency_ms"] - MAX_LATENCY_MS)
    study.tell(trial, [metrics["accuracy"], metrics["throughput_tok_s"]])


def run_plain(n: int, workdir: Path) -> float:
    start = time.perf_counter()
    study = new_study(workdir)
    for _ in range(n):
        trial = study.ask()
        suggest(trial)
        tell(study, trial, fake_metrics(trial.number))
    return time.perf_counter() - start


def run_plain_ray(n: int, workdir: Path) -> float:
    import ray

    start = time.perf_counter()
    remote = ray.remote(num_cpus=1, max_retries=0)(fake_metrics)  # baseline B's Ray task
    study = new_study(workdir)
    running, asked, told = {}, 0, 0
    while told < n:
        while len(running) < 2 and asked < n:
            trial = study.ask()
            suggest(trial)
            running[remote.remote(trial.number)] = trial
            asked += 1
        ready, _ = ray.wait(list(running), num_returns=1)
        for ref in ready:
            tell(study, running.pop(ref), ray.get(ref))
            told += 1
    return time.perf_counter() - start


def run_dsnas(n: int, workdir: Path, kind: str) -> float:
    from dsnas.progress import Progress
    from dsnas.run import run_study
    from dsnas.spec import load_study

    path = workdir / "overhead.toml"
    path.write_text(STUDY_TOML.format(space=SPACE_FILE.as_posix(), max_latency=MAX_LATENCY_MS))
    spec = load_study(path, executor=kind, n_trials=n)
    start = time.perf_counter()
    outcome = run_study(spec, trial_fn=trivial_evaluate, progress=Progress(spec, out=io.StringIO()))
    elapsed = time.perf_counter() - start
    if outcome.completed != n or outcome.failed:
        raise RuntimeError(f"dsnas-{kind}: {outcome.completed} completed, {outcome.failed} failed of {n}")
    return elapsed


VARIANTS = {"A": ("optuna ask/tell (A)", run_plain),
            "dsnas-local": ("dsnas, local executor", lambda n, d: run_dsnas(n, d, "local")),
            "B": ("optuna + direct Ray tasks (B)", run_plain_ray),
            "dsnas-ray": ("dsnas, Ray executor", lambda n, d: run_dsnas(n, d, "ray"))}


def timed(name: str, n: int) -> float:
    with tempfile.TemporaryDirectory(prefix=f"dsnas-overhead-{name}-") as tmp:
        return VARIANTS[name][1](n, Path(tmp))


def machine() -> str:
    import optuna
    import ray
    import torch

    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")
    return (f"machine: {cpu}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable); "
            f"{platform.system()} {platform.release()}; load average {os.getloadavg()[0]:.2f}\n"
            f"python {platform.python_version()}, torch {torch.__version__}, optuna {optuna.__version__}, "
            f"ray {ray.__version__}")


def profile_local(n: int) -> None:
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.runcall(timed, "dsnas-local", n)
    print(f"\ncProfile of one dsnas-local run ({n} trials), top 25 by cumulative time:")
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative").print_stats(25)


def growth(sizes: list[int], sampler: str, postgres: str | None, repeats: int) -> None:
    """The driver's own time per trial as the study grows: plain Optuna ask/tell (A) and dsnas's local executor on
    the same storage and sampler, ``repeats`` runs of each per size (interleaved); per trial over the whole run,
    its first tenth and its last tenth (flat is the aim), each the median over the runs, and the ratio of the
    medians. Both clocks start before the storage is opened."""
    storages = [("sqlite", None)] + ([("postgresql", postgres)] if postgres else [])
    print(f"{'storage':<11}{'trials':>7}{'sampler':>8}  {'A ms/trial (first/last 10%)':>30}  "
          f"{'dsnas ms/trial (first/last 10%)':>33}  {'dsnas / A':>9}")
    for kind, url in storages:
        for n in sizes:
            runs: dict[str, list[tuple[float, float, float]]] = {"A": [], "dsnas": []}
            for _ in range(repeats):
                with tempfile.TemporaryDirectory(prefix="dsnas-overhead-") as tmp:
                    work = Path(tmp)
                    name = f"plain-{os.getpid()}-{n}-{time.time_ns()}"
                    runs["A"].append(per_trial(stamps_plain(n, url or f"sqlite:///{work / 'plain.db'}", name,
                                                            sampler)))
                    runs["dsnas"].append(per_trial(stamps_dsnas(n, work, url or f"sqlite:///{work / 'dsnas.db'}",
                                                                sampler)))
            ra, rd = ([statistics.median(r[i] for r in runs[k]) for i in range(3)] for k in ("A", "dsnas"))
            print(f"{kind:<11}{n:>7}{sampler:>8}  {ra[0]:>12.2f} ({ra[1]:>6.2f}/{ra[2]:>6.2f})      "
                  f"{rd[0]:>15.2f} ({rd[1]:>6.2f}/{rd[2]:>6.2f})  {rd[0] / ra[0]:>8.2f}x", flush=True)


def per_trial(stamps: list[float]) -> tuple[float, float, float]:
    """(ms per trial over the run, over its first tenth, over its last tenth) from each trial's end time."""
    n, tenth = len(stamps) - 1, max(1, (len(stamps) - 1) // 10)
    return ((stamps[-1] - stamps[0]) / n * 1e3, (stamps[tenth] - stamps[0]) / tenth * 1e3,
            (stamps[-1] - stamps[-1 - tenth]) / tenth * 1e3)


def stamps_plain(n: int, url: str, name: str, sampler: str) -> list[float]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler_obj = (optuna.samplers.NSGAIISampler if sampler == "nsga2" else optuna.samplers.TPESampler)(seed=0)
    stamps = [time.perf_counter()]
    study = optuna.create_study(storage=optuna.storages.RDBStorage(url), study_name=name,
                                directions=["maximize", "maximize"], sampler=sampler_obj)
    for _ in range(n):
        trial = study.ask()
        suggest(trial)
        tell(study, trial, fake_metrics(trial.number))
        stamps.append(time.perf_counter())
    return stamps


def stamps_dsnas(n: int, workdir: Path, url: str, sampler: str) -> list[float]:
    from dsnas.progress import Progress
    from dsnas.run import run_study
    from dsnas.spec import load_study

    path = workdir / "overhead.toml"
    text = STUDY_TOML.format(space=SPACE_FILE.as_posix(), max_latency=MAX_LATENCY_MS)
    text = text.replace('name = "overhead"', f'name = "overhead-{os.getpid()}-{n}-{time.time_ns()}"\n'
                                             f'storage = "{url}"').replace('name = "tpe"', f'name = "{sampler}"')
    path.write_text(text)
    spec = load_study(path, executor="local", n_trials=n)
    stamps = [time.perf_counter()]
    outcome = run_study(spec, trial_fn=trivial_evaluate, progress=Progress(spec, out=io.StringIO()),
                        callbacks=[lambda study, trial: stamps.append(time.perf_counter())])
    if outcome.completed != n or outcome.failed:
        raise RuntimeError(f"dsnas: {outcome.completed} completed, {outcome.failed} failed of {n}")
    return stamps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--repeats", type=int, help="runs of each variant (default 3; 1 with --sizes)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--sizes", help="e.g. 100,1000,5000: the per-trial time as the study grows (A and "
                                        "dsnas-local only), instead of the four variants")
    parser.add_argument("--sampler", choices=("tpe", "nsga2"), default="tpe", help="with --sizes")
    parser.add_argument("--postgres", help="with --sizes: also on this PostgreSQL URL (e.g. from .ci/postgres)")
    args = parser.parse_args()
    settle_space()
    if args.sizes:
        print(machine())
        growth([int(s) for s in args.sizes.split(",")], args.sampler, args.postgres, args.repeats or 1)
        return
    print(machine())
    args.repeats = args.repeats or 3
    print(f"{args.trials} trials per run, {args.repeats} repeats, fresh SQLite storage each run\n", flush=True)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}

    def phase(names: list[str]) -> None:
        for name in names:
            timed(name, 5)  # warm-up: imports, first Ray task
        for _ in range(args.repeats):  # interleaved, so that drift hits every variant alike
            for name in names:
                times[name].append(timed(name, args.trials) / args.trials)

    phase(["A", "dsnas-local"])
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        phase(["B", "dsnas-ray"])
    finally:
        ray.shutdown()

    med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    print(f"{'variant':<31}{'median ms/trial':>16}{'min':>9}{'max':>9}")
    for name, ts in times.items():
        print(f"{VARIANTS[name][0]:<31}{med[name]:>16.2f}{min(ts) * 1e3:>9.2f}{max(ts) * 1e3:>9.2f}")
    print()
    for ours, base in (("dsnas-local", "A"), ("dsnas-ray", "B")):
        print(f"{ours} / {base}: {med[ours] / med[base]:.2f}x  "
              f"({med[ours] - med[base]:+.2f} ms/trial)")
    if args.profile:
        profile_local(args.trials)


if __name__ == "__main__":
    main()
