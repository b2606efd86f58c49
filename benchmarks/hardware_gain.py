"""What hardware-aware search buys on this machine: throughput at equal accuracy, dsnas's engine study against the
same search without the engine.

Both run studies/engine_cpu.toml as a user runs it (`dsnas search` in its own process, a fresh folder, the Ray
executor, real training), one after the other with the same seed and budget:

- baseline, fp32: the space with its engine choices fixed to fp32 dense layers. What a user gets without dsnas's
  engine: the best widths and depths the search finds, all in fp32 (a hand pick can only be as good as its front);
- dsnas: the space as shipped (engine = "auto": the precisions and sparsity that the engine probe found faster
  than fp32 here).

For 3 accuracy levels that both fronts reach (the lowest accuracy both reach, the highest, and their middle), it
prints each front's throughput at that accuracy, between its two neighbouring front points that of a mix of the
two (a share of the inputs to each: the harmonic mean of their throughputs, weighted; below its least accurate
point, that point serves), and their ratio; then the hypervolume ratio
(reference: accuracy 0.30, throughput 0 tokens/s). The last line is the median throughput ratio at equal
accuracy. With --repeats 2 the order alternates, so that a machine getting slower or faster during the run
favours neither.

Run:  python benchmarks/hardware_gain.py [--repeats 1] [--keep DIR] [--seeds 3]   (31 minutes with --repeats 2 on
      2 cores: 7 a repeat, 10 for the fresh seeds)
      python benchmarks/hardware_gain.py --scored DIR        (score the studies --keep DIR kept, again)
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
STUDY = ROOT / "studies" / "engine_cpu.toml"
REFERENCE = {"accuracy": 0.30, "throughput": 0.0}
FP32_ONLY = 'precision = ["fp32"]\nsparsity = ["dense"]\n'


def run(variant: str, folder: Path) -> dict:
    """One engine study, searched in ``folder``, and scored."""
    spaces, studies = folder / "search_spaces", folder / "studies"
    shutil.copytree(ROOT / "search_spaces", spaces)
    studies.mkdir()
    study = studies / STUDY.name
    shutil.copy(STUDY, study)
    if variant == "fp32":
        space = spaces / "transformer_lm_wide.toml"
        text = space.read_text().replace('engine = "auto"\n', "")
        space.write_text(text.replace("[per_layer]\n", "[per_layer]\n" + FP32_ONLY))
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "dsnas.cli", "search", str(study)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {variant} search failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return {**score(variant, folder), "wall_s": time.monotonic() - start}


def score(variant: str, folder: Path) -> dict:
    """A searched engine study: its front (accuracy, tokens/s, architecture), hypervolume and engine offer."""
    import optuna

    from dsnas.engine_offer import OFFER_ATTR
    from dsnas.results import done_trials, front, hypervolume, load

    studies = folder / "studies"
    url, name = f"sqlite:///{studies / 'engine_cpu.db'}", "engine_cpu"
    df = load(url, name)
    best = front(df)
    points = sorted(zip(best["accuracy"], best["throughput_tok_s"], best["arch_short"]), reverse=True)
    offer = optuna.load_study(study_name=name, storage=url).user_attrs.get(OFFER_ATTR, {})
    done = done_trials(df, feasible_only=False, trained_only=True)
    archs = {a: (s, t) for a, s, t in zip(done["arch"], done["arch_short"], done["throughput_tok_s"])}
    return {"variant": variant, "wall_s": float("nan"), "front": points, "hv": hypervolume(df, REFERENCE),
            "offer": offer, "archs": archs, "study": studies / STUDY.name}


def reseeded(result: dict, seeds: int, trained: dict) -> dict:
    """``result`` with each completed architecture's accuracy replaced by its mean over ``seeds`` fresh trainings
    (seeds 1000, 1001, ...: the same for both variants, none a search used), and the front and hypervolume of those.

    A search keeps the candidates whose seed happened to train well (the same architecture reaches 0.38-0.41 here
    from one seed to the next), so a front is partly luck; a fresh mean is not, and compares the variants on what
    their architectures reach. Each is trained in this process through the worker's own path (dsnas.worker), so
    an engine layer trains, converts and is evaluated as in the search; ``trained`` keeps the accuracies per
    architecture across repeats. Throughput stays the search's measurement."""
    import json

    from dsnas.pareto import dominated_volume, front_indices
    from dsnas.spec import load_study
    from dsnas.trial import TrialRequest
    from dsnas.worker import run_trial

    spec = load_study(result["study"])
    points = []
    for arch, (short, tput) in result["archs"].items():
        if arch not in trained:
            accs = [run_trial(TrialRequest(trial=0, arch=json.loads(arch), task=spec.task, hardware=spec.hardware,
                                           seed=1000 + k, engine=spec.engine)).metrics["accuracy"]
                    for k in range(seeds)]
            trained[arch] = statistics.mean(accs)
            print(f"    {short:32} {' '.join(f'{a:.4f}' for a in accs)}  mean {trained[arch]:.4f}", flush=True)
        points.append((trained[arch], tput, short))
    best = [points[i] for i in front_indices([p[:2] for p in points], ["maximize", "maximize"])]
    hv = dominated_volume([p[:2] for p in points], [REFERENCE["accuracy"], REFERENCE["throughput"]],
                          ["maximize", "maximize"])
    return {**result, "front": sorted(best, reverse=True), "hv": hv}


