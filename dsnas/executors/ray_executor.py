"""Runs each trial as a Ray task with explicit resources: a local Ray sized to this machine, or a cluster."""

from __future__ import annotations

import os
from typing import Any

from dsnas.errors import DsnasError
from dsnas.evaluate import EvalRequest, evaluate
from dsnas.executors.base import BaseExecutor, EvaluateFn, Finished
from dsnas.spec import ExecutorSpec


class RayExecutor(BaseExecutor):
    def __init__(self, spec: ExecutorSpec, device: str, evaluate_fn: EvaluateFn = evaluate) -> None:
        import ray

        self._ray = ray
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            try:
                ray.init(address=spec.address, num_cpus=None if spec.address else os.cpu_count(),
                         include_dashboard=False, log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ray.exceptions.RayError) as e:
                fix = (" Fix: check that the cluster runs there; if it uses token authentication (`ray start` turns"
                       " it on when a token exists), set RAY_AUTH_MODE=token and give the cluster's token in"
                       " ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN") if spec.address else ""
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise DsnasError(f"could not start or reach Ray at {spec.address or 'this machine'}: {first}.{fix}") \
                    from None
        resources = ray.cluster_resources()
        gpus = spec.gpus_per_trial
        if gpus == 0 and device != "cpu" and resources.get("GPU", 0) >= 1:
            gpus = 1  # a measurement owns its GPU: never share one between trials
        if device == "cuda" and resources.get("GPU", 0) < max(gpus, 1):
            raise DsnasError("the study asks for device = cuda, but the Ray cluster has no GPU")
        fit = int(resources.get("CPU", 0) // spec.cpus_per_trial)
        if gpus:
            fit = min(fit, int(resources.get("GPU", 0) // gpus))
        self.slots = spec.workers or max(1, fit)
        # max_retries=0: Ray's default (3) would silently re-run a candidate that crashed its worker;
        # a crash is a result (a FAIL trial with its reason), and the driver decides about re-runs.
        self._remote = ray.remote(num_cpus=spec.cpus_per_trial, num_gpus=gpus, max_retries=0,
                                  retry_exceptions=False)(evaluate_fn)
        self._running: dict[Any, int] = {}

    def submit(self, request: EvalRequest) -> None:
        self._running[self._remote.remote(request)] = request.trial

    def wait(self, timeout: float) -> list[Finished]:
        if not self._running:
            return []
        ready, _ = self._ray.wait(list(self._running), num_returns=1, timeout=timeout)
        out: list[Finished] = []
        for ref in ready:
            number = self._running.pop(ref)
            try:
                out.append((number, self._ray.get(ref)))
            except Exception as e:
                out.append((number, _cause(e)))
        return out

    def cancel(self, trial: int) -> None:
        for ref, number in list(self._running.items()):
            if number == trial:
                self._ray.cancel(ref, force=True)  # force: the worker process is killed, its CPUs/GPU freed
                del self._running[ref]

    def lost_worker(self, error: BaseException) -> bool:
        from ray import exceptions as rex

        return isinstance(error, (rex.WorkerCrashedError, rex.NodeDiedError, rex.OutOfMemoryError,
                                  rex.ObjectLostError, rex.LocalRayletDiedError))

    def cancel_all(self) -> None:
        for ref in self._running:
            self._ray.cancel(ref, force=True)
        self._running.clear()

    def close(self) -> None:
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()


def _cause(error: Exception) -> BaseException:
    """The candidate's own exception out of Ray's wrapper; a dead worker stays a Ray error."""
    from ray.exceptions import RayTaskError

    if isinstance(error, RayTaskError) and error.cause is not None:
        return error.cause
    return error
