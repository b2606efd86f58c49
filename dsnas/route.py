"""Routing over the Pareto front: each input is served by the cheapest front model that gets it right. A cascade runs
the cheapest model first and moves an input up while the model's confidence in it is below that stage's threshold;
a learned router predicts, from the first model's output, the cheapest sufficient model. Thresholds are chosen on a
calibration half of the task's validation inputs and accuracy is reported on the other half; the cost of each model
is dsnas's own measurement of it on this device, and the route as a whole is timed end to end.

A route bundle (``dsnas route --out DIR``) holds its members' bundles, route.json (order, thresholds, router,
calibration summary, the measured table), and ``load_route(DIR)`` serves batches with it."""

from __future__ import annotations

import itertools
import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsnas.allocator import hold_freed_memory
from dsnas.errors import DsnasError
from dsnas.export.bundle import (
    built_beside,
    check_replaceable,
    export_trial,
    load_bundle,
    read_bundle,
    recorded_task_spec,
)
from dsnas.export.pick import pick_trials
from dsnas.export.verify import Check, VerifyReport, _probe_check, _read_metrics, data_check
from dsnas.fidelity import infeasible
from dsnas.profiler import MeasureGate, device_key
from dsnas.profiler.device import fingerprint
from dsnas.profiler.disturbance import MAX_SETTLE_S, MachineWindow, least_disturbed, wait_for_quiet
from dsnas.tasks import make_task

ROUTE_TYPE, ROUTE_VERSION = "dsnas.route", 1
MAX_STAGES = 4  # thresholds are searched over a grid: 4 stages are 23^3 combinations, more would be slow and overfit
LEVELS = 21  # threshold candidates per stage: quantiles of its confidence on the calibration half
ROUTE_FILES = frozenset({"route.json", "members"})  # what a route folder holds (see check_replaceable)
COSTS = {"latency": ("latency_ms", "ms"), "flops": ("flops", "FLOPs")}
TIMING_ROUNDS = 5
Z95 = 1.645  # one-sided 95%: the accuracy a route may lose is bounded at this confidence (see lost)


# ---- what a model says about each input -------------------------------------------------------------------------

def scores(logits: Any, targets: Any) -> tuple[Any, Any]:
    """(per-input accuracy, per-input confidence) of one model's logits: a classifier's (N, C) against (N,), or a
    sequence model's (N, T, V) against (N, T), where both are means over the sequence. Confidence is the softmax's
    largest probability: calibrated enough to rank inputs, which is all a threshold needs."""
    import torch

    logits = logits.float()
    right = (logits.argmax(-1) == targets).float()
    top = torch.softmax(logits, -1).amax(-1)
    if right.dim() == 2:
        right, top = right.mean(1), top.mean(1)
    return right, top


def features(logits: Any) -> Any:
    """What the learned router reads from the first model's output, per input: mean and least top probability,
    mean margin between the two largest, mean entropy (over the sequence for a sequence model)."""
    import torch

    p = torch.softmax(logits.float(), -1)
    two = p.topk(2, dim=-1).values
    margin = two[..., 0] - two[..., 1]
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
    top = two[..., 0]
    if top.dim() == 1:
        top, margin, entropy = top[:, None], margin[:, None], entropy[:, None]
    return torch.stack([top.mean(1), top.amin(1), margin.mean(1), entropy.mean(1)], dim=1)


# ---- choosing the route ---------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """A way of serving the report half: its accuracy, mean cost per input and the share each stage served."""
    name: str
    accuracy: float
    cost: float
    shares: list[float]

    def row(self, unit: str, best: Outcome) -> dict[str, Any]:
        return {"route": self.name, "accuracy": self.accuracy, f"cost ({unit}/input)": self.cost,
                "cost vs most accurate": self.cost / best.cost if best.cost else math.nan,
                "served by stage": "/".join(f"{s:.0%}" for s in self.shares)}


def cascade_assign(conf: Any, thresholds: Sequence[float]) -> Any:
    """The stage that serves each input: the first whose confidence is at or above its threshold (the last stage
    serves what is left); a stage whose threshold is +inf serves nothing and is skipped (never run, never paid).
    ``conf``: (stages, N)."""
    import torch

    k, n = conf.shape
    served = torch.full((n,), k - 1, dtype=torch.long)
    open_ = torch.ones(n, dtype=torch.bool)
    for s, t in enumerate(thresholds):
        stop = open_ & (conf[s] >= t)
        served[stop] = s
        open_ &= ~stop
    return served


@dataclass(frozen=True)
class CostCurve:
    """A stage's cost per input when a share of the inputs runs through it, served in batches of ``batch`` rows.
    The rows that reach a later stage form a smaller batch, and a small batch costs more per row (much of a call's
    latency does not grow with its rows): one call's cost at a row count is interpolated linearly between the batch
    sizes dsnas measured the model at."""
    points: tuple[tuple[int, float], ...]  # (batch size, measured cost of one call), ascending
    batch: int

    def call(self, rows: float) -> float:
        (b0, c0), (b1, c1) = (self.points[0], self.points[-1]) if len(self.points) > 1 else (self.points[0],) * 2
        for (lo, clo), (hi, chi) in zip(self.points, self.points[1:]):
            if rows <= hi:
                (b0, c0), (b1, c1) = (lo, clo), (hi, chi)
                break
        return c0 if b1 == b0 else c0 + (rows - b0) * (c1 - c0) / (b1 - b0)

    def per_input(self, share: float) -> float:
        """Mean cost per input of all inputs, when ``share`` of them run through this stage."""
        if share <= 0:
            return 0.0
        rows = share * self.batch  # per batch; below one row, a share of the batches runs one row
        return self.call(max(1.0, rows)) * min(1.0, rows) / self.batch


