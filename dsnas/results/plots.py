"""The report's figures, twice: PNG images with matplotlib (Agg, so a headless machine draws them) and
interactive plotly figures for the HTML page. Both draw the same data, chosen once in ``views``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsnas.results.trials import done_trials, front, objectives

MAX_CHOICES = 8  # a parameter with more values than this is not a "choice" worth a box plot


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
    choices: list[str]  # param.* columns to show latency by


def views(df: Any, history: Any, reference: dict[str, float]) -> Views:
    objs = objectives(df)
    x, y = (objs[1], objs[0]) if len(objs) > 1 else (objs[0], objs[0])  # throughput across, accuracy up
    done = done_trials(df, feasible_only=False)
    hardware_x = next((c for c in ("sm_util", "gflop_s") if c in done.columns and done[c].notna().any()), None)
    if "throughput_tok_s" not in done.columns:
        hardware_x = None
    # Precision and sparsity first (when the space has them), then whole-model choices, then per-layer ones.
    params = [c for c in done.columns if c.startswith("param.") and 1 < done[c].nunique() <= MAX_CHOICES]
    params.sort(key=lambda c: (not any(k in c for k in ("precision", "sparsity")), c.startswith("param.layer"), c))
    choices = params[:3] if "latency_ms" in done.columns else []
    return Views(x, y, done, front(df), history, reference, hardware_x, choices)


def _label(obj: Any) -> str:
    return obj.column if obj.column == obj.name else f"{obj.name} ({obj.column})"


def write_pngs(v: Views, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must happen before pyplot is imported
    import matplotlib.pyplot as plt

    paths = [folder / "pareto.png", folder / "hypervolume.png", folder / "hardware.png"]
    for path, draw in zip(paths, (_pareto_png, _hypervolume_png, _hardware_png)):
        fig = draw(plt, v)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
    return paths


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
    if len(v.done) and v.done[v.x.column].min() > 0 and v.done[v.x.column].max() > 10 * v.done[v.x.column].min():
        ax.set_xscale("log")
    ax.set(xlabel=_label(v.x), ylabel=_label(v.y), title="Trials and the Pareto front")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _hypervolume_png(plt: Any, v: Views) -> Any:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    left.step(v.history["n_complete"], v.history["hypervolume"], where="post")
    right.step(v.history["wall_s"], v.history["hypervolume"], where="post", color="tab:green")
    left.set(xlabel="completed trials", ylabel="hypervolume")
    right.set(xlabel="wall time since the first trial started (s)")
    ref = ", ".join(f"{k}={val:.4g}" for k, val in v.reference.items())
    fig.suptitle(f"Hypervolume of the feasible trials (reference point: {ref})", fontsize=10)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    return fig


def _hardware_png(plt: Any, v: Views) -> Any:
    n = 1 + len(v.choices)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.8), squeeze=False)
    ax = axes[0][0]
    if v.hardware_x:
        ax.scatter(v.done[v.hardware_x], v.done["throughput_tok_s"], s=20, color="tab:purple")
        ax.set(xlabel=_hardware_label(v.hardware_x), ylabel="throughput_tok_s", title="What the device achieved")
    else:
        ax.text(0.5, 0.5, "no achieved-FLOP/s or SM-utilization\nmeasurement stored", ha="center", va="center")
    for ax, column in zip(axes[0][1:], v.choices):
        groups = [(value, g["latency_ms"].dropna()) for value, g in v.done.groupby(column)]
        ax.boxplot([g for _, g in groups], tick_labels=[str(value) for value, _ in groups])
        ax.set(xlabel=column.removeprefix("param."), ylabel="latency_ms", title="Latency by choice")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _hardware_label(column: str) -> str:
    return {"gflop_s": "achieved GFLOP/s (counted FLOPs / median time)",
            "sm_util": "SM utilization (NVML GPM)"}.get(column, column)


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
    pareto.update_layout(title="Trials and the Pareto front", xaxis_title=_label(v.x), yaxis_title=_label(v.y))

    volume = make_subplots(rows=1, cols=2, shared_yaxes=True,
                           subplot_titles=("by completed trials", "by wall time (s)"))
    volume.add_scatter(x=v.history["n_complete"], y=v.history["hypervolume"], line_shape="hv", row=1, col=1,
                       name="hypervolume")
    volume.add_scatter(x=v.history["wall_s"], y=v.history["hypervolume"], line_shape="hv", row=1, col=2,
                       name="hypervolume (time)")
    ref = ", ".join(f"{k}={val:.4g}" for k, val in v.reference.items())
    volume.update_layout(title=f"Hypervolume (reference point: {ref})", showlegend=False)
    return [pareto, volume, *_plotly_hardware(v, hover)]


def _plotly_hardware(v: Views, hover: str) -> list[Any]:
    import plotly.graph_objects as go

    out = []
    if v.hardware_x:
        fig = go.Figure(go.Scatter(x=v.done[v.hardware_x], y=v.done["throughput_tok_s"], mode="markers",
                                   customdata=v.done[["trial", "arch_short"]], hovertemplate=hover))
        fig.update_layout(title="What the device achieved", xaxis_title=_hardware_label(v.hardware_x),
                          yaxis_title="throughput_tok_s")
        out.append(fig)
    for column in v.choices:
        fig = go.Figure(go.Box(x=v.done[column].astype(str), y=v.done["latency_ms"], boxpoints="all"))
        fig.update_layout(title=f"Latency by {column.removeprefix('param.')}", yaxis_title="latency_ms")
        out.append(fig)
    return out
