"""Runs each trial as a Ray task with explicit resources: a local Ray sized to this machine, or a cluster."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from dsnas.errors import DsnasError
from dsnas.executors.base import BaseExecutor, ClockHandler, Finished, RungHandler, TrialFn
from dsnas.profiler.capabilities import usable_cpus
from dsnas.rungs import ClockEvent, RayChannel, start_board
from dsnas.spec import ExecutorSpec
from dsnas.trial import TrialRequest
from dsnas.worker import run_trial

# How long one long poll of the rung board waits for a report before the driver asks again.
RUNG_POLL_S = 30.0


def _check_a_node_fits(ray: Any, spec: ExecutorSpec, gpus: float, where: str = "") -> None:
    """A trial runs on one node: one that asks for more CPUs or GPUs than any node has waits in Ray's queue forever,
    and the search printed "trial 0 started", then nothing. ``where``: the study file, which the message names."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if not nodes:
        return
    for key, asked, name in (("CPU", spec.cpus_per_trial, "cpus_per_trial"), ("GPU", gpus, "gpus_per_trial")):
        most = max(n.get(key, 0) for n in nodes)
        if asked and asked > most:
            raise DsnasError(f"{where}: " * bool(where) + f"[executor.{name}] a trial runs on one node and asks "
                             f"for {asked:g} {key}s, but the "
                             f"largest of the Ray cluster's {len(nodes)} node(s) has {most:g}. Fix: set "
                             f"[executor] {name} = {most:g} or less, or add a node with {asked:g} {key}s")


