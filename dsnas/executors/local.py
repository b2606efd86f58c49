"""Runs trials one at a time in this process: for debugging, and for a single-GPU machine without Ray."""

from __future__ import annotations

from dataclasses import replace

from dsnas.executors.base import BaseExecutor, Finished, RungHandler, TrialFn
from dsnas.rungs import LocalChannel
from dsnas.trial import TrialRequest, TrialResult
from dsnas.worker import run_trial


class LocalExecutor(BaseExecutor):
    slots = 1

    def __init__(self, trial_fn: TrialFn = run_trial, on_rung: RungHandler | None = None) -> None:
        self._run_trial = trial_fn
        self._queue: list[TrialRequest] = []
        self._channel = LocalChannel(on_rung) if on_rung is not None else None

    def submit(self, request: TrialRequest) -> None:
        self._queue.append(replace(request, channel=self._channel) if request.rungs is not None else request)

    def wait(self, timeout: float) -> list[Finished]:
        if not self._queue:
            return []
        request = self._queue.pop(0)
        try:
            outcome: TrialResult | Exception = self._run_trial(request)
        except Exception as e:  # a failing candidate is a FAIL trial, not a failed search
            outcome = e
        return [(request.trial, outcome)]

    def cancel(self, trial: int) -> None:
        # A queued trial is dropped; a running one cannot be, as it runs inside wait() in this process (the
        # spec refuses trial_timeout_s with this executor for that reason).
        self._queue = [r for r in self._queue if r.trial != trial]

    def cancel_all(self) -> None:
        self._queue.clear()