def accuracy(served: Any, right: Any) -> float:
    return right.gather(0, served[None]).mean().item()


def shares(served: Any, k: int) -> list[float]:
    return [(served == s).float().mean().item() for s in range(k)]


def cascade_cost(served: Any, thresholds: Sequence[float], curves: Sequence[CostCurve]) -> float:
    """Mean cost per input of a cascade: each stage that runs costs the inputs that reach it (all that the stages
    before it did not serve); a stage with threshold +inf is skipped."""
    runs = [t != math.inf for t in thresholds] + [True]
    reach = [(served >= s).float().mean().item() for s in range(len(curves))]
    return sum(c.per_input(r) for c, r, on in zip(curves, reach, runs) if on)


def learned_cost(served: Any, curves: Sequence[CostCurve]) -> float:
    """Mean cost per input of the learned router: the first model on every input (the router reads its output),
    then each input's chosen model alone."""
    share = shares(served, len(curves))
    return curves[0].per_input(1.0) + sum(c.per_input(p) for c, p in zip(curves[1:], share[1:]))


def _early_losses(served: Any, right: Any) -> Any:
    """Per input served before the last stage, what it gave up against the last stage (1, 0 or -1)."""
    early = served < right.shape[0] - 1
    return (right[-1] - right.gather(0, served[None])[0])[early]


def lost(served: Any, right: Any) -> float:
    """A one-sided 95% upper bound on the accuracy an assignment gives up against the last (most accurate) stage
    on new inputs: the difference summed over the m inputs served early, plus Z95 standard errors of that sum. The
    variance is at least that of a smoothed loss rate (losses + 1) / (m + 2), so that a cheap model that made no
    mistake on 180 images is not taken to make none."""
    diff = _early_losses(served, right)
    m = len(diff)
    if m == 0:
        return 0.0
    total = diff.sum().item()
    rate = (max(total, 0.0) + 1) / (m + 2)
    spread = max(diff.var(correction=0).item() if m > 1 else 0.0, rate * (1 - rate))
    return (total + Z95 * math.sqrt(m * spread)) / right.shape[1]


def lost_at_least(served: Any, right: Any) -> float:
    """A one-sided 95% lower bound on the accuracy an assignment gives up against the last stage: what a route
    shown on inputs it was not chosen on to lose more than its target loses at least (see :func:`lost`)."""
    diff = _early_losses(served, right)
    m = len(diff)
    if m == 0:
        return 0.0
    spread = diff.var(correction=0).item() if m > 1 else 0.0
    return (diff.sum().item() - Z95 * math.sqrt(m * spread)) / right.shape[1]


def choose_thresholds(conf: Any, right: Any, curves: Sequence[CostCurve], drop: float) -> tuple[list[float], float]:
    """The thresholds (one per stage but the last) of least expected cost that lose at most ``drop`` of accuracy
    against the last stage on these (calibration) inputs (see :func:`lost`); all +inf (everything to the last
    stage) when none does."""
    import torch

    k = conf.shape[0]
    grids = []
    for s in range(k - 1):
        q = torch.quantile(conf[s], torch.linspace(0, 1, LEVELS)).tolist()
        grids.append(sorted({-math.inf, math.inf, *q}))
    best = ([math.inf] * (k - 1), math.inf)
    for combo in itertools.product(*grids):
        served = cascade_assign(conf, combo)
        mean_cost = cascade_cost(served, combo, curves)
        if mean_cost < best[1] and lost(served, right) <= drop + 1e-12:
            best = (list(combo), mean_cost)
    return best


@dataclass
class LearnedRouter:
    """Multinomial logistic regression from the first model's output features to the cheapest sufficient stage;
    an input goes to the first stage j where P(the cheapest sufficient stage <= j) reaches ``tau``."""
    mean: list[float]
    std: list[float]
    weight: list[list[float]]
    bias: list[float]
    tau: float = 0.5

    @classmethod
    def fit(cls, feats: Any, labels: Any, k: int) -> LearnedRouter:
        import torch

        mean, std = feats.mean(0), feats.std(0).clamp_min(1e-6)
        x = (feats - mean) / std
        w = torch.zeros(x.shape[1], k, requires_grad=True)
        b = torch.zeros(k, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=200)

        def closure() -> Any:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(x @ w + b, labels) + 1e-3 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return cls(mean.tolist(), std.tolist(), w.detach().T.tolist(), b.detach().tolist())

    def assign(self, feats: Any, tau: float | None = None) -> Any:
        import torch

        on = {"device": feats.device}  # a route served on a GPU: its features are there
        x = (feats.float() - torch.tensor(self.mean, **on)) / torch.tensor(self.std, **on)
        p = torch.softmax(x @ torch.tensor(self.weight, **on).T + torch.tensor(self.bias, **on), -1).cumsum(-1)
        return (p < (self.tau if tau is None else tau) - 1e-9).sum(-1).clamp_max(p.shape[1] - 1)


