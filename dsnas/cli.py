"""The `dsnas` command. Subcommands parse, call the library, and print; errors are one line, exit code 2."""

from __future__ import annotations

import argparse
import shutil
import sys
import traceback
from importlib import resources
from pathlib import Path

from dsnas.errors import DsnasError

EXAMPLES = ("studies/quickstart.toml", "search_spaces/transformer_lm.toml")


def cmd_search(args: argparse.Namespace) -> int:
    """Run (or resume) the study in STUDY_FILE until its budget is spent; print the Pareto front."""
    from dsnas.progress import pareto_table
    from dsnas.search import run_study
    from dsnas.spec import load_study

    spec = load_study(args.study_file, executor=args.executor, address=args.address, n_trials=args.n_trials,
                      timeout_s=args.timeout)
    outcome = run_study(spec)
    print(f"\nstopped: {outcome.stopped_because}; {outcome.completed} completed trials in the study, "
          f"{outcome.failed} failed in this run, {outcome.elapsed_s:.1f} s")
    print(pareto_table(outcome.front, spec))
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    """Write a working example study and search space into DIR."""
    target = Path(args.dir)
    for name in EXAMPLES:
        dest = target / name
        if dest.exists() and not args.force:
            raise DsnasError(f"{dest} exists. Fix: choose an empty DIR, or pass --force to overwrite")
    for name in EXAMPLES:
        dest = target / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_example(name), dest)
    print(f"wrote {', '.join(str(target / n) for n in EXAMPLES)}\nnext: dsnas search {target / EXAMPLES[0]}")
    return 0


def _example(name: str) -> Path:
    """An example file: inside the installed wheel, or at the top of a source checkout."""
    packaged = resources.files("dsnas") / "_examples" / name
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / name


def cmd_export(args: argparse.Namespace) -> int:
    """Write the bundle of one trial (architecture, weights, metrics) for `dsnas.load`."""
    from dsnas.export import export_trial, pick_trial
    from dsnas.search import open_study
    from dsnas.spec import load_study

    if (args.trial is None) == (args.pick is None):
        raise DsnasError("give exactly one of --trial N and --pick. Fix: e.g. --pick max-accuracy")
    spec = load_study(args.study_file)
    study = open_study(spec, create=False)
    frozen = pick_trial(study, spec, trial=args.trial, pick=args.pick)
    out = export_trial(spec, study, frozen, args.out)
    print(f"exported trial {frozen.number} ({frozen.user_attrs.get('arch_short', '')}) to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsnas", description="Hardware-aware neural architecture search.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("search", help=cmd_search.__doc__, description=cmd_search.__doc__)
    p.add_argument("study_file")
    p.add_argument("--executor", choices=("ray", "local"), help="override [executor] kind")
    p.add_argument("--address", help="a running Ray cluster, host:port (overrides [executor] address)")
    p.add_argument("--n-trials", type=int, help="override [budget] n_trials")
    p.add_argument("--timeout", type=float, help="override [budget] timeout_s (seconds)")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("init", help=cmd_init.__doc__, description=cmd_init.__doc__)
    p.add_argument("dir")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("export", help=cmd_export.__doc__, description=cmd_export.__doc__)
    p.add_argument("study_file")
    p.add_argument("--trial", type=int, help="the trial number")
    p.add_argument("--pick", help="max-NAME or min-NAME, e.g. max-accuracy, max-throughput, min-latency")
    p.add_argument("--out", help="bundle folder (default: exports/STUDY-trialN beside the study file)")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DsnasError as e:
        if args.debug:
            traceback.print_exc()
        print(f"dsnas: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ndsnas: interrupted; completed trials are stored, run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
