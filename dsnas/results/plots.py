"""The report's figures, twice: PNG (with SVG and PDF beside it) through matplotlib (Agg, so a headless machine
draws them) and interactive plotly figures for the HTML page. Both draw the same data with the same axis labels
(in words, with units and the measuring conditions) and the same log/linear scales, chosen once in ``views``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsnas.results.trials import done_trials, front, objectives

MAX_CHOICES = 8  # a parameter with more values than this is not a "choice" worth a box plot
CHOICE_ROWS = 6  # the choices with the largest effect, one row each
FORMATS = ("png", "svg", "pdf")


@dataclass(frozen=True)
class Conditions:
    """What a measured figure was measured under, for axis labels: the task's throughput unit, the batch sizes and
    the device."""
    unit: str = "tokens/s"
    batch_sizes: tuple[int, ...] = (1, 32)
    device: str = ""
    task: str = ""


@dataclass
class Views:
    """What the figures show, taken from a study's DataFrame."""
    x: Any  # the first two objectives (Objective)
    y: Any
    done: Any  # completed trials (feasible and not)
    front: Any  # feasible non-dominated trials
    history: Any  # hypervolume_history
    reference: dict[str, float]
    hardware_x: str | None  # e.g. sm_util or gflop_s: what the device achieved, against throughput
    labels: dict[str, str] = field(default_factory=dict)  # column -> axis label in words
    log_x: bool = False  # the same choice in the PNG and the HTML
    ceilings: dict[str, float] = field(default_factory=dict)  # gflop_s and gb_s the device's peaks
    choices: list[tuple[str, dict[str, float]]] = field(default_factory=list)  # ranked: (param column, effects)

    def label(self, column: str) -> str:
        return self.labels.get(column, column)

    def short_label(self, column: str) -> str:
        """The label without its conditions, for the small panels: "throughput, images/s"."""
        return self.label(column).split(" at batch")[0]


def views(df: Any, history: Any, reference: dict[str, float], conditions: Conditions | None = None) -> Views:
    conditions = conditions or Conditions()
    objs = objectives(df)
    x, y = (objs[1], objs[0]) if len(objs) > 1 else (objs[0], objs[0])  # throughput across, accuracy up
    # Each trained candidate once: a reused repeat is its original's point again, and counted twice it weighed a
    # choice's median (n_layers' effect on throughput read 71% where the trained trials give 20%).
    done = _one_column_per_choice(done_trials(df, feasible_only=False, trained_only=True))
    hardware_x = next((c for c in ("sm_util", "gflop_s") if c in done.columns and done[c].notna().any()), None)
    if "throughput_tok_s" not in done.columns:
        hardware_x = None
    column = done[x.column] if len(done) else None
    log_x = column is not None and column.min() > 0 and column.max() > 10 * column.min()
    return Views(x, y, done, front(df), history, reference, hardware_x, labels(conditions), log_x,
                 _ceilings(done), rank_choices(done, [o.column for o in objs]))


def labels(c: Conditions) -> dict[str, str]:
    """Axis labels in words, with units and conditions: "throughput, tokens/s at batch 32, AMD EPYC x2"."""
    on = f", {c.device}" if c.device else ""
    big, small = max(c.batch_sizes), min(c.batch_sizes)
    task = f" ({c.task} validation split)" if c.task else " (validation split)"
    return {"accuracy": f"accuracy{task}", "throughput_tok_s": f"throughput, {c.unit} at batch {big}{on}",
            "latency_ms": f"latency, ms at batch {small}{on}", "peak_memory_mb": f"peak memory, MiB at batch {big}",
            "params": "parameters", "val_loss": f"validation loss{task}",
            "gflop_s": f"achieved GFLOP/s at batch {big} (counted FLOPs / median time)",
            "sm_util": "SM utilization (NVML GPM)", "intensity": "arithmetic intensity, FLOPs per byte",
            "hypervolume": "hypervolume, share of the ideal box"}


def device_words(df: Any) -> str:
    """The device as the fingerprint names it ("cpu: AMD EPYC x2"); "several devices" when trials differ."""
    names = {str(f).split(" on ")[0] for f in df.get("fingerprint", []) if isinstance(f, str)}
    return names.pop() if len(names) == 1 else ("several devices" if names else "")


def _ceilings(done: Any) -> dict[str, float]:
    """The device's compute and bandwidth ceilings, as each measured trial divided its achieved rate by them."""
    out = {}
    for rate, share in (("gflop_s", "flop_util"), ("gb_s", "bw_util")):
        if rate in done.columns and share in done.columns:
            peaks = (done[rate] / done[share]).replace([float("inf")], float("nan")).dropna()
            if len(peaks):
                out[rate] = float(peaks.median())
    return out


