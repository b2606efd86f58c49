"""The `dsnas` command. Subcommands parse, call the library, and print; errors are one line, exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dsnas._version import __version__
from dsnas.errors import DsnasError
from dsnas.interrupts import Terminated, sigterm_raises

EXAMPLES = ("studies/quickstart.toml", "search_spaces/transformer_lm.toml")

# Each command imports what it runs, inside its function: `dsnas --help` and a mistyped command answer without
# loading torch, SQLAlchemy or Ray (tests/test_import.py).


def cmd_search(args: argparse.Namespace) -> int:
    """Run (or resume) the study in STUDY_FILE until its budget is spent; print the Pareto front."""
    from dsnas.progress import pareto_table
    from dsnas.run import run_study
    from dsnas.spec import load_study

    spec = load_study(args.study_file, executor=args.executor, address=args.address, n_trials=args.n_trials,
                      timeout_s=args.timeout)
    outcome = run_study(spec)
    reused = f" ({outcome.reused} of them repeats whose results were reused)" if outcome.reused else ""
    print(f"\nstopped: {outcome.stopped_because}; {outcome.completed} completed trials in the study{reused}, "
          f"{outcome.failed} failed in this run, {outcome.elapsed_s:.1f} s")
    print(pareto_table(outcome.front, spec))
    if outcome.all_failed:  # a run that evaluated nothing is a failed run, whatever it stored
        print(f"dsnas: all {outcome.failed} trials of this run failed; the first: {outcome.first_failure}",
              file=sys.stderr)
        return 1
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
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(_example(name), dest)
        except OSError as e:  # DIR is a file, a folder stands where a file goes, or the place is not writable
            raise DsnasError(f"cannot write {dest}: {e.strerror or e}. Fix: choose a DIR that is a folder you can "
                             "write (or does not exist yet)") from None
    print(f"wrote {', '.join(str(target / n) for n in EXAMPLES)}\nnext: dsnas search "
          f"{shlex.quote(str(target / EXAMPLES[0]))}")
    return 0


def _example(name: str) -> Path:
    """An example file: inside the installed wheel, or at the top of a source checkout."""
    from dsnas.spec import shipped  # deferred, as every command's import of the study file's code

    return shipped(name)


def cmd_export(args: argparse.Namespace) -> int:
    """Write the bundle of a trial (architecture, weights, ONNX, metrics, model card) for `dsnas.load`."""
    from dsnas.export import Limits, export_trial, pick_trials
    from dsnas.export.formats import describe_exports
    from dsnas.fidelity import infeasible
    from dsnas.spec import read_study
    from dsnas.study import as_searched, edited_since, open_study

    if sum(x is not None and x is not False for x in (args.trial, args.pick, args.front)) != 1:
        raise DsnasError("give exactly one of --trial N, --pick RULE and --front. Fix: e.g. --pick knee")
    given = [flag for flag, value in (("--max-latency-ms", args.max_latency_ms), ("--min-accuracy",
             args.min_accuracy), ("--max-memory-mb", args.max_memory_mb)) if value is not None]
    if args.trial is not None and given:  # the trial was exported as named, its limit unread, without a word
        raise DsnasError(f"{given[0]} limits which trials --pick and --front choose from; --trial {args.trial} names "
                         f"one. Fix: leave out {given[0]}, or use --pick or --front with it")
    if args.front and args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        # Each bundle goes into it: found only once the first bundle was built ("afile/s-trial0 ... File exists")
        raise DsnasError(f"--out {args.out}: with --front, names the folder the bundles go into, and this is a file. "
                         "Fix: name a folder with --out")
    spec = read_study(args.study_file)
    study = open_study(spec, create=False)
    if edited := edited_since(spec, study):  # a limit edited since judged no trial: the bundle is the search's
        print(f"dsnas: note: {edited}", file=sys.stderr)
    limits = Limits(max_latency_ms=args.max_latency_ms, min_accuracy=args.min_accuracy,
                    max_memory_mb=args.max_memory_mb)
    for frozen in pick_trials(study, spec, trial=args.trial, pick=args.pick, front=args.front, limits=limits):
        # With --front, --out is the folder the bundles go into, each under its default name.
        out = Path(args.out) / f"{spec.name}-trial{frozen.number}" if args.front and args.out else args.out
        out = export_trial(spec, study, frozen, out)
        what = "its architecture and metrics (the task's own function evaluated it: there is no model) " \
            if not (out / "weights.safetensors").exists() else ""
        print(f"exported trial {frozen.number} ({frozen.user_attrs.get('arch_short', '')}) {what}to {out}")
        if not frozen.user_attrs.get("feasible", 1.0):  # only --trial N takes one: it is no front model
            limits = as_searched(spec, study).hardware.constraints
            print(f"  note: {infeasible(frozen.number, frozen.user_attrs, limits)}")
        if not what:
            exports = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["exports"]
            print("\n".join(describe_exports(exports)))
    if args.pick == "knee":
        _say_knee_tie(study, spec, limits)
    return 0


def _say_knee_tie(study: Any, spec: Any, limits: Any) -> None:
    """A knee that is a tie (both ends of a front of two are as far from the ideal point) was settled by the trial
    number without a word: a model 6x slower for 0.0003 more accuracy, as the user had not chosen."""
    from dsnas.export.pick import knee_ties, pareto_front, pick_trials

    ties = knee_ties(pareto_front(pick_trials(study, spec, front=True, limits=limits), spec.directions),
                     spec.directions)
    # Trials of one result (a candidate retrained to the same figures) are no choice: "a tie" between 11 copies
    # of one model, "trial 2 the best in accuracy", sent the user to pick among them.
    if len({tuple(t.values) for t in ties}) > 1:
        # Tied in the first objective too, it is the lowest number: "the best in accuracy" said of one of two
        # trials of the same accuracy.
        why = (f"the lowest number of those as good in {spec.objectives[0].name}"
               if ties[1].values[0] == ties[0].values[0] else f"the best in {spec.objectives[0].name}")
        print(f"  the knee is a tie between trials {', '.join(str(t.number) for t in ties)}: trial "
              f"{ties[0].number} is {why}. Fix: to choose another, --trial N or --pick max-/min-METRIC")


def cmd_verify(args: argparse.Namespace) -> int:
    """Re-measure an exported bundle here (accuracy on the task's validation split, latency, throughput);
    exit 1 when it drifted beyond tolerance."""
    from dsnas.export import verify_bundle
    from dsnas.route import verify_route

    for flag, tol in (("--accuracy-tol", args.accuracy_tol), ("--latency-tol", args.latency_tol)):
        if not 0 <= tol < float("inf"):  # NaN fails it too
            raise DsnasError(f"{flag} {tol:g}: must be a tolerance >= 0. Fix: e.g. {flag} "
                             f"{0.005 if flag == '--accuracy-tol' else 0.25}")
    if (Path(args.bundle) / "route.json").is_file():  # a route bundle: its members, accuracy and cost
        if args.device not in ("auto", "cpu"):
            raise DsnasError(f"--device {args.device}: a route is verified on the CPU, where `dsnas route` timed it. "
                             "Fix: leave --device out")
        report = verify_route(args.bundle, accuracy_tol=args.accuracy_tol, latency_tol=args.latency_tol)
    else:
        report = verify_bundle(args.bundle, accuracy_tol=args.accuracy_tol, latency_tol=args.latency_tol,
                               device=args.device)
    print(report.table())
    return 0 if report.ok else 1


def cmd_report(args: argparse.Namespace) -> int:
    """Write a report folder (trials.csv, an HTML page, PNG plots) and print the Pareto front."""
    from dsnas.results.report import write_report
    from dsnas.spec import read_study

    spec = read_study(args.study_file)
    summary = write_report(spec, args.out, reference=args.reference)
    print(summary)
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Serve the Optuna dashboard on the study's storage, with dsnas's notes, charts and artifacts."""
    from dsnas.dashboard import serve
    from dsnas.spec import read_study

    if not 0 <= args.port <= 65535:
        raise DsnasError(f"--port {args.port}: must be a port number, 0-65535. Fix: e.g. --port 8080 (0: any free one)")
    if not args.host.strip():  # a blank host (--host "$UNSET") served the study on every interface, at http://:8080
        raise DsnasError(f"--host {args.host!r}: must name an address to listen on. Fix: leave --host out (this "
                         "machine only), or --host 0.0.0.0 to serve every network interface")
    serve(read_study(args.study_file), host=args.host, port=args.port)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Show what this machine's hardware and drivers allow dsnas to measure, and its device fingerprint."""
    from dsnas.profiler.capabilities import Capabilities, probe, usable_cpus
    from dsnas.profiler.device import fingerprint, fingerprint_id, named_device
    from dsnas.profiler.steadiness import host_speed_row

    cpus = usable_cpus()
    # No more than this machine's CPUs: --threads 100000 --ceilings crashed torch (a segmentation fault, exit 139)
    # after the capability table, and any number above the CPUs measured (and cached) ceilings of an overloaded CPU.
    if args.threads is not None and not 1 <= args.threads <= cpus:
        raise DsnasError(f"--threads {args.threads}: must be from 1 to the {cpus} CPUs this process may use. Fix: "
                         f"e.g. --threads {cpus}, or leave it out (all of them)")

    # Bad input first, in one line, before seconds of probing are printed above it.
    device = named_device(args.device)
    shapes = _engine_shapes(Path(args.engine)) if args.engine else None
    caps = probe(args.device)
    print(Capabilities((*caps, host_speed_row(args.threads))).table())
    fp = fingerprint(device)
    print(f"\nfingerprint {fingerprint_id(fp)}: " + ", ".join(f"{k}={v}" for k, v in fp.items()))
    if args.ceilings and device.type == "cpu":
        from dsnas.profiler.ceilings import ceilings

        found = ceilings(fp, args.threads or cpus)  # a measurement's count, not torch's (OMP_NUM_THREADS)
        print("\nceilings (what this CPU does at best; flop_util and bw_util are shares of them):\n  " +
              "\n  ".join(found.lines()))
    if shapes is not None:
        from dsnas.profiler.engine_probe import probe_on_device  # torch loads on first use

        spec, widths = shapes
        print("\n" + probe_on_device(args.device, widths, args.threads or spec.hardware.threads,
                                     spec.engine.int8_backend).table())
    return 0


def _engine_shapes(study_file: Path) -> tuple[Any, Any]:
    """(the study, the shapes its engine probe times: its space's widths, its task's context, its batch sizes)."""
    from dsnas.engine_offer import study_shapes
    from dsnas.space import load_space_file
    from dsnas.spec import check_plugins, read_study
    from dsnas.tasks import make_task

    spec = read_study(study_file)
    if spec.space.file is None:
        raise DsnasError(f"{study_file}: [space] names a callable; --engine needs a space file to read its widths. "
                         "Fix: give --engine a study whose [space] names a space file")
    check_plugins(spec)
    context = int(make_task(spec.task).arch_defaults().get("context", 1))
    shapes = study_shapes(load_space_file(spec.space.file), spec, context)
    if not shapes:
        raise DsnasError(f"{spec.space.file}: its model family does not say its layers' widths, so there is "
                         "nothing to probe. Fix: give --engine a transformer_lm study (e.g. studies/engine_cpu.toml)")
    return spec, shapes


def cmd_route(args: argparse.Namespace) -> int:
    """Route each input over the Pareto front: the cheapest model first, up while it is unsure; write a route
    bundle (members, thresholds, learned router, measured table) that dsnas.load_route serves."""
    from dsnas.route import NothingToRoute, build_route
    from dsnas.spec import read_study
    from dsnas.study import edited_since, open_study

    if args.target_accuracy is not None and args.max_accuracy_drop is not None:
        raise DsnasError("give one of --target-accuracy and --max-accuracy-drop. Fix: drop one")
    if args.target_accuracy is not None and not 0 <= args.target_accuracy <= 1:  # NaN fails both comparisons
        raise DsnasError(f"--target-accuracy {args.target_accuracy:g}: must be an accuracy in [0, 1]. Fix: e.g. "
                         "--target-accuracy 0.5")
    if args.max_accuracy_drop is not None and not 0 <= args.max_accuracy_drop <= 1:
        raise DsnasError(f"--max-accuracy-drop {args.max_accuracy_drop:g}: must be a drop in accuracy in [0, 1]. "
                         "Fix: e.g. --max-accuracy-drop 0.005")
    spec = read_study(args.study_file)
    study = open_study(spec, create=False)
    if edited := edited_since(spec, study):  # as export says it: the front and its figures are the search's
        print(f"dsnas: note: {edited}", file=sys.stderr)
    out = Path(args.out) if args.out else spec.base_dir / "routes" / spec.name
    try:
        trials = [int(n) for n in args.trials.split(",")] if args.trials else None
    except ValueError:
        raise DsnasError(f"--trials {args.trials}: must be trial numbers separated by commas. Fix: e.g. "
                         "--trials 3,7") from None
    try:
        report = build_route(spec, study, out, trials=trials, target_accuracy=args.target_accuracy,
                             max_accuracy_drop=0.005 if args.max_accuracy_drop is None else args.max_accuracy_drop,
                             cost=args.cost)
    except NothingToRoute as e:
        print(f"dsnas route: {e}" + ("" if trials else ". Fix: name two or more completed trials with --trials, "
                                     "e.g. --trials 3,7"))
        return 0
    print(report.table())
    print(f"route bundle: {report.folder} (dsnas.load_route serves it)")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    """Measure one architecture (a bundle folder, a study file with --trial N, or an architecture JSON file)
    and print its whole profile."""
    from dsnas.profile import profile_target

    sizes = None
    if args.batch_sizes:
        try:
            sizes = tuple(int(b) for b in args.batch_sizes.split(","))
        except ValueError:
            raise DsnasError(f"--batch-sizes {args.batch_sizes}: must be whole numbers separated by commas. "
                             "Fix: e.g. --batch-sizes 1,32") from None
    print(profile_target(args.target, trial=args.trial, device=args.device, batch_sizes=sizes,
                         kernels=args.kernels or None, cuda_graphs=args.cuda_graphs or None,
                         measure_s=args.measure_s, max_measure_s=args.max_measure_s))
    return 0


def cmd_predictor(args: argparse.Namespace) -> int:
    """Fit a per-device predictor of latency (or peak memory) on the study's measurements and print its held-out
    accuracy (cross-validated by architecture) next to a FLOPs-only baseline."""
    from dsnas.predictor import by_device, check_folds, cross_validate, study_rows
    from dsnas.screening import search_record
    from dsnas.spec import read_study
    from dsnas.study import open_study

    check_folds(args.folds)
    spec = read_study(args.study_file)
    study = open_study(spec, create=False)
    devices = by_device(study_rows(study))
    if not devices:
        raise DsnasError(f"{spec.path}: study {spec.name!r} has no measurement with counted FLOPs. "
                         "Fix: run `dsnas search` on it first")
    refused = []
    for fp, rows in devices.items():
        try:
            print(cross_validate(rows, args.target, folds=args.folds).table())
        except DsnasError as e:
            refused.append(f"device {fp}: {e}")
    if len(refused) == len(devices):  # one line, once (it was printed, then raised again)
        raise DsnasError(f"{spec.path}: study {spec.name!r}, " + "; ".join(refused))
    for line in refused:
        print(line.replace(": ", ": skipped: ", 1))
    record = search_record(study)
    if record:
        print(record)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsnas", description="Hardware-aware neural architecture search.")
    parser.add_argument("--version", action="version", version=f"dsnas {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true", help="also show debug messages")
    loud.add_argument("-q", "--quiet", action="store_true", help="show only warnings, errors and results")
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
    p.add_argument("--pick", help="max-accuracy, max-throughput, knee (the front's best compromise), "
                                  "or max-NAME / min-NAME of any stored metric")
    p.add_argument("--front", action="store_true", help="export every feasible Pareto-front trial")
    p.add_argument("--max-latency-ms", type=float, help="with --pick/--front: only trials at most this slow")
    p.add_argument("--min-accuracy", type=float, help="with --pick/--front: only trials at least this accurate")
    p.add_argument("--max-memory-mb", type=float, help="with --pick/--front: only trials using at most this memory")
    p.add_argument("--out", help="bundle folder (default: exports/STUDY-trialN beside the study file); with "
                   "--front, the folder the bundles go into")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("verify", help=cmd_verify.__doc__, description=cmd_verify.__doc__)
    p.add_argument("bundle")
    p.add_argument("--accuracy-tol", type=float, default=0.005, help="allowed absolute accuracy drift (0.005)")
    p.add_argument("--latency-tol", type=float, default=0.25,
                   help="allowed latency/throughput drift on the same device fingerprint: the median of 5 "
                        "re-measurements against the recorded median fails beyond a ratio of 1 + tol either way "
                        "(0.25; the recorded p10-p90 spread when larger, up to 1); the rounds' range is printed "
                        "beside it. "
                        "When the median fails and the rounds differ among themselves by more than the tolerance "
                        "(a busy machine), up to 2 more sets of 5 are measured and the median of all is judged")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("report", help=cmd_report.__doc__, description=cmd_report.__doc__)
    p.add_argument("study_file")
    p.add_argument("--out", help="report folder (default: reports/STUDY beside the study file)")
    p.add_argument("--reference", help="hypervolume reference point, e.g. accuracy=0.3,throughput=1000 "
                                       "(default: 0 for an objective to maximize whose values are not negative, "
                                       "else 10%% beyond the worst value)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("dashboard", help=cmd_dashboard.__doc__, description=cmd_dashboard.__doc__)
    p.add_argument("study_file")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default: %(default)s; 0: any free one)")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("doctor", help=cmd_doctor.__doc__, description=cmd_doctor.__doc__)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--ceilings", action="store_true", help="also measure (or read cached) CPU GEMM/bandwidth peaks")
    p.add_argument("--threads", type=int, help="threads for the host-speed row, --ceilings and --engine "
                   "(default: the CPUs this process may use, as a measurement)")
    p.add_argument("--engine", nargs="?", const=str(_example("studies/quickstart.toml")), metavar="STUDY",
                   help="also probe which engine choices pay here, at STUDY's layer shapes (default: the quickstart)")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("profile", help=cmd_profile.__doc__, description=cmd_profile.__doc__)
    p.add_argument("target", help="bundle folder, study file (with --trial), or architecture JSON file")
    p.add_argument("--trial", type=int, help="with a study file: the trial whose architecture to measure")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--batch-sizes", help="e.g. 1,32 (default: the study's or bundle's)")
    p.add_argument("--measure-s", type=float, help="minimum timed seconds per batch size")
    p.add_argument("--max-measure-s", type=float, help="time cap per batch size")
    p.add_argument("--kernels", action="store_true", help="per-kernel (CUDA) or per-operator (CPU) times")
    p.add_argument("--cuda-graphs", action="store_true", help="GPU: also time CUDA-graph replays")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("route", help=cmd_route.__doc__, description=cmd_route.__doc__)
    p.add_argument("study_file")
    p.add_argument("--target-accuracy", type=float, help="the accuracy the route must keep (on the calibration half)")
    p.add_argument("--max-accuracy-drop", type=float,
                   help="or: at most this far below the most accurate model (default 0.005)")
    p.add_argument("--cost", choices=("latency", "flops"), default="latency",
                   help="what a model costs per input: its measured latency (default) or FLOPs")
    p.add_argument("--trials", help="route these trials (e.g. 3,7,11) instead of the feasible front")
    p.add_argument("--out", help="route bundle folder (default: routes/STUDY beside the study file)")
    p.set_defaults(func=cmd_route)

    p = sub.add_parser("predictor", help=cmd_predictor.__doc__, description=cmd_predictor.__doc__)
    p.add_argument("study_file")
    p.add_argument("--target", choices=("latency", "peak_memory"), default="latency", help="what to predict")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds, split by architecture (5)")
    p.set_defaults(func=cmd_predictor)
    return parser