def throughput_at(points: list[tuple], accuracy: float) -> float | None:
    """A front's tokens/s at ``accuracy``: that of serving a share of the inputs with each of the two front points
    around it (accuracy mixes linearly, time per token too, so tokens/s is their weighted harmonic mean, not a
    straight line, which overstated it: 75,000 where a mix of 50,000 and 100,000 serves 66,667); None outside."""
    ranked = sorted((acc, tput) for acc, tput, _ in points)
    for (a0, t0), (a1, t1) in zip(ranked, ranked[1:]):
        if a0 <= accuracy <= a1:
            if a1 == a0:
                return max(t0, t1)
            share = (accuracy - a0) / (a1 - a0)  # of the inputs served by the more accurate point
            return 1 / ((1 - share) / t0 + share / t1)
    above = [t for a, t in ranked if a >= accuracy - 1e-12]  # below the least accurate point, that point serves
    return max(above) if above else None


def compare(base: dict, dsnas: dict) -> list[tuple[float, float, float, float]]:
    """(accuracy level, baseline tokens/s, dsnas tokens/s, ratio) at 3 levels both fronts reach. Where one front
    lies wholly above the other in accuracy, the one level both reach is the lower front's best."""
    high = min(max(p[0] for p in base["front"]), max(p[0] for p in dsnas["front"]))
    low = min(max(min(p[0] for p in base["front"]), min(p[0] for p in dsnas["front"])), high)
    rows = []
    for level in sorted({low, (low + high) / 2, high}):
        b, d = throughput_at(base["front"], level), throughput_at(dsnas["front"], level)
        if b and d:
            rows.append((level, b, d, d / b))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="keep the studies in this folder (default: a temporary one)")
    parser.add_argument("--scored", type=Path, help="score the studies an earlier --keep kept there; search nothing")
    parser.add_argument("--seeds", type=int, default=3,
                        help="train each completed architecture again with this many fresh seeds and compare the "
                             "fronts of the mean accuracies too (0: the searches' own fronts only)")
    args = parser.parse_args()
    if args.scored:
        args.repeats = kept_repeats(args.scored)
    from dsnas.profiler.capabilities import cpu_features, cpu_model

    print(f"machine: {cpu_model()} ({', '.join(cpu_features())}), {platform.node()}; study {STUDY.name}")
    ratios, hv_ratios, fresh_ratios, fresh_hv, trained = [], [], [], [], {}
    for repeat in range(args.repeats):
        order = ("fp32", "dsnas") if repeat % 2 == 0 else ("dsnas", "fp32")
        runs, folders = {}, []
        for variant in order:
            if args.scored:
                runs[variant] = score(variant, args.scored / f"{variant}-{repeat}")
                _show(repeat, runs[variant])
                continue
            folder = (args.keep / f"{variant}-{repeat}") if args.keep else Path(tempfile.mkdtemp(prefix="gain-"))
            if args.keep:
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
            runs[variant] = run(variant, folder)
            folders.append(folder)
            _show(repeat, runs[variant])
        rows, hv = _compare_table("the searches' fronts", runs)
        ratios += rows
        hv_ratios.append(hv)
        if args.seeds:
            print(f"\nrepeat {repeat + 1}: each completed architecture trained again, seeds 1000-{999 + args.seeds}:")
            fresh = {variant: reseeded(r, args.seeds, trained) for variant, r in runs.items()}
            for variant in order:
                _show(repeat, fresh[variant], f"mean accuracy over {args.seeds} fresh seeds")
            rows, hv = _compare_table(f"fronts of the mean accuracy over {args.seeds} fresh seeds", fresh)
            fresh_ratios += rows
            fresh_hv.append(hv)
        if not args.keep:  # only now: reseeding reads each study file (it removed them before, then failed)
            for folder in folders:
                shutil.rmtree(folder, ignore_errors=True)
    print(f"\nthe searches' fronts: hypervolume ratio {_median(hv_ratios)}, throughput ratio at equal accuracy "
          f"({len(ratios)} levels) {_median(ratios)}")
    if args.seeds:
        print(f"fronts of the mean accuracy over {args.seeds} fresh seeds: hypervolume ratio {_median(fresh_hv)}")
        ratios = fresh_ratios
    print(f"median throughput ratio at equal accuracy (dsnas / fp32, {len(ratios)} levels): {_median(ratios)}")


