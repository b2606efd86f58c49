"""Worker side of a trial: build -> train -> engine steps -> measure -> evaluate -> result (with rungs: measure
first, then train rung by rung while the driver decides). Never touches the storage."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from dsnas.errors import TrialError
from dsnas.models import build, forget_families, is_user_family
from dsnas.profiler import MeasureGate, device_key, measure, resolve_device
from dsnas.rungs import ClockEvent, RungReport, RungStop
from dsnas.tasks import data_differs, forget_built, make_task, preprocessing_of, runs_own_trials
from dsnas.trial import Profile, TrialRequest, TrialResult, worker_identity

# A trial's wait for the measurement gate (others measure on its device) is said once it lasts this long.
WAIT_SAY_S = 10.0


def run_trial(request: TrialRequest) -> TrialResult:
    clock = OwnClock(request)
    clock.tell("started")  # its time limit counts from here, not from when it was queued
    _start_of_run(request)
    task = _task_of(request)
    if runs_own_trials(task):  # the user's own evaluation function: no model is built here
        return run_own_trial(task, request)
    return _Candidate(request, task, clock).run()


_SERVED: list[str | None] = [None]  # the run whose trial this process ran last


def _start_of_run(request: TrialRequest) -> None:
    """A worker kept from another run (a Ray the notebook started itself) builds its task and imports the study's
    code afresh: trials after an edit of the task ran the code as it was before. The driver's own process (the
    local executor) did so as the run started."""
    run, before = request.run, _SERVED[0]
    _SERVED[0] = run
    if run is None or before in (None, run) or run.startswith(f"{socket.gethostname()}:{os.getpid()}:"):
        return
    forget_built()
    forget_families()


def _task_of(request: TrialRequest) -> Any:
    """The request's task as this process builds it, from the data the driver's was built from: a task kept from an
    earlier search (a Ray worker of a cluster that outlived it) is built again from the data as it is now, and a
    worker whose data still differs (another node's copy) refuses the trial rather than mix data in one study."""
    task = make_task(request.task)
    wanted = request.task_fingerprint
    if wanted is None or not data_differs(wanted, task.fingerprint()):
        return task
    forget_built()
    task = make_task(request.task)
    differs = data_differs(wanted, task.fingerprint())
    if differs:
        raise TrialError(f"the task's data on this worker ({worker_identity()['host']}) differs from the driver's "
                         f"({', '.join(differs)}): copy the study folder's data to this node as it is on the "
                         "driver's")
    return task


def run_own_trial(task: Any, request: TrialRequest) -> TrialResult:
    """A trial whose task evaluates architectures itself (dsnas.tasks.RunsOwnTrials): no model is built here."""
    started = time.perf_counter()
    known: dict[str, float] = {}  # what the function reported so far
    hardware: dict[str, float] = {}  # what it reported before training: all a pruned trial keeps

    def report(rung: int, metrics: dict[str, Any]) -> None:
        known.update({k: float(v) for k, v in metrics.items()})
        if rung == 0:
            hardware.update(known)
        if request.rungs is None or request.channel is None:
            return  # no multi-fidelity in this study: every trial goes on
        fraction = 0.0 if rung == 0 else request.rungs[rung - 1]
        sent = RungReport(request.trial, rung, fraction, dict(known))
        if not request.channel.ask(sent):
            raise RungStop(sent)

    try:
        metrics = {k: float(v) for k, v in task.evaluate_arch(request.arch, seed=request.seed,
                                                             rungs=tuple(request.rungs or ()),
                                                             report=report).items()}
        pruned = None
    except RungStop as stop:
        metrics, pruned = {**hardware, "trained_fraction": stop.report.fraction}, stop.report
    profile = {**recorded_profile(metrics, request.hardware, task), "worker": worker_identity()}
    return TrialResult(metrics={**metrics, "trial_s": time.perf_counter() - started}, profile=profile,
                       pruned=pruned)


def recorded_profile(metrics: dict[str, float], hardware: Any, task: Any) -> dict[str, Any]:
    """The profile of figures dsnas did not measure: each batch size's latency as one sample, on a "device"
    named by the task's fingerprint, so that the measurement table, the cache and the predictor can use them while
    every row says where it came from."""
    batches = {}
    for bs in hardware.batch_sizes:
        ms = metrics.get(f"latency_ms_bs{bs}")
        if ms is None:
            continue
        figures = {name: metrics[f"{name}_bs{bs}"] for name in ("flops", "bytes", "peak_memory_mb", "throughput_tok_s")
                   if f"{name}_bs{bs}" in metrics}
        batches[str(bs)] = {"median_ms": ms, "p10_ms": ms, "p90_ms": ms, "spread": 0.0, "repeats": 1,
                            "latency_ms": ms, **figures}
    source = task.fingerprint()
    return {"fingerprint": {"device": "recorded", "source": source}, "batches": batches, "backend": "recorded",
            "dtype": "recorded", "threads": None, "task": source,
            "measured_by": "the task's evaluate_arch (figures it supplied; dsnas did not measure them)"}


class _Candidate:
    """One trial in its worker: build -> train -> engine steps -> convert -> measure -> evaluate; with rungs,
    measured first (timings do not depend on the weights' values) and trained rung by rung."""

    def __init__(self, request: TrialRequest, task: Any, clock: OwnClock | None = None) -> None:
        import torch

        from dsnas.kernels import pipeline  # torch loads on first use

        self.request, self.task = request, task
        self.clock = clock or OwnClock(request)
        self.started = time.perf_counter()
        torch.manual_seed(request.seed)
        self.device = resolve_device(request.hardware.device)
        self.model = build(request.arch, request.task.base_dir).to(self.device)
        pipeline.check_task(self.model, task)
        # Time kept waiting for another trial's measurement (or for its training, to measure) is not this one's.
        self.gate = MeasureGate(device_key(self.device),
                                on_wait=lambda waiting: self.clock.tell("waiting" if waiting else "running"),
                                announce=f"trial {request.trial}", say_after_s=WAIT_SAY_S)
        if is_user_family(str(request.arch.get("family", ""))):
            with self.gate.shared():  # no computing outside the gate: another trial may be measuring
                _check_output(self.model, task, self.device, request.arch["family"])
        self.hw_metrics: dict[str, float] = {}
        self.train_metrics: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.profile: Profile = {}
        self.engine_info: dict[str, Any] = {}
        self.train_started: float | None = None
        self.waited_at_training = 0.0

    def run(self) -> TrialResult:
        from dsnas.kernels import pipeline  # torch loads on first use

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
                backends, reasons = self._measure_untrained()
                self._ask(0, 0.0, {})
                self._train(self.request.rungs)
                with self.gate.shared():  # the INT8 backends measured before: converting times nothing now
                    pipeline.finish(self.model, engine, self.engine_info, recorded=backends, reasons=reasons)
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
        from dsnas.kernels import pipeline  # torch loads on first use

        request, task = self.request, self.task
        with self.gate.shared() as hold:
            self.train_started = train_start = time.perf_counter()
            self.waited_at_training = waited_before = self.clock.waited_s()
            main = pipeline.main_fraction(self.model, request.engine)
            kwargs = pipeline.supported(task.train, fallback_steps=request.engine.fallback_steps, fraction=main)
            if rungs:
                kwargs.update(self._rung_kwargs(hold, rungs, main))
            self.train_metrics.update(task.train(self.model, self.device, seed=request.seed,
                                                 checkpoint=hold.checkpoint, **kwargs))
            _check_finite(self.model)
            # Its own seconds: the waits in checkpoint() for another trial's measurement are not its work.
            trained, waited_training = time.perf_counter(), self.clock.waited_s()
            engine_metrics, self.engine_info = pipeline.run(self.model, task, self.device, request.engine,
                                                            seed=request.seed, checkpoint=hold.checkpoint)
            self.train_metrics.update(pipeline.add_counts(self.train_metrics, engine_metrics))
            self.seconds.update(train_s=trained - train_start - (waited_training - waited_before),
                                engine_s=time.perf_counter() - trained - (self.clock.waited_s() - waited_training))

    def _rung_kwargs(self, hold: Any, rungs: tuple[float, ...], main: float) -> dict[str, Any]:
        """``rungs`` and ``at_rung`` for the task's train(), when it takes both. Rungs are shares of the whole
        budget, so that every candidate reports after as many tokens; train() counts shares of its own call, which
        for an int8 or sparse candidate is the budget less fine-tuning and QAT."""
        from dsnas.kernels import pipeline  # torch loads on first use

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

    def _measure_untrained(self) -> tuple[dict[str, str], dict[str, str]]:
        """Measure the architecture's inference form, untrained, holding the device alone; returns the INT8
        backend each layer chose, so that the trained model converts to the same code, and why (the measured
        ratios of an "auto" choice), for the trained model's profile."""
        import torch

        from dsnas.kernels.convert import int8_backends, int8_reasons, untrained_inference_form  # torch: first use
        from dsnas.kernels.linear import layer_report  # torch loads on first use

        # Before training, nothing here may draw from torch's global generator, which a model's dropout and a
        # task's unseeded batches train with: building the probe draws its weights, and the host-speed probes and
        # CPU ceilings draw random matrices as often as the host's load and the caches decide. One seed trained a
        # model with dropout to 0.3379, 0.3604 and 0.3745 in three runs (0.3750 without rungs).
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), self.gate.exclusive():
            measure_start = time.perf_counter()
            probe = untrained_inference_form(build(self.request.arch, self.request.task.base_dir).to(self.device),
                                             int8_backend=self.request.engine.int8_backend, rows=self._rows())
            self._measure(probe, cached=self.request.cached)
            self.profile["measured_on"] = "the untrained inference form, before training (timings do not depend " \
                                          "on the weights' values)"
            self.seconds["measure_s"] = time.perf_counter() - measure_start
        report = layer_report(probe)
        return int8_backends(report), int8_reasons(report)

    def _rows(self) -> list[int]:
        """The row counts a linear layer multiplies when measured: an "auto" INT8 backend is timed at these."""
        per_example = getattr(self.task, "tokens_per_example", 1)
        return sorted({bs * per_example for bs in self.request.hardware.batch_sizes})

    def _measure(self, model: Any, cached: dict[str, Any] | None = None) -> None:
        import torch

        engine = self.request.engine
        measured = torch.compile(model) if engine.compile else model
        context = {"compile": engine.compile, "int8_backend": engine.int8_backend, "calibrator": engine.calibrator}
        self.hw_metrics, profile = measure(measured, self.task, self.device, self.request.hardware,
                                           cached=cached, context=context)
        self.profile.update(profile)

    def _measure_again_if_the_form_changed(self) -> None:
        """What was measured before training must be what ships: an "auto" sparsity layer the Hessian left dense
        (the untrained form sparsifies every one) changes the form, and then the trained model is measured again."""
        from dsnas.kernels.convert import inference_signature, signature_difference  # torch loads on first use

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
        if pruned is not None and self.train_started is not None:  # up to the rung where it stopped, less waits
            self.seconds["train_s"] = time.perf_counter() - self.train_started - (self.clock.waited_s()
                                                                                 - self.waited_at_training)
        engine = {**self.engine_info, "compiled": self.request.engine.compile}
        left_alone = getattr(self.model, "dsnas_left_alone", None)
        if left_alone:  # layers an [engine.NAME] group matched that the engine has no kernel for, and why
            engine["left_alone"] = left_alone
        # The task's input preprocessing as this trial trained with it (the images task's mean, std and classes
        # come from the data): export records it in the bundle, whatever the data holds by then.
        profile = {**self.profile, "engine": engine, "task": self.task.fingerprint(),
                   "preprocessing": preprocessing_of(self.task), "worker": worker_identity()}
        metrics = {**(self.train_metrics if pruned is None else {}), **self.hw_metrics, **self.seconds,
                   "trial_s": time.perf_counter() - self.started, "waited_s": self.clock.waited_s()}
        metrics = {k: float(v) for k, v in metrics.items()}
        if pruned is not None:
            return TrialResult(metrics={**metrics, "trained_fraction": pruned.fraction}, profile=profile,
                               pruned=pruned)
        return TrialResult(metrics=metrics, profile=profile, weights=weights_bytes(self.model),
                           probe=probe_bytes(self.model, self.task.example_batch(2, self.device)))


