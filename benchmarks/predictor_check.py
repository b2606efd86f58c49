"""The latency predictor's accuracy on a space its design was not chosen on.

dsnas.predictor's features (the architecture's terms times log batch size among them) were chosen on the
108 models of benchmarks/data/charlm_space.csv, which search_efficiency.py reports on: fp32, dense, every
layer alike. This check runs a fresh study on the quickstart's own space instead (search_spaces/transformer_lm.toml:
1-4 layers, width 32-128, and per layer the heads, the FFN ratio, and, listed in a copy of it in place of its
engine = "auto", precision fp32/int8 and sparsity dense/2:4), with
dsnas's own driver and worker (`dsnas.run.run_study`, the local executor, the random sampler so that the
architectures are not the ones a sampler liked), then scores the predictor on that study exactly as
`dsnas predictor` does: K-fold split by architecture, against a FLOPs-only power law fitted on the same folds, per
batch size (architectures ranked against each other at one batch size, what a search compares) and pooled.

The study is studies/quickstart.toml with a small training budget (--train-tokens) and the engine's cheapest
settings (magnitude 2:4 saliency, max calibration, no fine-tuning or QAT): they change which weights are kept and
the INT8 ranges, not the layers' shapes or forms, and the check is about the measurements. No latency limit, no
multi-fidelity (no trial stopped at a rung), no predictor skips: every sampled architecture is trained and
measured. The study is written to --out (a temporary folder by default); run again with the same --out to resume
it or to score it again without new trials.

Run:  python benchmarks/predictor_check.py [--trials 40] [--train-tokens 20000] [--seed 0] [--folds 5]
      [--threads N] [--out DIR]
On a quiet 2-core machine 40 trials took 79 s; with other processes keeping both cores busy, 815 s, and the
timings then measure those processes (it prints the load average and how many timings converged).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
QUICKSTART = ROOT / "studies" / "quickstart.toml"
CHEAP_ENGINE = {"saliency": "magnitude", "calibrator": "max", "calibration_batches": 2, "finetune_frac": 0.0,
                "qat_frac": 0.0}
# The engine's choices listed, not the device's (the space's engine = "auto"): the same layer forms on every machine,
# and 2:4 among them, which "auto" offers only where a sparse kernel runs (never on a CPU).
ENGINE_CHOICES = {"precision": ["fp32", "int8"], "sparsity": ["dense", "2:4"]}


def space_toml() -> str:
    """The quickstart's space with ENGINE_CHOICES per layer in place of its engine = "auto"."""
    raw = tomllib.loads((QUICKSTART.parent / tomllib.loads(QUICKSTART.read_text())["space"]["file"]).read_text())
    raw.pop("engine", None)
    raw["per_layer"] = {**raw.get("per_layer", {}), **ENGINE_CHOICES}
    return to_toml(raw)


def study_toml(args: argparse.Namespace) -> str:
    """The quickstart's study file, changed only where the check needs it (see the module docstring)."""
    raw = tomllib.loads(QUICKSTART.read_text())
    raw["study"]["name"] = "predictor_check"
    raw["study"].pop("storage", None)  # beside the written study file, in --out
    raw["sampler"] = {"name": "random", "seed": args.seed}
    raw["budget"] = {"n_trials": args.trials}
    raw["space"]["file"] = "space.toml"  # space_toml(), written beside it
    raw["task"]["train_tokens"] = args.train_tokens
    raw["hardware"].pop("constraints", None)
    if args.threads:
        raw["hardware"]["threads"] = args.threads
    raw["executor"] = {"kind": "local"}
    raw["fidelity"] = {"kind": "none"}
    raw["predictor"] = {"skip": False}
    raw["engine"] = dict(CHEAP_ENGINE)
    return to_toml(raw)


def to_toml(table: dict[str, Any], prefix: str = "") -> str:
    """A study's tables as TOML: scalars and lists of scalars (JSON's spelling of them is TOML's), sub-tables."""
    scalars = [f"{k} = {json.dumps(v)}" for k, v in table.items() if not isinstance(v, dict)]
    out = [f"[{prefix}]"] if prefix and scalars else []
    out += scalars
    for key, value in table.items():
        if isinstance(value, dict):
            out.append(to_toml(value, f"{prefix}.{key}" if prefix else key))
    return "\n".join(out)


