"""Live progress of a search (one line per event, readable in a terminal and in a log) and the final
Pareto table."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from dsnas.results.pareto import front_indices
from dsnas.spec import StudySpec
from dsnas.storage import display_url

# How each metric is shown: (column title, format).
COLUMNS = {"accuracy": ("accuracy", "{:.4f}"), "throughput_tok_s": ("tokens/s", "{:,.0f}"),
           "latency_ms": ("latency ms", "{:.2f}"), "params": ("params", "{:,.0f}"),
           "peak_memory_mb": ("peak MB", "{:.1f}"), "val_loss": ("val loss", "{:.3f}")}


class Progress:
    def __init__(self, spec: StudySpec, out: TextIO | None = None) -> None:
        self.spec = spec
        self.out = out or sys.stdout
        self.completed = 0
        self.failed = 0
        self.front_points: list[list[float]] = []  # objective values of feasible completed trials
        self._t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def _say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def start(self, study: Any, requeued: list[int]) -> None:
        from optuna.trial import TrialState

        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        self.completed = len(done)
        self.front_points = [list(t.values) for t in done if t.user_attrs.get("feasible", 1.0)]
        budget = self.spec.budget
        limits = [f"{budget.n_trials} trials"] if budget.n_trials else []
        limits += [f"{budget.timeout_s:g} s"] if budget.timeout_s else []
        objectives = ", ".join(f"{o.direction} {o.name}" for o in self.spec.objectives)
        self._say(f"dsnas: study {self.spec.name!r} ({objectives}); budget {' or '.join(limits)}; "
                  f"executor {self.spec.executor.kind}; storage {display_url(self.spec.storage)}")
        if self.completed:
            self._say(f"  resuming: {self.completed} completed trials already stored count toward the budget")
        if requeued:
            self._say(f"  re-queued {len(requeued)} trial(s) left RUNNING by a stopped driver: "
                      f"{', '.join('#' + str(n) for n in requeued)} (marked FAIL)")

    def started(self, number: int, arch_short: str, running: dict[int, Any]) -> None:
        self._say(f"{self._status(running)}  trial {number} started: {arch_short}")

    def finished(self, number: int, values: list[float], feasible: bool, running: dict[int, Any]) -> None:
        self.completed += 1
        if feasible:
            self.front_points.append(values)
        shown = "  ".join(f"{o.name} {_fmt(o.metric, v)}" for o, v in zip(self.spec.objectives, values))
        self._say(f"{self._status(running)}  trial {number} done: {shown}" + ("" if feasible else "  (infeasible)"))

    def failed_trial(self, number: int, reason: str, running: dict[int, Any]) -> None:
        self.failed += 1
        self._say(f"{self._status(running)}  trial {number} FAILED: {reason.splitlines()[0][:200]}")

    def _status(self, running: dict[int, Any]) -> str:
        total = f"/{self.spec.budget.n_trials}" if self.spec.budget.n_trials else ""
        front = len(front_indices(self.front_points, self.spec.directions))
        return (f"[{self.elapsed():6.1f}s] done {self.completed}{total} · running {len(running)} · "
                f"failed {self.failed} · front {front} ·")


def _fmt(metric: str, value: float) -> str:
    return COLUMNS.get(metric, (metric, "{:.4g}"))[1].format(value)


def pareto_table(front: list[Any], spec: StudySpec) -> str:
    """The feasible non-dominated trials, best first in the first objective."""
    if not front:
        return "no feasible completed trial yet: the Pareto front is empty"
    metrics = [o.metric for o in spec.objectives]
    metrics += [m for m in ("accuracy", "throughput_tok_s", "latency_ms", "params") if m not in metrics]
    first = spec.objectives[0]
    rows = sorted(front, key=lambda t: t.values[0], reverse=first.direction == "maximize")
    header = ["trial", *(COLUMNS.get(m, (m, ""))[0] for m in metrics), "architecture"]
    body = [[f"#{t.number}", *(_fmt(m, t.user_attrs[m]) if m in t.user_attrs else "-" for m in metrics),
             t.user_attrs.get("arch_short", "?")] for t in rows]
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(str(c).rjust(w) if i < len(header) - 1 else str(c)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in [header, *body]]
    return f"Pareto front ({len(rows)} trials):\n" + "\n".join(lines)
