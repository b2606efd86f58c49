"""Search efficiency on NAS-Bench-201 (`python benchmarks/search_efficiency.py --table nb201`): how many evaluated
(trained) architectures each search method needs to reach 90% and 95% of the true front's hypervolume, on each
(dataset, device) pair of ../shared/benchmarks/nb201/nb201_dev.csv: 15,625 cells with recorded accuracy on
CIFAR-100 and ImageNet16-120 and recorded latency on six devices. Maximize accuracy, minimize latency; the
hypervolume's reference point is the one SOURCES.md gives (the 15th percentile of the table's accuracy, the median
of the device's latency), and the true front is the whole table's.

Every search runs through dsnas's own driver (`dsnas.run.run_study`, the local executor) with the table as its
task (benchmarks/nb201_task.py, a task plug-in that knows each cell's latency before training, as a measurement of
the untrained model would), on an in-memory Optuna study (SQLite would cost more than the lookups). A repeated
proposal is answered from the stored result ([budget] repeats = "reuse", dsnas's default) and does not count as an
evaluation. Methods: random search, Optuna's TPE (its multi-objective default), NSGA-II and GPSampler, two published
NAS baselines (regularized evolution, Pareto local search: benchmarks/nas_baselines.py) and dsnas's own sampler.

A search stops at --evaluations, or once it reaches 95% (what the score needs). Results go to --out (one JSON line
per search) as they finish, so an interrupted run resumes where it stopped. The last lines give, per pair, dsnas's
evaluations to 90% (and 95%) as a ratio of TPE's, with the middle 95% of that ratio over bootstrap resamples of
the seeds (how much of a ratio near a target is the seeds' luck)."""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import io
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TABLE = ROOT.parent / "shared" / "benchmarks" / "nb201" / "nb201_dev.csv"
SPACE = HERE / "nb201_space.toml"
DATASETS = ("cifar100", "imagenet16")
DEVICES = ("pixel3", "fpga", "eyeriss", "1080ti_256", "silver_4114", "samsung_a50")
METHODS = ("random", "tpe", "nsga2", "gp", "regularized evolution", "local search", "dsnas")
LEVELS = (0.90, 0.95)

STUDY = """
[study]
name = "nb201"
[objectives]
accuracy = "maximize"
latency = "minimize"
[sampler]
name = "{sampler}"
seed = {seed}
[budget]
n_trials = {evaluations}
timeout_s = {timeout_s}
[space]
file = "{space}"
[task]
name = "nb201_task:NB201Task"
table = "{table}"
dataset = "{dataset}"
device = "{device}"
[executor]
kind = "local"
"""


@functools.lru_cache(maxsize=None)
def problem(table: Path, dataset: str, device: str) -> tuple[list[float], float]:
    """(the reference point [accuracy, latency], the true front's hypervolume) of one pair; a worker runs many
    searches of a pair, and reads the table for it once."""
    import numpy as np

    from dsnas.pareto import dominated_volume, front_indices

    column = {"cifar100": "acc_cifar100_test", "imagenet16": "acc_imagenet16_test"}[dataset]
    rows = list(csv.DictReader(table.open()))
    points = [[float(r[column]), float(r[f"lat_{device}_ms"])] for r in rows]
    reference = [float(np.percentile([p[0] for p in points], 15)), float(np.median([p[1] for p in points]))]
    directions = ["maximize", "minimize"]
    front = [points[i] for i in front_indices(points, directions)]
    return reference, dominated_volume(front, reference, directions)


def one_search(job: tuple[str, str, str, int, int, str, float]) -> dict:
    """One search of one method on one pair (this folder on sys.path: see importable); returns its curve:
    (evaluations, driver seconds, hypervolume share) at each evaluation that raised the hypervolume."""
    dataset, device, method, seed, evaluations, table, timeout_s = job
    import optuna

    from dsnas.spec import load_study

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    reference, true_hv = problem(Path(table), dataset, device)
    own = ("regularized evolution", "local search")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "study.toml"
        path.write_text(STUDY.format(sampler=method if method not in own else "random", seed=seed,
                                     evaluations=evaluations, timeout_s=timeout_s, space=SPACE, table=table,
                                     dataset=dataset, device=device))
        spec = load_study(path)
        return _search(spec, method, seed, reference, true_hv)


