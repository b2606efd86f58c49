"""Live progress of a search (one line per event, readable in a terminal and in a log) and the final
Pareto table. The lines go to the "dsnas.search" logger (INFO; a lost database WARNING): the command line shows
them on stdout (-q hides them), a program that calls dsnas.search() routes them as it routes its own logs."""

from __future__ import annotations

import logging
import math
import time
from typing import Any, TextIO

from dsnas.fidelity import RungPlan
from dsnas.pareto import dominates, front_indices
from dsnas.spec import StudySpec
from dsnas.storage import display_url
from dsnas.tasks import rung_support, throughput_unit

# How each metric is shown: (column title, format). "significant" is three significant digits (_significant).
# Latency too: at two decimals a front of sub-millisecond models read 0.33 for both 0.334 and 0.326 ms (2.4% apart,
# more than two measurements of one model differ), and a row on the front for its latency looked dominated.
# Throughput the same way: whole numbers from 100 up, as before, but a task slower than 100 items/s read 52 for
# both 52.4 and 52.2.
COLUMNS = {"accuracy": ("accuracy", "{:.4f}"), "throughput_tok_s": ("tokens/s", "significant"),
           "latency_ms": ("latency ms", "significant"), "params": ("params", "{:,.0f}"),
           "peak_memory_mb": ("peak MiB", "significant"), "val_loss": ("val loss", "{:.3f}")}


log = logging.getLogger("dsnas.search")


class Progress:
    def __init__(self, spec: StudySpec, out: TextIO | None = None) -> None:
        self.spec = spec
        self.out = out  # a stream of its own (a benchmark's), instead of the logger
        self.completed = 0
        self.failed = 0
        self.pruned = 0  # stopped at a rung (they count toward n_trials)
        self.skipped = 0  # skipped by the predictor before training (they do not)
        self.reused = 0  # repeats answered from an earlier trial's result (they do not)
        self.first_failure = ""  # "trial N: reason" of this run's first failed trial
        self.stored_at_start = 0  # completed, pruned, reused and skipped trials a resumed study already had
        # The objective values of the feasible non-dominated completed trials, kept as trials finish: computing the
        # front of every trial on every status line grew with the cube of the study's size.
        self.front_points: list[list[float]] = []
        self._t0 = time.monotonic()

    def evaluated_this_run(self) -> int:
        """Trials of this run that did not fail: completed, pruned at a rung, skipped or reused."""
        return self.completed + self.pruned + self.reused + self.skipped - self.stored_at_start

    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def say(self, text: str, level: int = logging.INFO) -> None:
        if self.out is not None:
            print(text, file=self.out, flush=True)
        else:
            log.log(level, text)

    def start(self, study: Any, requeued: list[int]) -> None:
        from optuna.trial import TrialState

        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        self.reused = sum("reused_from" in t.user_attrs for t in done)
        self.completed = len(done) - self.reused
        self.pruned = sum(t.user_attrs.get("pruned_by") == "rung"
                          for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))
        self.stored_at_start = self.completed + self.pruned + self.reused + self.skipped
        # A reused repeat has its original's values: the original alone stands for them (as on the final front).
        points = [list(t.values) for t in done if t.user_attrs.get("feasible", 1.0) and "reused_from" not in
                  t.user_attrs]
        self.front_points = [points[i] for i in front_indices(points, self.spec.directions)]
        budget = self.spec.budget
        limits = [f"{budget.n_trials} trials"] if budget.n_trials else []
        limits += [f"{budget.timeout_s:g} s"] if budget.timeout_s else []
        objectives = ", ".join(f"{o.direction} {o.name}" for o in self.spec.objectives)
        self.say(f"dsnas: study {self.spec.name!r} ({objectives}); budget {' or '.join(limits)}; "
                  f"executor {self.spec.executor.kind}; storage {display_url(self.spec.storage)}")
        if self.completed or self.pruned:
            pruned = f" and {self.pruned} pruned" if self.pruned else ""
            self.say(f"  resuming: {self.completed} completed{pruned} trials already stored count toward the budget")
        fidelity = self.spec.fidelity
        if fidelity.enabled:
            rungs = ", ".join(f"{r:.0%}" for r in RungPlan(fidelity).rungs)
            why_not = rung_support(self.spec.task)
            if why_not:
                self.say(f"  fidelity: off: {why_not}, so every candidate trains its whole budget (measured first: "
                         "one over a hardware limit still stops untrained)")
            else:
                self.say(f"  fidelity: {fidelity.kind.replace('_', ' ')}, eta {fidelity.eta}, rungs at {rungs} of the "
                         "training budget; measured first, so a candidate over a hardware limit stops untrained")
        limits = [f"{m} {v:g}" for m, v in self.spec.hardware.constraints.items()]
        if self.spec.predictor.skip and limits:
            self.say(f"  predictor: skips a candidate predicted over a limit ({', '.join(limits)}) by more than "
                      f"{self.spec.predictor.margin:.0%}, once enough architectures are measured")
        if requeued:
            self.say(f"  re-queued {len(requeued)} trial(s) left RUNNING by a stopped driver: "
                      f"{', '.join('#' + str(n) for n in requeued)} (marked FAIL)")

    def started(self, number: int, arch_short: str, running: dict[int, Any]) -> None:
        self.say(f"{self._status(running)}  trial {number} started: {arch_short}")

    def finished(self, number: int, values: list[float], feasible: bool, running: dict[int, Any],
                 over: list[str] | None = None) -> None:
        """``over``: the limits the trial broke, as dsnas.fidelity.over_limits words them."""
        self.completed += 1
        if feasible:
            self._add_to_front(list(values))
        shown = "  ".join(f"{o.name} {format_metric(o.metric, v)}" for o, v in zip(self.spec.objectives, values))
        # Which limit, and by how much: "latency 0.60 (infeasible)" under a limit of 0.6 read as within it, and a
        # limit on a figure that is no objective (params) was not shown at all.
        why = f": {', '.join(over)}" if over else ""
        self.say(f"{self._status(running)}  trial {number} done: {shown}" + ("" if feasible else
                                                                             f"  (infeasible{why})"))

    def _add_to_front(self, values: list[float]) -> None:
        directions = self.spec.directions
        if any(dominates(p, values, directions) for p in self.front_points):
            return
        self.front_points = [p for p in self.front_points if not dominates(values, p, directions)] + [values]

    def pruned_trial(self, number: int, rung: int, fraction: float, reason: str, running: dict[int, Any]) -> None:
        self.pruned += 1
        where = "before training" if rung == 0 else f"at rung {rung} ({fraction:.0%} of the budget)"
        self.say(f"{self._status(running)}  trial {number} pruned {where}: {reason}")

    def skipped_trial(self, number: int, arch_short: str, reason: str, running: dict[int, Any]) -> None:
        self.skipped += 1
        self.say(f"{self._status(running)}  trial {number} skipped untrained ({arch_short}): {reason}")

    def reused_trial(self, number: int, original: int, arch_short: str, running: dict[int, Any]) -> None:
        self.reused += 1
        self.say(f"{self._status(running)}  trial {number} is trial {original} again ({arch_short}): the same "
                 "candidate, task, budget and engine; its result is reused, not trained again")

    def failed_trial(self, number: int, reason: str, running: dict[int, Any], counts: bool = True) -> None:
        if counts:
            self.failed += 1
            self.first_failure = self.first_failure or f"trial {number}: {reason.splitlines()[0][:500]}"
        self.say(f"{self._status(running)}  trial {number} FAILED: {reason.splitlines()[0][:200]}")

    def _status(self, running: dict[int, Any]) -> str:
        total = f"/{self.spec.budget.n_trials}" if self.spec.budget.n_trials else ""
        front = len(self.front_points)
        pruned = f" ({self.pruned} pruned)" if self.pruned else ""
        skipped = f"skipped {self.skipped} · " if self.skipped else ""
        skipped += f"reused {self.reused} · " if self.reused else ""
        return (f"[{self.elapsed():6.1f}s] done {self.completed + self.pruned}{total}{pruned} · running "
                f"{len(running)} · failed {self.failed} · {skipped}front {front} ·")


