"""Exclusive measurement on a shared node: trials train side by side, but while one trial measures,
no other trial on the same device computes (their work would steal cores or bandwidth from the timing).

A writer-preferring readers-writer lock on two lock files (flock), so it holds across Ray worker
processes on one node without a coordinator: trainers hold the lock shared and pass a turnstile at each
checkpoint; a measurer takes the turnstile, which stops new trainers at their next checkpoint, then
waits for the lock exclusively.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shlex
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)
_WARNED: set[tuple[Path, ...]] = set()
PATIENT_POLL_S = 0.05  # how often a wait with a deadline tries the lock again


class MeasureGate:
    def __init__(self, key: str, folder: str | os.PathLike[str] | None = None,
                 on_wait: Callable[[bool], None] | None = None, announce: str = "",
                 say_after_s: float | None = None) -> None:
        """``on_wait(True)`` when a holder is kept waiting by another, ``on_wait(False)`` when it goes on: the time a
        trial waits for others is not its own (trial_timeout_s). An uncontended pass says nothing. ``announce``: a
        command's name ("dsnas verify"); a measurement kept waiting says so, and by whom (a verify behind another's
        measurement waited minutes without a word and looked hung). With ``say_after_s`` (a trial's gate), any
        wait, to train or to measure, is said once it has lasted that long, at most once a minute."""
        folder = Path(folder or tempfile.gettempdir())
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", key)
        self.paths = (folder / f"dsnas-gate-{safe}.turnstile", folder / f"dsnas-gate-{safe}.lock")
        self.on_wait = on_wait
        self.announce = announce
        refused = {p: err for p in self.paths if (err := _refusal(p))}  # each file: the fix names every one
        if refused:
            _warn(refused)
            # Another account's dsnas made the gate and this one may not use it: measure behind a gate of this
            # account's own rather than fail, and say that the other account's runs are not waited for.
            mine = (p.with_name(f"{p.stem}-uid{os.getuid()}{p.suffix}") for p in self.paths)
            self.paths = tuple(mine)  # type: ignore[assignment]
        if announce and say_after_s is not None:
            self.on_wait, self.announce = _LongWaits(announce, self.paths, on_wait, say_after_s), ""

    @contextmanager
    def shared(self, patience_s: float | None = None) -> Iterator[_SharedHold | _HeldAlready]:
        """Hold while training or evaluating; call ``checkpoint()`` often so a measurer is not kept waiting.
        Within a hold of this thread's on the same gate it holds nothing more: a second hold queued behind a
        measurer who waits for the first, and neither went on (the driver's screen counted a candidate so).
        ``patience_s``: wait at most this long, then go on holding nothing (the driver: a trial that hangs holding
        the gate must not keep it from stopping that trial at its time limit)."""
        if _held().get(self.paths[1]):
            yield _HeldAlready()
            return
        with _open(self.paths[0]) as turnstile, _open(self.paths[1]) as lock:
            hold = _SharedHold(turnstile, lock, self.on_wait, self.paths[1])
            try:
                hold.enter(None if patience_s is None else time.monotonic() + patience_s)
            except _Impatient:  # holds within this one hold nothing either (the screen's counter would wait)
                with _holding(self.paths[1], "given up"):
                    yield _HeldAlready()
                return
            try:
                with _holding(self.paths[1], "shared"):
                    yield hold
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold while measuring: no other holder of this gate computes meanwhile. Within this thread's exclusive
        hold it holds nothing more; within its shared hold it is refused (it would wait for itself for ever)."""
        mode = _held().get(self.paths[1])
        if mode == "exclusive":
            yield
            return
        if mode == "shared":
            raise RuntimeError(f"measuring inside a shared hold of the gate {self.paths[1]} would wait for itself")
        with _open(self.paths[0]) as turnstile, _open(self.paths[1]) as lock:
            waiting = _Announced(self.announce, self.paths, self.on_wait) if self.announce else self.on_wait
            _take(turnstile, fcntl.LOCK_EX, waiting)
            try:
                _take(lock, fcntl.LOCK_EX, waiting)
                if isinstance(waiting, _Announced):
                    waiting.went_on()
                try:
                    with _holding(self.paths[1], "exclusive"):
                        yield
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
            finally:
                fcntl.flock(turnstile, fcntl.LOCK_UN)


# Per thread: the gates (their lock files) it holds, and how ("shared", "exclusive", or "given up": a patient
# hold that went on holding nothing); a paused hold holds none.
_HOLDS = threading.local()


def _held() -> dict[Path, str]:
    if not hasattr(_HOLDS, "modes"):
        _HOLDS.modes = {}
    return _HOLDS.modes


@contextmanager
def _holding(path: Path, mode: str) -> Iterator[None]:
    _held()[path] = mode
    try:
        yield
    finally:
        _held().pop(path, None)


class _Impatient(Exception):
    """A shared hold's wait ran past its patience."""


class _HeldAlready:
    """A hold that holds nothing: within one of this thread's own (the outer hold lets measurers in at its own
    checkpoints), or one whose patience ran out."""

    def checkpoint(self) -> None:
        pass

    @contextmanager
    def paused(self) -> Iterator[None]:
        yield


class _SharedHold:
    def __init__(self, turnstile: int, lock: int, on_wait: Callable[[bool], None] | None = None,
                 path: Path | None = None) -> None:
        self._turnstile, self._lock, self._on_wait, self._path = turnstile, lock, on_wait, path

    def enter(self, deadline: float | None = None) -> None:
        _take(self._turnstile, fcntl.LOCK_EX, self._on_wait, deadline)  # waits while a measurer is queued/measuring
        fcntl.flock(self._turnstile, fcntl.LOCK_UN)
        _take(self._lock, fcntl.LOCK_SH, self._on_wait, deadline)

    def checkpoint(self) -> None:
        """Let a waiting measurer in, then carry on."""
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self.enter()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hold nothing while the block waits (for the driver's answer at a rung, say), then carry on."""
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        mode = _held().pop(self._path, None) if self._path else None  # a hold inside the pause is a hold of its own
        try:
            yield
        finally:
            self.enter()
            if mode:
                _held()[self._path] = mode


def _take(fd: int, operation: int, on_wait: Callable[[bool], None] | None, deadline: float | None = None) -> None:
    """flock, saying so (``on_wait``) only when another holder keeps it waiting; past ``deadline`` (monotonic),
    _Impatient."""
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    if on_wait is not None:
        on_wait(True)
    try:
        if deadline is None:
            fcntl.flock(fd, operation)
            return
        while True:
            time.sleep(PATIENT_POLL_S)
            try:
                fcntl.flock(fd, operation | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise _Impatient from None
    finally:
        if on_wait is not None:
            on_wait(False)


class _Announced:
    """An exclusive hold's waits (for the turnstile, then the lock), said once as one wait: who holds the gate when
    the wait begins, and how long it lasted when the measurement goes on."""

    def __init__(self, what: str, paths: tuple[Path, ...], on_wait: Callable[[bool], None] | None) -> None:
        self.what, self.paths, self.on_wait = what, paths, on_wait
        self.since: float | None = None

    def __call__(self, waiting: bool) -> None:
        if self.on_wait is not None:
            self.on_wait(waiting)
        if waiting and self.since is None:
            self.since = time.monotonic()
            log.info("%s", waits_notice(self.what, self.paths, _held_by(self.paths)))

    def went_on(self) -> None:
        if self.since is not None:
            log.info("%s measures now (waited %.0f s for the gate)", self.what, time.monotonic() - self.since)


class _LongWaits:
    """A trial's waits for the gate, each said once it lasts ``after_s`` (a timer thread: the wait itself blocks in
    flock), at most once a minute: a trial behind other studies' measurements waited ten minutes, its search silent."""

    EVERY_S = 60.0

    def __init__(self, what: str, paths: tuple[Path, ...], on_wait: Callable[[bool], None] | None,
                 after_s: float) -> None:
        self.what, self.paths, self.on_wait, self.after_s = what, paths, on_wait, after_s
        self.lock = threading.Lock()
        self.timer: threading.Timer | None = None
        self.since = 0.0
        self.said_at: float | None = None
        self.said = False

    def __call__(self, waiting: bool) -> None:
        if self.on_wait is not None:
            self.on_wait(waiting)
        with self.lock:
            if waiting and self.timer is None:
                self.since = time.monotonic()
                self.timer = threading.Timer(self.after_s, self._say)
                self.timer.daemon = True
                self.timer.start()
            elif not waiting:
                if self.timer is not None:
                    self.timer.cancel()
                    self.timer = None
                if self.said:
                    self.said = False
                    log.info("%s goes on (waited %.0f s for the measurement gate)", self.what,
                             time.monotonic() - self.since)

    def _say(self) -> None:
        with self.lock:
            now = time.monotonic()
            if self.timer is None or (self.said_at is not None and now - self.said_at < self.EVERY_S):
                return
            self.said_at, self.said = now, True
        who = _held_by(self.paths)
        log.info("%s has waited %.0f s for the measurement gate %s, held by %s: another measurement on this device",
                 self.what, now - self.since, self.paths[1], who)


def waits_notice(what: str, paths: tuple[Path, ...], who: str) -> str:
    """How a wait for the gate is said, here and by a Ray study's driver for what waits in a worker."""
    return (f"{what} waits to measure: the measurement gate {paths[1]} is held by {who} (measuring beside it would "
            "time its work too)")


def _held_by(paths: tuple[Path, ...]) -> str:
    return ", ".join(holders(paths)) or "another process on this device"


def holders(paths: tuple[Path, ...]) -> list[str]:
    """The other processes that hold these lock files now, as "pid N (command line)", from Linux's /proc/locks;
    none elsewhere, or where a holder runs in another PID namespace (a container: its pid reads 0 here)."""
    try:
        locks = Path("/proc/locks").read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    keys = set()
    for path in paths:
        with contextlib.suppress(OSError):
            st = path.stat()
            keys.add(f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}")
    pids: list[int] = []
    for line in locks:
        fields = line.split()
        if "->" in fields or len(fields) < 6:  # "->": a process blocked on the lock, not one holding it
            continue
        pid, key = fields[4], fields[5]
        if key in keys and pid.isdigit() and int(pid) not in (0, os.getpid()) and int(pid) not in pids:
            pids.append(int(pid))
    return [f"pid {pid} ({_command(pid)})" for pid in pids]


def _command(pid: int) -> str:
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "ended since"
    # One line, each path as its last part: "python dsnas search quickstart.toml" fits where a venv's path did not.
    line = " ".join(" ".join(w.decode(errors="replace").split()).rstrip("/").rsplit("/", 1)[-1] for w in words if w)
    return line if len(line) <= 80 else line[:77] + "..."


def _refusal(path: Path) -> str:
    """Why this account cannot open (or make) the gate file; "" when it can. Measurements by two users' runs
    disturb each other as much as two trials do, so every account shares one gate where it can."""
    try:
        os.close(_open_fd(path))
    except OSError as err:
        return err.strerror or str(err)
    return ""


def _open_fd(path: Path) -> int:
    """An existing gate file is opened without O_CREAT, which Linux's protected_regular refuses in a shared sticky
    folder (/tmp) for a file of another owner, even at mode 0666; a new one is made 0666 whatever the umask, so
    that every account can lock it."""
    try:
        return os.open(path, os.O_RDWR)
    except FileNotFoundError:
        pass
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:  # another process made it meanwhile
        return os.open(path, os.O_RDWR)
    with contextlib.suppress(OSError):  # a folder that keeps its own modes: the gate still works for this account
        os.fchmod(fd, 0o666)
    return fd


def _warn(refused: dict[Path, str]) -> None:
    paths = tuple(refused)
    if paths not in _WARNED:
        _WARNED.add(paths)
        words = "; ".join(f"{p} ({why})" for p, why in refused.items())
        log.warning("dsnas cannot use the measurement gate %s, made by another account's dsnas; measuring behind a "
                    "gate of this account's own, so that account's runs are not waited for. Fix: their owner runs "
                    "`chmod 666 %s`", words, " ".join(shlex.quote(str(p)) for p in paths))


@contextmanager
def _open(path: Path) -> Iterator[int]:
    fd = _open_fd(path)  # made again if removed since (a temp folder cleaned)
    try:
        yield fd
    finally:
        os.close(fd)
