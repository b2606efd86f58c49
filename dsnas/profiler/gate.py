"""Exclusive measurement on a shared node: trials train side by side, but while one trial measures,
no other trial on the same device computes (their work would steal cores or bandwidth from the timing).

A writer-preferring readers-writer lock on two lock files (flock), so it holds across Ray worker
processes on one node without a coordinator: trainers hold the lock shared and pass a turnstile at each
checkpoint; a measurer takes the turnstile, which stops new trainers at their next checkpoint, then
waits for the lock exclusively.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class MeasureGate:
    def __init__(self, key: str, folder: str | os.PathLike[str] | None = None) -> None:
        folder = Path(folder or tempfile.gettempdir())
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", key)
        self.paths = (folder / f"dsnas-gate-{safe}.turnstile", folder / f"dsnas-gate-{safe}.lock")

    @contextmanager
    def shared(self) -> Iterator["_SharedHold"]:
        """Hold while training or evaluating; call ``checkpoint()`` often so a measurer is not kept waiting."""
        with _open(self.paths[0]) as turnstile, _open(self.paths[1]) as lock:
            hold = _SharedHold(turnstile, lock)
            hold.enter()
            try:
                yield hold
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold while measuring: no other holder of this gate computes meanwhile."""
        with _open(self.paths[0]) as turnstile, _open(self.paths[1]) as lock:
            fcntl.flock(turnstile, fcntl.LOCK_EX)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
            finally:
                fcntl.flock(turnstile, fcntl.LOCK_UN)


class _SharedHold:
    def __init__(self, turnstile: int, lock: int) -> None:
        self._turnstile, self._lock = turnstile, lock

    def enter(self) -> None:
        fcntl.flock(self._turnstile, fcntl.LOCK_EX)  # waits while a measurer is queued or measuring
        fcntl.flock(self._turnstile, fcntl.LOCK_UN)
        fcntl.flock(self._lock, fcntl.LOCK_SH)

    def checkpoint(self) -> None:
        """Let a waiting measurer in, then carry on."""
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self.enter()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hold nothing while the block waits (for the driver's answer at a rung, say), then carry on."""
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        try:
            yield
        finally:
            self.enter()


@contextmanager
def _open(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        yield fd
    finally:
        os.close(fd)
