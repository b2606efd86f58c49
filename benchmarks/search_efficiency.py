"""Search efficiency on a problem whose true Pareto front is known: a fully enumerated space of 108 byte-level
transformer LMs, each trained for real on the quickstart's task and measured on this machine
(benchmarks/record_table.py wrote benchmarks/data/charlm_space.csv). Every search runs through dsnas's own driver
(`dsnas.search`, the local executor, SQLite) with the table as its task (benchmarks/table_task.py: a task plug-in
that uses only the documented protocol), so the samplers, the rungs, the decisions at each rung and the latency
predictor are dsnas's real code; only the trials' results are looked up instead of trained again.

Methods: random search, Optuna's default multi-objective sampler (TPE), NSGA-II, and dsnas with multi-fidelity
(successive halving over the training budget) and the latency predictor (TPE as its sampler), and dsnas's own
sampler ([sampler] name = "dsnas", which takes the table's hardware figures as known before training), alone and
with halving and the predictor (ablations: random search, TPE and dsnas's sampler with halving alone, TPE with the
predictor alone); each run with --seeds seeds. With --hidden-hardware the table task gives no figure before
training, as dsnas's built-in tasks do not: the figures are measured at rung 0 and the dsnas sampler models them.
Objectives: accuracy and throughput (tokens/s at batch 32), both maximized, subject to a limit on latency at batch 1
(--max-latency-ms; default: the table's 70th percentile, so that about 30% of the space is infeasible).

What it reports: first, the latency predictor's held-out accuracy on the table's measurements next to a
FLOPs-only baseline, per batch size and pooled (as `dsnas predictor` prints it). The predictor's features were
chosen on this table, so these figures flatter it; benchmarks/predictor_check.py measures it on a space it was not
chosen on. Then, median and [min, max] over seeds:
- the hypervolume of the feasible front found, as a share of the true front's (reference point: the worst
  accuracy and throughput of the whole table), after each evaluated trial;
- the evaluated trials, and the wall seconds, each method needs to reach 90% and 95% of the true hypervolume.
  Wall seconds are those of a search with one worker on this machine: the recorded cost of what each trial ran
  (measuring, training up to where it stopped, one validation pass per rung), plus the driver's own time up to
  that trial in this replay (sampling, storage, the predictor's fits), plus, for each candidate the predictor
  judged, the cost of counting its FLOPs and bytes in the driver, measured at the start of this run on real
  models of the table (the table task reads its counts from the table instead). A run that never reaches a level
  within --trials counts as not reaching it (shown as ">N").

On NAS-Bench-201 (`--table nb201`): benchmarks/nb201_efficiency.py, whose docstring says what it runs.

Run:  python benchmarks/search_efficiency.py [--seeds 5] [--first-seed 0] [--trials 160] [--max-latency-ms X]
      [--methods a,b] [--out DIR] [--hidden-hardware]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TABLE = ROOT / "benchmarks" / "data" / "charlm_space.csv"

STUDY = """
[study]
name = "{name}"
[objectives]
accuracy = "maximize"
throughput = "maximize"
[sampler]
name = "{sampler}"
seed = {seed}
[budget]
n_trials = {trials}
[space]
file = "{space}"
[task]
name = "table_task:TableTask"
table = "{table}"
hardware_known = {known}
[hardware]
batch_sizes = [1, 32]
[hardware.constraints]
max_latency_ms = {limit}
[executor]
kind = "local"
[fidelity]
kind = "{fidelity}"
eta = {eta}
min_fraction = {min_fraction}
margin = {margin}
[predictor]
skip = {predictor}
"""
# name: (sampler, fidelity kind, predictor)
METHODS = {
    "random": ("random", "none", "false"),
    "tpe (Optuna default)": ("tpe", "none", "false"),
    "nsga2": ("nsga2", "none", "false"),
    "dsnas: tpe + halving + predictor": ("tpe", "successive_halving", "true"),
    "  ablation: tpe + halving": ("tpe", "successive_halving", "false"),
    "  ablation: tpe + predictor": ("tpe", "none", "true"),
    "dsnas sampler": ("dsnas", "none", "false"),
    "dsnas sampler + halving + predictor": ("dsnas", "successive_halving", "true"),
    "  ablation: random + halving": ("random", "successive_halving", "false"),
    "  ablation: dsnas sampler + halving": ("dsnas", "successive_halving", "false"),
}
LEVELS = (0.90, 0.95)


def space_of(rows: list[dict]) -> str:
    """The search space that enumerates the table: each key's distinct values (layers alike within a model)."""
    choices: dict[str, set] = {}
    for r in rows:
        arch = json.loads(r["arch"])
        layers = arch["layers"]
        if any(layer != layers[0] for layer in layers):
            raise SystemExit(f"{r['key']}: its layers differ; this benchmark enumerates spaces of alike layers")
        values = {"n_layers": len(layers), "d_model": arch["d_model"], **layers[0]}
        for key, value in values.items():
            choices.setdefault(key, set()).add(value)
    lines = [f"{k} = {json.dumps(sorted(v))}" for k, v in choices.items()]
    return 'family = "transformer_lm"\n[choices]\n' + "\n".join(lines) + "\n"


