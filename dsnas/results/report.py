"""`dsnas report`: a folder a person can open or share (trials.csv/.parquet, measurements.csv, PNG
images, one interactive HTML page) and a terminal summary of the Pareto front."""

from __future__ import annotations

import html
import math
import os
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Any

from dsnas.errors import DsnasError
from dsnas.progress import column_titles, format_metric
from dsnas.results.plots import Conditions, device_words, plotly_figures, views, write_pngs
from dsnas.results.trials import default_reference, done_trials, frame, hypervolume_history, objectives
from dsnas.spec import StudySpec
from dsnas.storage import process_tag, tag_gone
from dsnas.tasks import throughput_unit

SUMMARY_COLUMNS = ("latency_ms", "throughput_tok_s", "peak_memory_mb", "params")


def parse_reference(text: str | None, names: list[str]) -> dict[str, float] | None:
    """``accuracy=0.3,throughput=1000`` -> {"accuracy": 0.3, "throughput": 1000.0}."""
    if text is None:
        return None
    try:
        pairs = [part.split("=", 1) for part in text.split(",")]
        reference = {k.strip(): float(v) for k, v in pairs}
    except ValueError:
        pairs, reference = [], {}
    # Each objective once, and finite: accuracy=-inf printed "hypervolume inf", accuracy=nan a hypervolume of 0,
    # and an objective named twice kept its last number without a word.
    if len(pairs) != len(reference) or sorted(reference) != sorted(names) or \
            not all(math.isfinite(v) for v in reference.values()):
        example = ",".join(f"{n}=..." for n in names)
        raise DsnasError(f"--reference {text}: must give one finite number for each objective {names}. Fix: "
                         f"--reference {example}")
    return reference


def _check_writable(folder: Path) -> None:
    """The report's folder made and written to before any figure is drawn: an account that may only read the
    study (as report allows) gets one line naming the folder, not a traceback from the first file."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise DsnasError(f"{folder}: the report cannot be written there ({e.strerror or e}). Fix: name a folder "
                         "you can write to with --out") from None


def write_report(spec: StudySpec, out: str | Path | None = None, reference: str | None = None) -> str:
    """Write the report folder of a study; returns the terminal summary."""
    from dsnas import tables  # SQLAlchemy loads on first use
    from dsnas.study import as_searched, edited_since, nothing_to_use, open_study  # SQLAlchemy loads on first use

    study = open_study(spec, create=False)
    df = frame(study)
    df.attrs["edited"] = edited_since(spec, study)  # said beneath the front (see _notes)
    spec = as_searched(spec, study)  # the batch sizes the figures were measured at, also where the file changed
    if not (df["state"] == "COMPLETE").any():
        raise DsnasError(nothing_to_use(spec, study))
    ref = parse_reference(reference, [o["name"] for o in df.attrs["objectives"]]) or default_reference(df)
    folder = Path(out) if out else spec.base_dir / "reports" / spec.name
    if folder.exists() and not folder.is_dir():
        raise DsnasError(f"--out {folder}: is a file, and the report is a folder. Fix: name a folder, e.g. --out "
                         f"reports/{spec.name}")
    _check_writable(folder)
    _check_a_reports_folder(folder, given=bool(out))
    # Drawn in a folder of its own inside, then moved in at once: a report stopped half-way (Ctrl-C, a full disk)
    # left the last report's page beside this one's tables and half of its figures.
    for abandoned in folder.glob(".report-*"):  # of a report killed (kill -9, SIGTERM) before it could clean up
        if abandoned.is_dir() and tag_gone(abandoned.name.removeprefix(".report-")):
            shutil.rmtree(abandoned, ignore_errors=True)
    stage = folder / f".report-{process_tag()}"
    stage.mkdir()
    try:
        written = _write_tables(df, tables.measurements(study), stage)
        history = hypervolume_history(df, ref)
        conditions = Conditions(throughput_unit(spec.task), tuple(spec.hardware.batch_sizes), device_words(df),
                                spec.task.name)
        v = views(df, history, ref, conditions)
        written += write_pngs(v, stage)
        route = _read_route(spec)
        if route is not None:
            written.append(_route_png(route, stage))
        written.append(_write_html(spec, df, v, plotly_figures(v), stage, route))
        written = _moved_in(stage, folder, written)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return summary(spec, df, v, written)


# Written into a report's folder before its files are moved in: a report stopped while moving them left tables
# without the page that says whose they are, and the next report must still know the folder for a report's.
MARK = ".dsnas-report"


def _check_a_reports_folder(folder: Path, given: bool) -> None:
    """A report's files replace their namesakes: only a new or empty folder, or an earlier report's, may take them.
    `--out` of a bundle wrote 20 files into it (export then refused the folder as no bundle), and of the study's
    folder replaced any index.html or trials.csv of the user's there. ``given``: the folder is --out's (else the
    default one)."""
    held = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".report-")) if folder.is_dir() else []
    if not held or MARK in held:  # new, empty, only the stage of a report killed half-way, or a report's
        return
    page = folder / "index.html"
    try:  # a report of a dsnas before the mark
        earlier = page.is_file() and "<title>dsnas report: " in page.read_text(encoding="utf-8", errors="replace")
    except OSError:
        earlier = False
    if not earlier:
        shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise DsnasError(f"{'--out ' if given else ''}{folder}: holds files that are not a dsnas report's ({shown}), "
                         "and a report's files would replace their namesakes there. Fix: "
                         + ("name a new folder, or an earlier report's, with --out" if given else
                            "move them elsewhere, or name another folder with --out"))


def _moved_in(stage: Path, folder: Path, written: list[Path]) -> list[Path]:
    """Each staged file replaces its namesake in ``folder``, the page last (a reader never opens a page whose
    figures are not there yet), the folder marked a report's first."""
    (folder / MARK).touch()
    for path in sorted(stage.iterdir(), key=lambda p: p.name == "index.html"):
        os.replace(path, folder / path.name)
    return [folder / p.name for p in written]