def _search(spec, method: str, seed: int, reference: list[float], true_hv: float) -> dict:
    import optuna
    from nas_baselines import ParetoLocalSearch, RegularizedEvolution

    from dsnas.pareto import dominated_volume, front_indices
    from dsnas.progress import Progress
    from dsnas.run import run_study
    from dsnas.space import load_space_file

    own = {"regularized evolution": RegularizedEvolution, "local search": ParetoLocalSearch}
    sampler = None
    if method in own:
        sampler = own[method](dict(load_space_file(SPACE).parameters()), seed=seed)
    study = optuna.create_study(directions=spec.directions)
    points: list[list[float]] = []
    curve: list[tuple[int, float, float]] = []
    start = time.perf_counter()

    def score(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state.name != "COMPLETE" or "reused_from" in trial.user_attrs:
            return
        points.append(list(trial.values))
        share = dominated_volume(points, reference, ["maximize", "minimize"]) / true_hv
        if not curve or share > curve[-1][2]:
            curve.append((len(points), time.perf_counter() - start, share))
        if share >= LEVELS[-1]:
            study.stop()  # the score needs nothing after the last level

    with contextlib.redirect_stdout(io.StringIO()):
        outcome = run_study(spec, progress=Progress(spec, out=io.StringIO()), study=study, sampler=sampler,
                            callbacks=[score])
    seconds = time.perf_counter() - start
    proposals = getattr(study.sampler, "proposals", [])
    front = [points[i] for i in front_indices(points, ["maximize", "minimize"])] if points else []
    return {"dataset": spec.task.params["dataset"], "device": spec.task.params["device"], "method": method,
            "seed": seed, "evaluations": len(points), "budget": spec.budget.n_trials,
            "timeout_s": spec.budget.timeout_s, "front": front,
            "trials": len(study.trials), "seconds": seconds, "curve": curve, "stopped": outcome.stopped_because,
            "proposal_s_median": statistics.median(proposals) if proposals else None,
            "proposal_s_max": max(proposals) if proposals else None}


def resumable(result: dict, evaluations: int, timeout_s: float) -> bool:
    """Whether a stored search answers this run: one with this budget and time limit, or one that reached the last
    level within this budget and time limit (it stopped there; more of either would not change its curve). A
    shorter search that reached less was reported as not reaching it within the longer budget."""
    if result["evaluations"] > evaluations:
        return False
    done = bool(result["curve"]) and result["curve"][-1][2] >= LEVELS[-1] - 1e-12 and \
        result["curve"][-1][1] <= timeout_s
    return done or (result.get("budget") == evaluations and result.get("timeout_s") == timeout_s)


def importable() -> None:
    """In each worker: nb201_task, nb201_model and nas_baselines importable, as the study names them (this folder
    goes on sys.path in the workers only: its kernels.py would shadow a package of that name elsewhere)."""
    sys.path.insert(0, str(HERE))


def first_reaching(curve: list, level: float) -> tuple[int, float] | None:
    for evaluated, seconds, share in curve:
        if share >= level - 1e-12:
            return evaluated, seconds
    return None


def cell(values: list[float | None], budget: int) -> str:
    """Median [min, max] over seeds; a search that never reached the level counts as more than the budget."""
    filled = sorted(v if v is not None else float("inf") for v in values)
    med = statistics.median(filled)
    top = f"{filled[-1]:.0f}" if filled[-1] != float("inf") else f">{budget}"
    return (f">{budget}" if med == float("inf") else f"{med:.0f}") + f" [{filled[0]:.0f}, {top}]" \
        if filled[0] != float("inf") else f">{budget} (none)"


def ratio(ours: float, theirs: float, budget: int) -> str:
    if ours == float("inf"):
        return "n/a (dsnas did not reach it)" if theirs == float("inf") else \
            f">{budget / theirs:.2f}x (dsnas's median did not reach it in {budget})"
    if theirs == float("inf"):
        return f"<{ours / budget:.2f}x (TPE's median did not reach it in {budget})"
    return f"{ours / theirs:.2f}x"


def ratio_interval(ours: list[float], theirs: list[float], budget: int, draws: int = 2000) -> tuple[float, float]:
    """The middle 95% of the ratio of medians over bootstrap resamples of each method's seeds (a search that did
    not reach the level counts as the budget): how far the ratio could move with other seeds."""
    rng = np.random.RandomState(0)
    a, b = (np.minimum(np.array(v, dtype=float), budget) for v in (ours, theirs))
    ratios = np.median(rng.choice(a, (draws, len(a))), axis=1) / np.median(rng.choice(b, (draws, len(b))), axis=1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def report(results: list[dict], budget: int, seeds: list[int]) -> None:
    by = {}
    for r in results:
        by.setdefault((r["dataset"], r["device"], r["method"]), []).append(r)
    pairs = [(d, dev) for d in DATASETS for dev in DEVICES if any(k[:2] == (d, dev) for k in by)]
    methods = [m for m in METHODS if any(k[2] == m for k in by)]
    head = ("pair", "method", "seeds", "evals to 90%", "evals to 95%", "driver s/trial")
    lines = []
    for dataset, device in pairs:
        for method in methods:
            runs = by.get((dataset, device, method), [])
            if not runs:
                continue
            reach = {level: [first_reaching(r["curve"], level) for r in runs] for level in LEVELS}
            per_trial = statistics.median(r["seconds"] / max(1, r["trials"]) for r in runs)
            lines.append((f"{dataset}/{device}", method, str(len(runs)),
                          *(cell([h[0] if h else None for h in reach[level]], budget) for level in LEVELS),
                          f"{per_trial * 1e3:.1f} ms"))
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]
    for r in [head, *lines]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    dsnas = [r for r in results if r["method"] == "dsnas" and r["proposal_s_median"] is not None]
    if dsnas:
        typical = statistics.median(r["proposal_s_median"] for r in dsnas)
        worst = max(r["proposal_s_max"] for r in dsnas)
        print(f"\ndsnas sampler, seconds per proposal: median {typical:.3f}, worst {worst:.3f} (one core of {_cpu()})")
    stops = {}
    for r in results:
        if r["evaluations"] < budget and not any(share >= LEVELS[-1] for *_, share in r["curve"]):
            stops.setdefault(r["stopped"].split(":")[0], []).append(r["method"])
    print(f"\nmedian [min, max] over seeds {min(seeds)}-{max(seeds)}; >{budget}: not reached within {budget} "
          "evaluations, or the search stopped first:")
    for why, who in stops.items():
        print(f"  {why}: {len(who)} searches ({', '.join(f'{m} {who.count(m)}' for m in dict.fromkeys(who))})")
    print("dsnas's evaluations as a ratio of TPE's (median over seeds):")
    for dataset, device in pairs:
        ours = by.get((dataset, device, "dsnas"))
        theirs = by.get((dataset, device, "tpe"))
        if not ours or not theirs:
            continue
        parts = []
        for level in LEVELS:
            reached = [[h[0] if (h := first_reaching(r["curve"], level)) else float("inf") for r in runs]
                       for runs in (ours, theirs)]
            o, t = (statistics.median(v) for v in reached)
            interval = ""
            if o != float("inf") and t != float("inf"):
                interval = " [{:.2f}, {:.2f}]".format(*ratio_interval(*reached, budget))
            parts.append(f"{level:.0%}: {ratio(o, t, budget)}{interval}")
        print(f"  {dataset}/{device}: " + ", ".join(parts))
    print("  [ , ]: the middle 95% of the ratio over 2,000 bootstrap resamples of each method's seeds")


def _cpu() -> str:
    import platform

    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", default="nb201")
    parser.add_argument("--csv", default=str(TABLE), help="the NAS-Bench-201 table")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--evaluations", type=int, default=600)
    parser.add_argument("--methods", help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--pairs", help="comma-separated dataset/device pairs (default: all 12)")
    parser.add_argument("--timeout-s", type=float, default=300.0,
                        help="a search's own time limit: one that runs out of it counts as not reaching what it "
                             "had not reached (TPE, proposing mostly evaluated cells, can run for thousands of trials)")
    parser.add_argument("--jobs", type=int, default=1, help="searches at once (each on one core)")
    parser.add_argument("--out", default="nb201_results.jsonl", help="one JSON line per search; resumed from")
    parser.add_argument("--report-only", action="store_true", help="print the table of what --out holds")
    args = parser.parse_args(argv)
    if not Path(args.csv).is_file():
        raise SystemExit(f"--csv {args.csv}: no NAS-Bench-201 table there (the repository's ../shared/benchmarks/"
                         "nb201/nb201_dev.csv; its SOURCES.md says where it comes from). Fix: pass --csv PATH")
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: {unknown} are none of {list(METHODS)}")
    pairs = [tuple(p.split("/")) for p in args.pairs.split(",")] if args.pairs else \
        [(d, dev) for d in DATASETS for dev in DEVICES]
    wrong = ["/".join(p) for p in pairs if len(p) != 2 or p[0] not in DATASETS or p[1] not in DEVICES]
    if wrong:
        raise SystemExit(f"--pairs: {wrong} are not DATASET/DEVICE with a dataset of {list(DATASETS)} and a device of "
                         f"{list(DEVICES)}. Fix: e.g. --pairs {DATASETS[0]}/{DEVICES[0]}")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    out = Path(args.out)
    results = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    results = [r for r in results if resumable(r, args.evaluations, args.timeout_s)]
    have = {(r["dataset"], r["device"], r["method"], r["seed"]) for r in results}
    jobs = [(d, dev, m, s, args.evaluations, args.csv, args.timeout_s) for m in methods for (d, dev) in pairs
            for s in seeds if (d, dev, m, s) not in have]
    if not args.report_only and jobs:
        print(f"{len(jobs)} searches to run ({len(have)} already in {out}), {args.jobs} at once", file=sys.stderr)
        context = multiprocessing.get_context("spawn")
        with context.Pool(args.jobs, initializer=importable, maxtasksperchild=20) as pool, out.open("a") as sink:
            for done, result in enumerate(pool.imap_unordered(one_search, jobs), start=1):
                sink.write(json.dumps(result) + "\n")
                sink.flush()
                results.append(result)
                print(f"  {done}/{len(jobs)} {result['dataset']}/{result['device']} {result['method']} seed "
                      f"{result['seed']}: {result['evaluations']} evaluations, {result['seconds']:.1f} s",
                      file=sys.stderr, flush=True)
    wanted = [r for r in results if (r["dataset"], r["device"]) in pairs and r["method"] in methods
              and r["seed"] in seeds]
    report(wanted, args.evaluations, seeds)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
