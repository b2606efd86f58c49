"""Does multi-fidelity make the quickstart better or worse? The quickstart study (studies/quickstart.toml: real
training on 2 cores, the Ray executor), run as a user runs it (`dsnas search` in its own process, a fresh folder),
with [fidelity] kind = "none" (the baseline) and "successive_halving", alternating, --repeats times:

- at the same budget (the quickstart's 12 evaluated trials): the front's hypervolume and the wall time;
- at about the same wall time: halving with the trial budget lifted and [budget] timeout_s at 85% of the
  baseline's median wall time (no trial starts after it; the running ones finish, which takes up the rest); the
  table shows the wall time each really took.

The hypervolume uses a fixed reference point (accuracy 0.30, throughput 0 tokens/s) so that runs compare; the
front is the feasible completed trials'. Wall time: the driver's run from start to its last trial's end.

Run:  python benchmarks/quickstart_fidelity.py [--repeats 2]
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
REFERENCE = {"accuracy": 0.30, "throughput": 0.0}


def run(kind: str, timeout_s: float | None, folder: Path) -> dict:
    """One quickstart in ``folder``: its hypervolume, wall time and trial counts."""
    from dsnas.results import front, hypervolume, load

    (folder / "studies").mkdir(parents=True)
    shutil.copytree(ROOT / "search_spaces", folder / "search_spaces")
    text = (ROOT / "studies" / "quickstart.toml").read_text() + f'\n[fidelity]\nkind = "{kind}"\n'
    if timeout_s is not None:
        text = text.replace("n_trials = 12", "n_trials = 200").replace("timeout_s = 270", f"timeout_s = {timeout_s}")
    study = folder / "studies" / "quickstart.toml"
    study.write_text(text)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "dsnas.cli", "search", str(study)], capture_output=True, text=True)
    wall = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"the search failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    df = load(f"sqlite:///{folder / 'studies' / 'quickstart.db'}", "quickstart")
    states = df["state"].value_counts().to_dict()
    best = front(df)
    return {"kind": kind, "hv": hypervolume(df, REFERENCE), "wall_s": wall, "complete": states.get("COMPLETE", 0),
            "pruned": states.get("PRUNED", 0), "front": len(best),
            "best_accuracy": float(best["accuracy"].max()) if len(best) else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()} ({platform.node()}), "
          f"reference point {REFERENCE}")
    results: dict[str, list[dict]] = {"none": [], "successive_halving": [], "halving, same wall time": []}
    for repeat in range(args.repeats):
        for label, kind in (("none", "none"), ("successive_halving", "successive_halving")):
            with tempfile.TemporaryDirectory() as tmp:
                results[label].append(run(kind, None, Path(tmp)))
            print(f"  repeat {repeat + 1}: {label}: {results[label][-1]}", flush=True)
        same_time = statistics.median(r["wall_s"] for r in results["none"])
        with tempfile.TemporaryDirectory() as tmp:
            results["halving, same wall time"].append(run("successive_halving", round(0.85 * same_time), Path(tmp)))
        print(f"  repeat {repeat + 1}: same wall time: {results['halving, same wall time'][-1]}", flush=True)
    base = statistics.median(r["hv"] for r in results["none"])
    print(f"\n{'fidelity':<26} {'HV (median)':>12} {'HV / none':>10} {'wall s':>8} {'complete':>9} {'pruned':>7} "
          f"{'front':>6} {'best acc':>9}")
    for label, rows in results.items():
        med = {k: statistics.median(r[k] for r in rows) for k in ("hv", "wall_s", "complete", "pruned", "front",
                                                                     "best_accuracy")}
        print(f"{label:<26} {med['hv']:>12,.0f} {med['hv'] / base:>10.3f} {med['wall_s']:>8.0f} "
              f"{med['complete']:>9.0f} {med['pruned']:>7.0f} {med['front']:>6.0f} {med['best_accuracy']:>9.4f}")
    print(f"(medians of {args.repeats} runs; HV / none: against the baseline's median, measured in the same run)")


if __name__ == "__main__":
    main()