def _write_tables(df: Any, measured: Any, folder: Path) -> list[Path]:
    written = [folder / "trials.csv", folder / "measurements.csv"]
    df.to_csv(written[0], index=False)
    measured.to_csv(written[1], index=False)
    try:
        import pyarrow  # noqa: F401  (pandas writes parquet through it)
    except ImportError:
        return written  # parquet only when available; the CSV has the same content
    df.to_parquet(folder / "trials.parquet", index=False)
    return [*written, folder / "trials.parquet"]


def _read_route(spec: StudySpec) -> dict[str, Any] | None:
    """The route `dsnas route` wrote for this study (routes/STUDY beside the study file), if any."""
    import json

    path = spec.base_dir / "routes" / spec.name / "route.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if doc.get("_type") == "dsnas.route" and doc.get("table") else None


def _route_png(route: dict[str, Any], folder: Path) -> Path:
    """route.png: accuracy against mean cost per input, of each member alone (the front) and of the routes at
    each target, on the report half of the validation inputs."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must happen before pyplot is imported
    import matplotlib.pyplot as plt

    cost = next(k for k in route["table"][0] if k.startswith("cost ("))
    unit = cost.removeprefix("cost (").removesuffix(")")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    alone = [r for r in route["table"] if r["route"].endswith("alone")]
    routed = [r for r in route["table"] if not r["route"].endswith("alone")]
    ax.plot([r[cost] for r in alone], [r["accuracy"] for r in alone], "o-", color="tab:red",
            label="front models alone")
    for kind, marker in (("cascade", "*"), ("learned", "^")):
        rows = [r for r in routed if r["route"].startswith(kind)]
        ax.scatter([r[cost] for r in rows], [r["accuracy"] for r in rows], marker=marker, s=80,
                   label=f"{kind} at each accuracy target")
    for r in alone + [r for r in routed if r["route"] in ("cascade", "learned router")]:
        ax.annotate(r["route"], (r[cost], r["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel=f"mean cost, {unit} (each model measured on this device)",
           ylabel="accuracy on the report half of the validation inputs",
           title="Routing over the front: accuracy against cost")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    path = folder / "route.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _write_html(spec: StudySpec, df: Any, v: Any, figures: list[Any], folder: Path,
                route: dict[str, Any] | None = None) -> Path:
    from plotly.offline import get_plotlyjs

    # plotly.js goes once into the folder beside the page: the page works offline and stays small.
    (folder / "plotly.min.js").write_text(get_plotlyjs(), encoding="utf-8")  # counted with the page: see summary()
    charts = "\n".join(f.to_html(full_html=False, include_plotlyjs="directory" if i == 0 else False)
                       for i, f in enumerate(figures))
    shown = _summary_frame(v)
    disturbed = "".join(f"<p><b>{html.escape(note)}</b></p>" for note in _notes(spec, df))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>dsnas report: {html.escape(spec.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}</style></head><body>
<h1>dsnas study {html.escape(spec.name)}</h1>
<p>{_counts(df)}. Measured on: {html.escape('; '.join(df['fingerprint'].dropna().unique()))}.</p>
{disturbed}
<h2>Pareto front (feasible, non-dominated)</h2>
{_front_html(shown, spec)}
{charts}
{_route_html(route)}
<h2>All trials</h2>
<p>Also in trials.csv and measurements.csv (one row per trial and batch size, with dispersion).</p>
<div style="overflow-x:auto">
{_all_trials_html(df)}
</div>
</body></html>
"""
    path = folder / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


