"""The worker's engine steps after training: sparsify -> fine-tune -> calibrate + QAT (``run``), then ``finish``
converts to the inference form, with the accuracy after each step, so a trial shows what each step cost."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dsnas.errors import TrialError
from dsnas.kernels import sparsity
from dsnas.kernels.calibrate import make_calibrator
from dsnas.kernels.convert import convert
from dsnas.kernels.linear import EngineLinear, engine_layers, layer_report
from dsnas.kernels.sparsity import hutchinson_diag

NM = (2, 4)  # the one N:M pattern the sparsity choice "2:4" names, the one GPUs accelerate


def run(model: nn.Module, task: Any, device: Any, engine: Any, *, seed: int,
        checkpoint: Callable[[], None]) -> tuple[dict[str, float], dict[str, Any]]:
    """Apply the engine's training steps to a trained ``model`` in place; returns (metrics, profile["engine"]).
    Metrics: ``accuracy_<step>`` after each step that ran; the caller converts (``finish``) and evaluates last."""
    layers = engine_layers(model)
    sparse = {n: m for n, m in layers.items() if m.sparsity != "dense"}
    int8 = {n: m for n, m in layers.items() if m.precision == "int8"}
    metrics: dict[str, float] = {}
    info: dict[str, Any] = {}
    if sparse or int8:
        check_task(model, task)
        metrics["accuracy_trained"] = task.evaluate(model, device)["accuracy"]
    if sparse:
        info["sparsity"] = _sparsify(model, task, device, engine, sparse, seed)
        metrics["accuracy_sparsified"] = task.evaluate(model, device)["accuracy"]
        if engine.finetune_frac > 0:
            _count(metrics, _train(task, model, device, engine, engine.finetune_frac, seed + 1, checkpoint))
            metrics["accuracy_finetuned"] = task.evaluate(model, device)["accuracy"]
    if int8:
        info["calibration"] = _calibrate(model, task, device, engine, int8, seed)
        for layer in int8.values():
            layer.qat = True
        metrics["accuracy_calibrated"] = task.evaluate(model, device)["accuracy"]
        if engine.qat_frac > 0:
            _count(metrics, _train(task, model, device, engine, engine.qat_frac, seed + 2, checkpoint))
            metrics["accuracy_qat"] = task.evaluate(model, device)["accuracy"]
    metrics["fallbacks"] = float(sum(m.fallbacks for m in layers.values()))
    return metrics, info


def finish(model: nn.Module, engine: Any, info: dict[str, Any], recorded: dict[str, str] | None = None,
           rows: Any = None, reasons: dict[str, str] | None = None) -> None:
    """Convert to the inference form and record what runs per layer. The worker calls it while it holds the
    device alone: choosing an INT8 backend times the candidates (at ``rows``, the row counts it will be measured
    at), and other trials' work would skew that. ``recorded``: the INT8 backend each layer already chose (when
    measured before training): nothing is timed; ``reasons``: why each was chosen then."""
    convert(model, int8_backend=engine.int8_backend, recorded=recorded, rows=rows, reasons=reasons)
    info["layers"] = layer_report(model)


def main_fraction(model: nn.Module, engine: Any) -> float:
    """The share of the task's budget the first training gets: fine-tuning and QAT come out of the same budget, so
    every candidate trains on as many tokens and a sparse or int8 one gains no accuracy from extra training."""
    layers = engine_layers(model).values()
    spent = (engine.finetune_frac if any(m.sparsity != "dense" for m in layers) else 0.0) + \
        (engine.qat_frac if any(m.precision == "int8" for m in layers) else 0.0)
    return 1.0 - spent


def check_task(model: nn.Module, task: Any) -> None:
    """Before any training: a model with sparse or int8 layers needs a task that can fine-tune and calibrate."""
    layers = engine_layers(model).values()
    if not any(m.sparsity != "dense" or m.precision == "int8" for m in layers):
        return
    missing = [f"{name}()" for name in ("batches", "loss") if not callable(getattr(task, name, None))]
    kwargs = supported(task.train, fraction=1.0, lr_scale=1.0)
    missing += [f"train({k}=)" for k in ("fraction", "lr_scale") if k not in kwargs]
    if missing:
        raise TrialError(f"this architecture has sparse or int8 layers, which need the task to provide "
                         f"{', '.join(missing)} (see dsnas/tasks/charlm.py); remove those choices or add them")


def _train(task: Any, model: nn.Module, device: Any, engine: Any, fraction: float, seed: int,
           checkpoint: Callable[[], None]) -> dict[str, float]:
    kwargs = supported(task.train, fraction=fraction, lr_scale=engine.lr_scale, fallback_steps=engine.fallback_steps)
    return task.train(model, device, seed=seed, checkpoint=checkpoint, **kwargs) or {}


# What a task's train() counts (the built-in tasks' steps, tokens, images and overflowed steps): fine-tuning's and
# QAT's are added to the first training's (``add_counts``), so that a trial says what it trained on in all.
COUNTS = ("train_steps", "train_tokens", "train_images", "skipped_steps")


def _count(metrics: dict[str, float], trained: Any) -> None:
    for key in COUNTS:
        if isinstance(trained, dict) and isinstance(trained.get(key), (int, float)):
            metrics[key] = metrics.get(key, 0.0) + float(trained[key])


def add_counts(first: dict[str, float], engine_metrics: dict[str, float]) -> dict[str, float]:
    """``engine_metrics`` with the counts of its trainings added to those of the first training (``first``): a
    2:4 int8 candidate said train_tokens 14,848 where it trained on 29,184, as a dense one did on 29,696."""
    return {**engine_metrics, **{key: first[key] + engine_metrics[key] for key in COUNTS
                                 if key in engine_metrics and isinstance(first.get(key), (int, float))}}


def supported(fn: Callable[..., Any], **kwargs: Any) -> dict[str, Any]:
    """The keyword arguments ``fn`` accepts: a user's task written before they existed still trains."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _sparsify(model: nn.Module, task: Any, device: Any, engine: Any, layers: dict[str, EngineLinear],
           seed: int) -> dict[str, Any]:
    """Resolve "auto" layers by their Hessian trace, then apply 2:4 masks chosen by the saliency criterion."""
    batches = task.batches(max(1, engine.calibration_batches), device, seed=seed)
    diags = None
    auto = [n for n, m in layers.items() if m.sparsity == "auto"]
    if engine.saliency == "hessian" or auto:
        diags = dict(zip(layers, _hessian_diag(model, task, batches, [m.weight for m in layers.values()],
                                               engine.hessian_samples, seed)))
    info: dict[str, Any] = {"saliency": engine.saliency, "pattern": f"{NM[0]}:{NM[1]}"}
    chosen = [n for n, m in layers.items() if m.sparsity != "auto"]
    if auto:
        traces = sparsity.hessian_traces([diags[n] for n in auto])
        ranked = sparsity.rank_layers_by_sensitivity(auto, traces, [layers[n].weight.numel() for n in auto])
        # The least sensitive half of the "auto" layers is sparsified; the rest stay dense (their mask all ones).
        chosen += ranked[: (len(ranked) + 1) // 2]
        info["traces"] = {n: round(t, 6) for n, t in zip(auto, traces)}
        info["auto_sparsified"] = sorted(ranked[: (len(ranked) + 1) // 2])
    norms = sparsity.collect_input_norms(model, {n: layers[n] for n in chosen}, [x for x, _ in batches]) \
        if engine.saliency == "wanda" else {}
    for name in chosen:
        weight = layers[name].weight.detach()
        if engine.saliency == "hessian":
            scores = sparsity.hessian_scores(weight, diags[name])
        elif engine.saliency == "wanda":
            scores = sparsity.wanda_scores(weight, norms[name])
        else:
            scores = sparsity.magnitude_scores(weight)
        sparsity.sparsify_layer(layers[name], scores, *NM)
    info["pruned"] = sorted(chosen)
    return info


def _hessian_diag(model: nn.Module, task: Any, batches: list[Any], params: list[torch.Tensor], samples: int,
                  seed: int) -> list[torch.Tensor]:
    """diag(H) of the loss on the first batch by ``samples`` Hutchinson probes. Spreading the same probes over
    several batches measured no better (benchmarks/saliency.py: the probes' noise dwarfs the batches'), and each
    batch costs one more forward and backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    x, y = batches[0]
    was_training = model.training
    model.train()
    # fp16 layers compute this pass in fp32, as after an overflow: no loss scaling guards its Hessian-vector
    # products, which overflowed fp16 where activations are large (inputs of 1e4: every trace NaN, the "auto"
    # layers ranked on NaN without a word, and hessian saliency refused its scores as if the weights were bad).
    half = {m: m.fallback_left for m in engine_layers(model).values() if m.precision == "fp16"}
    for layer in half:
        layer.fallback_left = 1
    try:
        # The fused attention kernels have no second derivative; the math one does.
        with sdpa_kernel(SDPBackend.MATH):
            return hutchinson_diag(lambda: task.loss(model, x, y), params, samples, seed)
    finally:
        model.train(was_training)
        for layer, left in half.items():
            layer.fallback_left = left


def _calibrate(model: nn.Module, task: Any, device: Any, engine: Any, layers: dict[str, EngineLinear],
               seed: int) -> dict[str, Any]:
    """Observe each int8 layer's inputs over calibration batches and set its activation range."""
    calibrators = {name: make_calibrator(engine.calibrator) for name in layers}
    seen: set[str] = set()

    def observer(name: str) -> Callable[..., None]:
        def observe(_module: nn.Module, args: tuple[Any, ...]) -> None:
            calibrators[name].observe(args[0].detach())
            seen.add(name)
        return observe

    hooks = [layer.register_forward_pre_hook(observer(name)) for name, layer in layers.items()]
    model.eval()
    try:
        with torch.no_grad():
            for x, _ in task.batches(engine.calibration_batches, device, seed=seed + 3):
                model(x)
    finally:
        for hook in hooks:
            hook.remove()
    silent = [name for name in layers if name not in seen]
    if silent:  # else the calibrator's own "call observe()" error, naming no layer
        raise TrialError(f"int8 calibration needs each int8 layer's inputs, but {silent} saw none in "
                         f"{engine.calibration_batches} calibration batches. Fix: leave layers the model's forward "
                         "does not run out of the int8 choices, or give the task batches that run through them")
    amax = {}
    for name, layer in layers.items():
        found = float(calibrators[name].amax())
        if not found > 0:
            # Every calibrator gives 0 when the input held only zeros; QAT would then fail on a zero range with
            # "run calibration" as the fix, naming no layer, though calibration ran.
            raise TrialError(f"int8 layer {name} saw only zeros at its input over {engine.calibration_batches} "
                             f"calibration batches (calibrator {engine.calibrator!r}): an activation range of 0 "
                             "has nothing to quantize. Fix: give that layer another precision, or find why its "
                             "input is zero (zero weights or a dead ReLU before it)")
        layer.act_amax.fill_(found)
        amax[name] = round(found, 6)
    return {"calibrator": engine.calibrator, "batches": engine.calibration_batches, "amax": amax}
