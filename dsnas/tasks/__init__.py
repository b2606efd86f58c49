"""Proxy training tasks: a dataset plus its train and evaluation loops. Built-in tasks are named; a user task is
"module:callable" returning an object with the methods of :class:`Task` (dsnas builds, trains and measures the
model), or of :class:`RunsOwnTrials` (the task's ``evaluate_arch`` does the whole trial)."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Any, Protocol

from dsnas.config import build_section
from dsnas.errors import SpecError
from dsnas.plugins import import_callable, new_run

BUILTIN_TASKS = ("charlm", "images")
# The architecture keys each built-in task fixes (its arch_defaults()), known without loading its data.
BUILTIN_ARCH_KEYS = {"charlm": ("vocab_size", "context"), "images": ("image_size", "channels", "n_classes")}


class Task(Protocol):
    """What dsnas calls on a task that trains the candidates dsnas builds. Required: everything below. Optional,
    looked up with getattr or by signature, so that a task written before they existed still runs:

    - ``train(..., fraction=, lr_scale=, fallback_steps=)``: the engine's fine-tuning and QAT train on ``fraction``
      of the budget at ``lr_scale`` times the learning rate; low-precision layers fall back to fp32 for
      ``fallback_steps`` steps after an overflow. A candidate with sparse or int8 layers needs fraction and
      lr_scale, and :class:`EngineTask`'s ``batches`` and ``loss``.
    - ``train(..., rungs=, at_rung=)``: multi-fidelity; train() calls ``at_rung(k)`` after the share ``rungs[k-1]``
      of its budget, and at_rung raises to stop it there. Without them, a trial trains fully and no rung stops it.
    - ``count_arch(arch, batch_sizes)``: as :class:`RunsOwnTrials`' (the predictor's FLOPs, bytes and params).
    - ``eval_inputs() -> (inputs, targets)``: every validation input and its target, as evaluate() scores them;
      `dsnas route` needs it (its thresholds are chosen on half of them, its accuracy reported on the other half).
    - ``throughput_unit``, a class attribute: what throughput counts, in words (e.g. "images/s"; "items/s" when
      absent), for tables and plots.
    - ``tokens_per_example``: what throughput counts per example (tokens for a language model; 1 when absent).
    """

    def arch_defaults(self) -> dict[str, Any]:
        """Architecture keys the task fixes (vocabulary, context length)."""

    def train(self, model: Any, device: Any, *, seed: int, checkpoint: Callable[[], None]) -> dict[str, float]:
        """Train in place within the task's fixed budget; call ``checkpoint()`` between steps."""

    def evaluate(self, model: Any, device: Any) -> dict[str, float]:
        """Validation metrics; must include ``accuracy``."""

    def example_batch(self, batch_size: int, device: Any) -> Any:
        """A deterministic input batch of this size, one tensor, used for measuring and for the export probe."""

    def fingerprint(self) -> dict[str, Any]:
        """What data the task used, so that results are comparable."""


class EngineTask(Task, Protocol):
    """A task that can fine-tune and calibrate the engine's sparse and int8 layers (dsnas.kernels.pipeline)."""

    def batches(self, n: int, device: Any, seed: int = 0) -> list[tuple[Any, Any]]:
        """``n`` (input, target) training batches: calibration and the Hessian estimates read them."""

    def loss(self, model: Any, x: Any, y: Any) -> Any:
        """The training loss of ``model`` on one batch, a scalar tensor that backward() can run through."""