def sufficient_stage(right: Any) -> Any:
    """Per input, the cheapest stage as right as the last (most accurate) one."""
    enough = right >= right[-1][None] - 1e-9
    return enough.float().argmax(0)


def choose_tau(router: LearnedRouter, feats: Any, right: Any, curves: Sequence[CostCurve], drop: float) -> float:
    """The router's ``tau`` of least expected cost that loses at most ``drop`` (as :func:`choose_thresholds`)."""
    best = (1.0 + 1e-6, math.inf)  # tau above 1: everything to the last stage
    for tau in [i / 100 for i in range(1, 101)]:
        served = router.assign(feats, tau)
        mean_cost = learned_cost(served, curves)
        if mean_cost < best[1] and lost(served, right) <= drop + 1e-12:
            best = (tau, mean_cost)
    return best[0]


# ---- the members and their data ---------------------------------------------------------------------------------

@dataclass
class Member:
    """One front model in a route: its bundle, model and measured cost per input."""
    trial: int
    folder: Path
    model: Any
    curve: CostCurve
    describe: str = ""
    disturbed: bool = False  # its trial's speed was measured while others took the CPUs (its cost is suspect)

    @property
    def cost(self) -> float:
        """Per input, serving every input (in batches of the largest measured batch size)."""
        return self.curve.per_input(1.0)


def cost_curve(metrics: dict[str, float], batch_sizes: Sequence[int], kind: str, trial: int) -> CostCurve:
    """A trial's cost per call at each batch size it was measured at (its ``latency_ms_bsN`` or ``flops_bsN``)."""
    key, _ = COSTS[kind]
    points = tuple((bs, float(metrics[f"{key}_bs{bs}"])) for bs in sorted(batch_sizes) if metrics.get(f"{key}_bs{bs}"))
    if not points:
        raise DsnasError(f"trial {trial} has no measured {key}_bsN: dsnas did not measure it (a task's own "
                         "evaluation function that reported none)")
    return CostCurve(points, max(batch_sizes))


def validation_inputs(task: Any) -> tuple[Any, Any]:
    """(inputs, targets) of the task's validation split; a task that cannot give them cannot be routed."""
    return _needs_eval_inputs(task)()


def _needs_eval_inputs(task: Any) -> Any:
    get = getattr(task, "eval_inputs", None)
    if not callable(get):
        raise DsnasError(f"the task {type(task).__name__} has no eval_inputs() -> (inputs, targets): dsnas route "
                         "needs each validation input and its target. Fix: add it to the task (see dsnas.tasks.Task)")
    return get


def halves(n: int) -> tuple[Any, Any]:
    """(calibration, report) indices: alternate inputs, so both halves cover the whole validation split."""
    import torch

    idx = torch.arange(n)
    return idx[0::2], idx[1::2]


def run_all(models: Sequence[Any], x: Any, batch: int = 256) -> list[Any]:
    import torch

    out = []
    with torch.inference_mode():
        for m in models:
            out.append(torch.cat([m(part).float() for part in x.split(batch)]))
    return out


# ---- serving ----------------------------------------------------------------------------------------------------

class Route:
    """Serves batches: the first stage runs on the whole batch, and only the rows it escalates go on, so a batch
    costs what its inputs need. Returns each row's logits from the stage that served it."""

    def __init__(self, models: Sequence[Any], kind: str, thresholds: Sequence[float],
                 router: LearnedRouter | None = None) -> None:
        self.models, self.kind, self.thresholds, self.router = list(models), kind, list(thresholds), router
        self.last_served: Any = None  # the stage that served each row of the last batch

    def __call__(self, x: Any) -> Any:
        import torch

        with torch.inference_mode():
            if self.kind != "learned":
                return self._cascade(x)
            assert self.router is not None
            first = self.models[0](x).float()
            out = first.clone()
            served = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            target = self.router.assign(features(first))  # the first model's output says where each row goes
            for s in range(1, len(self.models)):
                rows = (target == s).nonzero().flatten()
                if len(rows):
                    out[rows] = self.models[s](x[rows]).float()
                    served[rows] = s
            self.last_served = served
            return out

    def _cascade(self, x: Any) -> Any:
        """Stage by stage on the rows still open; a stage whose threshold is +inf is skipped."""
        import torch

        open_rows = torch.arange(x.shape[0], device=x.device)  # on the input's device (a GPU's, served there)
        served = torch.full((x.shape[0],), len(self.models) - 1, dtype=torch.long, device=x.device)
        out: Any = None
        for s, model in enumerate(self.models):
            last = s == len(self.models) - 1
            if not last and self.thresholds[s] == math.inf:
                continue
            logits = model(x[open_rows]).float()
            if out is None:
                out = logits.new_empty((x.shape[0], *logits.shape[1:]))
            out[open_rows] = logits
            served[open_rows] = s
            if last:
                break
            still = scores(logits, logits.argmax(-1))[1] < self.thresholds[s]
            open_rows = open_rows[still]
            if not len(open_rows):
                break
        self.last_served = served
        return out