def rank_choices(done: Any, columns: list[str]) -> list[tuple[str, dict[str, float]]]:
    """The architecture choices (every sampled parameter with 2..MAX_CHOICES values: depth and width as much as
    precision) ranked by their effect on the objectives: for each objective, the range of the per-value medians as a
    share of the objective's range over the completed trials; a choice ranks by its largest. A value tried once is
    left out (one trial's median is that trial, not the value's effect), and so is a parameter most trials lack (a
    deep layer's choice, which only the deep models have)."""
    ranked = []
    done = _one_column_per_choice(done)
    for param in [c for c in done.columns if c.startswith("param.") and 1 < done[c].nunique() <= MAX_CHOICES]:
        if done[param].notna().mean() < 0.75:
            continue
        counts = done[param].value_counts()
        kept = done[done[param].isin(counts[counts >= 2].index)]
        if kept[param].nunique() < 2:
            continue
        effects = {}
        for col in columns:
            spread = done[col].max() - done[col].min()
            medians = kept.groupby(param)[col].median()
            effects[col] = float((medians.max() - medians.min()) / spread) if spread > 0 else 0.0
        ranked.append((param, effects))
    ranked.sort(key=lambda pe: -max(pe[1].values(), default=0.0))
    return ranked[:CHOICE_ROWS]


def _one_column_per_choice(done: Any) -> Any:
    """A choice the device offers by width is sampled as one parameter per width where its options differ
    (``layer0.precision@96``, dsnas.space): each holds a part of the trials, fewer than the rank needs, so the
    precision dropped out of the figure. Here they are the one choice again, ``param.layer0.precision``."""
    split = [c for c in done.columns if c.startswith("param.") and "@" in c]
    if not split:
        return done
    done = done.copy()
    for column in split:
        whole = column.split("@")[0]
        done[whole] = done[column] if whole not in done.columns else done[whole].fillna(done[column])
    # At a width that offers one option the choice is no parameter at all: its value is in the architecture.
    for whole in {c.split("@")[0] for c in split}:
        layer, _, key = whole.removeprefix("param.layer").partition(".")
        if layer.isdigit() and "arch" in done.columns:
            done[whole] = done[whole].fillna(done["arch"].map(lambda arch: _layer_value(arch, int(layer), key)))
    return done.drop(columns=split)


def _as_dict(arch: Any) -> dict[str, Any] | None:
    """A stored architecture as a dict: the trials table holds it as JSON text."""
    if isinstance(arch, str):
        try:
            arch = json.loads(arch)
        except ValueError:
            return None
    return arch if isinstance(arch, dict) else None


def _layer_value(arch: Any, index: int, key: str) -> Any:
    """``arch["layers"][index][key]`` of a stored architecture (a dict or its JSON text), or None."""
    layers = (_as_dict(arch) or {}).get("layers", [])
    return layers[index].get(key) if index < len(layers) and isinstance(layers[index], dict) else None


def precision_of(arch: Any) -> str:
    """What a candidate computes in: its layers' precision, "mixed" when they differ. ``arch``: a dict, or the JSON
    text the trials table holds (read as text, every candidate was "fp32")."""
    arch = _as_dict(arch)
    if arch is None:
        return "fp32"
    found = {layer.get("precision", "fp32") for layer in arch.get("layers", []) if isinstance(layer, dict)}
    found |= {g.get("precision", "fp32") for g in arch.get("engine", []) if isinstance(g, dict)}
    found = found or {"fp32"}
    return found.pop() if len(found) == 1 else "mixed"


# ---- PNG, SVG and PDF ------------------------------------------------------------------------------------------

