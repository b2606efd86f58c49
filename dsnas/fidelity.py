"""Multi-objective successive halving and Hyperband over the training budget. A trial reports its objectives at
rungs (shares of the training budget); at each rung the driver compares it with every trial of its bracket that
reached the same rung, by non-dominated sorting with a crowding tie-break, and stops the dominated ones as PRUNED.
Optuna cannot prune a multi-objective study (``trial.report`` is single-objective), so the decision is dsnas's.

Rung 0 is the measurement before training: a candidate over a hardware limit stops there, since training changes
none of the figures a limit is on."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from dsnas.pareto import comparable, crowding_distances, nondominated_ranks
from dsnas.spec import TRAINED, FidelitySpec


@dataclass(frozen=True)
class RungPlan:
    """The rungs of each bracket: successive halving has one bracket, Hyperband one per first rung."""

    spec: FidelitySpec

    @property
    def rungs(self) -> tuple[float, ...]:
        """The shares of the budget at which a trial of bracket 0 reports: 1/eta**n, ..., 1/eta (1 is the end),
        the first being the smallest such share that is at least min_fraction."""
        n = math.floor(math.log(1 / self.spec.min_fraction, self.spec.eta) + 1e-9)
        return tuple(self.spec.eta ** -k for k in range(n, 0, -1))

    @property
    def brackets(self) -> int:
        return len(self.rungs) + 1 if self.spec.kind == "hyperband" else 1

    def bracket_of(self, number: int) -> int:
        """A trial's bracket, from its number alone (the same after a resume). Hyperband gives bracket b (first
        rung b) a share of the trials that spends each bracket about the same budget, as Li et al. do."""
        if self.brackets == 1:
            return 0
        n = len(self.rungs)
        weights = [math.ceil((n + 1) / (n - b + 1) * self.spec.eta ** (n - b)) for b in range(n + 1)]
        return _weighted_round_robin(weights, number % sum(weights))

    def fractions(self, bracket: int) -> tuple[float, ...]:
        return self.rungs[bracket:]


def _at_share(attrs: dict[str, Any], rung: int, fraction: float) -> dict[str, Any] | None:
    """A trial's rung record at this share of the training budget. By share, not by the rung's number: a study
    resumed with another eta or min_fraction has its earlier trials' rung 1 at another share (their accuracy after
    1/3 of the training judged a new trial's after 1/9). A record that keeps no share is taken at its number."""
    k = 1
    while isinstance(record := attrs.get(f"rung{k}"), dict):
        share = record.get("fraction")
        if (k == rung) if share is None else math.isclose(share, fraction):
            return record
        k += 1
    return None


def _weighted_round_robin(weights: list[int], slot: int) -> int:
    """The bracket of the slot-th place in a smooth weighted round robin (brackets interleave, not in blocks)."""
    current = [0] * len(weights)
    chosen = 0
    for _ in range(slot + 1):
        current = [c + w for c, w in zip(current, weights)]
        chosen = max(range(len(weights)), key=lambda i: (current[i], -i))
        current[chosen] -= sum(weights)
    return chosen


@dataclass(frozen=True)
class Decision:
    go: bool
    reason: str  # one line, stored with the trial


