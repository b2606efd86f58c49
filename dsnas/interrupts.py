"""Ctrl-C that waits for the storage: an interrupt in the middle of a write would leave a half-written trial
and a database session in a broken state, so the driver defers it to the end of the write. Elsewhere (a trial
training in the driver's own process, a wait on Ray) it acts at once. SIGTERM (`kill`, a batch scheduler, systemd)
is handled the same way: without it the process died at once and left its running trial RUNNING."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be; the command exits 143 (128 + 15) for it."""


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While open, SIGTERM raises Terminated where it lands, as Ctrl-C raises KeyboardInterrupt: a command's own
    cleanup runs (a search's guard takes over once its loop starts). Before, a SIGTERM while a search opened its
    study killed the process at once, without a word, its database left in write-ahead-log mode."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread takes signals
        yield
        return

    def raise_terminated(signum: int, frame: Any) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class InterruptGuard:
    def __init__(self) -> None:
        self._depth = 0
        self._pending: type[KeyboardInterrupt] | None = None
        self._installed = False
        self._received: type[KeyboardInterrupt] | None = None  # the last signal's interrupt

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Route SIGINT and SIGTERM through the guard while the block runs (only the main thread takes signals)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        self._installed = True
        try:
            yield
        except KeyboardInterrupt as e:
            # Ray's C++ core checks for signals while it waits and raises a plain KeyboardInterrupt for the
            # Terminated the handler raised: the SIGTERM is what arrived, so it exits 143, not 130.
            if self._received is Terminated and not isinstance(e, Terminated):
                raise Terminated() from e
            raise
        finally:
            self._installed = False
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def reroute(self) -> None:
        """Take SIGINT and SIGTERM back from a library that set its own handlers since: ray.init sets SIGTERM to
        exit at once, so a SIGTERM cut a trial's recording short and left trials RUNNING (exit 134, not 143)."""
        if self._installed and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self._on_signal)

    @property
    def pending(self) -> bool:
        """A Ctrl-C arrived during a write and waits for it to end (a wait for the database stops at once)."""
        return self._pending is not None

    def _on_signal(self, signum: int, frame: Any) -> None:
        interrupt = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        self._received = interrupt
        if self._depth:
            self._pending = interrupt
        else:
            raise interrupt

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Inside a write, a block that writes nothing and may wait without bound (for another process's hold on
        the measurement gate): an interrupt, pending or new, acts at once. The caller must leave the write's state
        safe to fail, as a trial already counted as running is."""
        depth, self._depth = self._depth, 0
        try:
            if self._pending is not None:
                interrupt, self._pending = self._pending, None
                raise interrupt
            yield
        finally:
            self._depth = depth

    @contextmanager
    def writing(self) -> Iterator[None]:
        """A block that must not be cut short: an interrupt during it is raised when it ends."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth and self._pending is not None:
                interrupt, self._pending = self._pending, None
                raise interrupt