def read_table(path: Path) -> list[dict]:
    rows = list(csv.DictReader(path.open()))
    for r in rows:
        for k, v in r.items():
            if k not in ("key", "arch"):
                r[k] = float(v)
    return rows


def true_front(rows: list[dict], limit: float) -> tuple[list[list[float]], list[float], float]:
    """(the feasible front's points, the reference point, its hypervolume)."""
    from dsnas.pareto import dominated_volume, front_indices

    directions = ["maximize", "maximize"]
    reference = [min(r["accuracy"] for r in rows), min(r["throughput_tok_s"] for r in rows)]
    feasible = [[r["accuracy"], r["throughput_tok_s"]] for r in rows if r["latency_ms"] <= limit]
    front = [feasible[i] for i in front_indices(feasible, directions)]
    return front, reference, dominated_volume(front, reference, directions)


def rung_ranking(rows: list[dict]) -> str:
    """How well the accuracy at each recorded share of the budget ranks the final accuracy (Spearman over the
    table's architectures): what sets min_fraction's default (docs/fidelity-and-predictor.md)."""
    import numpy as np

    from dsnas.predictor import spearman

    final = np.array([r["accuracy"] for r in rows])
    shares = [k.removeprefix("accuracy@") for k in rows[0] if k.startswith("accuracy@")]
    cells = [f"{s} {spearman(np.array([r[f'accuracy@{s}'] for r in rows]), final):.2f}" for s in shares]
    return f"rung accuracy against the final, Spearman over {len(rows)} architectures: " + ", ".join(cells)


def predictor_accuracy(rows: list[dict]) -> str:
    """dsnas's latency and peak-memory predictor on the table's own measurements (every architecture at batch 1
    and 32), 5-fold split by architecture, next to the FLOPs-only power law: what `dsnas predictor` prints. The
    data its features were chosen on: predictor_check.py gives the figures on a space they were not."""
    from dsnas.predictor import MeasuredRow, cross_validate

    measured = [MeasuredRow("table", "cpu", r["key"], json.loads(r["arch"]), bs, r[f"flops_bs{bs}"],
                            r[f"bytes_bs{bs}"], r["params"], r[f"latency_ms_bs{bs}"], r[f"peak_memory_mb_bs{bs}"])
                for r in rows for bs in (1, 32)]
    head = ("latency predictor on this table, the data its design was chosen on (held-out figures on another "
            "space: benchmarks/predictor_check.py)")
    return "\n".join([head, *(cross_validate(measured, target).table() for target in ("latency", "peak_memory"))])