def column_titles(unit: str) -> dict[str, str]:
    """Each metric's column title, throughput in the task's unit (``unit``: throughput_unit's words)."""
    return {**{m: c[0] for m, c in COLUMNS.items()}, "throughput_tok_s": unit}


def format_metric(metric: str, value: float) -> str:
    """A figure in the one format dsnas prints it in, everywhere (search, report, dashboard note)."""
    form = COLUMNS.get(metric, (metric, "{:.4g}"))[1]
    return _significant(value) if form == "significant" else form.format(value)


def _significant(value: float) -> str:
    """Three significant digits, in fixed point: a small model's peak memory at one decimal read 0.0 MiB (0.0399
    measured) or 0.1 for both 0.0927 and 0.139; a large one's keeps its digits (1,234 MiB, not 1.23e+03)."""
    rounded = float(f"{value:.3g}")  # 99.96 is 100, shown as such
    if rounded == 0 or not math.isfinite(value) or abs(rounded) >= 100:
        return f"{value:,.0f}"
    value = rounded
    return f"{value:.{max(1, 2 - math.floor(math.log10(abs(value))))}f}"


def pareto_table(front: list[Any], spec: StudySpec) -> str:
    """The feasible non-dominated trials, best first in the first objective."""
    if not front:
        return "no feasible completed trial yet: the Pareto front is empty"
    metrics = [o.metric for o in spec.objectives]
    metrics += [m for m in ("accuracy", "throughput_tok_s", "latency_ms", "params") if m not in metrics]
    first = spec.objectives[0]
    rows = sorted(front, key=lambda t: t.values[0], reverse=first.direction == "maximize")
    titles = column_titles(throughput_unit(spec.task))
    header = ["trial", *(titles.get(m, m) for m in metrics), "architecture"]
    body = [[f"#{t.number}", *(format_metric(m, t.user_attrs[m]) if m in t.user_attrs else "-" for m in metrics),
             t.user_attrs.get("arch_short", "?")] for t in rows]
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(str(c).rjust(w) if i < len(header) - 1 else str(c)
                       for i, (c, w) in enumerate(zip(r, widths))) for r in [header, *body]]
    return f"Pareto front ({len(rows)} trials):\n" + "\n".join(lines)
