"""Worker side of a trial: build -> train -> engine steps -> measure -> evaluate -> result (with rungs: measure
first, then train rung by rung while the driver decides). Never touches the storage."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from dsnas.rungs import RungReport, RungStop
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
    # Multi-fidelity (dsnas.pruning): measure first and report there (rung 0), then at each of these shares of the
    # training budget; the driver may stop the trial at any of them. None: train fully, then measure.
    rungs: tuple[float, ...] | None = None
    channel: Any = None  # the executor's RungChannel to the driver, set when the request is submitted


@dataclass
class TrialResult:
    metrics: dict[str, float]  # every numeric result, named with its unit where it has one
    profile: dict[str, Any] = field(default_factory=dict)  # how the numbers were obtained
    weights: bytes | None = None  # trained weights, safetensors
    probe: bytes | None = None  # safetensors: a fixed input and the trained model's logits on it
    pruned: RungReport | None = None  # the rung where the driver stopped it; metrics then hold no accuracy


def evaluate(request: EvalRequest) -> TrialResult:
    from dsnas.tasks import make_task
    from dsnas.tasks.evaluator import evaluate_with, is_evaluator

    task = make_task(request.task)
    if is_evaluator(task):  # the user's own evaluation function: no model is built here
        return evaluate_with(task, request)
    return _Candidate(request, task).run()


class _Candidate:
    """One trial in its worker: build -> train -> engine steps -> convert -> measure -> evaluate; with rungs,
    measured first (timings do not depend on the weights' values) and trained rung by rung."""

    def __init__(self, request: EvalRequest, task: Any) -> None:
        import torch

        from dsnas.kernels import pipeline
        from dsnas.models import build
        from dsnas.profiler import MeasureGate, device_key, resolve_device

        self.request, self.task = request, task
        self.started = time.perf_counter()
        torch.manual_seed(request.seed)
        self.device = resolve_device(request.hardware.device)
        self.model = build(request.arch).to(self.device)
        pipeline.check_task(self.model, task)
        self.gate = MeasureGate(device_key(self.device))
        self.hw_metrics: dict[str, float] = {}
        self.train_metrics: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.profile: dict[str, Any] = {}
        self.engine_info: dict[str, Any] = {}
        self.train_started: float | None = None

    def run(self) -> TrialResult:
        from dsnas.kernels import pipeline

        engine = self.request.engine
        try:
            if self.request.rungs is None:
                self._train(None)
                with self.gate.exclusive():  # converting times the INT8 backends: that needs the device alone too
                    measure_start = time.perf_counter()
                    pipeline.finish(self.model, engine, self.engine_info, rows=self._rows())
                    self._measure(self.model, cached=self.request.cached)
                    self.seconds["measure_s"] = time.perf_counter() - measure_start
            else:
                backends = self._measure_untrained()
                self._ask(0, 0.0, {})
                self._train(self.request.rungs)
                with self.gate.shared():  # the INT8 backends measured before: converting times nothing now
                    pipeline.finish(self.model, engine, self.engine_info, recorded=backends)
                self._measure_again_if_the_form_changed()
        except RungStop as stop:
            return self._result(stop.report)
        with self.gate.shared():  # no computing outside the gate: another trial may be measuring
            eval_metrics = self.task.evaluate(self.model, self.device)  # the converted model: what was measured
        if "accuracy" not in eval_metrics:
            raise TypeError(f"the task's evaluate() must return 'accuracy', got {sorted(eval_metrics)}")
        self.train_metrics.update(eval_metrics)
        return self._result(None)

    def _train(self, rungs: tuple[float, ...] | None) -> None:
        from dsnas.kernels import pipeline

        request, task = self.request, self.task
        with self.gate.shared() as hold:
            self.train_started = train_start = time.perf_counter()
            main = pipeline.main_fraction(self.model, request.engine)
            kwargs = pipeline.supported(task.train, fallback_steps=request.engine.fallback_steps, fraction=main)
            if rungs:
                kwargs.update(self._rung_kwargs(hold, rungs, main))
            self.train_metrics.update(task.train(self.model, self.device, seed=request.seed,
                                                 checkpoint=hold.checkpoint, **kwargs))
            trained = time.perf_counter()
            engine_metrics, self.engine_info = pipeline.run(self.model, task, self.device, request.engine,
                                                            seed=request.seed, checkpoint=hold.checkpoint)
            self.train_metrics.update(engine_metrics)
            self.seconds.update(train_s=trained - train_start, engine_s=time.perf_counter() - trained)

    def _rung_kwargs(self, hold: Any, rungs: tuple[float, ...], main: float) -> dict[str, Any]:
        """``rungs`` and ``at_rung`` for the task's train(), when it takes both. Rungs are shares of the whole
        budget, so that every candidate reports after as many tokens; train() counts shares of its own call, which
        for an int8 or sparse candidate is the budget less fine-tuning and QAT."""
        from dsnas.kernels import pipeline

        def at_rung(k: int) -> None:
            metrics = self.task.evaluate(self.model, self.device)
            self.model.train()
            with hold.paused():  # waiting for the driver computes nothing: a trial that wants to measure may
                self._ask(k + 1, rungs[k], metrics)

        kwargs = pipeline.supported(self.task.train, rungs=tuple(min(r / main, 1.0) for r in rungs), at_rung=at_rung)
        if len(kwargs) < 2:
            self.profile["rungs"] = "the task's train() takes no rungs= and at_rung=: it trained without them"
            return {}
        return kwargs

    def _measure_untrained(self) -> dict[str, str]:
        """Measure the architecture's inference form, untrained, holding the device alone; returns the INT8
        backend each layer chose, so that the trained model converts to the same code."""
        from dsnas.kernels.convert import int8_backends, untrained_inference_form
        from dsnas.kernels.linear import layer_report
        from dsnas.models import build

        with self.gate.exclusive():
            measure_start = time.perf_counter()
            probe = untrained_inference_form(build(self.request.arch).to(self.device),
                                             int8_backend=self.request.engine.int8_backend, rows=self._rows())
            self._measure(probe, cached=self.request.cached)
            self.profile["measured_on"] = "the untrained inference form, before training (timings do not depend " \
                                          "on the weights' values)"
            self.seconds["measure_s"] = time.perf_counter() - measure_start
        return int8_backends(layer_report(probe))

    def _rows(self) -> list[int]:
        """The row counts a linear layer multiplies when measured: an "auto" INT8 backend is timed at these."""
        per_example = getattr(self.task, "tokens_per_example", 1)
        return sorted({bs * per_example for bs in self.request.hardware.batch_sizes})

    def _measure(self, model: Any, cached: dict[str, Any] | None = None) -> None:
        import torch

        from dsnas.profiler import measure

        engine = self.request.engine
        measured = torch.compile(model) if engine.compile else model
        context = {"compile": engine.compile, "int8_backend": engine.int8_backend, "calibrator": engine.calibrator}
        self.hw_metrics, profile = measure(measured, self.task, self.device, self.request.hardware,
                                           cached=cached, context=context)
        self.profile.update(profile)

    def _measure_again_if_the_form_changed(self) -> None:
        """What was measured before training must be what ships: an "auto" sparsity layer the Hessian left dense
        (the untrained form prunes every one) changes the form, and then the trained model is measured again."""
        from dsnas.kernels.convert import inference_signature, signature_difference

        shipped = inference_signature(self.model)
        shipped["compiled"] = self.request.engine.compile  # measured under torch.compile: the same model compiled
        why = signature_difference(self.profile.get("signature", {}), shipped)
        if not why:
            return
        with self.gate.exclusive():
            start = time.perf_counter()
            self._measure(self.model, cached=self.request.cached)
            self.seconds["measure_s"] = self.seconds.get("measure_s", 0.0) + time.perf_counter() - start
        self.profile["measured_on"] = f"the trained model, measured again after training: {why}"

    def _ask(self, rung: int, fraction: float, metrics: dict[str, Any]) -> None:
        """Report to the driver at a rung; raises RungStop when it stops the trial there."""
        request = self.request
        report = RungReport(request.trial, rung, fraction,
                            {**self.hw_metrics, **{k: float(v) for k, v in metrics.items()}})
        if request.channel is not None and not request.channel.ask(report):
            raise RungStop(report)

    def _result(self, pruned: RungReport | None) -> TrialResult:
        if pruned is not None and self.train_started is not None:
            self.seconds["train_s"] = time.perf_counter() - self.train_started  # up to the rung where it stopped
        profile = {**self.profile, "engine": {**self.engine_info, "compiled": self.request.engine.compile},
                   "task": self.task.fingerprint(), "worker": worker_identity()}
        metrics = {**(self.train_metrics if pruned is None else {}), **self.hw_metrics, **self.seconds,
                   "trial_s": time.perf_counter() - self.started}
        metrics = {k: float(v) for k, v in metrics.items()}
        if pruned is not None:
            return TrialResult(metrics={**metrics, "trained_fraction": pruned.fraction}, profile=profile,
                               pruned=pruned)
        return TrialResult(metrics=metrics, profile=profile, weights=weights_bytes(self.model),
                           probe=probe_bytes(self.model, self.task.example_batch(2, self.device)))


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