def kept_repeats(folder: Path) -> int:
    """The repeats an earlier --keep kept in ``folder`` (fp32-0 and dsnas-0, fp32-1 and dsnas-1, ...: both
    variants searched). None is refused: a mistyped folder printed "none (no equal-accuracy level both fronts
    reach ...)" as if two fronts had been compared, and exited 0."""
    kept = 0
    while all((folder / f"{variant}-{kept}" / "studies" / "engine_cpu.db").is_file() for variant in ("fp32", "dsnas")):
        kept += 1
    if not kept:
        raise SystemExit(f"--scored {folder}: no repeat that --keep kept there (fp32-0/studies/engine_cpu.db and "
                         "dsnas-0/studies/engine_cpu.db). Fix: pass the folder an earlier run's --keep searched in")
    return kept


def _median(ratios: list[float]) -> str:
    """The median of the ratios that could be taken, or why there is none (no level both fronts reach; an fp32
    front wholly below the hypervolume's reference accuracy)."""
    known = [r for r in ratios if r == r]
    if not known:
        return "none (no equal-accuracy level both fronts reach, or no front above the reference)"
    return f"{statistics.median(known):.2f}x"


def _compare_table(title: str, runs: dict) -> tuple[list[float], float]:
    """Print the throughput at 3 equal-accuracy levels and the hypervolumes; return the ratios."""
    rows = compare(runs["fp32"], runs["dsnas"])
    print(f"\n{title}:\n{'accuracy':>12} {'fp32 tokens/s':>14} {'dsnas tokens/s':>15} {'ratio':>7}")
    for level, b, d, r in rows:
        print(f"{level:>12.4f} {b:>14,.0f} {d:>15,.0f} {r:>6.2f}x")
    # An fp32 front wholly below the reference accuracy has no hypervolume: no ratio (it divided by zero).
    hv = runs["dsnas"]["hv"] / runs["fp32"]["hv"] if runs["fp32"]["hv"] > 0 else float("nan")
    print(f"hypervolume (reference {REFERENCE}): fp32 {runs['fp32']['hv']:,.0f}, dsnas {runs['dsnas']['hv']:,.0f}: "
          + (f"{hv:.2f}x" if hv == hv else "no ratio (the fp32 front lies below the reference accuracy)"))
    return [r for *_, r in rows], hv


def _show(repeat: int, result: dict, what: str = "") -> None:
    wall = "" if result["wall_s"] != result["wall_s"] else f", {result['wall_s']:.0f} s"  # nan: scored again
    print(f"\nrepeat {repeat + 1}, {result['variant']}{' (' + what + ')' if what else ''}: "
          f"{len(result['front'])} on the front{wall};"
          f" engine offer: {result['offer'].get('precision', ['fp32'])} {result['offer'].get('sparsity', ['dense'])}",
          flush=True)
    for acc, tput, arch in result["front"]:
        print(f"  accuracy {acc:.4f}  {tput:>10,.0f} tokens/s  {arch}")


if __name__ == "__main__":
    main()