def _all_trials_html(df: Any) -> str:
    """Every trial, each figure dsnas formats (accuracy, throughput, latency, params, ...) as the front above shows
    it: in 4 significant digits the same page showed trial 3's 270,720 parameters as 2.707e+05 and 14,657 tokens/s
    as 1.466e+04."""
    table = df.drop(columns=["arch"])
    formatters = {c: (lambda x, c=c: format_metric(c, x) if x == x and x is not None else "")
                  for c in column_titles("") if c in table.columns and table[c].dtype.kind == "f"}
    return table.to_html(index=False, float_format=lambda x: f"{x:.4g}", na_rep="", formatters=formatters)


def _route_html(route: dict[str, Any] | None) -> str:
    if route is None:
        return ""
    import pandas as pd

    table = pd.DataFrame(route["table"]).to_html(index=False, float_format=lambda x: f"{x:.4g}")
    return (f"<h2>Routing over the front</h2><p>dsnas route: {len(route['members'])} members; serves with the "
            f"{html.escape(route['serve'])} router. Thresholds chosen on {route['calibration']['inputs']} "
            f"validation inputs, figures on the other {route['calibration']['report_inputs']}.</p>"
            f'<img src="route.png" alt="route: accuracy against cost">{table}')


def _summary_frame(v: Any) -> Any:
    # Every objective: the front is non-dominated in all of them, and a row shown without the third one it wins
    # on looks dominated.
    plotted = [v.y.column, v.x.column] if v.x is not v.y else [v.y.column]
    objective_columns = plotted + [o.column for o in objectives(v.front) if o.column not in plotted]
    extra = [c for c in SUMMARY_COLUMNS if c in v.front.columns and c not in objective_columns]
    shown = v.front[["trial", "arch_short", *objective_columns, *extra]]
    if "disturbed" in v.front.columns and v.front["disturbed"].notna().any():
        # A front point measured under others' load: its speed may be the machine's, not the model's.
        flags = v.front["disturbed"].map({True: "yes", False: "no"}).fillna("?")
        shown = shown.assign(disturbed=flags.to_numpy())
    return shown


def _notes(spec: StudySpec, df: Any) -> list[str]:
    """What the summary and the page say beneath the front about figures to read with care."""
    return [note for note in (df.attrs.get("edited", ""), _disturbed_note(spec, df), _memory_note(spec, df)) if note]


def _disturbed_note(spec: StudySpec, df: Any) -> str:
    """A line naming the completed trials whose measurement others' load or a slowed host disturbed even after its
    retries."""
    if "disturbed" not in df.columns:
        return ""
    flagged = (df["state"] == "COMPLETE") & df["disturbed"].eq(True)
    if "reused_from" in df.columns:  # a reused repeat measured nothing: it holds its original's flag, and was
        flagged &= df["reused_from"].isna()  # named as "measured while ..." beside that original
    trials = df.loc[flagged, "trial"].tolist()
    if not trials:
        return ""
    return (f"disturbed: trial{'s' if len(trials) > 1 else ''} {', '.join(map(str, trials))} measured while other "
            "processes took the CPUs or the GPU, or the host ran slow (even after retries): speed figures suspect. "
            f"Fix: re-measure on a quiet machine with `dsnas profile {shlex.quote(str(spec.path))} --trial N`")


