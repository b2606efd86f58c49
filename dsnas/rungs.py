"""The line from a trial's worker to the driver at each rung: the worker reports its figures and waits; the driver
records them and answers whether the trial goes on (see dsnas.fidelity). The same line carries the trial's clock
(when it started, when it waits for another trial), which trial_timeout_s counts by. In-process for the local
executor; a small asyncio Ray actor for Ray, so that a trial's rungs run in one worker while the decision stays the
driver's."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RungReport:
    trial: int
    rung: int  # 0: measured before training; k >= 1: after the k-th rung's share of the training budget
    fraction: float  # share of the training budget done
    metrics: dict[str, float]


@dataclass(frozen=True)
class ClockEvent:
    """What a worker tells the driver about its trial's own running time (trial_timeout_s): it ``started`` on its
    worker (time queued before is not its own), or is ``waiting`` for another trial (the measurement gate) or
    ``running`` again; ``ran_s``: its own running time then, as the worker counted it (the driver read the events
    late while it was busy, and counted a wait between two of them as running); ``seq``: their order."""

    trial: int
    event: str
    ran_s: float = 0.0
    seq: int = 0


class RungStop(Exception):
    """Raised in the worker when the driver stops its trial at a rung; the worker returns a pruned result."""

    def __init__(self, report: RungReport) -> None:
        super().__init__(f"stopped at rung {report.rung}")
        self.report = report


class RungChannel(abc.ABC):
    @abc.abstractmethod
    def ask(self, report: RungReport) -> bool:
        """Tell the driver, wait for its answer: True when the trial goes on."""

    def clock(self, event: ClockEvent) -> None:
        """Tell the driver without waiting (the local executor's driver runs the trial itself: nothing to tell)."""


class LocalChannel(RungChannel):
    """The driver's decision called directly: the local executor runs the trial inside the driver's own loop."""

    def __init__(self, decide: Callable[[RungReport], bool]) -> None:
        self._decide = decide

    def ask(self, report: RungReport) -> bool:
        return self._decide(report)


class RayChannel(RungChannel):
    """A worker's side of the rung board (a Ray actor handle pickles into the task's arguments)."""

    def __init__(self, board: Any) -> None:
        self._board = board

    def ask(self, report: RungReport) -> bool:
        import ray

        return bool(ray.get(self._board.ask.remote(report)))

    def clock(self, event: ClockEvent) -> None:
        self._board.clock.remote(event)  # not waited for: the trial goes on at once


class RungBoard:
    """The Ray actor between workers and the driver (every method async: one event loop, no locks). Workers
    ``ask`` and wait, or tell the ``clock``; the driver long-polls ``take`` and ``answer``s each report."""

    def __init__(self) -> None:
        self._reports: list[RungReport | ClockEvent] = []
        self._waiting: dict[tuple[int, int], asyncio.Future[bool]] = {}
        self._new = asyncio.Event()

    async def ask(self, report: RungReport) -> bool:
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting[(report.trial, report.rung)] = answer
        self._reports.append(report)
        self._new.set()
        return await answer

    async def clock(self, event: ClockEvent) -> None:
        self._reports.append(event)
        self._new.set()

    async def take(self, timeout_s: float) -> list[RungReport | ClockEvent]:
        """The reports and clock events not yet taken, in the order they came, waiting up to ``timeout_s``."""
        if not self._reports:
            try:
                await asyncio.wait_for(self._new.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        taken, self._reports = self._reports, []
        self._new.clear()
        return taken

    async def answer(self, trial: int, rung: int, go: bool) -> None:
        waiting = self._waiting.pop((trial, rung), None)
        if waiting is not None and not waiting.done():
            waiting.set_result(go)


def start_board(ray: Any) -> Any:
    """The rung board of this driver: no CPU of its own (it only passes messages), never restarted (the driver
    owns it; a board that died with its answers is a failed trial, not a silent re-run)."""
    return ray.remote(num_cpus=0, max_restarts=0)(RungBoard).remote()
