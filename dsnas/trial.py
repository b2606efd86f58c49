"""What passes between the driver and a worker: the request for one trial, and its result. A module of its own so
that the driver, the executors, the worker and a task that runs its own trials share these types without importing
each other."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypedDict

from dsnas.rungs import RungReport
from dsnas.spec import EngineSpec, HardwareSpec, TaskSpec

# A trial's seconds of its own work (dsnas.worker): a repeat answered from an earlier trial did none of it.
WORK_SECONDS = ("trial_s", "train_s", "engine_s", "measure_s", "waited_s")
_RUNG_FIGURE = re.compile(r"rung\d+\.")  # its objectives at its rungs (dsnas.fidelity): it trained there


def own_work(key: str) -> bool:
    """Whether a trial's numeric attribute ``key`` is of its own work, which a repeat did not do: its seconds, the
    predictor's check of it, its rungs' figures. (A repeat copied them: summing train_s doubled a search's compute,
    and the predictor's record counted 225 checks for 18.)"""
    return key in WORK_SECONDS or key.startswith(("predicted.", "predictor_error.")) or bool(_RUNG_FIGURE.match(key))


class Profile(TypedDict, total=False):
    """How a trial's numbers were obtained: TrialResult.profile, stored as the trial's "profile" attribute and read
    by the driver, dsnas.tables, the export, the model card, verify and `dsnas profile`. Every key is optional: a
    task that runs its own trials supplies only its figures, and a missing figure is named in ``unavailable``."""

    fingerprint: dict[str, Any]  # the device that measured (dsnas.profiler.device.fingerprint)
    # Per batch size (a string, as JSON keys are): the timing (dsnas.profiler.timing.TIMING_KEYS: median_ms, p10_ms,
    # p90_ms, spread, repeats, ...) and the figures (latency_ms, throughput_tok_s, flops, bytes, gflop_s, gb_s,
    # flop_util, bw_util, peak_memory_mb, window_* on a GPU), with the measurement_key they were measured under.
    batches: dict[str, dict[str, Any]]
    backend: str  # what ran: "eager", "compiled-eager", or "recorded" (figures a task supplied)
    dtype: str  # float32, a single low precision, or "mixed"
    threads: int | None  # CPU threads while timing; None on a GPU
    signature: dict[str, Any]  # the inference form measured, per layer (dsnas.kernels.convert.inference_signature)
    measurement_key: str  # the protocol and form a cached measurement must match (dsnas.profiler.measure)
    cache: dict[str, Any]  # {"hit": bool, "from": "study S trial N" on a hit, "why": why an entry was stale}
    unavailable: dict[str, str]  # figure -> why it is missing here (never a made-up number)
    disturbed: bool | None  # the machine's load disturbed a timing after its attempts; None: not observable
    memory_method: str  # how peak memory was measured
    memory_unavailable: str  # why there is no peak memory
    peak_rss_mb: float  # the worker process's peak RSS, training included: context only
    ceilings: dict[str, Any]  # the device's measured (CPU) or rated (GPU) compute and bandwidth ceilings
    window: dict[str, Any]  # GPU: the steady window's NVML/GPM figures
    kernels: dict[str, Any]  # per batch size: the top kernels or operators of one profiled call
    measured_on: str  # which form was measured (untrained before training, or the trained model again)
    rungs: str  # why the task trained without rungs, when it did
    engine: dict[str, Any]  # the engine's steps: per-layer choices, fallbacks, calibration, sparsity
    task: dict[str, Any]  # the task's fingerprint
    worker: dict[str, Any]  # host, pid and Ray node that ran the trial
    measured_by: str  # for recorded figures: who supplied them


@dataclass(frozen=True)
class TrialRequest:
    trial: int
    arch: dict[str, Any]
    task: TaskSpec
    hardware: HardwareSpec
    seed: int
    cached: dict[str, Any] | None = None  # earlier measurements of this arch (the driver's cache lookup)
    engine: EngineSpec = field(default_factory=EngineSpec)
    # Multi-fidelity (dsnas.fidelity): measure first and report there (rung 0), then at each of these shares of the
    # training budget; the driver may stop the trial at any of them. None: train fully, then measure.
    rungs: tuple[float, ...] | None = None
    channel: Any = None  # the executor's RungChannel to the driver, set when the request is submitted
    # The driver's task.fingerprint(): a worker whose task was built from other data (a Ray worker kept from an
    # earlier search, a node with another copy of the data) builds it again, or refuses the trial.
    task_fingerprint: dict[str, Any] | None = None
    # The driver's run ("host:pid:start"): a worker that served another run (a Ray the notebook started itself, its
    # workers reused) builds its task and imports the study's code afresh, as the driver did at the run's start.
    run: str | None = None


@dataclass
class TrialResult:
    metrics: dict[str, float]  # every numeric result, named with its unit where it has one
    profile: Profile = field(default_factory=Profile)  # how the numbers were obtained
    weights: bytes | None = None  # trained weights, safetensors
    probe: bytes | None = None  # safetensors: a fixed input and the trained model's logits on it
    pruned: RungReport | None = None  # the rung where the driver stopped it; metrics then hold no accuracy


TrialFn = Callable[[TrialRequest], TrialResult]  # the worker's entry point (dsnas.worker.run_trial)


def worker_identity() -> dict[str, Any]:
    """Where the trial ran: host and process, and the Ray node when it ran in a Ray worker."""
    import os
    import socket
    import sys

    out: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    ray = sys.modules.get("ray")  # only a Ray worker has it imported; the local executor must not start Ray
    if ray is not None and ray.is_initialized():
        out["ray_node_id"] = ray.get_runtime_context().get_node_id()
    return out