class RunsOwnTrials(Protocol):
    """A task that evaluates architectures itself: dsnas builds no model and measures nothing; the function returns
    the trial's metrics (trained and measured its own way, or looked up in a table of recorded results). That is
    enough to run a search, multi-fidelity included, and benchmarks/search_efficiency.py on a table of one's own.

    ``evaluate_arch`` returns every objective and limit the study names (``accuracy``, ``throughput_tok_s``,
    ``latency_ms``, ...) and, for the profile, ``latency_ms_bsN`` per batch size (with ``flops_bsN``, ``bytes_bsN``,
    ``peak_memory_mb_bsN`` where known). With ``rungs`` (shares of the training budget; empty without them) it calls
    ``report(0, hardware_metrics)`` before training and ``report(k, metrics)`` after share ``rungs[k - 1]``;
    ``report`` raises when the driver stops the trial, and the trial is PRUNED. Optional: ``count_arch``, and
    ``hardware(arch)``: the figures known before training (a table's recorded latency), which dsnas's sampler takes
    as they are instead of modelling them.
    """

    def arch_defaults(self) -> dict[str, Any]:
        """Architecture keys the task fixes (may be {})."""

    def fingerprint(self) -> dict[str, Any]:
        """What the results are of (data, table, device)."""

    def evaluate_arch(self, arch: dict[str, Any], *, seed: int, rungs: tuple[float, ...],
                      report: Callable[[int, dict[str, float]], None]) -> dict[str, float]:
        """The trial's metrics."""

    def count_arch(self, arch: dict[str, Any], batch_sizes: tuple[int, ...]) -> dict[str, float]:
        """Optional: ``flops_bsN``, ``bytes_bsN`` and ``params`` of an architecture, before it trains."""

    def hardware(self, arch: dict[str, Any]) -> dict[str, float]:
        """Optional: the figures of an architecture known before it trains (``latency_ms``, ...), cheaply: dsnas's
        sampler asks it of thousands of candidates."""


THROUGHPUT_UNITS = {"charlm": "tokens/s", "images": "images/s"}


def throughput_unit(spec: Any) -> str:
    """What throughput counts per second, in words: a built-in task's unit, or a user task class's
    ``throughput_unit`` (e.g. "snippets/s"); "items/s" when it does not say."""
    if spec.name in THROUGHPUT_UNITS:
        return THROUGHPUT_UNITS[spec.name]
    try:
        factory = import_callable(spec.name, spec.base_dir)
    except Exception:  # a label is never worth an error: the study's checks report an unimportable task
        return "items/s"
    unit = getattr(factory, "throughput_unit", None)
    return unit if isinstance(unit, str) and unit else "items/s"


def rung_support(spec: Any) -> str:
    """'' when the task can stop a candidate part-way through training (its train() takes ``rungs=`` and
    ``at_rung=``, or it evaluates architectures itself and reports rungs), else why not, in words. Read from the
    task's class, without building it."""
    if spec.name in BUILTIN_TASKS:
        return ""
    try:
        factory = import_callable(spec.name, spec.base_dir)
    except Exception:  # the study's checks report an unimportable task
        return ""
    if callable(getattr(factory, "evaluate_arch", None)) or not callable(getattr(factory, "train", None)):
        return ""  # its own evaluation function reports rungs, or a factory function: not known before it runs
    params = inspect.signature(factory.train).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) or {"rungs", "at_rung"} <= set(params):
        return ""
    return "the task's train() takes no rungs= and at_rung="


# Where a task's data lives (a fingerprint's path): a study folder moved whole holds the same data, which the
# fingerprint's hash says.
LOCATION_KEYS = ("dataset", "corpus")


