"""A task that injects one fault into charlm's training, for testing that a search survives it (and for
benchmarks/reliability.py): use `[task] name = "dsnas.tasks.faults:faulty_charlm"` with `fault` and `marker`.
Also the memory cgroup that an out-of-memory fault runs in, so that the kernel kills the worker and nothing else."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dsnas.errors import TrialError

FAULTS = ("crash_once", "hang_once", "diverge_once", "oom_once", "pause_once")
OOM_SLACK_MB = 256  # oom_once allocates at most the cgroup's limit plus this, then gives up: a bound, always
PAUSE_MAX_S = 120.0  # pause_once waits at most this long for its release file


def faulty_charlm(fault: str, marker: str, after: int = 0, cgroup: str = "", **params: Any) -> Any:
    """charlm, whose train() call number ``after`` in this study (counted across processes by files beside
    ``marker``; 0: the first) meets the fault: ``crash_once`` kills its process as SIGKILL would,
    ``hang_once`` never returns, ``diverge_once`` raises as a NaN loss does, ``oom_once`` moves its process into
    the memory cgroup ``cgroup`` (see :func:`memory_cgroup`) and allocates until the kernel's OOM killer ends it,
    ``pause_once`` waits until the file ``marker + ".go"`` exists (a hold point for a fault from outside, such
    as a database restart). Other calls train normally."""
    from dsnas.tasks.charlm import CharLMConfig, CharLMTask  # torch loads on first use

    if fault not in FAULTS:
        raise ValueError(f"fault must be one of {FAULTS}, got {fault!r}")
    if fault == "oom_once" and not cgroup:
        raise ValueError("fault oom_once needs cgroup = a memory cgroup folder (dsnas.tasks.faults.memory_cgroup): "
                         "without a limit it would exhaust the machine")
    task = CharLMTask(CharLMConfig(**params), os.path.dirname(marker))
    train = task.train

    def faulty_train(model: Any, device: Any, *, seed: int, checkpoint: Any) -> dict[str, float]:
        hit = _claim_call(marker) == after
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\n")  # who took the fault: a test checks that the process is gone
        if hit:
            _inject(fault, marker, cgroup)
        return train(model, device, seed=seed, checkpoint=checkpoint)

    task.train = faulty_train
    return task


def _inject(fault: str, marker: str, cgroup: str) -> None:
    if fault == "crash_once":
        os._exit(1)
    if fault == "hang_once":
        time.sleep(3600)
    if fault == "diverge_once":
        raise TrialError("training diverged: the loss became nan")
    if fault == "oom_once":
        _exhaust_memory(cgroup)
    if fault == "pause_once":
        deadline = time.monotonic() + PAUSE_MAX_S
        while not os.path.exists(marker + ".go"):
            if time.monotonic() > deadline:
                raise TrialError(f"pause_once: {marker}.go did not appear within {PAUSE_MAX_S:g} s")
            time.sleep(0.05)


def _claim_call(marker: str) -> int:
    """This call's number among all calls of the study, across processes (trials run in parallel): the first
    free name marker.call0, marker.call1, ... that this caller creates."""
    number = 0
    while True:
        try:
            os.close(os.open(f"{marker}.call{number}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return number
        except FileExistsError:
            number += 1


def _exhaust_memory(cgroup: str) -> None:
    """Join ``cgroup`` and touch memory until the kernel kills this process; bounded by the cgroup's limit."""
    limit = _limit_bytes(Path(cgroup))
    (Path(cgroup) / "cgroup.procs").write_text(f"{os.getpid()}\n", encoding="utf-8")
    held, step = [], 8 << 20
    while len(held) * step < limit + (OOM_SLACK_MB << 20):
        held.append(b"\xa5" * step)  # written, so every page is charged to the cgroup
    raise TrialError(f"oom_once: {len(held) * step >> 20} MiB allocated in {cgroup} (limit {limit >> 20} MiB) "
                     "and the kernel killed nothing: the limit did not apply")


def _limit_bytes(cgroup: Path) -> int:
    for name in ("memory.max", "memory.limit_in_bytes"):  # cgroup v2, v1
        if (cgroup / name).exists():
            text = (cgroup / name).read_text(encoding="utf-8").strip()
            if text.isdigit() and int(text) < 1 << 50:
                return int(text)
    raise ValueError(f"{cgroup} has no memory limit: oom_once would exhaust the machine")


def memory_cgroup_supported() -> tuple[bool, str]:
    """Whether this process may create a memory-limited child of its own memory cgroup (v2, or v1's memory
    hierarchy): tried for real, with a probe that is removed again."""
    try:
        parent = _own_memory_cgroup()
        probe = parent / f"dsnas-probe-{secrets.token_hex(4)}"
        probe.mkdir()
        probe.rmdir()
    except (OSError, LookupError) as e:
        return False, f"cannot create a memory cgroup: {e}"
    return True, f"memory cgroups can be created under {parent}"


@contextlib.contextmanager
def memory_cgroup(limit_mb: int) -> Iterator[str]:
    """A new child of this process's memory cgroup, limited to ``limit_mb`` MiB of memory and no swap; yields
    its folder. Removed at the end, after SIGKILL to any process still in it (only processes that joined it)."""
    path = _own_memory_cgroup() / f"dsnas-oom-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        limit = str(limit_mb << 20)
        if (path / "memory.max").exists():  # v2
            (path / "memory.max").write_text(limit, encoding="utf-8")
            with contextlib.suppress(OSError):  # no swap accounting: no swap to limit
                (path / "memory.swap.max").write_text("0", encoding="utf-8")
        else:  # v1: the memory+swap limit must not be below the memory limit, so it comes second
            (path / "memory.limit_in_bytes").write_text(limit, encoding="utf-8")
            with contextlib.suppress(OSError):
                (path / "memory.memsw.limit_in_bytes").write_text(limit, encoding="utf-8")
        yield str(path)
    finally:
        _remove_cgroup(path)


def _remove_cgroup(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for pid in (path / "cgroup.procs").read_text(encoding="utf-8").split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        try:
            path.rmdir()
            return
        except OSError:  # busy until its killed processes are gone
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _own_memory_cgroup() -> Path:
    """This process's cgroup folder that has the memory controller: cgroup v2's unified one, or v1's memory one."""
    mounts = [line.split() for line in Path("/proc/self/mountinfo").read_text(encoding="utf-8").splitlines()]
    for line in Path("/proc/self/cgroup").read_text(encoding="utf-8").splitlines():
        _, controllers, relative = line.split(":", 2)
        for fields in mounts:
            sep = fields.index("-")
            fstype, options, root, mount = fields[sep + 1], fields[-1], fields[3], fields[4]
            v2 = controllers == "" and fstype == "cgroup2"
            v1 = "memory" in controllers.split(",") and fstype == "cgroup" and "memory" in options.split(",")
            if not (v1 or v2) or not relative.startswith(root):
                continue
            folder = Path(mount) / relative[len(root):].lstrip("/")
            if v1 or "memory" in (folder / "cgroup.subtree_control").read_text(encoding="utf-8").split():
                return folder
    raise LookupError("no memory cgroup of this process is mounted with the memory controller for its children")
