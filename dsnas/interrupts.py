"""Ctrl-C that waits for the storage: an interrupt in the middle of a write would leave a half-written trial
and a database session in a broken state, so the driver defers it to the end of the write. Elsewhere (a trial
training in the driver's own process, a wait on Ray) it acts at once."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class InterruptGuard:
    def __init__(self) -> None:
        self._depth = 0
        self._pending = False

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Route SIGINT through the guard while the block runs (only the main thread can take signals)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    @property
    def pending(self) -> bool:
        """A Ctrl-C arrived during a write and waits for it to end (a wait for the database stops at once)."""
        return self._pending

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._depth:
            self._pending = True
        else:
            raise KeyboardInterrupt

    @contextmanager
    def writing(self) -> Iterator[None]:
        """A block that must not be cut short: an interrupt during it is raised when it ends."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth and self._pending:
                self._pending = False
                raise KeyboardInterrupt