def write_pngs(v: Views, folder: Path) -> list[Path]:
    """pareto, hypervolume, hardware, roofline and choices: each as PNG, SVG (text kept as text) and PDF."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must happen before pyplot is imported
    import matplotlib.pyplot as plt

    written = []
    draws = {"pareto": _pareto_png, "hypervolume": _hypervolume_png, "hardware": _hardware_png,
             "roofline": _roofline_png, "choices": _choices_png}
    with matplotlib.rc_context({"svg.fonttype": "none", "pdf.fonttype": 42}):  # searchable, editable text
        for name, draw in draws.items():
            fig = draw(plt, v)
            for fmt in FORMATS:
                path = folder / f"{name}.{fmt}"
                fig.savefig(path, dpi=110, bbox_inches="tight")
                written.append(path)
            plt.close(fig)
    return written


def _pareto_png(plt: Any, v: Views) -> Any:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    feasible = v.done[v.done["feasible"].astype(bool)]
    infeasible = v.done[~v.done["feasible"].astype(bool)]
    ax.scatter(feasible[v.x.column], feasible[v.y.column], s=22, color="tab:blue", label="feasible")
    ax.scatter(infeasible[v.x.column], infeasible[v.y.column], s=26, marker="x", color="grey",
               label="infeasible (breaks a hardware limit)")
    line = v.front.sort_values(v.x.column)
    ax.plot(line[v.x.column], line[v.y.column], "o-", color="tab:red", markersize=7, label="Pareto front")
    for _, t in v.front.iterrows():
        ax.annotate(f"#{t['trial']}", (t[v.x.column], t[v.y.column]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    if v.log_x:
        ax.set_xscale("log")
    ax.set(xlabel=v.label(v.x.column), ylabel=v.label(v.y.column), title="Trials and the Pareto front")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def reference_words(v: Views) -> str:
    return ", ".join(f"{k} {val:.4g}" for k, val in v.reference.items())


def _hypervolume_png(plt: Any, v: Views) -> Any:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    left.step(v.history["n_complete"], v.history["normalised"], where="post")
    right.step(v.history["wall_s"], v.history["normalised"], where="post", color="tab:green")
    left.set(xlabel="trained trials", ylabel=v.label("hypervolume"), ylim=(0, 1.02))
    right.set(xlabel="wall time since the first trial started, s")
    fig.suptitle(f"Hypervolume of the feasible front, as a share of the box from the reference point "
                 f"({reference_words(v)}) to the best value of each objective", fontsize=9)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return fig


def _hardware_png(plt: Any, v: Views) -> Any:
    fig, ax = plt.subplots(figsize=(6, 4))
    if v.hardware_x:
        ax.scatter(v.done[v.hardware_x], v.done["throughput_tok_s"], s=20, color="tab:purple")
        ax.set(xlabel=v.label(v.hardware_x), ylabel=v.label("throughput_tok_s"), title="What the device achieved")
    else:
        ax.text(0.5, 0.5, "no achieved-FLOP/s or SM-utilization\nmeasurement stored", ha="center", va="center")
    ax.grid(alpha=0.3)
    return fig


def roofline_points(v: Views) -> Any:
    """Per measured candidate: arithmetic intensity (FLOPs / bytes, the achieved GFLOP/s over GB/s of one call) and
    achieved GFLOP/s, with its precision."""
    if not {"gflop_s", "gb_s"} <= set(v.done.columns):
        return None
    points = v.done[["trial", "arch_short", "gflop_s", "gb_s", "arch"]].dropna(subset=["gflop_s", "gb_s"])
    points = points[points["gb_s"] > 0]
    return points.assign(intensity=points["gflop_s"] / points["gb_s"],
                         precision=points["arch"].map(precision_of))


def _roofline_png(plt: Any, v: Views) -> Any:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = roofline_points(v)
    if points is None or points.empty:
        ax.text(0.5, 0.5, "no FLOP and byte counts stored", ha="center", va="center")
        return fig
    for precision, group in points.groupby("precision"):
        ax.scatter(group["intensity"], group["gflop_s"], s=22, label=f"candidates, {precision}")
    peak, bandwidth = v.ceilings.get("gflop_s"), v.ceilings.get("gb_s")
    if peak and bandwidth:
        lo, hi = points["intensity"].min() / 2, max(points["intensity"].max() * 2, 2 * peak / bandwidth)
        knee = peak / bandwidth
        ax.plot([lo, knee, hi], [lo * bandwidth, peak, peak], color="black", lw=1.2,
                label=f"ceilings: {peak:.4g} GFLOP/s, {bandwidth:.4g} GB/s (measured here)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlabel=v.label("intensity"), ylabel=v.label("gflop_s"), title="Roofline: each candidate under the "
                                                                           "device's ceilings")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return fig


def _choices_png(plt: Any, v: Views) -> Any:
    columns = [c for c in (v.y.column, v.x.column) if c in v.done.columns]
    columns = list(dict.fromkeys(columns))
    rows = max(1, len(v.choices))
    fig, axes = plt.subplots(rows, len(columns), figsize=(5.2 * len(columns), 2.6 * rows), squeeze=False)
    if not v.choices:
        axes[0][0].text(0.5, 0.5, "no architecture choice with 2-8 values", ha="center", va="center")
    for row, (param, effects) in zip(axes, v.choices):
        for ax, col in zip(row, columns):
            groups = [(value, g[col].dropna()) for value, g in v.done.groupby(param)]
            ax.boxplot([g for _, g in groups], tick_labels=[_value(value) for value, _ in groups])
            ax.set_title(f"{param.removeprefix('param.')}: effect {effects[col]:.0%} of the range", fontsize=9)
            ax.set_ylabel(v.short_label(col), fontsize=8)
            ax.grid(alpha=0.3)
    fig.suptitle("Architecture choices, largest effect first (effect: the range of the per-value medians, as a "
                 "share of the objective's range)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    return fig


def _value(value: Any) -> str:
    """A choice's value as written in the space: 2, not 2.0 (a column with gaps is stored as floats)."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


