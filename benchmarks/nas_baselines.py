"""Two published NAS baselines as Optuna samplers over a space of categorical choices, so that a benchmark can set
them against dsnas's samplers on the same study: regularized (aging) evolution and Pareto local search.

Both propose a whole arch at a time (relative sampling) and work for any number of objectives. What they know is
read from the study on every proposal, never kept in the sampler: a driver that recreates its sampler, or several
drivers on one storage, propose the same way. Only COMPLETE trials count as results; every other trial's arch counts
as proposed, so that neither baseline proposes again what is running, failed, or done.
"""

from __future__ import annotations

import abc
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from optuna._transform import _SearchSpaceTransform
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study, StudyDirection

# Optuna's fast non-dominated sort (the one NSGA-II ranks with); private, but unchanged since Optuna 3.6.
from optuna.study._multi_objective import _fast_non_domination_rank
from optuna.trial import FrozenTrial, TrialState

Arch = tuple[int, ...]  # the index of the chosen option of each choice that has more than one

# Draws of a random arch before the unproposed ones are listed instead: enough while most of the space is fresh.
_RANDOM_ATTEMPTS = 100
# Past this many archs the unproposed ones are not listed, and a random proposal may repeat one.
_ENUMERATION_LIMIT = 1_000_000


@dataclass(frozen=True)
class History:
    """What a study tells a baseline: the archs with their results, and every arch proposed so far."""

    archs: list[Arch]  # of the COMPLETE trials, in the order they completed
    losses: np.ndarray  # (len(archs), objectives); lower is better in every column
    proposed: set[Arch]  # of all trials but the one being proposed for, in any state


def crowding_distance(losses: np.ndarray) -> np.ndarray:
    """NSGA-II's crowding distance (Deb et al., 2002) of each row: the extremes of each objective are infinitely
    far; the others, the sum over objectives of the gap between their neighbours, over the objective's range."""
    distance = np.zeros(len(losses))
    for column in losses.T:
        order = np.argsort(column, kind="stable")
        span = column[order[-1]] - column[order[0]]
        if span == 0 or not np.isfinite(span):
            continue  # an objective on which all are equal separates none of them
        distance[order[[0, -1]]] = np.inf
        distance[order[1:-1]] += (column[order[2:]] - column[order[:-2]]) / span
    return distance


def front_indices(losses: np.ndarray) -> np.ndarray:
    """The rows on the non-dominated front (with one objective: the rows tied for the best value)."""
    return np.flatnonzero(_fast_non_domination_rank(losses) == 0)


class ArchSampler(BaseSampler):
    """What both baselines share: the encoding of an arch as option indices, reading the history from the study,
    and fresh random archs."""

    def __init__(self, choices: Mapping[str, Sequence[Any]], seed: int | None = None) -> None:
        for name, options in choices.items():
            if len(options) == 0 or len(set(options)) != len(options):
                raise ValueError(f"choice {name!r} needs one or more distinct options, but got {list(options)!r}")
        # Choices with one option are no decision: Optuna answers their suggestion without asking the sampler.
        self._options = {name: list(options) for name, options in choices.items() if len(options) > 1}
        self._index = {name: {option: i for i, option in enumerate(options)} for name, options in self._options.items()}
        self._sizes = [len(options) for options in self._options.values()]
        self._rng = np.random.RandomState(seed)

    def reseed_rng(self) -> None:
        self._rng.seed()

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return {name: CategoricalDistribution(options) for name, options in self._options.items()}

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not search_space:
            return {}
        arch = self.propose(self.history(study, trial))
        return {name: options[i] for (name, options), i in zip(self._options.items(), arch)}

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        """A parameter outside the choices: uniformly at random, the way Optuna's RandomSampler draws it, but from
        this sampler's own random state so that the seed fixes the whole study."""
        space = _SearchSpaceTransform({param_name: param_distribution})
        return space.untransform(self._rng.uniform(space.bounds[:, 0], space.bounds[:, 1]))[param_name]

    @abc.abstractmethod
    def propose(self, history: History) -> Arch:
        """The next arch to evaluate, given what the study holds."""

    def history(self, study: Study, trial: FrozenTrial) -> History:
        """Read from the study on every proposal; trials without a whole arch are none of the baseline's."""
        trials = study._get_trials(deepcopy=False, use_cache=True)
        archs = {t.number: arch for t in trials if t.number != trial.number and (arch := self.arch_of(t)) is not None}
        complete = [t for t in trials if t.state == TrialState.COMPLETE and t.number in archs]
        complete.sort(key=lambda t: (t.datetime_complete, t.number))
        directions = study.directions  # read once: a property that asks the storage
        losses = [[_loss(v, d) for v, d in zip(t.values, directions)] for t in complete]
        shape = (len(complete), len(directions))
        return History([archs[t.number] for t in complete], np.array(losses).reshape(shape), set(archs.values()))

    def arch_of(self, trial: FrozenTrial) -> Arch | None:
        """The trial's arch; None when it has not chosen every option (yet), or chose one outside the space."""
        params = trial.params
        if any(name not in params or params[name] not in index for name, index in self._index.items()):
            return None
        return tuple(index[params[name]] for name, index in self._index.items())

    def random_arch(self) -> Arch:
        return tuple(int(self._rng.randint(size)) for size in self._sizes)

    def fresh_arch(self, proposed: set[Arch]) -> Arch:
        """A uniformly random arch not proposed before; a repeat only once the space is exhausted (or too large to
        list and nearly exhausted)."""
        for _ in range(_RANDOM_ATTEMPTS):
            arch = self.random_arch()
            if arch not in proposed:
                return arch
        if math.prod(self._sizes) > _ENUMERATION_LIMIT:
            return arch
        unproposed = [a for a in itertools.product(*map(range, self._sizes)) if a not in proposed]
        return unproposed[self._rng.randint(len(unproposed))] if unproposed else arch

    def neighbours(self, arch: Arch) -> list[Arch]:
        """The archs that differ from this one in exactly one choice."""
        return [
            arch[:position] + (option,) + arch[position + 1 :]
            for position, size in enumerate(self._sizes)
            for option in range(size)
            if option != arch[position]
        ]


