"""Where trials run: Ray (default; one task per trial, whole devices) or locally in this process."""

from __future__ import annotations

from dsnas.executors.base import BaseExecutor, ClockHandler, Finished, RungHandler, TrialFn
from dsnas.executors.local import LocalExecutor
from dsnas.executors.ray_executor import RayExecutor
from dsnas.spec import StudySpec
from dsnas.worker import run_trial

__all__ = ["BaseExecutor", "ClockHandler", "TrialFn", "Finished", "RungHandler", "make_executor"]


def make_executor(spec: StudySpec, trial_fn: TrialFn = run_trial, on_rung: RungHandler | None = None,
                  on_clock: ClockHandler | None = None) -> BaseExecutor:
    """``on_clock``: what to do with the trials' clock events (trial_timeout_s counts by them, and the driver says
    a long wait for the measurement gate); a local executor runs one trial in the driver's own loop, which takes no
    time limit and says its own waits: it has none to send."""
    if spec.executor.kind == "local":
        return LocalExecutor(trial_fn, on_rung)
    return RayExecutor(spec.executor, spec.hardware.device, trial_fn, on_rung, on_clock, where=spec.path)