@contextmanager
def showing_logs(level: int) -> Iterator[None]:
    """The library logs (progress of a search, the dashboard's address, a lost database) through the "dsnas"
    logger; while a command runs, they show as plain lines on its stdout, where they went before they were logs.
    Removed afterwards, so that a program that calls main() keeps its own logging as it was."""
    logger = logging.getLogger("dsnas")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    before = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # printed once, not again by a root handler someone else installed
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before[0])
        logger.propagate = before[1]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Each command reads its task's data and plug-ins as they are now: a second command in one process (a notebook
    # calling main) verified a bundle against the data an earlier one had read ("task data same" after an edit).
    if "dsnas.tasks" in sys.modules:
        sys.modules["dsnas.tasks"].forget_built()
    if "dsnas.models" in sys.modules:
        sys.modules["dsnas.models"].forget_families()
    from dsnas.storage import disk_full, optuna_quieted  # (imports no Optuna: `dsnas --version` stays quick)

    try:
        with showing_logs(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO), \
                optuna_quieted(), sigterm_raises():  # a notebook calling main keeps its own Optuna settings
            return args.func(args)
    except DsnasError as e:
        if args.debug:
            traceback.print_exc()
        print(f"dsnas: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `dsnas ... | head` closed the pipe: not an error of ours, and no traceback
        # What the Python docs advise: point stdout at devnull, or the flush at exit fails on the pipe again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command cut off by its pipe
    except Exception as e:
        full = disk_full(e)
        if full is not None:  # a full disk is no bug of ours: a traceback (four, from a search) said nothing else
            if args.debug:
                traceback.print_exc()
            kept = "the search resumes; its completed trials are stored" if args.command == "search" else \
                "what was stored before is kept"
            print(f"dsnas: error: a disk is full ({full}). Fix: free space on the disk that holds "
                  f"{_written_where(args)} (`df -h` shows what is left), then run the same command again ({kept})",
                  file=sys.stderr)
            return 2
        lost = _lost_connection(e)
        if lost is None:
            raise
        if args.debug:
            traceback.print_exc()
        # Outside a search's trials (opening the study, report, export), where no outage is waited through: Optuna's
        # own words blamed the data ("invalid data in the commit, e.g. exceeding max length") after 4 tracebacks.
        if "locked" in lost or "busy" in lost:  # SQLite: a file another process holds, not a server gone
            print(f"dsnas: error: the study's database file was locked by another process too long ({lost}). Fix: "
                  "run the same command again once that process is done (what was stored is kept)", file=sys.stderr)
        else:
            print(f"dsnas: error: the connection to the database was lost ({lost}). Fix: check that the database "
                  "server runs and is reachable, then run the same command again (what was stored is kept)",
                  file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        stopped = "terminated" if isinstance(e, Terminated) else "interrupted"
        # What a stop leaves depends on the command: only a search has trials to resume (export and route keep an
        # earlier bundle as it was; verify, profile and report store nothing).
        after = "completed trials are stored, run the same command to resume" if args.command == "search" else \
            "what was stored before is kept; run the same command again"
        print(f"\ndsnas: {stopped}; {after}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130


def _written_where(args: argparse.Namespace) -> str:
    """Where the command writes: its --out, else the study file's folder (a study's database, its artifacts, and
    by default its exports, reports and routes are there)."""
    if getattr(args, "out", None):
        return shlex.quote(str(args.out))
    study_file = getattr(args, "study_file", None)
    if study_file:
        return f"{shlex.quote(str(Path(study_file).resolve().parent))} (and [study] storage, where it is elsewhere)"
    return "the folders it writes"


def _lost_connection(error: BaseException) -> str | None:
    """The first line of what says the database connection failed in ``error``'s chain, or None (another error)."""
    if "sqlalchemy" not in sys.modules:  # no database was opened
        return None
    from dsnas.storage import _first_line, _lost_cause  # loaded already, with SQLAlchemy

    cause = _lost_cause(error)
    return None if cause is None else _first_line(cause)


if __name__ == "__main__":
    sys.exit(main())