def load_route(folder: str | Path, device: str = "cpu", kind: str | None = None) -> Route:
    """The route bundle in ``folder`` as a callable that serves batches (see :class:`Route`); ``kind``: "cascade"
    or "learned" (default: the one the bundle chose)."""
    folder = Path(folder)
    doc = read_route(folder)
    members = [load_bundle(folder / m["bundle"], device=device) for m in doc["members"]]
    kind = kind or doc["serve"]
    if kind not in ("cascade", "learned"):
        raise DsnasError(f"kind must be 'cascade' or 'learned', got {kind!r}")
    router = LearnedRouter(**{**doc["learned"], "tau": float(doc["learned"]["tau"])}) if kind == "learned" else None
    return Route(members, kind, [float(t) for t in doc["cascade"]["thresholds"]], router)


def read_route(folder: Path) -> dict[str, Any]:
    path = folder / "route.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DsnasError(f"{path}: missing: {folder} is not a route bundle. Fix: write one with `dsnas route "
                         "STUDY.toml --out DIR`") from None
    except (OSError, json.JSONDecodeError) as e:
        raise DsnasError(f"{path}: not readable JSON ({e}). Fix: write the route again") from None
    if doc.get("_type") != ROUTE_TYPE or doc.get("_version") != ROUTE_VERSION:
        raise DsnasError(f"{path}: expected _type {ROUTE_TYPE!r} version {ROUTE_VERSION}, got {doc.get('_type')!r} "
                         f"version {doc.get('_version')!r}. Fix: write the route again with this dsnas")
    check_members(path, [read_bundle(folder / m["bundle"]) for m in doc["members"]])
    return doc


def check_members(where: Path, docs: Sequence[dict[str, Any]]) -> None:
    """Members must read the same inputs: one task with the same parameters, the same fixed arch keys."""
    first = docs[0]
    for doc in docs[1:]:
        if doc.get("task", {}).get("name") != first.get("task", {}).get("name") or \
                doc.get("task", {}).get("params") != first.get("task", {}).get("params"):
            raise DsnasError(f"{where}: trial {doc.get('trial')} was trained on another task or task parameters than "
                             f"trial {first.get('trial')}: a route's members must read the same inputs")
        for key in ("vocab_size", "context", "image_size", "channels", "n_classes"):
            if doc["arch"].get(key) != first["arch"].get(key):
                raise DsnasError(f"{where}: trial {doc.get('trial')} has {key} {doc['arch'].get(key)!r} and trial "
                                 f"{first.get('trial')} {first['arch'].get(key)!r}: a route's members must read the "
                                 "same inputs")


# ---- building a route -------------------------------------------------------------------------------------------

