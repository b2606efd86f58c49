"""Which trials to export: one by number, the feasible Pareto front within limits, or the one a pick rule names
(the knee, or the best in a metric)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dsnas.errors import DsnasError
from dsnas.pareto import comparable, front_indices
from dsnas.spec import OBJECTIVES, StudySpec
from dsnas.study import nothing_to_use

LISTED = 10  # completed trials named in the error for a number that is none of them

# Each limit: the flag that sets it, the user attribute it bounds, and whether that is an upper bound.
LIMITS = {"max_latency_ms": ("--max-latency-ms", "latency_ms", True),
          "min_accuracy": ("--min-accuracy", "accuracy", False),
          "max_memory_mb": ("--max-memory-mb", "peak_memory_mb", True)}


@dataclass(frozen=True)
class Limits:
    """Bounds a picked trial must keep (None: no bound), on the metrics the trial stored."""
    max_latency_ms: float | None = None
    min_accuracy: float | None = None
    max_memory_mb: float | None = None

    def items(self) -> list[tuple[str, str, bool, float]]:
        """(flag, metric, is an upper bound, limit) of each limit that is set."""
        return [(*LIMITS[name], float(getattr(self, name))) for name in LIMITS if getattr(self, name) is not None]

    def admits(self, trial: Any) -> bool:
        values = [(trial.user_attrs.get(metric), upper, limit) for _, metric, upper, limit in self.items()]
        return all(v is not None and (v <= limit if upper else v >= limit) for v, upper, limit in values)

    def __str__(self) -> str:
        return " ".join(f"{flag} {limit:g}" for flag, _, _, limit in self.items())


def pick_trials(study: Any, spec: StudySpec, trial: int | None = None, pick: str | None = None,
                front: bool = False, limits: Limits = Limits()) -> list[Any]:
    """The trials to export: ``trial`` by number (limits ignored); or every feasible Pareto-front trial within
    ``limits`` (``front``), best first in the first objective; or the one ``pick`` rule names among them:
    ``knee``, ``max-NAME`` / ``min-NAME`` of an objective or of any stored numeric metric."""
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if trial is not None:
        chosen = _by_number(done, trial, spec)
        # A reused repeat trained nothing: its original holds the weights, and the same result.
        return [_by_number(done, int(chosen.user_attrs["reused_from"]), spec) if "reused_from" in chosen.user_attrs
                else chosen]
    done = [t for t in done if "reused_from" not in t.user_attrs]
    how, metric = ("front", "") if front else _parse_pick(pick)
    feasible = [t for t in done if t.user_attrs.get("feasible", 1.0)]
    if not feasible:
        raise DsnasError(nothing_to_use(spec, study, feasible=True))
    candidates = _within(limits, feasible, spec)
    if how in ("front", "knee"):
        best = pareto_front(candidates, spec.directions)
        return best if how == "front" else [knee(best, spec.directions)]
    # A NaN (an own task's evaluate() may report one beside finite objectives) compares false either way: where
    # the first trial held it, max() and min() both returned that trial.
    reporting = [t for t in candidates if comparable(t.user_attrs.get(metric))]
    if not reporting:
        raise DsnasError(f"--pick {pick}: no feasible completed trial reports {metric!r} in study {spec.name!r}. "
                         "Fix: pick an objective or a metric the trials stored, e.g. --pick max-accuracy")
    best = (max if how == "max" else min)(t.user_attrs[metric] for t in reporting)
    # Of trials tied at the best value, one on the front: max() took the lowest number, which a trial of the same
    # accuracy and 5x the throughput dominated (off the front that --front and knee export).
    tied = [t for t in reporting if t.user_attrs[metric] == best]
    return [pareto_front(tied, spec.directions)[0] if len(tied) > 1 else tied[0]]


def _by_number(done: list[Any], number: int, spec: StudySpec) -> Any:
    found = [t for t in done if t.number == number]
    if not found:
        numbers = ", ".join(str(t.number) for t in done) or "none"
        if len(done) > LISTED:  # every one of 2,792 trials named made the error a line of 15,000 characters
            nearest = sorted(sorted((t.number for t in done), key=lambda n: (abs(n - number), n))[:LISTED])
            numbers = f"{len(done)} of them; those nearest {number}: {', '.join(map(str, nearest))}"
        raise DsnasError(f"trial {number}: no completed trial with that number in study {spec.name!r}. "
                         f"Fix: pick one of the completed trials ({numbers})")
    return found[0]


def _parse_pick(pick: str | None) -> tuple[str, str]:
    """("knee", "") or ("max" | "min", metric); an objective name stands for its metric."""
    if pick == "knee":
        return "knee", ""
    how, _, name = (pick or "").partition("-")
    if how not in ("max", "min") or not name:
        raise DsnasError(f"--pick {pick}: must be knee, max-NAME or min-NAME. Fix: e.g. --pick knee "
                         "or --pick max-accuracy")
    return how, OBJECTIVES.get(name, (name,))[0]


def _within(limits: Limits, feasible: list[Any], spec: StudySpec) -> list[Any]:
    """The feasible trials (some) within ``limits``, or an error that says what the study offers instead."""
    for flag, metric, _, _ in limits.items():
        if not any(metric in t.user_attrs for t in feasible):
            raise DsnasError(f"{flag}: the trials of study {spec.name!r} did not store {metric!r}, so it cannot "
                             f"be limited. Fix: remove {flag}")
    kept = [t for t in feasible if limits.admits(t)]
    if not kept:
        best = ", ".join(f"{metric} {_best(feasible, metric, upper):.4g}" for _, metric, upper, _ in limits.items())
        raise DsnasError(f"{limits}: no feasible completed trial of study {spec.name!r} is within these limits; "
                         f"the best available: {best}. Fix: loosen the limits")
    return kept


def _best(trials: list[Any], metric: str, lowest: bool) -> float:
    return (min if lowest else max)(t.user_attrs[metric] for t in trials if metric in t.user_attrs)


def pareto_front(trials: list[Any], directions: list[str]) -> list[Any]:
    """The non-dominated trials, best first in the first objective (then by number)."""
    front = [trials[i] for i in front_indices([t.values for t in trials], directions)]
    sign = -1.0 if directions[0] == "maximize" else 1.0
    return sorted(front, key=lambda t: (sign * t.values[0], t.number))


def knee(front: list[Any], directions: list[str]) -> Any:
    """The front's best compromise: the trial closest to the ideal point once each objective is scaled to
    [0, 1] over the front (1 = best), so that no objective wins by its units alone; of trials as close (both ends
    of a front of two), the best in the first objective (see knee_ties)."""
    return knee_ties(front, directions)[0]


def knee_ties(front: list[Any], directions: list[str]) -> list[Any]:
    """The trials of ``front`` (best first in the first objective, as pareto_front orders it) closest to the ideal
    point: more than one where the knee is a tie, which `dsnas export --pick knee` says."""
    columns = list(zip(*(t.values for t in front)))

    def scaled(value: float, column: tuple[float, ...], direction: str) -> float:
        low, high = min(column), max(column)
        if high == low:
            return 1.0  # every trial is as good as the best here
        share = (value - low) / (high - low)
        return share if direction == "maximize" else 1.0 - share

    def distance(t: Any) -> float:
        return math.dist([scaled(v, c, d) for v, c, d in zip(t.values, columns, directions)], [1.0] * len(directions))

    distances = [distance(t) for t in front]
    return [t for t, d in zip(front, distances) if d <= min(distances) + 1e-12]