def _loss(value: float, direction: StudyDirection) -> float:
    return -value if direction == StudyDirection.MAXIMIZE else value


class RegularizedEvolution(ArchSampler):
    """Regularized (aging) evolution, Real et al., "Regularized evolution for image classifier architecture search"
    (AAAI 2019), with the multi-objective tournament usual in NAS benchmarks.

    The first ``population`` results come from uniformly random archs. Then the population is the ``population``
    most recently completed trials (the oldest die); ``sample_size`` of them, drawn without replacement as in the
    NAS-Bench-101 code, hold a tournament: the lowest non-dominated rank within the sample wins, then the largest
    crowding distance within its front, then chance (one objective: the best value). The winner's child changes one
    choice to another option, both uniformly at random, redrawn up to 100 times until it is an arch not proposed
    before.

    Args:
        choices: each choice's name and its options.
        seed: seed of the random state; the same seed and the same results give the same proposals.
        population: trials alive at once (P in the paper).
        sample_size: trials in each tournament (S in the paper).
    """

    def __init__(
        self,
        choices: Mapping[str, Sequence[Any]],
        seed: int | None = None,
        *,
        population: int = 50,
        sample_size: int = 10,
    ) -> None:
        if not 1 <= sample_size <= population:
            raise ValueError(f"1 <= sample_size <= population must hold, but got {sample_size=}, {population=}")
        super().__init__(choices, seed)
        self._population = population
        self._sample_size = sample_size

    def propose(self, history: History) -> Arch:
        # Failed trials are no members: the population fills with results, as in the paper's `while |P| < P`.
        if len(history.archs) < self._population:
            return self.fresh_arch(history.proposed)
        alive = np.arange(len(history.archs) - self._population, len(history.archs))
        sample = self._rng.choice(alive, size=self._sample_size, replace=False)
        parent = history.archs[sample[self.tournament(history.losses[sample])]]
        for _ in range(_RANDOM_ATTEMPTS):
            child = self.mutate(parent)
            if child not in history.proposed:
                break
        return child

    def tournament(self, losses: np.ndarray) -> int:
        """The winner's row: on the sample's front, the least crowded; a remaining tie is drawn at random."""
        best = front_indices(losses)
        if len(best) > 1:
            crowding = crowding_distance(losses[best])
            best = best[crowding == crowding.max()]
        return int(best[self._rng.randint(len(best))]) if len(best) > 1 else int(best[0])

    def mutate(self, parent: Arch) -> Arch:
        position = self._rng.randint(len(parent))
        option = int(self._rng.randint(self._sizes[position] - 1))
        if option >= parent[position]:
            option += 1  # any option but the parent's, each equally likely
        return parent[:position] + (option,) + parent[position + 1 :]


class ParetoLocalSearch(ArchSampler):
    """Local search, the baseline of White, Nolen & Savani, "Exploring the loss landscape in neural architecture
    search" (UAI 2021), in its multi-objective form: Pareto local search (Paquete, Chiarandini & Stuetzle, 2004).

    The first ``initial`` results come from uniformly random archs. Then a member of the current non-dominated
    front of COMPLETE trials (one objective: the best trial) that is not yet explored is drawn at random, and one
    of its neighbours (archs one choice away) not proposed before, also at random. A member is explored once all
    its neighbours were proposed; when all are, the search restarts from a uniformly random arch not proposed
    before. No arch is proposed twice before the space is exhausted.

    Args:
        choices: each choice's name and its options.
        seed: seed of the random state; the same seed and the same results give the same proposals.
        initial: random archs evaluated before the local search starts.
    """

    def __init__(self, choices: Mapping[str, Sequence[Any]], seed: int | None = None, *, initial: int = 10) -> None:
        if initial < 1:
            raise ValueError(f"initial >= 1 must hold (the search starts from a result), but got {initial=}")
        super().__init__(choices, seed)
        self._initial = initial

    def propose(self, history: History) -> Arch:
        if len(history.archs) < self._initial:
            return self.fresh_arch(history.proposed)
        unexplored = self.unexplored_front(history)
        if not unexplored:
            return self.fresh_arch(history.proposed)  # a restart: the whole front is explored
        candidates = unexplored[self._rng.randint(len(unexplored))]
        return candidates[self._rng.randint(len(candidates))]

    def unexplored_front(self, history: History) -> list[list[Arch]]:
        """For each front member not yet explored, its neighbours not yet proposed (members in completion order,
        an arch evaluated twice counted once)."""
        members = dict.fromkeys(history.archs[i] for i in front_indices(history.losses))
        open_neighbours = ([n for n in self.neighbours(member) if n not in history.proposed] for member in members)
        return [candidates for candidates in open_neighbours if candidates]
