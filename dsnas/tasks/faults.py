"""A task that injects one fault into charlm's training, for testing that a search survives it (and for
benchmarks/reliability.py): use `[task] name = "dsnas.tasks.faults:faulty_charlm"` with `fault` and `marker`."""

from __future__ import annotations

import os
import time
from typing import Any

FAULTS = ("crash_once", "hang_once", "diverge_once")


def faulty_charlm(fault: str, marker: str, **params: Any) -> Any:
    """charlm, whose first train() call in this study (the ``marker`` file does not exist yet) fails:
    ``crash_once`` kills its process as SIGKILL or an out-of-memory kill would, ``hang_once`` never returns,
    ``diverge_once`` raises as a NaN loss does. Later calls train normally."""
    from dsnas.errors import TrialError
    from dsnas.tasks.charlm import CharLMConfig, CharLMTask

    if fault not in FAULTS:
        raise ValueError(f"fault must be one of {FAULTS}, got {fault!r}")
    task = CharLMTask(CharLMConfig(**params), os.path.dirname(marker))
    train = task.train

    def faulty_train(model: Any, device: Any, *, seed: int, checkpoint: Any) -> dict[str, float]:
        first = _claim(marker + ".claimed")
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\n")  # who took the fault: a test checks that the process is gone
        if first and fault == "crash_once":
            os._exit(1)
        if first and fault == "hang_once":
            time.sleep(3600)
        if first and fault == "diverge_once":
            raise TrialError("training diverged: the loss became nan")
        return train(model, device, seed=seed, checkpoint=checkpoint)

    task.train = faulty_train
    return task


def _claim(path: str) -> bool:
    """True for exactly one caller across processes (trials run in parallel): the one that creates the file."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False
