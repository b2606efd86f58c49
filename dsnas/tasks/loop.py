"""The training loop the built-in tasks share: AdamW with a linear warm-up and cosine decay to a tenth (the same
schedule shape for every budget), the engine's training step (loss scaling, per-layer fp32 fallback after an
overflow), the driver's rungs and the worker's checkpoints between steps."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from dsnas.errors import TrialError
from dsnas.kernels.precision import TrainStep


def train_steps(model: Any, steps: int, next_batch: Callable[[], tuple[Any, Any]], loss: Callable[[Any, Any], Any],
                *, lr: float, warmup_frac: float, fallback_steps: int, checkpoint: Callable[[], None],
                rungs: Sequence[float] = (), at_rung: Callable[[int], None] | None = None) -> tuple[float, int]:
    """Train ``model`` in place for ``steps`` steps; returns (the mean loss of the last 10 steps taken, the steps
    skipped for an overflow). After the share ``rungs[k]`` of the steps, ``at_rung(k)`` is called (it raises to
    stop the training). A loss that diverges, or every step overflowing, is a TrialError."""
    rung_steps = [max(1, math.ceil(share * steps - 1e-9)) for share in rungs]
    warmup = max(1, int(steps * warmup_frac))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.1 + 0.45 * (
        1 + math.cos(math.pi * max(0, s - warmup) / max(1, steps - warmup)))))
    model.train()
    step = TrainStep(model, opt, fallback_steps=fallback_steps)
    recent: list[float] = []
    try:
        for done in range(1, steps + 1):
            value = loss(*next_batch())
            if step.step(value):
                sched.step()
                recent = (recent + [value.item()])[-10:]
            elif step.diverged():
                raise TrialError(f"training diverged: the loss became {value.item()}")
            checkpoint()
            while at_rung is not None and rung_steps and rung_steps[0] <= done:
                at_rung(len(rungs) - len(rung_steps))
                rung_steps.pop(0)
    finally:
        step.close()
    if not recent:
        raise TrialError(f"training diverged: all {steps} steps overflowed")
    return sum(recent) / len(recent), step.skipped