# ---- the HTML page's interactive figures ------------------------------------------------------------------------

def plotly_figures(v: Views) -> list[Any]:
    """The same views as write_pngs, interactive: hovering a point names the trial and its architecture."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    hover = "trial %{customdata[0]}: %{customdata[1]}<extra></extra>"
    pareto = go.Figure()
    for name, part, marker in (("feasible", v.done[v.done["feasible"].astype(bool)], {"color": "#1f77b4"}),
                               ("infeasible", v.done[~v.done["feasible"].astype(bool)],
                                {"color": "grey", "symbol": "x"})):
        pareto.add_scatter(x=part[v.x.column], y=part[v.y.column], mode="markers", name=name, marker=marker,
                           customdata=part[["trial", "arch_short"]], hovertemplate=hover)
    line = v.front.sort_values(v.x.column)
    pareto.add_scatter(x=line[v.x.column], y=line[v.y.column], mode="lines+markers", name="Pareto front",
                       marker={"color": "#d62728", "size": 10}, customdata=line[["trial", "arch_short"]],
                       hovertemplate=hover)
    pareto.update_layout(title="Trials and the Pareto front", xaxis_title=v.label(v.x.column),
                         yaxis_title=v.label(v.y.column), xaxis_type="log" if v.log_x else "linear")

    volume = make_subplots(rows=1, cols=2, shared_yaxes=True,
                           subplot_titles=("by trained trials", "by wall time, s"))
    volume.add_scatter(x=v.history["n_complete"], y=v.history["normalised"], line_shape="hv", row=1, col=1,
                       name="hypervolume")
    volume.add_scatter(x=v.history["wall_s"], y=v.history["normalised"], line_shape="hv", row=1, col=2,
                       name="hypervolume (time)")
    volume.update_layout(title=f"Hypervolume, share of the box from the reference point ({reference_words(v)}) to "
                               "the best value of each objective", showlegend=False, yaxis_title=v.label("hypervolume"))
    return [pareto, volume, *_plotly_hardware(v, hover)]


def _plotly_hardware(v: Views, hover: str) -> list[Any]:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    out = []
    if v.hardware_x:
        fig = go.Figure(go.Scatter(x=v.done[v.hardware_x], y=v.done["throughput_tok_s"], mode="markers",
                                   customdata=v.done[["trial", "arch_short"]], hovertemplate=hover))
        fig.update_layout(title="What the device achieved", xaxis_title=v.label(v.hardware_x),
                          yaxis_title=v.label("throughput_tok_s"))
        out.append(fig)
    points = roofline_points(v)
    if points is not None and not points.empty:
        fig = go.Figure()
        for precision, group in points.groupby("precision"):
            fig.add_scatter(x=group["intensity"], y=group["gflop_s"], mode="markers", name=f"candidates, {precision}",
                            customdata=group[["trial", "arch_short"]], hovertemplate=hover)
        peak, bandwidth = v.ceilings.get("gflop_s"), v.ceilings.get("gb_s")
        if peak and bandwidth:
            lo, hi = points["intensity"].min() / 2, max(points["intensity"].max() * 2, 2 * peak / bandwidth)
            fig.add_scatter(x=[lo, peak / bandwidth, hi], y=[lo * bandwidth, peak, peak], mode="lines",
                            name=f"ceilings: {peak:.4g} GFLOP/s, {bandwidth:.4g} GB/s", line={"color": "black"})
        fig.update_layout(title="Roofline: each candidate under the device's ceilings", xaxis_type="log",
                          yaxis_type="log", xaxis_title=v.label("intensity"), yaxis_title=v.label("gflop_s"))
        out.append(fig)
    if v.choices:
        columns = list(dict.fromkeys(c for c in (v.y.column, v.x.column) if c in v.done.columns))
        titles = [f"{p.removeprefix('param.')}: effect {e[c]:.0%}" for p, e in v.choices for c in columns]
        fig = make_subplots(rows=len(v.choices), cols=len(columns), subplot_titles=titles)
        for r, (param, _) in enumerate(v.choices, start=1):
            for k, col in enumerate(columns, start=1):
                fig.add_box(x=v.done[param].map(_value), y=v.done[col], boxpoints="all", showlegend=False,
                            row=r, col=k)
                fig.update_yaxes(title_text=v.short_label(col), row=r, col=k, title_font={"size": 10})
        fig.update_layout(title="Architecture choices, largest effect first", height=260 * len(v.choices))
        out.append(fig)
    return out