def run_search(method: str, seed: int, args: argparse.Namespace, limit: float, folder: Path) -> tuple[list, float]:
    """One search; returns (its trials in number order, the driver's own seconds)."""
    import optuna

    from dsnas.progress import Progress
    from dsnas.run import run_study
    from dsnas.spec import load_study

    sampler, fidelity, predictor = METHODS[method]
    space = folder / "space.toml"
    study_file = folder / f"m{list(METHODS).index(method)}_s{seed}.toml"
    study_file.write_text(STUDY.format(name=study_file.stem, sampler=sampler, seed=seed, trials=args.trials,
                                       space=space, table=args.table, limit=limit, fidelity=fidelity,
                                       eta=args.eta, min_fraction=args.min_fraction, margin=args.margin,
                                       predictor=predictor, known=str(not args.hidden_hardware).lower()))
    spec = load_study(study_file)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        run_study(spec, progress=Progress(spec, out=io.StringIO()))
    driver_s = time.perf_counter() - start
    study = optuna.load_study(study_name=spec.name, storage=spec.storage)
    return sorted(study.trials, key=lambda t: t.number), driver_s


def trial_cost(trial, row: dict, count_s: float) -> tuple[float, bool]:
    """(recorded seconds of what this trial ran, whether it was evaluated: counts toward the trial budget)."""
    attrs = trial.user_attrs
    counted = count_s if any(k.startswith("predicted.") for k in attrs) else 0.0  # the driver counted it first
    if attrs.get("pruned_by") == "predictor" or "reused_from" in attrs:  # a reused repeat trains nothing
        return counted, False
    rungs = sorted(int(k[4:]) for k in attrs if k.startswith("rung") and k[4:].isdigit())
    evals = max([k for k in rungs if k > 0], default=0)  # one validation pass at each rung reached
    if trial.state.name == "PRUNED":
        fraction = attrs[f"rung{attrs['pruned_at']}"]["fraction"]
        return counted + row["measure_s"] + fraction * row["train_s"] + evals * row["eval_s"], True
    return counted + row["trial_s"] + evals * row["eval_s"], True


def trajectory(trials: list, rows_by_arch: dict, reference: list[float], limit: float,
               count_s: float) -> list[tuple]:
    """(evaluated trials so far, wall seconds so far, hypervolume) after each trial, in the order they ran."""
    from dsnas.pareto import dominated_volume

    out, points, cost, evaluated = [], [], 0.0, 0
    begun = min(t.datetime_start for t in trials)
    for t in trials:
        if t.state.name not in ("COMPLETE", "PRUNED"):
            continue
        row = rows_by_arch[json.dumps(t.user_attrs["arch"], sort_keys=True)]
        seconds, counted = trial_cost(t, row, count_s)
        cost += seconds
        evaluated += counted
        if t.state.name == "COMPLETE" and t.user_attrs["latency_ms"] <= limit:
            points.append(list(t.values))
        driver = (t.datetime_complete - begun).total_seconds()  # the replay's own time: all driver, no training
        out.append((evaluated, cost + driver, dominated_volume(points, reference, ["maximize", "maximize"])))
    return out


