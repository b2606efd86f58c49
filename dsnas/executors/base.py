"""What the driver needs from a place that runs trials: submit a request, wait for finished ones."""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

from dsnas.rungs import ClockEvent, RungReport
from dsnas.trial import TrialFn, TrialRequest, TrialResult

__all__ = ["BaseExecutor", "ClockHandler", "Finished", "RungHandler", "TrialFn"]
# A finished trial: its number, and its result or the reason it failed.
Finished = tuple[int, TrialResult | BaseException]
# The driver's answer to a trial at a rung: True when it goes on. Executors call it from wait(), on the driver's
# thread, so that the driver alone writes the study.
RungHandler = Callable[[RungReport], bool]
# What the driver does with a worker's clock event (trial_timeout_s counts the trial's own running time by them).
ClockHandler = Callable[[ClockEvent], None]


class BaseExecutor(abc.ABC):
    slots: int  # how many trials may run at once

    @abc.abstractmethod
    def submit(self, request: TrialRequest) -> None:
        """Start a trial (or queue it); returns at once."""

    @abc.abstractmethod
    def wait(self, timeout: float) -> list[Finished]:
        """Trials that finished, waiting up to ``timeout`` seconds for at least one; rung reports that arrive
        meanwhile are answered through the executor's RungHandler."""

    @abc.abstractmethod
    def cancel_all(self) -> None:
        """Stop every unfinished trial (the driver fails them)."""

    @abc.abstractmethod
    def cancel(self, trial: int) -> None:
        """Stop one trial and reclaim its worker (the driver fails it)."""

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` run once where the trials run, with a trial's resources (the engine probe); its result."""
        return fn(*args)

    def lost_worker(self, error: BaseException) -> bool:
        """Whether ``error`` says the trial's worker died (a crash, an out-of-memory kill, a lost node), so that
        running the trial again may succeed; the candidate's own exceptions say no."""
        return False

    def close(self) -> None:
        """Release what the executor started."""
