"""Proxy training tasks: a dataset plus its train and evaluation loops. Built-in tasks are named;
a user task is "module:callable" returning an object with the methods of :class:`Task`."""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from typing import Any, Protocol

from dsnas.errors import SpecError

BUILTIN_TASKS = ("charlm",)


class Task(Protocol):
    tokens_per_example: int  # what "throughput" counts per example (tokens for a language model)

    def arch_defaults(self) -> dict[str, Any]:
        """Architecture keys the task fixes (vocabulary, context length)."""

    def train(self, model: Any, device: Any, *, seed: int, checkpoint: Callable[[], None]) -> dict[str, float]:
        """Train in place within the task's fixed budget; call ``checkpoint()`` between steps."""

    def evaluate(self, model: Any, device: Any) -> dict[str, float]:
        """Validation metrics; must include ``accuracy``."""

    def example_batch(self, batch_size: int, device: Any) -> Any:
        """A deterministic input batch of this size, used for measuring and for the export probe."""

    def fingerprint(self) -> dict[str, Any]:
        """What data the task used, so that results are comparable."""


def check_params(where: str, spec: Any) -> None:
    """Validate a task's parameters before any work (bad names, types, ranges, missing files)."""
    if spec.name == "charlm":
        from dsnas.config import build_section
        from dsnas.tasks.charlm import CharLMConfig

        config = build_section(where, "task", CharLMConfig, spec.params)
        config.resolve_corpus(spec.base_dir, where)
        return
    from dsnas.plugins import import_callable

    factory = import_callable(spec.name, spec.base_dir)
    try:
        inspect.signature(factory).bind(**spec.params)
    except ValueError:  # a builtin without a signature: its parameters cannot be checked before the run
        return
    except TypeError as e:
        raise SpecError(where, "task", f"the parameters must fit {spec.name}{inspect.signature(factory)} ({e})",
                        sorted(spec.params), f"give [task] only the parameters {spec.name} takes") from None


def make_task(spec: Any) -> Task:
    """Build (once per process) the task a study names."""
    return _cached(spec.name, json.dumps(spec.params, sort_keys=True), spec.base_dir)


@functools.lru_cache(maxsize=4)
def _cached(name: str, params_json: str, base_dir: str) -> Task:
    params = json.loads(params_json)
    if name == "charlm":
        from dsnas.tasks.charlm import CharLMConfig, CharLMTask

        return CharLMTask(CharLMConfig(**params), base_dir)
    from dsnas.plugins import import_callable

    return import_callable(name, base_dir)(**params)