def data_differs(then: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The keys in which two task fingerprints differ, each as stored (JSON: a tuple is a list, a dict's keys are
    strings; a fingerprint of tuples differed from itself stored), leaving out where the data lives when both
    record its hash (``*_sha256``): the same bytes moved with their study are the same data; and a key a later
    dsnas added (LATER_KEYS) where the older fingerprint has none."""
    then, now = _as_stored(then), _as_stored(now)
    keys = sorted(set(then) | set(now))
    hashed = any(k.endswith("_sha256") and then.get(k) is not None and k in now for k in keys)
    return [k for k in keys if then.get(k) != now.get(k) and not (hashed and k in LOCATION_KEYS)
            and not (k in LATER_KEYS and k not in then)]


def _as_stored(fingerprint: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(fingerprint, default=str))


# Fingerprint keys a later dsnas added: "folder_reader", how an image folder is read (dsnas.tasks.images).
LATER_KEYS = ("folder_reader",)


def runs_own_trials(task: Any) -> bool:
    return callable(getattr(task, "evaluate_arch", None))


def builtin_defaults(name: str) -> dict[str, Any]:
    """A built-in task's parameters as they are when the study file leaves them out; {} for another task."""
    import dataclasses

    if name == "charlm":
        from dsnas.tasks.charlm import CharLMConfig as config  # torch loads on first use
    elif name == "images":
        from dsnas.tasks.images import ImagesConfig as config  # torch loads on first use
    else:
        return {}
    return {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}


def check_params(where: str, spec: Any) -> None:
    """Validate a task's parameters before any work (bad names, types, ranges, missing files)."""
    if spec.name == "charlm":
        from dsnas.tasks.charlm import CharLMConfig  # torch loads on first use

        config = build_section(where, "task", CharLMConfig, spec.params)
        config.resolve_corpus(spec.base_dir, where)
        return
    if spec.name == "images":
        from dsnas.tasks.images import ImagesConfig  # torch loads on first use

        config = build_section(where, "task", ImagesConfig, spec.params)
        config.resolve_dataset(spec.base_dir, where)
        return

    for key, value in spec.params.items():
        found = _unstorable(value, key)
        if found is not None:  # a TOML date or time: the parameters are stored with each trial and bundle as JSON
            at, bad = found
            raise SpecError(where, f"task.{at}", "must be a string, number, boolean or a list or table of them "
                            f"(it is stored with the study and its bundles), not a TOML {type(bad).__name__}",
                            str(bad), f'quote it: "{bad}"')
    factory = import_callable(spec.name, spec.base_dir)
    try:
        inspect.signature(factory).bind(**spec.params)
    except ValueError:  # a builtin without a signature: its parameters cannot be checked before the run
        return
    except TypeError as e:
        raise SpecError(where, "task", f"the parameters must fit {spec.name}{inspect.signature(factory)} ({e})",
                        sorted(spec.params), f"give [task] only the parameters {spec.name} takes") from None


def _unstorable(value: Any, at: str) -> tuple[str, Any] | None:
    """(where, the value) of the first value inside ``value`` that JSON cannot store, or None."""
    if isinstance(value, dict):
        return next((found for k, v in value.items() if (found := _unstorable(v, f"{at}.{k}"))), None)
    if isinstance(value, list):
        return next((found for i, v in enumerate(value) if (found := _unstorable(v, f"{at}[{i}]"))), None)
    return None if value is None or isinstance(value, (str, int, float, bool)) else (at, value)


def check_task(where: str, spec: Any) -> None:
    """Build a user's task (once per run: the driver then takes this one) and check that it has what dsnas
    calls, before any trial trains: a missing method or a fingerprint that cannot be stored failed each trial after
    it had trained, or stopped the search with a traceback. A task that fails is not kept: the next run in this
    process builds it again (from the fixed factory), where it kept refusing the one it had built."""
    try:
        _check_task(where, spec)
    except BaseException:
        forget_built()
        raise


def _check_task(where: str, spec: Any) -> None:
    try:
        task = make_task(spec)
    except Exception as e:  # whatever the user's factory raises
        detail = " ".join(str(e).splitlines())
        raise SpecError(where, "task.name", f"the factory must build the task ({type(e).__name__}: {detail})",
                        spec.name, "fix the factory or the [task] parameters it was given") from None
    own = runs_own_trials(task)
    needs = ("arch_defaults", "fingerprint", *(() if own else ("train", "evaluate", "example_batch")))
    missing = [name for name in needs if not callable(getattr(task, name, None))]
    protocol = "RunsOwnTrials" if own else "Task"
    if missing:
        raise SpecError(where, "task.name", f"the task must have the methods of dsnas.tasks.{protocol} "
                        f"({', '.join(needs)}); {type(task).__name__} has no {', '.join(missing)}", spec.name,
                        "add them (docs/own-model.md)")
    defaults = task.arch_defaults()
    if not isinstance(defaults, dict):
        raise SpecError(where, "task.name", f"the task's arch_defaults() must return a dict, got "
                        f"{type(defaults).__name__}", spec.name, "return {} when the task fixes no architecture key")
    fingerprint = task.fingerprint()
    try:
        json.dumps(fingerprint, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise SpecError(where, "task.name", f"the task's fingerprint() must return JSON values (str, int, float, "
                        f"bool, lists and dicts of them), to be stored with each trial ({e})", spec.name,
                        "convert them, e.g. int(labels.sum()) for a numpy number, str(path) for a path") from None
    if not isinstance(fingerprint, dict):
        raise SpecError(where, "task.name", f"the task's fingerprint() must return a dict, got "
                        f"{type(fingerprint).__name__}", spec.name, 'return e.g. {"data": "my.csv", "rows": 1000}')
    try:
        preprocessing_of(task)
    except ValueError as e:
        raise SpecError(where, "task.name", f"the task's preprocessing() {e}", spec.name,
                        'return e.g. {"input": "(N, 3, 32, 32) float32 in [0, 1]", "mean": [0.5, 0.5, 0.5], '
                        '"std": [0.2, 0.2, 0.2], "classes": ["cat", "dog"]}') from None


def preprocessing_of(task: Any) -> dict[str, Any] | None:
    """What the task does to an input before the model sees it, where it says (its optional ``preprocessing()``):
    recorded with each trial, then in an exported bundle and its card. ValueError names the rule it breaks."""
    say = getattr(task, "preprocessing", None)
    if not callable(say):
        return None
    found = say()
    if found is None:
        return None
    if not isinstance(found, dict):
        raise ValueError(f"must return a dict or None, got {type(found).__name__}")
    try:
        json.dumps(found, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"must return JSON values ({e})") from None
    if not isinstance(found.get("input", ""), str):
        raise ValueError(f"'input' must be a sentence (a str), got {type(found['input']).__name__}")
    for key in ("mean", "std"):
        if key in found and not (isinstance(found[key], list) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in found[key])):
            raise ValueError(f"{key!r} must be a list of numbers, one per channel, got {found[key]!r}")
    if "classes" in found and not (isinstance(found["classes"], list) and all(isinstance(c, str)
                                                                              for c in found["classes"])):
        raise ValueError(f"'classes' must be a list of names (str), output index i the i-th, got "
                         f"{type(found['classes']).__name__}")
    return found


def arch_keys(spec: Any) -> tuple[str, ...]:
    """The architecture keys a task fixes: a built-in task's without loading its data, a user's from the task
    itself (built once per process, check_task has)."""
    if spec.name in BUILTIN_ARCH_KEYS:
        return BUILTIN_ARCH_KEYS[spec.name]
    return tuple(make_task(spec).arch_defaults())


def make_task(spec: Any) -> Task | RunsOwnTrials:
    """Build (once per run: see forget_built) the task a study names."""
    key = (spec.name, json.dumps(spec.params, sort_keys=True), spec.base_dir)
    if key not in _built:
        while len(_built) >= MAX_BUILT:
            del _built[next(iter(_built))]
        _built[key] = _build(spec.name, dict(spec.params), spec.base_dir)
    return _built[key]


# Tasks built in this process: the driver, the study's checks and a local executor's workers take the same one
# (building reads and encodes the data). Kept for one run only (forget_built): a second dsnas.search in the same
# process read the data as the first had, after the corpus on disk changed, so the data check let it mix them.
_built: dict[tuple[str, str, str], Any] = {}
MAX_BUILT = 4


def forget_built() -> None:
    """Build each task anew from its data and code as they are now: at the start of a run, and after a task failed
    its checks (a fixed factory or data is then used)."""
    _built.clear()
    new_run()  # the study folders' modules are imported afresh too


def _build(name: str, params: dict[str, Any], base_dir: str) -> Task | RunsOwnTrials:
    if name == "charlm":
        from dsnas.tasks.charlm import CharLMConfig, CharLMTask  # torch loads on first use

        return CharLMTask(CharLMConfig(**params), base_dir)
    if name == "images":
        from dsnas.tasks.images import ImagesConfig, ImagesTask  # torch loads on first use

        return ImagesTask(ImagesConfig(**params), base_dir)

    return import_callable(name, base_dir)(**_beside_study(params, base_dir))


def _beside_study(params: dict[str, Any], base_dir: str) -> dict[str, Any]:
    """A user factory's [task] strings that name a file or folder beside the study file, as paths there: relative
    paths are the study file's, as everywhere in it (the factory opened them from the folder dsnas was started in,
    and read another data.txt there without a word)."""
    import os

    def placed(value: Any) -> Any:
        if isinstance(value, str) and value and not os.path.isabs(value) and base_dir \
                and os.path.exists(os.path.join(base_dir, value)):
            return os.path.join(base_dir, value)
        return value

    return {key: placed(value) for key, value in params.items()}