def decide(number: int, values: list[float], peers: dict[int, list[float]], directions: list[str], eta: int,
           min_trials: int, margins: list[float] | None = None) -> Decision:
    """Whether trial ``number`` goes on from a rung where it has ``values``; ``peers``: every trial of its bracket
    at the same rung (other drivers' too), by number, itself included or not.

    The trials are sorted into fronts by non-dominated sorting, where a lead in an objective with a margin (those
    training changes: accuracy, loss) counts only beyond that share of the value: early in training, a lead
    smaller than that is noise, not a verdict. Then they are ordered by front, crowding distance (wider first) and
    number: a trial on the first front goes on, and so does one among the best max(1, n // eta)."""
    points = {**peers, number: values}
    n = len(points)
    if n < min_trials:
        return Decision(True, f"{n} of {min_trials} trials needed at this rung to compare: goes on")
    numbers = sorted(points)
    ranks = nondominated_ranks([points[k] for k in numbers], directions, margins)
    crowding = crowding_distances([points[k] for k in numbers], ranks)  # scale-free: directions do not matter
    order = sorted(range(n), key=lambda i: (ranks[i], -crowding[i], numbers[i]))
    me = numbers.index(number)
    position, keep = order.index(me), max(1, n // eta)
    where = f"{position + 1} of {n} (front {ranks[me] + 1}); the first front and the best {keep} go on"
    if ranks[me] == 0 or position < keep:
        return Decision(True, where)
    return Decision(False, f"dominated: {where}")


def over_limits(metrics: dict[str, float], constraints: Any) -> list[str]:
    """The hardware limits a measurement breaks, each as "latency_ms 61.2 > 50"."""
    return [f"{metric} {metrics[metric]:.4g} > {limit:g}" for metric, limit in constraints.items()
            if metric in metrics and metrics[metric] > limit]


def infeasible(number: int, metrics: dict[str, float], constraints: Any) -> str:
    """How a trial taken by name though it breaks a limit is said (export by number, a route's --trials)."""
    broke = ", ".join(over_limits(metrics, constraints))
    return f"trial {number} is infeasible{': ' + broke if broke else ''} ([hardware.constraints] the study was " \
        "searched under)"


class RungJudge:
    """The driver's side of the rungs: a report's decision against the study's stored rungs, and what to store."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec.fidelity
        self.plan = RungPlan(spec.fidelity)
        self.metrics = [o.metric for o in spec.objectives]
        self.directions = spec.directions
        self.margins = [spec.fidelity.margin if m in TRAINED else 0.0 for m in self.metrics]
        self.constraints = spec.hardware.constraints

    def values(self, metrics: dict[str, float]) -> list[float] | None:
        """The report's objective values, or None when one is missing (a task that reports less)."""
        if not all(m in metrics for m in self.metrics):
            return None
        return [metrics[m] for m in self.metrics]

    def peers(self, study: Any, bracket: int, rung: int, number: int) -> dict[int, list[float]]:
        """The objective values of every other trial of this bracket that reached this rung's share of the budget,
        whichever driver ran it; a failed trial is left out (it may run again)."""
        from optuna.trial import TrialState

        fraction = self.plan.fractions(bracket)[rung - 1]
        out = {}
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                TrialState.RUNNING)):
            record = _at_share(trial.user_attrs, rung, fraction)
            # A trial stopped for a nan here keeps its values in its record: compared, it sat on the first front of
            # every later decision (nothing dominates a nan) and pushed a real trial out of the best max(1, n // eta).
            if trial.number != number and record and "values" in record and \
                    trial.user_attrs.get("bracket", 0) == bracket and all(map(comparable, record["values"])):
                out[trial.number] = record["values"]
        return out

    def decide(self, report: Any, peers: dict[int, list[float]] | None) -> Decision:
        if report.rung == 0:
            over = over_limits(report.metrics, self.constraints)
            if over:
                return Decision(False, f"over the hardware limits before training ({'; '.join(over)}); training "
                                "changes none of these figures")
            return Decision(True, "within the hardware limits")
        values = self.values(report.metrics)
        if values is None or peers is None:
            return Decision(True, f"the report lacks an objective ({', '.join(self.metrics)}): goes on")
        broken = [f"{m} {v}" for m, v in zip(self.metrics, values) if not math.isfinite(v)]
        if broken:  # a nan is never dominated: it would go on at every rung, and sit among its peers' values
            return Decision(False, f"{', '.join(broken)} at this rung: a figure must be a finite number (training "
                                   "diverged?)")
        return decide(report.trial, values, peers, self.directions, self.spec.eta, self.spec.min_trials,
                      self.margins)

    def attrs(self, report: Any, decision: Decision) -> dict[str, Any]:
        """The rung as the trial's user attributes: ``rungK`` (share of the budget, objective values, decision)
        and, for the dashboard's table, each objective as a number ``rungK.METRIC``."""
        # "at": when the driver decided (epoch seconds), so that the order of decisions can be replayed.
        record: dict[str, Any] = {"fraction": report.fraction, "go": decision.go, "reason": decision.reason,
                                  "at": time.time()}
        values = self.values(report.metrics)
        if values is not None:
            record["values"] = values
        attrs: dict[str, Any] = {f"rung{report.rung}": record}
        if report.rung > 0:
            attrs.update({f"rung{report.rung}.{m}": report.metrics[m] for m in self.metrics if m in report.metrics})
        if not decision.go:
            attrs.update(pruned_by="rung", pruned_at=report.rung, pruned_reason=decision.reason)
        return attrs