class RayExecutor(BaseExecutor):
    def __init__(self, spec: ExecutorSpec, device: str, trial_fn: TrialFn = run_trial,
                 on_rung: RungHandler | None = None, on_clock: ClockHandler | None = None, where: str = "") -> None:
        import ray

        self._ray = ray
        self._where = where  # the study file, named by a cluster that cannot run its trials
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            try:
                # Without an address, a Ray of this search's own ("local"): address=None would join whatever
                # RAY_ADDRESS or a `ray start` on this machine names, where num_cpus is refused (a ValueError).
                ray.init(address=spec.address or "local", num_cpus=None if spec.address else usable_cpus(),
                         include_dashboard=False, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as e:
                fix = (" Fix: check that the cluster runs there; if it uses token authentication (`ray start` turns"
                       " it on when a token exists), set RAY_AUTH_MODE=token and give the cluster's token in"
                       " ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN") if spec.address else ""
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise DsnasError(f"could not start or reach Ray at {spec.address or 'this machine'}: {first}.{fix}") \
                    from None
            except BaseException:  # Ctrl-C while Ray starts: what it started so far ends (a notebook kept 330 MB)
                ray.shutdown()
                raise
        try:
            resources, gpus = self._check_cluster(spec, device)
        except BaseException:
            # A Ray this search started ends with it: left running (0.6 GB), a later search in this process joined
            # it as someone else's and never ended it either.
            if self._owns_ray:
                ray.shutdown()
            raise
        fit = int(resources.get("CPU", 0) // spec.cpus_per_trial)
        if gpus:
            fit = min(fit, int(resources.get("GPU", 0) // gpus))
        self.slots = spec.workers or max(1, fit)
        # max_retries=0: Ray's default (3) would silently re-run a candidate that crashed its worker;
        # a crash is a result (a FAIL trial with its reason), and the driver decides about re-runs.
        self._resources = {"num_cpus": spec.cpus_per_trial, "num_gpus": gpus}
        self._remote = ray.remote(**self._resources, max_retries=0, retry_exceptions=False)(trial_fn)
        self._running: dict[Any, int] = {}
        self._oom_kills_at_submit: dict[Any, int | None] = {}  # ref -> the kernel's OOM-kill count then
        self._on_rung, self._on_clock = on_rung, on_clock
        self._board: Any = None  # the rung board actor, started with the first trial that reports to the driver
        self._poll: Any = None  # the outstanding long poll of the board

    def _check_cluster(self, spec: ExecutorSpec, device: str) -> tuple[dict[str, float], float]:
        """The cluster's resources and the GPUs a trial takes, once the cluster is known to run the trials."""
        resources = self._ray.cluster_resources()
        gpus = spec.gpus_per_trial
        if gpus == 0 and device != "cpu" and resources.get("GPU", 0) >= 1:
            gpus = 1  # a measurement owns its GPU: never share one between trials
        if device == "cuda" and resources.get("GPU", 0) < max(gpus, 1):
            raise DsnasError(f"{self._where}: " * bool(self._where) + "[hardware.device] cuda needs a GPU, and the "
                             "Ray cluster has none. Fix: set device = \"auto\", or add a node with a GPU")
        _check_a_node_fits(self._ray, spec, gpus, self._where)
        return resources, gpus

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return self._ray.get(self._ray.remote(**self._resources, max_retries=0)(fn).remote(*args))
        except Exception as e:
            if not self.lost_worker(e):
                raise
            # The engine probe's worker killed (out of memory, a lost node): a traceback named neither it nor a fix.
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DsnasError(f"{fn.__name__} ran in a Ray worker that died ({type(e).__name__}: {first}). Fix: run "
                             "the same command again; if it dies again, read the worker's log under "
                             "/tmp/ray/session_latest/logs") from None

    def submit(self, request: TrialRequest) -> None:
        if (request.rungs is not None and self._on_rung is not None) or self._on_clock is not None:
            self._board = self._board or start_board(self._ray)
            request = replace(request, channel=RayChannel(self._board))
        ref = self._remote.remote(request)
        self._running[ref] = request.trial
        self._oom_kills_at_submit[ref] = oom_kills()

    def wait(self, timeout: float) -> list[Finished]:
        if not self._running:
            return []
        if self._board is not None and self._poll is None:
            self._poll = self._board.take.remote(RUNG_POLL_S)
        polls = [self._poll] if self._poll is not None else []
        ready, _ = self._ray.wait(list(self._running) + polls, num_returns=1, timeout=timeout)
        out: list[Finished] = []
        for ref in ready:
            if polls and ref == self._poll:
                try:
                    self._answer(self._ray.get(ref))
                except self._ray.exceptions.RayActorError:
                    self._board = self._poll = None  # its waiting workers fail; a new board serves new trials
                continue
            number = self._running.pop(ref)
            oom_before = self._oom_kills_at_submit.pop(ref, None)
            try:
                out.append((number, self._ray.get(ref)))
            except Exception as e:
                out.append((number, explain_death(_cause(e), oom_before, oom_kills(), self._one_machine)))
        return out

    def _answer(self, reports: list[Any]) -> None:
        """The driver's decision on each rung report, sent back to the waiting workers; clock events to the
        driver's clock."""
        self._poll = None
        for report in reports:
            if isinstance(report, ClockEvent):
                if self._on_clock is not None:
                    self._on_clock(report)
                continue
            go = self._on_rung(report) if self._on_rung is not None else True
            self._board.answer.remote(report.trial, report.rung, go)

    def _one_machine(self) -> bool:
        """Whether every node of the cluster runs on this machine, where /proc/vmstat counts OOM kills."""
        here = {"127.0.0.1", "localhost", self._ray.util.get_node_ip_address()}
        return all(node["NodeManagerAddress"] in here for node in self._ray.nodes() if node["Alive"])

    def cancel(self, trial: int) -> None:
        for ref, number in list(self._running.items()):
            if number == trial:
                self._ray.cancel(ref, force=True)  # force: the worker process is killed, its CPUs/GPU freed
                del self._running[ref]
                self._oom_kills_at_submit.pop(ref, None)

    def lost_worker(self, error: BaseException) -> bool:
        from ray import exceptions as rex

        return isinstance(error, (rex.WorkerCrashedError, rex.NodeDiedError, rex.OutOfMemoryError,
                                  rex.ObjectLostError, rex.LocalRayletDiedError))

    def cancel_all(self) -> None:
        # A Ray this executor started goes down in close(), and its workers with it. Force-cancelling each task
        # first races, in Ray's core, with the reply of the worker it kills ("Check failed: Tried to complete task
        # that was not pending", ray-project/ray#54798): the driver aborted, 1 run in about 17.
        if not self._owns_ray:
            for ref in self._running:
                self._ray.cancel(ref, force=True)
        self._running.clear()
        self._oom_kills_at_submit.clear()

    def close(self) -> None:
        if self._board is not None and self._ray.is_initialized():
            self._ray.kill(self._board)
            self._board = self._poll = None
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()


def _cause(error: Exception) -> BaseException:
    """The candidate's own exception out of Ray's wrapper; a dead worker stays a Ray error."""
    from ray.exceptions import RayTaskError

    if isinstance(error, RayTaskError) and error.cause is not None:
        return error.cause
    return error


def oom_kills() -> int | None:
    """How many processes the kernel's OOM killer has ended on this machine since boot (None where unknown)."""
    try:
        with open("/proc/vmstat") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("oom_kill ")), None)
    except OSError:
        return None


def explain_death(error: BaseException, oom_before: int | None, oom_after: int | None,
                  one_machine: Callable[[], bool]) -> BaseException:
    """A worker's death as the reason the trial failed: an out-of-memory kill says so (Ray's memory monitor
    says it itself; the kernel's OOM killer does not, so a crash while its kill count on this machine rose is
    named as one, with the evidence); anything else is returned as it is."""
    from ray.exceptions import OutOfMemoryError, WorkerCrashedError

    if isinstance(error, OutOfMemoryError):
        said = " ".join(str(error).strip().splitlines()[:2])  # what happened; the rest is Ray's advice
        return OutOfMemoryError(f"out of memory: Ray's memory monitor killed the worker. {said}")
    if (isinstance(error, WorkerCrashedError) and oom_before is not None and oom_after is not None
            and oom_after > oom_before and one_machine()):
        return OutOfMemoryError(
            f"out of memory: the worker died (WorkerCrashedError) while the kernel's OOM killer ended "
            f"{oom_after - oom_before} process(es) on this machine (oom_kill in /proc/vmstat went {oom_before} -> "
            f"{oom_after}); give trials more memory, or leave the largest models out of the search space")
    return error
