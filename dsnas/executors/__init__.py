"""Where trials run: Ray (default; one task per trial, whole devices) or locally in this process."""

from __future__ import annotations

from dsnas.evaluate import evaluate
from dsnas.executors.base import BaseExecutor, EvaluateFn, Finished, RungHandler
from dsnas.spec import StudySpec

__all__ = ["BaseExecutor", "EvaluateFn", "Finished", "RungHandler", "make_executor"]


def make_executor(spec: StudySpec, evaluate_fn: EvaluateFn = evaluate,
                  on_rung: RungHandler | None = None) -> BaseExecutor:
    if spec.executor.kind == "local":
        from dsnas.executors.local import LocalExecutor

        return LocalExecutor(evaluate_fn, on_rung)
    from dsnas.executors.ray_executor import RayExecutor

    return RayExecutor(spec.executor, spec.hardware.device, evaluate_fn, on_rung)
