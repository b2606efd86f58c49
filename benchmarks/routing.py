"""What routing over the Pareto front buys on this machine: each input served by the cheapest front model that is
sure of it, against the most accurate single model.

For each built-in task it runs the shipped study as a user runs it (`dsnas search` in its own process, a fresh
folder, the local executor so that Ray's start is not in the numbers; quickstart: byte-level LMs on the Python
standard library; images: MobileNetV2-style CNNs on scikit-learn's digits), then `dsnas route` on its front. The
thresholds (and the learned router) are chosen on one half of the task's validation inputs (made larger than the
shipped studies' for this: half the digits, 2048 windows of text) and everything below is measured on the other
half: accuracy and mean cost per input (each model's latency per input as dsnas measured it at the largest batch
size) of every single front model, the cascade and the learned router, at the route's target (0.5 points below the
most accurate model) and at 0 and 1 point below; the share each stage served; and the end-to-end wall-clock time
per input of serving the half in batches, the routes and the single models timed in
turns (median of 5 rounds).

The last line is the cost cut at <= 0.5 points of accuracy below the most accurate model, in percent.

Run:  python benchmarks/routing.py [--tasks quickstart,images] [--keep DIR]   (about 5 minutes on 2 cores)
      python benchmarks/routing.py --study STUDY.toml                       (route a study already searched)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
STUDIES = {"quickstart": ROOT / "studies" / "quickstart.toml", "images": ROOT / "studies" / "images.toml"}
# A larger validation split than the shipped studies': each half must hold enough inputs to bound what a route
# loses (dsnas.route.lost); 180 held-out digits cannot tell a model with no mistakes from one with 1% of them.
VALIDATION = {"quickstart": "val_tokens = 131_072\n", "images": "val_share = 0.5\n"}
TARGET_DROP = 0.005


def search(name: str, folder: Path) -> Path:
    """The shipped study, copied with the search spaces so its relative paths hold, searched in ``folder``."""
    shutil.copytree(ROOT / "search_spaces", folder / "search_spaces")
    (folder / "studies").mkdir()
    study = folder / "studies" / STUDIES[name].name
    study.write_text(STUDIES[name].read_text().replace("[task]\n", "[task]\n" + VALIDATION[name]))
    done = subprocess.run([sys.executable, "-m", "dsnas.cli", "search", str(study), "--executor", "local"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {name} search failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return study


def route(study: Path) -> tuple[str, float, str]:
    """(the table, the cost cut at the target, which route gave it and how it was measured) of routing
    ``study``'s front."""
    from dsnas.route import build_route
    from dsnas.spec import read_study
    from dsnas.study import open_study

    spec = read_study(study)
    report = build_route(spec, open_study(spec, create=False), study.parent / "route",
                         max_accuracy_drop=TARGET_DROP, also_drops=(0.0, 0.01))
    best = next(o for name, o in report.outcomes.items() if name.endswith("alone") and o.cost == max(
        x.cost for n, x in report.outcomes.items() if n.endswith("alone")))
    routes = [o for name, o in report.outcomes.items() if name in ("cascade", "learned router")]
    lines = [report.table(), f"most accurate single model: {best.name}, accuracy {best.accuracy:.4f}, "
             f"{best.cost:.4g} {report.unit}/input"]
    for o in routes:
        lines.append(f"{o.name}: accuracy {o.accuracy:.4f} ({(o.accuracy - best.accuracy) * 100:+.2f} points), "
                     f"cost ratio {o.cost / best.cost:.3f}")
    measured = report.measured
    if measured:
        alone = measured.get(best.name)
        lines.append("end to end (ms/input, median of 5): " + ", ".join(
            f"{k} {v:.4g}" + (f" ({v / alone:.2f}x)" if alone else "") for k, v in measured.items()))
    return "\n".join(lines), *at_target(best, routes, measured)


def at_target(best, routes: list, measured: dict[str, float]) -> tuple[float, str]:
    """(the cost cut at <= TARGET_DROP below ``best``, the most accurate model alone; which route gives it and how
    it was measured). Where neither route is within the target on the report half, none gives a cut there: 0, the
    most accurate model alone, with the cheaper route's cut and loss beside it (that cut was the number printed as
    the cut at the target, "misses the target" beside it); so too where no route within it costs less than that
    model alone."""
    ok = [o for o in routes if o.accuracy >= best.accuracy - TARGET_DROP - 1e-12]
    # A route that costs more than the most accurate model alone cuts nothing: that model alone is within the
    # target at a cut of 0 (a cascade that sends most rows on read "-20% less cost").
    cheaper = [o for o in ok if o.cost < best.cost]
    if not cheaper:
        near = min(ok or routes, key=lambda o: o.cost)
        saved = 1.0 - near.cost / best.cost
        why = "no route within the target costs less" if ok else "neither route is within the target"
        return 0.0, (f"{best.name}: {why}; the cheaper, {near.name}, {(near.accuracy - best.accuracy) * 100:+.2f} "
                     f"points at {abs(saved):.0%} {'less' if saved >= 0 else 'more'}")
    chosen = min(cheaper, key=lambda o: o.cost)
    how = f"{chosen.name}, {(chosen.accuracy - best.accuracy) * 100:+.2f} points"
    if measured.get(chosen.name) and measured.get(best.name):
        saved = 1.0 - measured[chosen.name] / measured[best.name]  # negative: the route is slower end to end
        how += f"; end to end: {abs(saved):.0%} {'less' if saved >= 0 else 'more'}"
    return 1.0 - chosen.cost / best.cost, how


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="quickstart,images")
    parser.add_argument("--study", help="route this searched study instead of searching the shipped ones")
    parser.add_argument("--keep", help="search in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    cuts = []
    if args.study:
        table, cut, how = route(Path(args.study).resolve())
        print(table)
        cuts.append((Path(args.study).stem, cut, how))
    else:
        root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="dsnas-routing-"))
        for name in args.tasks.split(","):
            folder = root / name
            if folder.exists() and {p.name for p in folder.iterdir()} - {"search_spaces", "studies"}:
                raise SystemExit(f"routing: {folder} holds more than an earlier run's search_spaces/ and studies/; "
                                 "give --keep a folder of its own")
            shutil.rmtree(folder, ignore_errors=True)  # an earlier run's: searched anew
            folder.mkdir(parents=True)
            print(f"\n== {name}: searching {STUDIES[name].relative_to(ROOT)} in {folder}", flush=True)
            table, cut, how = route(search(name, folder))
            print(table, flush=True)
            cuts.append((name, cut, how))
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print()
    for name, cut, how in cuts:
        print(f"{name}: {cut:.0%} less cost than the most accurate model at <= 0.5 points accuracy loss, from "
              f"dsnas's measurements of each model ({how})")


if __name__ == "__main__":
    main()
