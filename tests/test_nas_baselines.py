"""benchmarks/nb201_model.py against NAS-Bench-201's published sizes, and benchmarks/nas_baselines.py (regularized
evolution, Pareto local search) on toy spaces whose true Pareto front is enumerated here."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def _load(name: str):
    # Loaded by path: benchmarks/ is no package, and putting it on sys.path would shadow names (kernels.py).
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


nb201_model = _load("nb201_model")
nas_baselines = _load("nas_baselines")
RegularizedEvolution, ParetoLocalSearch = nas_baselines.RegularizedEvolution, nas_baselines.ParetoLocalSearch

LARGEST = {edge: "nor_conv_3x3" for edge in nb201_model.EDGES}
EMPTY = {edge: "none" for edge in nb201_model.EDGES}


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _conv_bn(c_in: int, c_out: int, kernel: int) -> int:
    return c_in * c_out * kernel * kernel + 2 * c_out  # bias-free conv, BN's weight and bias


def test_the_largest_cell_has_the_parameters_of_its_layers_and_nas_bench_201s_published_count():
    c, n, classes = 16, 5, 10
    stem = _conv_bn(3, c, 3)
    cells = sum(n * 6 * _conv_bn(width, width, 3) for width in (c, 2 * c, 4 * c))  # six 3x3 edges a cell
    reductions = sum(_conv_bn(w, 2 * w, 3) + _conv_bn(2 * w, 2 * w, 3) + w * 2 * w for w in (c, 2 * c))  # + 1x1 shortcut
    head = 2 * 4 * c + 4 * c * classes + classes  # lastact BN, linear classifier
    expected = stem + cells + reductions + head
    assert _parameters(nb201_model.build({**LARGEST, "num_classes": classes})) == expected
    # The NAS-Bench-201 API's cost table (NAS-Bench-201-v1_0-e61699.pth, `get_cost_info(...)["params"]`) gives
    # 1.531546 M parameters for this arch on CIFAR-10, the largest of the space (0.073306 M the smallest).
    assert expected == 1_531_546


def test_a_cell_of_none_edges_still_runs_and_leaves_only_the_skeleton():
    model = nb201_model.build({**EMPTY, "num_classes": 10}).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert _parameters(model) == 73_306  # the smallest NAS-Bench-201 network on CIFAR-10, as published


def test_describe_writes_the_nas_bench_201_string_and_parse_reads_it_back():
    text = "|nor_conv_3x3~0|+|none~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_1x1~1|nor_conv_3x3~2|"
    arch = {"edge_1_0": "nor_conv_3x3", "edge_2_0": "none", "edge_2_1": "avg_pool_3x3",
            "edge_3_0": "skip_connect", "edge_3_1": "nor_conv_1x1", "edge_3_2": "nor_conv_3x3"}
    assert nb201_model.describe(arch) == nb201_model.arch_string(arch) == text
    assert nb201_model.parse(text) == arch
    assert nb201_model.describe({**arch, "channels": 32}) == text + " channels=32"


@pytest.mark.parametrize(("change", "key"), [
    ({"edge_2_1": None}, "edge_2_1"),
    ({"edge_3_0": "max_pool_3x3"}, "edge_3_0"),
    ({"channels": 0}, "channels"),
])
def test_validate_names_the_bad_key(change, key):
    arch = {k: v for k, v in {**LARGEST, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=key):
        nb201_model.validate(arch)


# A toy space of 4**5 = 1024 archs with two objectives, where locality helps: each choice moves "accuracy" on its
# own (separable), and only the first two choices cost "latency". Its front is the 7 archs with c2..c4 = 3.
CHOICES = {f"c{i}": [0, 1, 2, 3] for i in range(5)}
DIRECTIONS = ["maximize", "minimize"]
SPACE = list(itertools.product(*CHOICES.values()))


def _toy(arch: tuple[int, ...]) -> tuple[float, float]:
    accuracy = 100.0 - sum((i + 1) * (3 - option) ** 2 for i, option in enumerate(arch))
    latency = 1.0 + arch[0] + arch[1]
    return accuracy, latency


def _toy_objective(trial: optuna.Trial) -> tuple[float, float]:
    return _toy(tuple(trial.suggest_categorical(name, options) for name, options in CHOICES.items()))


def _dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] >= b[0] and a[1] <= b[1] and a != b


def _front(archs) -> set[tuple[int, ...]]:
    archs = set(archs)
    return {a for a in archs if not any(_dominates(_toy(b), _toy(a)) for b in archs)}


TRUE_FRONT = _front(SPACE)


def _arch(trial: optuna.trial.FrozenTrial) -> tuple[int, ...]:
    return tuple(trial.params[name] for name in CHOICES)


def _one_apart(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return sum(x != y for x, y in zip(a, b)) == 1


def _search(sampler: optuna.samplers.BaseSampler, n_trials: int, objective=_toy_objective, stop=None) -> list:
    study = optuna.create_study(directions=DIRECTIONS, sampler=sampler)
    callbacks = [lambda study, trial: study.stop() if stop and stop(study) else None]
    study.optimize(objective, n_trials=n_trials, callbacks=callbacks)
    return study.trials


def _front_found(study: optuna.Study) -> bool:
    return TRUE_FRONT <= {_arch(t) for t in study.get_trials(deepcopy=False)}


@pytest.fixture(autouse=True)
def _quiet_optuna():
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(verbosity)


def test_the_toy_front_is_what_its_objectives_say():
    assert TRUE_FRONT == {(0, 0, 3, 3, 3), (0, 1, 3, 3, 3), (0, 2, 3, 3, 3), (1, 2, 3, 3, 3), (2, 2, 3, 3, 3),
                          (2, 3, 3, 3, 3), (3, 3, 3, 3, 3)}


def test_the_tournament_prefers_the_front_then_the_least_crowded():
    losses = np.array([[0.0, 4.0], [1.0, 2.0], [2.0, 1.0], [4.0, 0.0], [3.0, 3.0]])  # the last is dominated
    # Deb's crowding distance over the front: the extremes are infinitely far, (2 - 0)/4 + (4 - 1)/4 = 1.25 and
    # (4 - 1)/4 + (2 - 0)/4 = 1.25 the middle ones.
    assert nas_baselines.crowding_distance(losses[:4]).tolist() == [np.inf, 1.25, 1.25, np.inf]
    sampler = RegularizedEvolution(CHOICES, seed=0, population=5, sample_size=5)
    assert {sampler.tournament(losses) for _ in range(50)} == {0, 3}  # an extreme, either one by chance
    assert sampler.tournament(losses[1:]) in {0, 2}  # [1, 2] and [4, 0] are now the extremes
    assert RegularizedEvolution(CHOICES, seed=0).tournament(np.array([[3.0], [1.0], [2.0]])) == 1  # one objective


def test_regularized_evolution_mutates_one_choice_of_a_living_result():
    population = 10
    trials = _search(RegularizedEvolution(CHOICES, seed=0, population=population, sample_size=5), 120)
    for i in range(population, len(trials)):
        alive = [_arch(t) for t in trials[i - population:i]]  # the `population` most recent results
        assert any(_one_apart(_arch(trials[i]), parent) for parent in alive), f"trial {i} is no child of the living"
    assert len({_arch(t) for t in trials}) == len(trials)  # its retries found an unproposed child every time


def test_pareto_local_search_steps_from_the_front_and_never_repeats_an_arch():
    choices = {"a": [0, 1, 2, 3], "b": [0, 1, 2, 3], "c": [0, 1, 2, 3]}  # 64 archs, searched to exhaustion

    def objective(trial):
        return _toy((*(trial.suggest_categorical(name, options) for name, options in choices.items()), 3, 3))

    initial = 5
    trials = _search(ParetoLocalSearch(choices, seed=1, initial=initial), 64 + 3, objective)
    archs = [tuple(t.params[name] for name in choices) for t in trials]
    assert set(archs[:64]) == set(itertools.product(range(4), repeat=3))  # every arch once before any repeat
    sampler = ParetoLocalSearch(choices)  # only for its neighbours
    restarts = 0
    for i in range(initial, 64):
        front = {a for a in archs[:i] if not any(_dominates(_toy((*b, 3, 3)), _toy((*a, 3, 3))) for b in archs[:i])}
        if any(archs[i] in sampler.neighbours(member) for member in front):
            continue
        assert all(set(sampler.neighbours(member)) <= set(archs[:i]) for member in front), f"trial {i} left the front"
        restarts += 1
    assert restarts > 0  # the front of the explored part moves on, and so, once explored, must the search


def test_a_running_trial_counts_as_proposed():
    choices = {"a": ["x", "y"], "b": ["x", "y"]}
    for sampler in (RegularizedEvolution(choices, seed=0, population=1, sample_size=1),
                    ParetoLocalSearch(choices, seed=0, initial=1)):
        study = optuna.create_study(sampler=sampler)
        running = [study.ask() for _ in range(4)]  # none completes: each proposal must avoid the others
        archs = {tuple(t.suggest_categorical(name, options) for name, options in choices.items()) for t in running}
        assert len(archs) == 4


@pytest.mark.parametrize("make", [
    lambda seed: RegularizedEvolution(CHOICES, seed, population=10, sample_size=5),
    lambda seed: ParetoLocalSearch(CHOICES, seed, initial=5),
], ids=["regularized_evolution", "pareto_local_search"])
def test_a_seed_fixes_every_proposal(make: Callable[[int], optuna.samplers.BaseSampler]):
    def objective(trial):
        trial.suggest_float("dropout", 0.0, 0.5)  # outside the choices: the sampler's independent draw
        return _toy_objective(trial)

    def proposals(seed):
        return [t.params for t in _search(make(seed), 40, objective)]

    assert proposals(3) == proposals(3)
    assert proposals(3) != proposals(4)


@pytest.mark.parametrize(("make", "budget"), [
    (lambda seed: RegularizedEvolution(CHOICES, seed, population=20, sample_size=10), len(SPACE) // 2),
    (lambda seed: ParetoLocalSearch(CHOICES, seed), len(SPACE) // 5),
], ids=["regularized_evolution", "pareto_local_search"])
def test_the_whole_true_front_is_found_in_a_fraction_of_the_space(make, budget):
    # Random search without repeats needs on average 1024 * 7/8 = 896 trials to meet all 7 front members; over
    # seeds 0-19, evolution needed 103-397 trials (median 244) and local search 70-140 (median 91).
    for seed in range(3):
        trials = _search(make(seed), budget, stop=_front_found)
        assert TRUE_FRONT <= {_arch(t) for t in trials}, f"seed {seed}: front not found in {budget} trials"


@pytest.mark.parametrize("make", [
    lambda seed: RegularizedEvolution(CHOICES, seed, population=20, sample_size=10),
    lambda seed: ParetoLocalSearch(CHOICES, seed),
], ids=["regularized_evolution", "pareto_local_search"])
def test_one_objective_climbs_to_the_best_arch(make):
    study = optuna.create_study(direction="maximize", sampler=make(0))
    best = (3, 3, 3, 3, 3)
    study.optimize(lambda trial: _toy_objective(trial)[0], n_trials=len(SPACE) // 5,
                   callbacks=[lambda study, trial: study.stop() if _arch(trial) == best else None])
    assert _arch(study.best_trial) == best
    assert np.isclose(study.best_value, 100.0)
