"""Worker side of a trial: build -> train -> evaluate -> measure -> result. Never touches the storage."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from dsnas.spec import EngineSpec, HardwareSpec, TaskSpec


@dataclass(frozen=True)
class EvalRequest:
    trial: int
    arch: dict[str, Any]
    task: TaskSpec
    hardware: HardwareSpec
    seed: int
    cached: dict[str, Any] | None = None  # earlier measurements of this arch (the driver's cache lookup)
    engine: EngineSpec = field(default_factory=EngineSpec)


@dataclass
class TrialResult:
    metrics: dict[str, float]  # every numeric result, named with its unit where it has one
    profile: dict[str, Any] = field(default_factory=dict)  # how the numbers were obtained
    weights: bytes | None = None  # trained weights, safetensors
    probe: bytes | None = None  # safetensors: a fixed input and the trained model's logits on it


def evaluate(request: EvalRequest) -> TrialResult:
    import torch

    from dsnas.kernels import pipeline
    from dsnas.models import build
    from dsnas.profiler import MeasureGate, device_key, measure, resolve_device
    from dsnas.tasks import make_task

    started = time.perf_counter()
    torch.manual_seed(request.seed)
    device = resolve_device(request.hardware.device)
    task = make_task(request.task)
    model = build(request.arch).to(device)
    pipeline.check_task(model, task)
    gate = MeasureGate(device_key(device))
    with gate.shared() as hold:
        train_start = time.perf_counter()
        train_metrics = task.train(model, device, seed=request.seed, checkpoint=hold.checkpoint,
                                   **pipeline.supported(task.train, fallback_steps=request.engine.fallback_steps,
                                                        fraction=pipeline.main_fraction(model, request.engine)))
        trained = time.perf_counter()
        engine_metrics, engine_info = pipeline.run(model, task, device, request.engine, seed=request.seed,
                                                   checkpoint=hold.checkpoint)
        engined = time.perf_counter()
    with gate.exclusive():
        measure_start = time.perf_counter()
        pipeline.finish(model, request.engine, engine_info)
        measured = torch.compile(model) if request.engine.compile else model
        hw_metrics, profile = measure(measured, task, device, request.hardware, cached=request.cached)
        measure_end = time.perf_counter()
    with gate.shared():  # no computing outside the gate: another trial may be measuring
        eval_metrics = task.evaluate(model, device)  # the converted model: what was measured is what is scored
    if "accuracy" not in eval_metrics:
        raise TypeError(f"the task's evaluate() must return 'accuracy', got {sorted(eval_metrics)}")
    profile["engine"] = {**engine_info, "compiled": request.engine.compile}
    profile["task"] = task.fingerprint()
    profile["worker"] = worker_identity()
    metrics = {**train_metrics, **engine_metrics, **eval_metrics, **hw_metrics, "train_s": trained - train_start,
               "engine_s": engined - trained,
               "measure_s": measure_end - measure_start, "trial_s": time.perf_counter() - started}
    return TrialResult(metrics={k: float(v) for k, v in metrics.items()}, profile=profile,
                       weights=weights_bytes(model), probe=probe_bytes(model, task.example_batch(2, device)))


def weights_bytes(model: Any) -> bytes:
    from safetensors.torch import save

    return save(unique_state(model))


def unique_state(model: Any) -> dict[str, Any]:
    """The training-form state dict (``convert`` rebuilds the inference forms from it) with each tensor once:
    tied weights share storage, and safetensors stores each tensor once; loading the first name re-fills every
    alias."""
    from dsnas.kernels.convert import training_state

    out, seen = {}, set()
    for name, tensor in training_state(model).items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            out[name] = tensor.detach().cpu().contiguous()
    return out


def probe_bytes(model: Any, batch: Any) -> bytes:
    import torch
    from safetensors.torch import save

    with torch.inference_mode():
        logits = model(batch).float().cpu()
    return save({"input": batch.cpu().contiguous(), "logits": logits.contiguous()})


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
