"""Runs trials one at a time in this process: for debugging, and for a single-GPU machine without Ray."""

from __future__ import annotations

from dataclasses import replace

from dsnas.evaluate import EvalRequest, TrialResult, evaluate
from dsnas.executors.base import BaseExecutor, EvaluateFn, Finished, RungHandler
from dsnas.rungs import LocalChannel


class LocalExecutor(BaseExecutor):
    slots = 1

    def __init__(self, evaluate_fn: EvaluateFn = evaluate, on_rung: RungHandler | None = None) -> None:
        self._evaluate = evaluate_fn
        self._queue: list[EvalRequest] = []
        self._channel = LocalChannel(on_rung) if on_rung is not None else None

    def submit(self, request: EvalRequest) -> None:
        self._queue.append(replace(request, channel=self._channel) if request.rungs is not None else request)

    def wait(self, timeout: float) -> list[Finished]:
        if not self._queue:
            return []
        request = self._queue.pop(0)
        try:
            outcome: TrialResult | Exception = self._evaluate(request)
        except Exception as e:  # a failing candidate is a FAIL trial, not a failed search
            outcome = e
        return [(request.trial, outcome)]

    def cancel(self, trial: int) -> None:
        # A queued trial is dropped; a running one cannot be, as it runs inside wait() in this process (the
        # spec refuses trial_timeout_s with this executor for that reason).
        self._queue = [r for r in self._queue if r.trial != trial]

    def cancel_all(self) -> None:
        self._queue.clear()
