"""The model files of a bundle that other runtimes load: model.pt2 (torch.export) and model.onnx. INT8 layers
export in QDQ form (QuantizeLinear / DequantizeLinear around a float GEMM, the form TensorRT and onnxruntime take):
their weights as int8 per output row, their inputs at the calibrated per-tensor range. 2:4 layers export with their
zeros in place (the mask is in weights.safetensors)."""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dsnas.errors import DsnasError


def write_model_files(model: Any, example: Any, out: Path) -> dict[str, str]:
    """model.pt2 (torch.export) and model.onnx, each when the model supports it, with a dynamic batch
    dimension; returns {format: file name, or "unavailable: reason"} so that no omission is silent."""
    import torch

    for name in ("model.pt2", "model.onnx"):
        (out / name).unlink(missing_ok=True)  # a file from an earlier export must not outlive a failure now
    status = {}
    with qdq_form(model) as int8_layers:
        try:
            # Batch 2, not 1: torch.export specializes a dimension whose example size is 1.
            program = torch.export.export(model, (example[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
            torch.export.save(program, out / "model.pt2")
            status["pt2"] = "model.pt2"
        except Exception as e:  # any failure of tracing or saving means: this model has no .pt2
            program, status["pt2"] = None, f"unavailable: torch.export failed ({_one_line(e)})"
        status["onnx"] = _write_onnx(program, out / "model.onnx")
    if int8_layers:
        status["int8"] = (f"{int8_layers} INT8 layers as QuantizeLinear/DequantizeLinear (weights int8 per output "
                          "row, inputs at the calibrated per-tensor range) in model.onnx and model.pt2")
    sparse = _sparse_layers(model)
    if sparse:
        status["sparsity"] = (f"{len(sparse)} 2:4 layers with their zeros in place in the model files; each mask is "
                              f"in weights.safetensors as LAYER.mask ({', '.join(sparse[:4])}"
                              f"{', ...' if len(sparse) > 4 else ''})")
    return status


def _sparse_layers(model: Any) -> list[str]:
    from dsnas.kernels.linear import engine_layers  # torch loads on first use

    return [name for name, layer in engine_layers(model).items() if layer.pattern == "2:4"]


@contextmanager
def qdq_form(model: Any) -> Iterator[int]:
    """While open, each converted INT8 engine layer of ``model`` computes through torch's quantized_decomposed
    quantize/dequantize ops, which torch.export keeps and the ONNX exporter writes as QuantizeLinear /
    DequantizeLinear; the kernel that ran when measuring (torch's or torchao's packed weights) cannot be exported.
    Yields how many layers it changed; puts the measured kernels back on exit."""
    from dsnas.kernels.linear import engine_layers  # torch loads on first use

    int8 = {name: layer for name, layer in engine_layers(model).items()
            if getattr(layer, "precision", None) == "int8" and layer.inference is not None}
    # The QDQ weights are quantized from each layer's fp32 master, which dsnas.load frees: a loaded model's
    # write_model_files was an AttributeError on None ('NoneType' object has no attribute 'detach').
    shed = [name for name, layer in int8.items() if layer.weight is None]
    if shed:
        raise DsnasError(f"INT8 layer {shed[0]!r} holds no fp32 master weight (dsnas.load keeps only the inference "
                         "form), and its QDQ form is quantized from it. Fix: load the model with "
                         "dsnas.load(bundle, training_form=True)")
    swapped = {}
    for layer in int8.values():
        swapped[layer] = layer.inference
        layer.inference = _qdq_linear(layer)
    try:
        yield len(swapped)
    finally:
        for layer, kernel in swapped.items():
            layer.inference = kernel


def _write_onnx(program: Any, path: Path) -> str:
    import torch

    if program is None:
        return "unavailable: the ONNX exporter needs torch.export, which failed (see pt2)"
    missing = onnx_missing()
    if missing:
        return f"unavailable: {' and '.join(missing)} not installed. Fix: pip install 'dsnas[onnx]'"
    import onnx

    # The exporter's default opset first; opset 22 where that file is invalid: before 22, Conv takes no bfloat16, and
    # a CNN with bf16 stages was written as a model.onnx that onnx's checker and onnxruntime refuse, "written".
    for opset in (None, 22):
        try:
            with _quiet():
                torch.onnx.export(program, (), str(path), input_names=["input"], output_names=["logits"],
                                  dynamic_shapes=({0: "batch"},), external_data=False, verbose=False,
                                  **({} if opset is None else {"opset_version": opset}))
        except Exception as e:  # an operator without an ONNX translation, for instance
            path.unlink(missing_ok=True)
            return f"unavailable: torch.onnx.export failed ({_one_line(e)})"
        try:
            onnx.checker.check_model(str(path), full_check=True)
            return path.name
        except Exception as e:  # onnx.checker's ValidationError or a shape inference error
            invalid = _one_line(e)
    path.unlink(missing_ok=True)
    return f"unavailable: the exported ONNX file is not valid ({invalid})"


def _qdq_linear(layer: Any) -> Any:
    """A module computing ``layer`` (a converted INT8 EngineLinear) as QDQ: symmetric int8 weights per output row
    (scale = the row's amax / 127, as QAT fake-quantized them) and the input at the calibrated amax / 127."""
    import torch
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
    from torch import nn

    qd = torch.ops.quantized_decomposed
    weight = layer.weight.detach().float() * (layer.mask if layer.mask is not None else 1)
    scale = (weight.abs().amax(1).clamp_min(1e-12) / 127).float()
    x_amax = float(layer.act_amax)  # calibrated before QAT: every trained int8 layer has one
    x_scale = x_amax / 127

    class QDQ(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("weight_int8", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
            self.register_buffer("weight_scale", scale)
            self.register_buffer("weight_zero", torch.zeros_like(scale, dtype=torch.int64))
            self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float(), requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # Clamped to the symmetric grid first, as QAT and the int8 kernels clip (+-127 steps): ONNX's
            # QuantizeLinear saturates at -128, one step beyond it for an input below -amax.
            xq = qd.quantize_per_tensor(x.float().clamp(-x_amax, x_amax), x_scale, 0, -128, 127, torch.int8)
            xd = qd.dequantize_per_tensor(xq, x_scale, 0, -128, 127, torch.int8)
            w = qd.dequantize_per_channel(self.weight_int8, self.weight_scale, self.weight_zero, 0, -127, 127,
                                          torch.int8)
            return torch.nn.functional.linear(xd, w, self.bias)

    return QDQ().to(layer.weight.device)


# A QDQ model (or one of fp16 layers) run by onnxruntime against the trial's logits: INT8 and half-precision
# rounding differ between kernels (an fp16 model: 0.0011 at 100% top-1 agreement), but the predictions must agree.
# fp32 models must agree to float rounding.
ONNX_TOP1_AGREEMENT = 0.99
ONNX_FP32_ATOL = 1e-3


def onnx_check(path: Path, probe: dict[str, Any], batch_sizes: Any, threads: int | None,
               recorded: dict[str, float], low_precision: bool) -> dict[str, Any]:
    """model.onnx run by onnxruntime on the probe input against the trial's logits (largest difference, relative
    RMS, top-1 agreement) and timed on the CPU at each batch size beside dsnas's latency of the torch model."""
    import statistics
    import time

    if importlib.util.find_spec("onnxruntime") is None:
        return {"ok": None, "why": "onnxruntime not installed (pip install onnxruntime): not checked"}
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    x, y = probe["input"].numpy(), probe["logits"].float().numpy()
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        out = session.run(None, {"input": x})[0]
    except Exception as e:  # e.g. a bf16 MatMul, which onnxruntime's CPU kernels do not implement
        return {"ok": None, "why": f"onnxruntime cannot run it on the CPU ({_one_line(e)}): not checked"}
    diff = out - y
    top1 = float((out.argmax(-1) == y.argmax(-1)).mean())
    max_diff = float(np.abs(diff).max())
    ok = top1 >= ONNX_TOP1_AGREEMENT if low_precision else max_diff <= ONNX_FP32_ATOL
    check: dict[str, Any] = {"ok": ok, "max_abs_diff": max_diff, "top1_agreement": top1,
                             "relative_rms": float(np.sqrt((diff ** 2).mean() / max((y ** 2).mean(), 1e-30))),
                             "rule": f"top-1 agreement >= {ONNX_TOP1_AGREEMENT}" if low_precision else
                                     f"max |difference| <= {ONNX_FP32_ATOL}"}
    for bs in batch_sizes:
        batch = x[np.arange(bs) % len(x)]
        for _ in range(3):
            session.run(None, {"input": batch})
        times = []
        for _ in range(20):
            start = time.perf_counter()
            session.run(None, {"input": batch})
            times.append((time.perf_counter() - start) * 1000)
        check[f"onnxruntime_latency_ms_bs{bs}"] = statistics.median(times)
        if recorded.get(f"latency_ms_bs{bs}"):
            check[f"dsnas_latency_ms_bs{bs}"] = recorded[f"latency_ms_bs{bs}"]
    return check


def describe_exports(exports: dict[str, Any]) -> list[str]:
    """What `dsnas export` says about the files: each format written, or why not; the onnxruntime check."""
    lines = [f"  {name}: {'written' if not str(exports.get(key, '')).startswith('unavailable') else exports[key]}"
             for key, name in (("pt2", "model.pt2"), ("onnx", "model.onnx")) if key in exports]
    for key in ("int8", "sparsity", "preprocessing"):
        if key in exports:
            lines.append(f"  {key}: {exports[key]}")
    if "transformers" in exports:
        lines.append(f"  hf/ (transformers): {exports['transformers']}")
    check = exports.get("onnx_check")
    if check and check.get("ok") is None:
        lines.append(f"  onnxruntime: {check['why']}")
    elif check:
        times = ", ".join(f"{check[k]:.3g} ms at batch {k.rsplit('_bs', 1)[1]} (dsnas, torch: "
                          f"{check.get(k.replace('onnxruntime', 'dsnas'), float('nan')):.3g} ms)"
                          for k in check if k.startswith("onnxruntime_latency"))
        lines.append(f"  onnxruntime: {'agrees' if check['ok'] else 'DISAGREES'} with the trial's logits (max "
                     f"|difference| {check['max_abs_diff']:.2g}, top-1 agreement {check['top1_agreement']:.1%}; "
                     f"rule: {check['rule']}); {times}")
    return lines


def onnx_missing() -> list[str]:
    """The packages torch's ONNX exporter needs that are not installed."""
    return [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]


@contextmanager
def _quiet() -> Iterator[None]:
    """The exporter logs and warns about things that do not concern a dsnas user (torchvision ops, deprecations)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]