@dataclass
class RouteReport:
    """What `dsnas route` found: the table of single models, the cascade and the learned router on the report
    half, and the route bundle's folder."""
    unit: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    measured: dict[str, float] = field(default_factory=dict)  # route name -> end-to-end ms per input
    disturbance: dict[str, Any] = field(default_factory=dict)  # of the timing (dsnas.profiler.disturbance)
    folder: Path | None = None
    left_out: list[str] = field(default_factory=list)  # members left out, each with why
    serve: str = ""  # the route the bundle serves: "cascade" or "learned router"
    notes: list[str] = field(default_factory=list)  # a route not served for its loss; everything to one model

    def add(self, name: str, acc: float, cost: float, served_shares: list[float]) -> None:
        self.outcomes[name] = Outcome(name, acc, cost, served_shares)

    def table(self) -> str:
        cols = list(self.rows[0]) + ["measured ms/input"]
        body = [[_cell(r[c]) for c in cols[:-1]] + [_cell(self.measured.get(r["route"], math.nan))]
                for r in self.rows]
        widths = [max(len(str(x)) for x in [c, *(b[i] for b in body)]) for i, c in enumerate(cols)]
        lines = ["  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in [cols, *body]]
        served = [f"serves: the {self.serve}"] if self.serve else []
        return "\n".join(lines + self.left_out + served + [f"note: {n}" for n in self.notes + self._timing_note()])

    def _timing_note(self) -> list[str]:
        if not self.disturbance.get("disturbed"):
            return []
        return [f"the measured ms/input were timed while others took {_taken(self.disturbance)} of the CPUs (after 3 "
                "tries): slower than this machine serves when quiet; route again when it is"]


def _taken(disturbance: dict[str, Any]) -> str:
    """Others' and steal's share of the CPUs in a disturbance record, in words."""
    return f"{(disturbance.get('others_cpu_share') or 0) + (disturbance.get('steal_share') or 0):.0%}"


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def build_route(spec: Any, study: Any, out: Path, *, trials: Sequence[int] | None = None,
                target_accuracy: float | None = None, max_accuracy_drop: float = 0.005,
                cost: str = "latency", also_drops: Sequence[float] = ()) -> RouteReport:
    """Export the front (or ``trials``) into ``out``/members, choose the cascade's thresholds and fit the learned
    router on the calibration half, report both on the other half against each single model, time them end to
    end, and write route.json. ``also_drops``: more accuracy drops (below the most accurate model) to report the
    cascade and the router at, beside the route's own target.

    Built in a folder beside ``out`` and put in place whole, as a bundle is: a run that writes no route (nothing to
    route, a task without eval_inputs) leaves an earlier route at ``out`` as it was. (It deleted that route's
    left-out member and ended "nothing to route", exit 0: the route no longer loaded.)"""
    if cost not in COSTS:
        raise DsnasError(f"--cost must be one of {list(COSTS)}, got {cost!r}" + (
            " (energy is measured only on a GPU's NVML counter, so a route cannot be priced by it everywhere)"
            if cost == "energy" else ""))
    _needs_eval_inputs(make_task(spec.task))  # before minutes of exports
    check_replaceable(out, "route", ROUTE_FILES)
    with built_beside(out, "route") as work:
        report = _build_route(spec, study, work, trials, target_accuracy, max_accuracy_drop, cost, also_drops)
    report.folder = out
    return report


def _build_route(spec: Any, study: Any, out: Path, trials: Sequence[int] | None, target_accuracy: float | None,
                 max_accuracy_drop: float, cost: str, also_drops: Sequence[float]) -> RouteReport:
    import torch

    chosen = [pick_trials(study, spec, trial=n)[0] for n in trials] if trials else \
        pick_trials(study, spec, front=True)
    chosen = list({frozen.number: frozen for frozen in chosen}.values())  # a trial named twice, or a repeat's original
    if len(chosen) < 2:
        whose = f"--trials names {len(chosen)} model" if trials else f"the front has {len(chosen)} model"
        raise NothingToRoute(f"{whose}: there is nothing to route (a route needs at least two models of different "
                             "cost)")
    from dsnas.study import as_searched  # SQLAlchemy loads on first use: dsnas.load_route serves without it

    searched = as_searched(spec, study).hardware  # the batch sizes each bundle carries, the limits searched under
    # Thinned by their recorded costs before any is exported: every front model was exported and loaded, about a
    # second each, to keep MAX_STAGES of them (a front of 84, 80 s).
    costed = sorted(((cost_curve(frozen.user_attrs, searched.batch_sizes, cost, frozen.number), frozen)
                     for frozen in chosen),
                    key=lambda pair: pair[0].per_input(1.0))
    thinned = _thin(costed, [frozen.user_attrs.get("accuracy") for _, frozen in costed])
    costlier = _costlier_than_the_most_accurate(costed, thinned[-1], COSTS[cost][1])
    members = []
    for curve, frozen in thinned:
        folder = export_trial(spec, study, frozen, out / "members" / f"trial{frozen.number}")
        members.append(Member(frozen.number, folder, load_bundle(folder), curve,
                              str(frozen.user_attrs.get("arch_short", "")), bool(frozen.user_attrs.get("disturbed"))))
    check_members(out, [read_bundle(m.folder) for m in members])
    task = make_task(recorded_task_spec(read_bundle(members[0].folder)))
    x, y = validation_inputs(task)
    logits = run_all([m.model for m in members], x)
    right, conf = (torch.stack(t) for t in zip(*(scores(lg, y) for lg in logits)))
    calib, held = halves(len(x))
    # A cascade falls back to its costliest stage, which must be its most accurate: a member that costs more than
    # a cheaper one and is not more accurate is left out (named trials, or a front by another cost than its own).
    keep, left_out = _rising(members, right[:, calib].mean(1).tolist(), COSTS[cost][1])
    left_out = costlier + left_out
    if len(keep) < len(members):
        for i in sorted(set(range(len(members))) - set(keep)):
            shutil.rmtree(members[i].folder, ignore_errors=True)  # in the work folder: the route holds the rest
        members, logits, right, conf = ([members[i] for i in keep], [logits[i] for i in keep], right[keep],
                                        conf[keep])
        if len(members) < 2:
            raise NothingToRoute(f"{'; '.join(left_out)}: one model is left, so there is nothing to route")
    best_calib = right[-1, calib].mean().item()
    if target_accuracy is not None and target_accuracy > best_calib + 1e-12:
        raise DsnasError(f"--target-accuracy {target_accuracy:g} is above the most accurate model's "
                         f"{best_calib:.4f} on the calibration half: the best reachable is {best_calib:.4f}")
    drop = best_calib - target_accuracy if target_accuracy is not None else max_accuracy_drop
    curves = [m.curve for m in members]
    feats = features(logits[0])
    # The router is fitted on one half of the calibration inputs and its tau chosen on the other: chosen on the
    # inputs it was fitted to (1.0000 there), tau's bound meant nothing, and a route that was to lose 0.5 points
    # lost 5 on the report half.
    fit, tune = calib[0::2], calib[1::2]
    router = LearnedRouter.fit(feats[fit], sufficient_stage(right[:, fit]), len(members))
    report = RouteReport(unit=COSTS[cost][1], left_out=left_out)
    for i, m in enumerate(members):  # each single model: all inputs to stage i
        served = torch.full((len(held),), i, dtype=torch.long)
        report.add(f"trial {m.trial} alone", accuracy(served, right[:, held]), m.cost, shares(served, len(members)))
    chosen_routes: dict[str, Any] = {}
    for extra, suffix in [(drop, ""), *((d, f" -{d * 100:g} pt") for d in also_drops)]:
        t = choose_thresholds(conf[:, calib], right[:, calib], curves, extra)[0]
        served = cascade_assign(conf[:, held], t)
        report.add("cascade" + suffix, accuracy(served, right[:, held]), cascade_cost(served, t, curves),
                   shares(served, len(members)))
        chosen_routes.setdefault("cascade", served)
        tau = choose_tau(router, feats[tune], right[:, tune], curves, extra)
        served = router.assign(feats[held], tau)
        report.add(("learned router" if not suffix else "learned") + suffix, accuracy(served, right[:, held]),
                   learned_cost(served, curves), shares(served, len(members)))
        chosen_routes.setdefault("learned router", served)
        chosen_routes.setdefault("thresholds", t)
        chosen_routes.setdefault("tau", tau)
    thresholds, router.tau = chosen_routes["thresholds"], chosen_routes["tau"]
    alone = report.outcomes[f"trial {members[-1].trial} alone"].cost
    serve, report.notes = _served(report, chosen_routes, right[:, held], drop, alone)
    if serve is None:  # neither held the target on the report half: the cascade to the most accurate model alone
        failed = report.outcomes.pop("cascade")
        report.add("cascade (not served)", failed.accuracy, failed.cost, failed.shares)
        thresholds = [math.inf] * (len(members) - 1)
        served = cascade_assign(conf[:, held], thresholds)
        report.add("cascade", accuracy(served, right[:, held]), cascade_cost(served, thresholds, curves),
                   shares(served, len(members)))
        serve = "cascade"
        report.notes.append(f"neither route held its target on the report half: the bundle serves the most accurate "
                            f"model alone (trial {members[-1].trial}), as the cascade row shows")
    elif serve == "cascade" and all(t == math.inf for t in thresholds):
        report.notes.append(f"the route sends every input to the most accurate model (trial {members[-1].trial}): "
                            f"on {len(calib)} calibration inputs no cheaper stage was shown to lose at most "
                            f"{drop:g} of accuracy. Fix: a task with more validation inputs, or a "
                            + ("lower --target-accuracy" if target_accuracy is not None else
                               "larger --max-accuracy-drop"))
    # The costs that chose the thresholds and the router, where the search measured them on a busy machine.
    disturbed = [m.trial for m in members if cost == "latency" and m.disturbed]
    if disturbed:
        report.notes.append(f"the recorded costs of trial{'s' * (len(disturbed) > 1)} "
                            f"{', '.join(map(str, disturbed))} were measured while other processes took the CPUs "
                            "or the host ran slow (disturbed): the cost column and the route's thresholds rest on "
                            "them. Fix: search again when the machine is quiet (`dsnas report` lists the disturbed "
                            "trials)")
    # A trial --trials named that breaks the limits the study was searched under: routed as asked, but said (the
    # bundle served a model over the study's latency and params limits without a word).
    frozen_of = {frozen.number: frozen for frozen in chosen}
    limits = searched.constraints
    for m in members:
        if not frozen_of[m.trial].user_attrs.get("feasible", 1.0):
            report.notes.append(f"{infeasible(m.trial, frozen_of[m.trial].user_attrs, limits)}: --trials named it; "
                                "the front holds none such")
    report.serve = serve
    best = report.outcomes[f"trial {members[-1].trial} alone"]
    report.rows = [o.row(report.unit, best) for o in report.outcomes.values()]
    timed_on = None
    if cost == "latency":
        report.measured, report.disturbance = _time_end_to_end(
            members, thresholds, router, x[held], read_bundle(members[0].folder)["hardware"]["batch_sizes"])
        timed_on = fingerprint(torch.device("cpu"))  # verify compares the time only on a machine like this one
    doc = {"_type": ROUTE_TYPE, "_version": ROUTE_VERSION, "study": spec.name, "cost": cost, "timed_on": timed_on,
           "serve": "cascade" if serve == "cascade" else "learned",
           "members": [{"trial": m.trial, "bundle": str(m.folder.relative_to(out)), "cost_per_input": m.cost,
                        "cost_per_call": dict(m.curve.points), "arch_short": m.describe} for m in members],
           "cascade": {"thresholds": thresholds, "confidence": "mean top softmax probability"},
           "learned": router.__dict__,
           "calibration": {"inputs": len(calib), "report_inputs": len(held), "max_accuracy_lost": drop,
                           "most_accurate_on_calibration": best_calib},
           "table": report.rows, "measured_ms_per_input": report.measured, "timing_disturbance": report.disturbance,
           "disturbed_costs": disturbed, "left_out": left_out}
    # An infinite threshold (a stage no input stops at) is written "inf" and a figure that is NaN null, as JSON has
    # neither (json.dumps wrote the bare words, which JavaScript and jq refuse or misread).
    (out / "route.json").write_text(json.dumps(_json_safe(doc), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return report


def _served(report: RouteReport, served: dict[str, Any], right: Any, drop: float,
            alone: float = math.inf) -> tuple[str | None, list[str]]:
    """Which route the bundle serves: the cheaper of the cascade and the learned router among those the report
    half does not show (with 95% confidence) to lose more than ``drop``, a learned router only where it costs less
    than the most accurate model alone (``alone``); None when neither holds. The notes say which failed it: the
    cheaper route alone was served, whatever it lost on the inputs it was not chosen on; and a learned router that
    found no tau sends every input on after its first model, costlier than the last alone, and was served, losing
    nothing."""
    held, notes = [], []
    for name in sorted(("cascade", "learned router"), key=lambda n: report.outcomes[n].cost):
        cost = report.outcomes[name].cost
        if name == "learned router" and cost >= alone - 1e-12:  # (a cascade of no early stage is the model alone)
            unit = f" {report.unit}" if report.unit else ""
            notes.append(f"the {name} costs {cost:.4g}{unit} per input, no less than the most accurate model alone "
                         f"({alone:.4g}{unit}): not served")
            continue
        at_least = lost_at_least(served[name], right)
        if at_least <= drop + 1e-12:
            held.append(name)
        else:
            notes.append(f"the {name} lost at least {at_least:.4f} of accuracy on the report half (95% bound), "
                         f"beyond the {drop:g} allowed: not served")
    return (held[0] if held else None), notes


class NothingToRoute(DsnasError):
    """The front has fewer than two models: a notice, not a failure."""


def _json_safe(v: Any) -> Any:
    """``v`` with each infinite float as the string "inf" or "-inf" (float() reads both back), a NaN as None."""
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def _rising(members: list[Member], accuracies: list[float], unit: str = "") -> tuple[list[int], list[str]]:
    """Of members sorted by cost, the indices of those more accurate than every cheaper one kept, and why each
    other one was left out (``unit``: the cost's, per input)."""
    keep: list[int] = []
    left_out = []
    for i, acc in enumerate(accuracies):
        if keep and acc <= accuracies[keep[-1]]:
            best = members[keep[-1]]
            costs = "as much as" if members[i].cost == best.cost else "more than"
            per = f"{' ' + unit if unit else ''} per input"
            left_out.append(f"left out trial {members[i].trial}: it costs {costs} trial {best.trial} "
                            f"({members[i].cost:.4g} vs {best.cost:.4g}{per}) and is not more accurate "
                            f"on the calibration half ({acc:.4f} vs {accuracies[keep[-1]]:.4f})")
        else:
            keep.append(i)
    return keep, left_out


def _thin(members: list[Any], accuracies: Sequence[float | None] = ()) -> list[Any]:
    """At most MAX_STAGES members, cheapest first: the cheapest, the most accurate, and between them the ones
    spread evenly in cost (a longer cascade pays more first stages for less). ``accuracies``: each member's
    recorded accuracy, where known. The most accurate is not always the costliest (named trials, or a front ranked
    by another cost than the route's): taking the costliest for it, a route over five named trials thinned the
    most accurate one out and found nothing to route. The ones costlier than it are left out (a cascade's last
    stage must be its most accurate; _rising would leave them out)."""
    if len(members) <= MAX_STAGES:
        return members
    known = [(a, -i) for i, a in enumerate(accuracies) if isinstance(a, (int, float)) and math.isfinite(a)]
    last = -max(known)[1] if len(known) == len(members) else len(members) - 1  # the cheapest of the most accurate
    if last < MAX_STAGES:
        return members[: last + 1]
    picks = {0, last}
    for i in range(1, MAX_STAGES - 1):
        picks.add(round(i * last / (MAX_STAGES - 1)))
    return [members[i] for i in sorted(picks)]


def _costlier_than_the_most_accurate(costed: list[Any], last: Any, unit: str) -> list[str]:
    """Why each member costlier than the last one thinning kept (the most accurate, see _thin) is left out."""
    curve, best = last
    after = next(i for i, pair in enumerate(costed) if pair is last) + 1
    return [f"left out trial {frozen.number}: it costs more than trial {best.number} ({c.per_input(1.0):.4g} vs "
            f"{curve.per_input(1.0):.4g} {unit} per input) and was not more accurate in the search "
            f"({frozen.user_attrs['accuracy']:.4f} vs {best.user_attrs['accuracy']:.4f})"
            for c, frozen in costed[after:]]


def _time_end_to_end(members: Sequence[Member], thresholds: Sequence[float], router: LearnedRouter, x: Any,
                     batch_sizes: Sequence[int]) -> tuple[dict[str, float], dict[str, Any]]:
    """Wall-clock ms per input of serving ``x`` in batches of the largest measured batch size: the most accurate
    model alone, the cascade and the learned router, in turns (so that a busy moment of the machine hits all),
    median of TIMING_ROUNDS rounds; and the timing's disturbance record (see _timed)."""
    servers = {f"trial {members[-1].trial} alone": members[-1].model,
               f"trial {members[0].trial} alone": members[0].model,
               "cascade": Route([m.model for m in members], "cascade", thresholds),
               "learned router": Route([m.model for m in members], "learned", [], router)}
    times, disturbance = _timed(servers, list(x.split(max(batch_sizes))), len(x))
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}, disturbance


def _timed(servers: dict[str, Any], parts: list[Any], n: int) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Each server's ms per input of serving ``parts`` (``n`` inputs), TIMING_ROUNDS rounds, as dsnas times a model:
    holding this machine's measurement gate (a search's trials and other measurements wait), freed memory held
    (dsnas.allocator), and timed again while other processes took the CPUs, the least disturbed set kept
    (dsnas.profiler.disturbance; its record is returned). A route timed beside two busy processes read 7x its
    time, and verify failed it without a word."""
    import torch

    def attempt() -> tuple[dict[str, list[float]], Any]:
        times: dict[str, list[float]] = {name: [] for name in servers}
        with MachineWindow() as window:
            for _ in range(TIMING_ROUNDS):
                for name, serve in servers.items():
                    start = time.perf_counter()
                    for p in parts:
                        serve(p)
                    times[name].append((time.perf_counter() - start) * 1000 / n)
        return times, window.share

    hold_freed_memory()
    gate = MeasureGate(device_key(torch.device("cpu")), announce="the route's timing")
    with gate.exclusive(), torch.inference_mode():
        for serve in servers.values():
            serve(parts[0])  # warm-up
        return least_disturbed(attempt, lambda: wait_for_quiet(MAX_SETTLE_S))


# ---- verifying a route here -------------------------------------------------------------------------------------

def verify_route(folder: str | Path, accuracy_tol: float = 0.005, latency_tol: float = 0.25) -> Any:
    """A route bundle checked here: each member's probe (its weights are the trial's), the route's accuracy on the
    report half against route.json's, and its end-to-end time per input against the recorded one (the median of
    TIMING_ROUNDS rounds; a drift beyond ``latency_tol`` fails only on a machine like the one that wrote it)."""
    import torch

    folder = Path(folder)
    doc = read_route(folder)
    dev = torch.device("cpu")
    report = VerifyReport(str(folder), "cpu")
    members = []
    for m in doc["members"]:
        model = load_bundle(folder / m["bundle"])
        recorded_metrics = _read_metrics(folder / m["bundle"] / "metrics.json")
        # Its probe was written on the device it was measured on (a GPU study's front, routed here): its tolerance.
        ran_on = (recorded_metrics.get("fingerprint") or recorded_metrics.get("profile", {}).get("fingerprint", {}))
        check = _probe_check(folder / m["bundle"], model, dev, ran_on.get("device"))
        report.checks.append(Check(f"trial {m['trial']} probe", check.recorded, check.now, check.drift,
                                   check.verdict, check.failed))
        members.append(model)
    kind = doc["serve"]
    router = LearnedRouter(**{**doc["learned"], "tau": float(doc["learned"]["tau"])}) if kind == "learned" else None
    thresholds = [float(t) for t in doc["cascade"]["thresholds"]]
    route = Route(members, kind, thresholds, router)
    task = make_task(recorded_task_spec(read_bundle(folder / doc["members"][0]["bundle"])))
    data = data_check(recorded_metrics, task)  # the members trained on one task's data (route refuses others)
    x, y = validation_inputs(task)
    _, held = halves(len(x))
    name = "cascade" if kind == "cascade" else "learned router"
    row = next(r for r in doc["table"] if r["route"] == name)
    acc = scores(route(x[held]), y[held])[0].mean().item()
    drift = acc - row["accuracy"]
    ok = abs(drift) <= accuracy_tol
    report.checks.append(data)
    if data.compared:
        report.checks.append(Check(f"{name} accuracy", f"{row['accuracy']:.4f}", f"{acc:.4f}", f"{drift:+.4f}",
                                   f"{'ok' if ok else 'FAIL'} (tol {accuracy_tol:g})", failed=not ok))
    else:  # other text of the same size passed "ok" on accuracy within the tolerance
        report.checks.append(Check(f"{name} accuracy", f"{row['accuracy']:.4f}", f"{acc:.4f}", "-",
                                   "other data: not compared", compared=False))
    recorded = (doc.get("measured_ms_per_input") or {}).get(name)
    then_fp, here = doc.get("timed_on") or {}, fingerprint(dev)
    differs = sorted(k for k in set(then_fp) | set(here) if then_fp.get(k) != here.get(k))
    if recorded and differs:  # another host, CPU, torch or dsnas may legitimately serve at another speed
        said = f"other device ({', '.join(differs)} differ)" if then_fp else "route.json records no device"
        report.checks.append(Check(f"{name} ms/input", f"{recorded:.4g}", "-", "-", f"{said}: not compared",
                                   compared=False))
    elif recorded:
        batch = max(read_bundle(folder / doc["members"][0]["bundle"])["hardware"]["batch_sizes"])
        times, disturbance = _timed({name: route}, list(x[held].split(batch)), len(held))
        rounds = times[name]
        now = sorted(rounds)[len(rounds) // 2]
        ratio = now / recorded
        ok = 1 / (1 + latency_tol) <= ratio <= 1 + latency_tol
        measured = f"{now:.4g} (rounds {min(rounds):.3g}-{max(rounds):.3g})"
        then_disturbed = (doc.get("timing_disturbance") or {}).get("disturbed")
        if disturbance.get("disturbed") or then_disturbed:  # as a bundle's verify: a busy machine's time is no verdict
            when = "now" if disturbance.get("disturbed") else "when the route was made"
            share = disturbance if disturbance.get("disturbed") else doc["timing_disturbance"]
            report.checks.append(Check(f"{name} ms/input", f"{recorded:.4g}", measured, f"x{ratio:.2f}",
                                       f"disturbed {when} (others took {_taken(share)} of the CPUs): not compared; "
                                       "run again when quiet", compared=False))
        else:
            unknown = "; disturbance unknown" if disturbance.get("disturbed") is None else ""
            report.checks.append(Check(f"{name} ms/input", f"{recorded:.4g}", measured, f"x{ratio:.2f}",
                                       f"{'ok' if ok else 'FAIL'} (tol x{1 + latency_tol:g}){unknown}",
                                       failed=not ok))
    return report