def counting_seconds(rows: list[dict], sample: int = 12) -> float:
    """What the driver spends counting one candidate's FLOPs and bytes (dsnas.screening.count_arch on the
    quickstart's task, one core), median over ``sample`` of the table's architectures."""
    from dsnas.screening import count_arch
    from dsnas.spec import TaskSpec
    from dsnas.tasks import make_task

    task = make_task(TaskSpec("charlm", {"context": 64, "batch_size": 32}, str(ROOT)))
    times = []
    for r in rows[:: max(1, len(rows) // sample)]:
        start = time.perf_counter()
        count_arch(json.loads(r["arch"]), task, (1, 32))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def first_reaching(curve: list[tuple[int, float, float]], target: float) -> tuple[float, float] | None:
    for evaluated, cost, volume in curve:
        if volume >= target * (1 - 1e-12):
            return evaluated, cost
    return None


def chosen_methods(text: str | None) -> list[str]:
    """The methods --methods names (all when None), in METHODS' order. A name that is none of them is refused: it
    was dropped without a word, and a run of only mistyped names printed an empty table."""
    if not text:
        return list(METHODS)
    wanted = [x.strip() for x in text.split(",")]
    unknown = [x for x in wanted if x not in [m.strip() for m in METHODS]]
    if unknown:
        raise SystemExit(f"--methods: {unknown} are none of {[m.strip() for m in METHODS]}. Fix: name them as "
                         "listed, comma-separated")
    return [m for m in METHODS if m.strip() in wanted]


def summary(values: list[float | None], budget: float, unit: str = "") -> str:
    """Median [min, max] over seeds; a run that never reached the level counts as more than the budget."""
    filled = sorted(v if v is not None else float("inf") for v in values)
    median = statistics.median(filled)
    if median == float("inf"):
        return f">{budget:.0f}{unit} ({sum(v is not None for v in values)}/{len(values)} reached)"
    top = f"{filled[-1]:.0f}" if filled[-1] != float("inf") else f">{budget:.0f}"
    return f"{median:.0f}{unit} [{filled[0]:.0f}, {top}]"


def main() -> None:
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--table")
    if first.parse_known_args()[0].table == "nb201":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from nb201_efficiency import main as nb201  # NAS-Bench-201: the scoring its SOURCES.md gives

        return nb201(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", default=str(TABLE))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--trials", type=int, default=160, help="evaluated trials per search")
    parser.add_argument("--max-latency-ms", type=float, help="the latency limit (default: the table's 70th pct)")
    from dsnas.spec import FidelitySpec

    defaults = FidelitySpec()  # dsnas's own defaults, unless told otherwise
    parser.add_argument("--eta", type=int, default=defaults.eta)
    parser.add_argument("--min-fraction", type=float, default=defaults.min_fraction)
    parser.add_argument("--margin", type=float, default=defaults.margin)
    parser.add_argument("--methods", help="comma-separated subset of the methods (default: all)")
    parser.add_argument("--out", help="folder for curves.csv and search_efficiency.png")
    parser.add_argument("--hidden-hardware", action="store_true",
                        help="the task does not give the hardware figures before training (as the built-in tasks): "
                        "the dsnas sampler models them, and they are measured at rung 0")
    args = parser.parse_args()
    methods = chosen_methods(args.methods)
    if args.seeds < 1 or args.trials < 1:  # no seed left nothing to take a median of: a StatisticsError
        raise SystemExit(f"--seeds {args.seeds}, --trials {args.trials}: each must be at least 1")
    if not Path(args.table).is_file():
        raise SystemExit(f"--table {args.table}: no table there (benchmarks/record_table.py writes one; the default "
                         f"is {TABLE}). Fix: pass --table PATH, or --table nb201")
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # table_task, as a study names it

    rows = read_table(Path(args.table))
    folder = Path(tempfile.mkdtemp(prefix="dsnas-efficiency-"))
    (folder / "space.toml").write_text(space_of(rows))
    latencies = sorted(r["latency_ms"] for r in rows)
    limit = args.max_latency_ms or round(latencies[int(0.7 * len(latencies))], 3)
    front, reference, true_hv = true_front(rows, limit)
    by_arch = {json.dumps(json.loads(r["arch"]), sort_keys=True): r for r in rows}
    infeasible = sum(r["latency_ms"] > limit for r in rows)
    # The table does not say where it was recorded (record_table.py ran it on a 2-core CPU): this is the replay's.
    print(f"table {Path(args.table).name}: {len(rows)} architectures, replayed on {platform.processor() or 'cpu'} "
          f"({platform.node()}); latency limit {limit:g} ms at batch 1 ({infeasible} infeasible); true front "
          f"{len(front)} points, hypervolume {true_hv:.6g} (reference accuracy {reference[0]:.4f}, "
          f"throughput {reference[1]:,.0f} tok/s)")
    from dsnas.fidelity import RungPlan

    rungs = RungPlan(FidelitySpec(eta=args.eta, min_fraction=args.min_fraction)).rungs
    print(rung_ranking(rows))
    print(predictor_accuracy(rows) + "\n")
    count_s = counting_seconds(rows)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    print(f"seeds {seeds.start}-{seeds.stop - 1} x {args.trials} evaluated trials per method; successive halving eta "
          f"{args.eta}, rungs at {', '.join(str(Fraction(r).limit_denominator(1000)) for r in rungs)} of the "
          f"training budget, margin {args.margin:g}; counting a candidate for the predictor: {count_s:.3f} s\n")
    curves: dict[str, list] = {}
    lines = []
    try:
        for method in methods:
            runs, drivers, skipped = [], [], []
            for seed in seeds:
                trials, driver_s = run_search(method, seed, args, limit, folder)
                runs.append(trajectory(trials, by_arch, reference, limit, count_s))
                drivers.append(driver_s)
                skipped.append(sum(t.user_attrs.get("pruned_by") == "predictor" for t in trials))
            curves[method] = runs
            lines.append((method, *row_cells(runs, true_hv, args.trials), f"{statistics.median(skipped):.0f}",
                          f"{statistics.median(drivers):.1f} s"))
            print(f"  done: {method}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    head = ("method", "trials to 90%", "wall s to 90%", "trials to 95%", "wall s to 95%", "final HV",
            "wall s spent", "skipped", "driver s")
    widths = [max(len(str(r[i])) for r in [head, *lines]) for i in range(len(head))]
    for r in [head, *lines]:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print("\nmedian [min, max] over seeds; wall s: one worker on this machine, recorded trial costs plus the "
          "driver's own time (see the docstring); final HV: share of the true front's hypervolume after the "
          "budget; skipped: candidates the predictor skipped untrained; driver s: the driver's own time for the "
          "whole search")
    if args.out:
        write_curves(Path(args.out), curves, true_hv, args.first_seed)


def row_cells(runs: list, true_hv: float, trials: int) -> list[str]:
    """Trials and seconds to each level, the final hypervolume share and the seconds spent, over seeds."""
    cells = []
    for level in LEVELS:
        hits = [first_reaching(c, level * true_hv) for c in runs]
        cells.append(summary([h[0] if h else None for h in hits], trials))
        cells.append(summary([h[1] if h else None for h in hits], max(c[-1][1] for c in runs), " s"))
    shares = sorted(c[-1][2] / true_hv for c in runs)
    cells.append(f"{statistics.median(shares):.1%} [{shares[0]:.1%}, {shares[-1]:.1%}]")
    cells.append(f"{statistics.median(c[-1][1] for c in runs):.0f} s")
    return cells


def write_curves(out: Path, curves: dict[str, list], true_hv: float, first_seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    with (out / "curves.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "seed", "evaluated", "wall_s", "hv_share"])
        for method, runs in curves.items():
            for seed, curve in enumerate(runs, start=first_seed):
                writer.writerows([method.strip(), seed, n, round(s, 2), v / true_hv] for n, s, v in curve)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, runs in curves.items():
        for axis, x in ((axes[0], 0), (axes[1], 1)):
            grid = sorted({p[x] for c in runs for p in c})
            med = [statistics.median(_at(c, x, g) for c in runs) / true_hv for g in grid]
            axis.step(grid, med, where="post", label=method.strip())
    axes[0].set_xlabel("evaluated trials")
    axes[1].set_xlabel("wall seconds, one worker (recorded trial costs + driver)")
    for axis in axes:
        axis.set_ylabel("hypervolume / true (median over seeds)")
        axis.axhline(0.9, color="grey", lw=0.5)
        axis.axhline(0.95, color="grey", lw=0.5)
        axis.set_ylim(0, 1.02)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "search_efficiency.png", dpi=110)
    print(f"wrote {out / 'curves.csv'} and {out / 'search_efficiency.png'}")


def _at(curve: list, x: int, value: float) -> float:
    """The hypervolume share a run had reached by ``value`` on axis ``x`` (0 before its first point)."""
    reached = [p[2] for p in curve if p[x] <= value]
    return reached[-1] if reached else 0.0


if __name__ == "__main__":
    main()