class OwnClock:
    """A trial's own time as its worker counts it: from its start, less its waits for another trial's measurement
    (the gate). Each change is told to the driver with the time so far, where trial_timeout_s counts it."""

    def __init__(self, request: TrialRequest) -> None:
        self.request = request
        self.started = time.monotonic()
        self.waited = 0.0  # seconds waited so far, the wait going on left out
        self.waiting_since: float | None = None
        self.told = 0

    def waited_s(self) -> float:
        """Seconds waited so far, the wait going on included."""
        now = time.monotonic()
        return self.waited + (now - self.waiting_since if self.waiting_since is not None else 0.0)

    def tell(self, event: str) -> None:
        now = time.monotonic()
        if event == "waiting" and self.waiting_since is None:
            self.waiting_since = now
        elif event == "running" and self.waiting_since is not None:
            self.waited += now - self.waiting_since
            self.waiting_since = None
        if self.request.channel is not None:
            self.told += 1
            self.request.channel.clock(ClockEvent(self.request.trial, event, now - self.started - self.waited_s(),
                                                  self.told))


def _check_output(model: Any, task: Any, device: Any, family: str) -> None:
    """A user's model must return one tensor, the logits: one that returned a tuple was measured and trained, and
    then failed the trial at the export probe with a message naming neither the rule nor the builder."""
    import torch

    batch = task.example_batch(2, device)
    if not isinstance(batch, torch.Tensor):
        # The export probe keeps it as one tensor: a task of (x, mask) batches trained and measured its candidate,
        # then failed the trial with "'tuple' object has no attribute 'cpu'".
        raise TrialError(f"the task's example_batch() must return one tensor (the input the model is measured on "
                         f"and an export's probe keeps), got a {type(batch).__name__}. Fix: return one tensor from "
                         f"it (several inputs stacked or concatenated), and have the model {family} builds take it")
    from dsnas.kernels.linear import engine_layers  # torch loads on first use

    training, ran = model.training, set()
    layers = engine_layers(model)
    hooks = [layer.register_forward_pre_hook(lambda _m, _a, n=name: ran.add(n)) for name, layer in layers.items()]
    try:
        with torch.inference_mode():
            out = model.eval()(batch)
    finally:
        for hook in hooks:
            hook.remove()
    model.train(training)
    if not isinstance(out, torch.Tensor):
        raise TrialError(f"the model's forward() must return one tensor (the logits) for the task's example_batch, "
                         f"got a {type(out).__name__}. Fix: return the logits only, in the model {family} builds")
    idle = [name for name in layers if name not in ran]
    if idle:
        # A forward that reads a layer's weight itself (F.linear(x, self.fc.weight)) never calls the layer: its
        # engine choice ran nowhere, yet the trial reported it ("ran as bf16") and counted its weight at bf16.
        raise TrialError(f"the engine chose {layers[idle[0]].precision} {layers[idle[0]].sparsity} for "
                         f"{', '.join(idle[:3])}{' ...' if len(idle) > 3 else ''}, but the model's forward never "
                         f"calls {'it' if len(idle) == 1 else 'them'} (it reads the weights itself, or the layer is "
                         f"unused at inference), so the choice would change nothing that runs. Fix: call the module "
                         f"in the forward of the model {family} builds, or leave it out of the [engine] group's "
                         f"modules")


def _check_finite(model: Any) -> None:
    """A trained model whose weights hold nan or inf diverged: the built-in tasks stop on a nan loss themselves, a
    user's task may not, and its model would complete at a constant prediction's accuracy and export."""
    import torch

    diverged = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if diverged:
        tensors = f"{len(diverged)} weight tensor{'s hold' if len(diverged) > 1 else ' holds'}"
        raise TrialError(f"training diverged: {tensors} nan or inf after the task's train() (first {diverged[0]})")


def weights_bytes(model: Any) -> bytes:
    from safetensors.torch import save

    from dsnas.kernels.convert import unique_state  # torch loads on first use

    return save(unique_state(model))


# Written in a probe's metadata: its logits are the model's in eval mode (a probe of an older dsnas may hold a
# training-mode forward's: dropout's random logits, where a task's evaluate() ended with model.train()).
PROBE_MODE = {"model_mode": "eval"}


def probe_bytes(model: Any, batch: Any) -> bytes:
    import torch
    from safetensors.torch import save

    with torch.inference_mode():
        logits = model.eval()(batch).float().cpu()  # as exported and served: export compares a rebuilt model with it
    return save({"input": batch.cpu().contiguous(), "logits": logits.contiguous()}, metadata=PROBE_MODE)
