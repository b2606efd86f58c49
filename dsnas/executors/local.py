"""Runs trials one at a time in this process: for debugging, and for a single-GPU machine without Ray."""

from __future__ import annotations

from dsnas.evaluate import EvalRequest, TrialResult, evaluate
from dsnas.executors.base import BaseExecutor, EvaluateFn, Finished


class LocalExecutor(BaseExecutor):
    slots = 1

    def __init__(self, evaluate_fn: EvaluateFn = evaluate) -> None:
        self._evaluate = evaluate_fn
        self._queue: list[EvalRequest] = []
        self._current: EvalRequest | None = None  # so that an interrupt can report it

    def submit(self, request: EvalRequest) -> None:
        self._queue.append(request)

    def wait(self, timeout: float) -> list[Finished]:
        if not self._queue:
            return []
        request = self._current = self._queue.pop(0)
        try:
            outcome: TrialResult | Exception = self._evaluate(request)
        except Exception as e:  # a failing candidate is a FAIL trial, not a failed search
            outcome = e
        # Reached only when the trial ended: on Ctrl-C, _current stays set for cancel_all to report.
        self._current = None
        return [(request.trial, outcome)]

    def cancel_all(self) -> list[int]:
        numbers = [r.trial for r in ([self._current] if self._current else []) + self._queue]
        self._queue.clear()
        self._current = None
        return numbers