def _memory_note(spec: StudySpec, df: Any) -> str:
    """A line naming the completed trials whose peak memory another definition measured: a study resumed across
    a dsnas upgrade held figures 16x apart for models of one size (the process's RSS growth against the weights
    plus the call's allocations), in one column and under one limit."""
    if "memory_method" not in df.columns or "peak_memory_mb" not in df.columns:
        return ""
    done = df[(df["state"] == "COMPLETE") & df["peak_memory_mb"].notna()]
    if "reused_from" in done.columns:  # a reused repeat holds its original's figure, not a measurement of its own
        done = done[done["reused_from"].isna()]
    methods = done["memory_method"].fillna("not recorded")
    if methods.nunique() < 2:
        return ""
    groups = "; ".join(f"{method}: trial{'s' * (len(trials) > 1)} {', '.join(map(str, trials))}"
                       for method, trials in done.groupby(methods)["trial"].apply(list).items())
    return (f"peak memory: measured by {methods.nunique()} definitions in this study ({groups}), so its figures and "
            "any max_peak_memory_mb limit compare unlike numbers across them. Fix: `dsnas profile "
            f"{shlex.quote(str(spec.path))} --trial N` measures a trial by this dsnas's definition; a new study "
            "measures them all by it")


def _counts(df: Any) -> str:
    counts = df["state"].value_counts()
    text = ", ".join(f"{n} {state.lower()}" for state, n in counts.items()) + " trials"
    reused = int(df["reused_from"].notna().sum()) if "reused_from" in df.columns else 0
    # The search's end line counts only the pruned trials that were evaluated: the report said "33 pruned" of a
    # study whose search had said "26 pruned", the other 7 skipped untrained by the predictor.
    skipped = int((df["pruned_by"] == "predictor").sum()) if "pruned_by" in df.columns else 0
    notes = [f"{reused} of the complete ones are repeats whose results were reused"] if reused else []
    notes += [f"{skipped} of the pruned ones skipped untrained by the predictor"] if skipped else []
    return text + (f" ({'; '.join(notes)})" if notes else "")


def _formatted(shown: Any) -> Any:
    """The front with each figure in the one format dsnas prints it everywhere (search, report, dashboard)."""
    out = shown.copy()
    for col in out.columns:
        if out[col].dtype.kind == "f":
            out[col] = [format_metric(col, x) if x == x else "" for x in out[col]]
    return out


def _front_text(shown: Any, spec: StudySpec) -> str:
    if shown.empty:  # pandas printed "Empty DataFrame / Columns: [...] / Index: []"
        return "no feasible completed trial: the Pareto front is empty"
    return _titled(shown, spec).to_string(index=False)


def _front_html(shown: Any, spec: StudySpec) -> str:
    """The page's front under the titles the terminal gives it (an images task's throughput is not tokens/s)."""
    if shown.empty:
        return "<p>No feasible completed trial: the Pareto front is empty.</p>"
    return _titled(shown, spec).to_html(index=False)


def _titled(shown: Any, spec: StudySpec) -> Any:
    return _formatted(shown).rename(columns=_titles(spec))


def _titles(spec: StudySpec) -> dict[str, str]:
    """The front's column titles as `search` prints them, throughput in the task's unit: the report printed the
    column names, and an own task's snippets/s read `throughput_tok_s`."""
    return {**column_titles(throughput_unit(spec.task)), "arch_short": "architecture"}


def summary(spec: StudySpec, df: Any, v: Any, written: list[Path]) -> str:
    shown = _summary_frame(v)
    volume = v.history["hypervolume"].iloc[-1]  # after the last completed trial: the study's hypervolume
    share = v.history["normalised"].iloc[-1]
    ref = ", ".join(f"{k}={val:.4g}" for k, val in v.reference.items())
    # NaN: no box between the reference and the best values to take a share of
    if share == share:
        boxed = f"{share:.1%} of the box from the reference to the best of each objective"
    elif done_trials(df).empty:
        boxed = "no feasible trial, so no share of a box"
    else:
        boxed = ("the reference is not below the best feasible value of every objective, so the box from it to the "
                 "best is empty (Fix: a --reference worse than the front in each objective)")
    lines = [f"study {spec.name!r}: {_counts(df)}; Pareto front of {len(shown)}; hypervolume {volume:.6g} "
             f"(reference {ref}), {boxed}",
             _front_text(shown, spec),
             *_notes(spec, df),
             f"report: {written[-1]} ({len(written) + 1} files: figures as PNG, SVG and PDF, plotly.min.js included, "
             f"in {written[-1].parent})"]
    return "\n".join(lines)