def run_search(study_file: Path) -> tuple[Any, float]:
    """Run (or resume) the study; returns it, opened, and the seconds the search took."""
    from dsnas.progress import Progress
    from dsnas.run import run_study
    from dsnas.spec import load_study
    from dsnas.study import open_study

    spec = load_study(study_file, executor="local")
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the live progress; stdout is for the tables
        run_study(spec, progress=Progress(spec, out=sys.stderr))
    return open_study(spec, create=False), time.perf_counter() - start


def converged_share(study: Any) -> str:
    """How many of the stored timings reached the protocol's wanted confidence interval, per batch size: on a busy
    machine many do not, and the predictor is then scored against noise."""
    counts: dict[str, list[bool]] = {}
    for t in study.get_trials(deepcopy=False):
        for bs, batch in t.user_attrs.get("profile", {}).get("batches", {}).items():
            counts.setdefault(bs, []).append(bool(batch.get("converged")))
    return ", ".join(f"batch {bs}: {sum(v)}/{len(v)}" for bs, v in sorted(counts.items(), key=lambda x: int(x[0])))


def ratio_lines(result: Any) -> list[str]:
    """The predictor against the baseline per batch size: MAPE as a ratio, Spearman as a difference, and every
    place where the predictor is the worse of the two."""
    groups = [(f"batch {b.batch_size}", b.predictor, b.baseline) for b in result.by_batch]
    groups.append(("pooled", result.predictor, result.baseline))
    mape = ", ".join(f"{name} {ours.mape / base.mape:.2f}x" for name, ours, base in groups)
    rank = ", ".join(f"{name} {ours.spearman - base.spearman:+.3f}" for name, ours, base in groups)
    worse = [f"{name} {metric}" for name, ours, base in groups[:-1] for metric, bad in (
        ("MAPE", ours.mape > base.mape), ("Spearman", ours.spearman < base.spearman),
        ("within +-10%", ours.within_10 < base.within_10)) if bad]
    return [f"  MAPE, predictor / FLOPs-only: {mape}",
            f"  Spearman, predictor - FLOPs-only: {rank}",
            f"  predictor worse than FLOPs-only at: {', '.join(worse) or 'none'}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40, help="architectures to train and measure (40)")
    parser.add_argument("--train-tokens", type=int, default=20_000, help="training budget of each (20000)")
    parser.add_argument("--seed", type=int, default=0, help="the random sampler's seed (0)")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds, split by architecture (5)")
    parser.add_argument("--threads", type=int, help="CPU threads while measuring (default: all cores)")
    parser.add_argument("--out", help="folder for the study file and its database (default: a temporary one)")
    args = parser.parse_args()
    for flag, value, least in (("--trials", args.trials, 1), ("--train-tokens", args.train_tokens, 1),
                               ("--folds", args.folds, 2)):
        if value < least:
            parser.error(f"{flag} must be at least {least}, got {value}")
    from dsnas.predictor import by_device, cross_validate, study_rows

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="dsnas-predictor-check-"))
    out.mkdir(parents=True, exist_ok=True)
    study_file = out / "predictor_check.toml"
    study_file.write_text(study_toml(args) + "\n")
    (out / "space.toml").write_text(space_toml() + "\n")
    load = os.getloadavg()
    study, search_s = run_search(study_file)
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    print(f"{platform.processor() or platform.machine()} ({platform.node()}, {os.cpu_count()} cores); load average "
          f"{load[0]:.1f} before the search, {os.getloadavg()[0]:.1f} after; study {study_file}")
    print(f"search: {states.count('COMPLETE')} completed, {states.count('FAIL')} failed trials; this run "
          f"{search_s:.0f} s; timings that converged: {converged_share(study)}")
    from dsnas.errors import DsnasError

    for rows in by_device(study_rows(study)).values():
        for target in ("latency", "peak_memory"):
            try:
                result = cross_validate(rows, target, folds=args.folds)
            except DsnasError as e:  # too few architectures: resume with the same --out and more --trials
                sys.exit(f"predictor_check: {e} (--trials; the same --out resumes the study)")
            print("\n" + result.table())
            print("\n".join(ratio_lines(result)))


if __name__ == "__main__":
    main()
