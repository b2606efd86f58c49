"""dsnas's own sampler (``[sampler] name = "dsnas"``), built for architecture spaces where training is what costs
and the hardware figures do not: before a candidate trains, its hardware figures are known (the task's
``hardware(arch)``: a table's recorded latency, say), and only what training gives (accuracy) must be predicted.

Each proposal:
1. The trained candidates so far (COMPLETE trials, a repeat counted once) fit one Gaussian process per figure
   that is not known in advance (dsnas.surrogate), an objective on the normal scores of its ranks (_warped); a
   hardware figure is fitted on every candidate measured, those stopped at a rung too (_measured_early). The
   hyperparameters are re-learned as the data grows by a fifth, and only re-conditioned in between.
2. A pool of candidates never proposed before: the whole space when it is small, else random ones and every
   one-choice mutation of the current front. Those a known figure puts over a hardware limit are dropped.
3. Each is scored by its expected hypervolume improvement (dsnas.acquisition) over the front of the feasible
   trained candidates and of the running ones (their known figures, and the model's mean for the rest: a
   "kriging believer", so that several workers are not all sent to the same spot), times the probability that
   the figures it must guess are within the limits, times the chance that it does not train to a floor
   (_not_failing). The best is proposed.
Until ``startup`` candidates have been evaluated (trained, or measured and stopped at a rung), the proposals are
random (among those within the known limits); by default a third of the study's ``n_trials``, at least 4 and at
most 14 (_startup).

The driver binds the sampler to the study's space and task (``bind``); on a space without declared choices
(``[space] callable``) the run falls back to TPE with a notice."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from optuna.distributions import CategoricalDistribution
from optuna.samplers import BaseSampler, RandomSampler
from optuna.trial import TrialState

from dsnas.acquisition import expected_improvement, probability_feasible
from dsnas.surrogate import Encoding, GaussianProcess

_ABSENT = "<absent>"  # in a candidate's key: a parameter it does not use (a layer past its depth)
# Random proposals before the model is trusted, and the shortest start a small budget gets (docs/search-strategy.md:
# on NAS-Bench-201's 600 evaluations 10 and 6 needed more; a 12-trial search of the quickstart's table did as well
# with 3 to 6, and with 14 no better than random search)
STARTUP, SHORTEST_STARTUP = 14, 4
LISTED = 50_000  # a space of at most this many architectures is listed whole, and every candidate can be scored
FLOOR_TIES = 3  # trained candidates sharing the worst value exactly that make it a floor (see _not_failing)
SCORING_FLOPS = 3e8  # per proposal: candidates x (trained candidates)^2, about 50 ms on one core
# Design-matrix rows kept between proposals (about 1.7 KB each on the quickstart space): a random candidate is
# rarely scored twice, and keeping every one grew the sampler by 556 MB in 120 proposals.
MAX_ENCODED = 20_000


Candidate = tuple[dict[str, Any], tuple[Any, ...]]  # (its parameters, its key: see DsnasSampler._key)


@dataclass
class Problem:
    """What the sampler must know of the study, given by the driver once the space is settled."""

    parameters: dict[str, tuple[Any, ...]]  # Optuna parameter name -> its options (those with more than one)
    used: Callable[[dict[str, Any]], dict[str, Any]]  # the parameters an architecture uses (no layers past its depth)
    arch_of: Callable[[dict[str, Any]], dict[str, Any]]  # parameters -> the architecture
    objectives: list[tuple[str, str]]  # (metric, direction), in the study's order
    limits: dict[str, float] = field(default_factory=dict)  # metric -> upper limit ([hardware.constraints])
    known: Callable[[dict[str, Any]], dict[str, float]] | None = None  # arch -> figures known before training
    untrained: tuple[str, ...] = ()  # figures training does not change (hardware): measured before it, at rung 0
    budget: int | None = None  # the candidates the study evaluates at most ([budget] n_trials; None: timeout only)


class DsnasSampler(BaseSampler):
    """See the module's docstring. ``startup``: random candidates before the model proposes (default: by the
    budget, see _startup); ``pool``: how many candidates to score per proposal at most; ``time_s``: the driver's
    time per proposal it aims to stay within (the pool shrinks when scoring takes longer)."""

    def __init__(self, seed: int | None = None, *, startup: int | None = None, pool: int = 2000,
                 time_s: float = 1.0) -> None:
        # Checked here, so that a study file's [sampler] with one of these out of range is refused before any work
        # (dsnas.spec builds the sampler once to check its settings); a negative pool once failed every trial.
        if startup is not None and startup < 0:
            raise ValueError(f"startup must be >= 0 (random candidates before the model proposes), got {startup}")
        if pool < 1:
            raise ValueError(f"pool must be >= 1 (candidates scored per proposal), got {pool}")
        if not time_s > 0:
            raise ValueError(f"time_s must be > 0 (seconds per proposal), got {time_s}")
        self._rng = np.random.RandomState(seed)
        self._fallback = RandomSampler(seed=seed)
        self.startup, self.pool, self.time_s = startup, pool, time_s
        self.problem: Problem | None = None
        self._encoding: Encoding | None = None
        self._models: dict[str, GaussianProcess] = {}  # metric -> its model
        self._fitted_at: dict[str, int] = {}  # metric -> how many points its hyperparameters were learned on
        self._all: list[Candidate] | None = None  # see _listed
        self._encoded: dict[tuple[Any, ...], np.ndarray] = {}  # candidate key -> its row of the design matrix
        self._known: dict[tuple[Any, ...], dict[str, float]] = {}  # candidate key -> known figures (fixed)
        self._keys: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}  # trial number -> (key, used params)
        self._measured: dict[tuple[Any, ...], tuple[dict[str, Any], Any]] = {}  # key -> (used params, figures)
        self.proposals: list[float] = []  # every proposal's time (for the benchmark)

    def bind(self, problem: Problem) -> None:
        self.problem = problem
        self._encoding = Encoding.of(problem.parameters)

    def reseed_rng(self) -> None:
        self._rng.seed()
        self._fallback.reseed_rng()

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        if self.problem is None:
            return {}
        return {name: CategoricalDistribution(list(options)) for name, options in self.problem.parameters.items()}

    def sample_independent(self, study: Any, trial: Any, param_name: str, param_distribution: Any) -> Any:
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)

    def sample_relative(self, study: Any, trial: Any, search_space: dict[str, Any]) -> dict[str, Any]:
        if self.problem is None or not search_space:
            return {}
        start = time.perf_counter()
        done, pending, seen = self._history(study, trial.number)
        if not done or len(self._measured) < self._startup():  # _measured: the evaluated candidates, see _history
            params = self._random_unseen(seen)
        else:
            params = self._best(done, pending, seen, start)
        self.proposals.append(time.perf_counter() - start)
        return params

    def _startup(self) -> int:
        """The random start: as set, else a third of the budget within [SHORTEST_STARTUP, STARTUP]. A start of 14
        in a 12-trial study would leave the model nothing to propose; on the quickstart's recorded table, 20 seeds
        of 12 / 24 / 40-trial searches with halving did as well with starts of 3-6 / 8 / 8-14, and better than
        TPE from 24 trials on (docs/search-strategy.md, "Small budgets")."""
        if self.startup is not None:
            return self.startup
        if self.problem is None or self.problem.budget is None:
            return STARTUP
        return min(STARTUP, max(SHORTEST_STARTUP, self.problem.budget // 3))

    # -- the study so far

    def _key(self, used: dict[str, Any]) -> tuple[Any, ...]:
        """A candidate's identity: the values of the parameters it uses, in the space's order."""
        return tuple(used.get(name, _ABSENT) for name in self.problem.parameters)

    def _history(self, study: Any, current: int) -> tuple[dict[Any, Any], list[Candidate], set[Any]]:
        """(trained candidates: key -> (parameters, values, figures, feasible); the running ones; the keys of
        every candidate proposed before, in any state). Also keeps in self._measured every candidate whose figures
        were measured, trained or not (stopped at a rung: measured before training)."""
        done: dict[str, Any] = {}
        pending, seen = [], set()
        self._measured = {}
        for t in study._get_trials(deepcopy=False, use_cache=True):
            if t.number == current:
                continue
            if t.number not in self._keys or t.state == TrialState.RUNNING:  # a running trial's params may grow
                used = self.problem.used(t.params)
                self._keys[t.number] = (self._key(used), used)
            key, used = self._keys[t.number]
            seen.add(key)
            if t.state == TrialState.COMPLETE and t.values is not None and key not in done:
                feasible = t.user_attrs.get("feasible", 1.0) > 0.5
                done[key] = (used, list(t.values), t.user_attrs, feasible)
            elif t.state == TrialState.RUNNING and used:
                pending.append((used, key))
            if t.state == TrialState.COMPLETE or (t.state == TrialState.PRUNED and
                                                  t.user_attrs.get("pruned_by") != "predictor"):
                self._measured.setdefault(key, (used, t.user_attrs))  # a skipped one's figures are predicted
        return done, pending, seen

    # -- proposals

    def _random_unseen(self, seen: set[Any]) -> dict[str, Any]:
        """A random candidate never proposed and within the known limits. Where few are, random draws miss them:
        a listed space is searched whole for one; only where none is left is any candidate drawn."""
        for _ in range(200):
            params = self._random_params()
            if self._key(self.problem.used(params)) not in seen and self._within_known_limits(params):
                return params
        left = [params for params, key in self._listed() or () if key not in seen and
                self._within_known_limits(params, key)]
        return left[int(self._rng.randint(len(left)))] if left else self._random_params()

    def _random_params(self, count: int | None = None) -> Any:
        """One random candidate's parameters, or a list of ``count``."""
        names = list(self.problem.parameters)
        options = list(self.problem.parameters.values())
        picks = self._rng.randint(0, [len(o) for o in options], size=(count or 1, len(names)))
        drawn = [{n: o[i] for n, o, i in zip(names, options, row)} for row in picks]
        return drawn if count is not None else drawn[0]

    def _best(self, done: dict[Any, Any], pending: list[Candidate], seen: set[Any],
              start: float) -> dict[str, Any]:
        problem = self.problem
        rows = list(done.values())
        x = self._design([(r[0], key) for key, r in done.items()])
        modelled = self._modelled(rows[0][0])
        early = self._measured_early(modelled, len(rows))
        values = self._warped(np.array([r[1] for r in rows], dtype=float), modelled,
                              {metric: ys for metric, (_, ys) in early.items()})
        column = {metric: i for i, (metric, _) in enumerate(problem.objectives)}
        for metric in modelled:  # an objective's (warped) values, or a limit's figure from the trial's attributes
            if metric in early:  # measured on more candidates than were trained
                xs, ys = early[metric]
                self._fit(metric, xs, _normal_scores(ys, ys) if self._ranked(metric) else ys)
                continue
            y = values[:, column[metric]] if metric in column else np.array([float(r[2][metric]) for r in rows])
            self._fit(metric, x, y)
        pool = self._pool(rows, pending, seen)
        if not pool:
            return self._random_unseen(seen)
        budget = max(0.1, self.time_s - (time.perf_counter() - start))
        mu, sigma, pof = self._predict(pool, modelled, budget)
        pool = pool[: len(mu)]
        front = [self._minimized(v) for v, r in zip(values, rows) if r[3]]
        running = [c for c in pending if self._whole(c[0])]
        if running:  # the running ones, as the model expects them to end
            front += self._predict(running, modelled, budget)[0].tolist()
        front_arr = np.array(front, dtype=float).reshape(-1, len(problem.objectives))
        ref = self._reference(np.array([self._minimized(v) for v in values], dtype=float))
        score = expected_improvement(mu, sigma, front_arr, ref) * pof * self._not_failing(x, rows, pool, modelled)
        if not np.any(score > 0):
            return pool[int(self._rng.randint(len(pool)))][0]
        best = np.flatnonzero(score >= score.max() * (1 - 1e-12))
        return pool[int(self._rng.choice(best))][0]

    def _not_failing(self, x: np.ndarray, rows: list[Any], pool: list[Candidate], modelled: list[str]) -> np.ndarray:
        """Per candidate, the chance it does not train to the floor: the worst value of a modelled objective when
        at least FLOOR_TIES trained candidates share it exactly (chance accuracy: a broken architecture, one whose
        output does not depend on its input). Modelled apart, as an unknown constraint, by a model of the
        0/1 floor indicator. Only a figure training makes can be a floor: the largest models tie on params or
        peak memory without being broken."""
        failed = np.zeros(len(rows), dtype=bool)
        for i, (metric, direction) in enumerate(self.problem.objectives):
            if metric not in modelled or not self._ranked(metric) or metric in self.problem.untrained:
                continue
            column = np.array([r[1][i] for r in rows], dtype=float)
            floor = column.min() if direction == "maximize" else column.max()
            at_floor = column == floor
            if at_floor.sum() >= FLOOR_TIES:
                failed |= at_floor
        if not failed.any():
            return np.ones(len(pool))
        self._fit("<floor>", x, failed.astype(float))
        chance, _ = self._models["<floor>"].predict(self._design(pool))
        return 1.0 - np.clip(chance, 0.0, 1.0)

    def _warped(self, values: np.ndarray, modelled: list[str],
                among: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """The trained candidates' objective values (one row each) with every modelled objective replaced by its
        normal scores (the standard normal quantile of each value's rank), which the model is fitted on and the
        front is scored in. Accuracy has a long tail of failed architectures; fitted as it is, the model spends
        itself on telling those from the rest and ranks the good ones poorly (on NAS-Bench-201, Spearman 0.24
        among the best fifth of held-out cells after 100 trained, against 0.45 on normal scores). The map keeps
        the order, so the front is the same front. An objective that is also a limit stays in its units, where
        the limit is. ``among``: an objective's values ranked among these (every measured candidate's, see
        _measured_early) instead of among the trained ones."""
        out = values.copy()
        for i, (metric, _) in enumerate(self.problem.objectives):
            if metric in modelled and self._ranked(metric):
                out[:, i] = _normal_scores(values[:, i], (among or {}).get(metric, values[:, i]))
        return out

    def _ranked(self, metric: str) -> bool:
        """Whether a modelled figure is fitted on normal scores (see _warped): an objective that is not a limit."""
        return any(m == metric for m, _ in self.problem.objectives) and metric not in self.problem.limits

    def _measured_early(self, modelled: list[str], trained: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Each modelled figure that training does not change (Problem.untrained: the hardware figures),
        with the design matrix and values of every candidate it was measured on, where those are more than the
        trained ones: a candidate stopped at a rung, one over a limit at rung 0 in particular, tells where the
        figures and the limits lie as a trained one does."""
        out = {}
        for metric in modelled:
            if metric not in self.problem.untrained:
                continue
            rows = [((used, key), float(attrs[metric])) for key, (used, attrs) in self._measured.items()
                    if isinstance(attrs.get(metric), (int, float))]
            if len(rows) > trained:
                out[metric] = (self._design([r[0] for r in rows]), np.array([r[1] for r in rows]))
        return out

    def _whole(self, params: dict[str, Any]) -> bool:
        """Whether a running trial's parameters are all there: another driver's trial may be half-sampled."""
        try:
            self.problem.arch_of(params)
        except KeyError:
            return False
        return True

    def _modelled(self, params: dict[str, Any]) -> list[str]:
        """The objectives and limits not known before training: those the sampler models."""
        known = self._known_figures(params)
        metrics = [m for m, _ in self.problem.objectives] + list(self.problem.limits)
        return [m for m in dict.fromkeys(metrics) if m not in known]

    def _fit(self, metric: str, x: np.ndarray, y: np.ndarray) -> None:
        model = self._models.setdefault(metric, GaussianProcess(self._encoding))
        n = len(y)
        if n >= 1.2 * self._fitted_at.get(metric, 0):
            model.fit(x, y)
            self._fitted_at[metric] = n
        else:
            model.condition(x, y)

    def _pool(self, rows: list[Any], pending: list[Candidate], seen: set[Any]) -> list[Candidate]:
        """Candidates never proposed and within the known limits: every one-choice mutation of the front's members
        and of the running ones, and the rest of the space (when it is listed, see _listed) or random ones, as
        many as scoring can take (its cost grows with the square of the trained candidates)."""
        names = list(self.problem.parameters)
        options = [self.problem.parameters[n] for n in names]
        room = int(np.clip(SCORING_FLOPS / max(1, len(rows)) ** 2, self.pool // 4, self.pool * 10))
        starts = [*self._front_params(rows), *(params for params, _ in pending)]
        near = [{**p, name: v} for p in starts for name, opts in zip(names, options) for v in opts
                if p.get(name, v) != v]
        self._rng.shuffle(near)
        listed = self._listed()
        if listed is not None:  # the neighbours first, then the rest of the space (keys known, no work to redo)
            rest = [c for c in listed if c[1] not in seen]
            if len(rest) > room:
                rest = [rest[i] for i in self._rng.choice(len(rest), room, replace=False)]
            raw = near
        else:
            raw, rest = near[: room // 2] + self._random_params(room - min(len(near), room // 2)), []
        out, keys = [], set(seen)
        for params in raw:
            full = {**self._random_params(), **params} if len(params) < len(names) else params
            key = self._key(self.problem.used(full))
            if key not in keys and self._within_known_limits(full, key):
                keys.add(key)
                out.append((full, key))
        out += [c for c in rest if c[1] not in keys and self._within_known_limits(*c)]
        return out

    def _listed(self) -> list[Candidate] | None:
        """Every candidate of a space of at most LISTED architectures, with its key, listed once (None for a
        larger space, which is sampled instead)."""
        if self._all is None:
            options = list(self.problem.parameters.values())
            if math.prod(len(o) for o in options) > LISTED:
                self._all = []
            else:
                names, unique = list(self.problem.parameters), {}
                for combo in itertools.product(*options):
                    params = dict(zip(names, combo))
                    unique.setdefault(self._key(self.problem.used(params)), params)
                self._all = [(params, key) for key, params in unique.items()]
        return self._all or None

    def _front_params(self, rows: list[Any]) -> list[dict[str, Any]]:
        feasible = [r for r in rows if r[3]] or rows
        points = np.array([self._minimized(r[1]) for r in feasible], dtype=float)
        # A point is on the front when no other is at least as good everywhere and better somewhere.
        no_worse = (points[:, None, :] <= points[None, :, :]).all(axis=2)
        better = (points[:, None, :] < points[None, :, :]).any(axis=2)
        dominated = (no_worse & better).any(axis=0)
        return [r[0] for r, d in zip(feasible, dominated) if not d]

    def _known_figures(self, params: dict[str, Any], key: tuple[Any, ...] | None = None) -> dict[str, float]:
        if self.problem.known is None:
            return {}
        key = key if key is not None else self._key(self.problem.used(params))
        if key not in self._known:
            self._known[key] = dict(self.problem.known(self.problem.arch_of(params)) or {})
        return self._known[key]

    def _within_known_limits(self, params: dict[str, Any], key: tuple[Any, ...] | None = None) -> bool:
        known = self._known_figures(params, key)
        return all(known[m] <= limit for m, limit in self.problem.limits.items() if m in known)

    def _predict(self, pool: list[Candidate], modelled: list[str],
                 budget_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per candidate, each objective's value in minimized form (mean and standard deviation; a known figure
        has deviation 0) and the probability that the modelled limits hold. Stops scoring (the pool is cut) when
        the time per proposal is spent."""
        start = time.perf_counter()
        chunks = []
        for begin in range(0, len(pool), 2048):
            if chunks and time.perf_counter() - start > budget_s:
                break
            chunks.append(self._predict_chunk(pool[begin:begin + 2048], modelled))
        return tuple(np.concatenate(parts) for parts in zip(*chunks))  # type: ignore[return-value]

    def _predict_chunk(self, pool: list[Candidate],
                       modelled: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        problem = self.problem
        predicted = {m: self._models[m].predict(self._design(pool)) for m in modelled}
        known = [self._known_figures(params, key) for params, key in pool]
        mu = np.zeros((len(pool), len(problem.objectives)))
        sigma = np.zeros_like(mu)
        for i, (metric, direction) in enumerate(problem.objectives):
            sign = -1.0 if direction == "maximize" else 1.0
            if metric in predicted:
                mu[:, i], sigma[:, i] = sign * predicted[metric][0], predicted[metric][1]
            else:
                mu[:, i] = [sign * k[metric] for k in known]
        limited = [m for m in problem.limits if m in predicted]
        if limited:
            pof = probability_feasible(np.stack([predicted[m][0] for m in limited], axis=1),
                                       np.stack([predicted[m][1] for m in limited], axis=1),
                                       np.array([problem.limits[m] for m in limited]))
        else:
            pof = np.ones(len(pool))
        return mu, sigma, pof

    def _design(self, pool: list[Candidate]) -> np.ndarray:
        """The candidates' rows of the design matrix, each encoded once."""
        new = [(params, key) for params, key in pool if key not in self._encoded]
        if new and len(self._encoded) + len(new) > MAX_ENCODED:  # the measured candidates' and this pool's stay
            keep = set(self._measured) | {key for _, key in pool}
            self._encoded = {k: row for k, row in self._encoded.items() if k in keep}
        if new:
            rows = self._encoding.encode([self.problem.used(params) for params, _ in new])
            self._encoded.update((key, row) for (_, key), row in zip(new, rows))
        return np.stack([self._encoded[key] for _, key in pool])

    def _minimized(self, values: list[float]) -> list[float]:
        return [-v if d == "maximize" else v for v, (_, d) in zip(values, self.problem.objectives)]

    @staticmethod
    def _reference(points: np.ndarray) -> list[float]:
        """A tenth of the observed range beyond the worst observed value of each objective (the nadir): every
        trained candidate counts, the ones at the ends of the front too."""
        worst, best = points.max(axis=0), points.min(axis=0)
        return list(worst + 0.1 * np.maximum(worst - best, 1e-9))


def _normal_scores(values: np.ndarray, among: np.ndarray) -> np.ndarray:
    """The standard normal quantile of each value's rank among ``among`` (which holds them all; ties share their
    average rank, as scipy's rankdata gives them)."""
    # scipy.stats.norm.ppf is this function; importing scipy.stats took 1.1 s of every driver, scipy.special 0.3 s.
    from scipy.special import ndtri

    reference = np.sort(among)
    below = np.searchsorted(reference, values, "left")
    rank = below + (np.searchsorted(reference, values, "right") - below + 1) / 2
    return ndtri((rank - 0.5) / len(reference))
