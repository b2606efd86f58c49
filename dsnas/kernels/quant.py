"""INT8 quantization-aware training (fake quantization with a straight-through estimator) and the real low-precision
inference forms: INT8 linear layers on three measured backends, and per-row scaled FP8 on GPUs that have it."""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dsnas.allocator import hold_freed_memory
from dsnas.errors import TrialError

INT8_BACKENDS = ("torchao-dynamic", "torch-dynamic", "int8-static")
DEFAULT_ROWS = (1, 32, 256)  # row counts the INT8 backends are timed at when the model's own are not known
QMAX = 127  # symmetric int8: -128 is left out so that the grid is symmetric around zero
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
_CHOICES: dict[tuple, tuple[str, dict[str, Any]]] = {}
# Choosing a backend, one this many times slower than the fastest at its faster of two calls is timed no further:
# torch._int_mm ran 0.26 s a call at 1024 rows on an AVX2-only EPYC (fp32: 0.02 s), and its nine calls at each of
# 8 shapes took 41 s of a 58 s engine probe (2026-12-06).
LOSING = 3.0


# --- fake quantization (QAT) ----------------------------------------------------------------------------------------

class _FakeQuant(torch.autograd.Function):
    """Quantize-dequantize to the symmetric int8 grid of step ``scale``; the gradient passes unchanged where
    |x| <= amax and is zero where x was clipped (STE with clipping)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x.abs() <= amax)
        return (_int8_grid(x / scale) * scale).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None


def _int8_grid(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(x), -QMAX, QMAX)


def _row_scale(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output row: (amax, scale = amax / 127); an all-zero row gets scale 1 (its values quantize to 0 anyway)."""
    amax = w.detach().float().abs().amax(dim=tuple(range(1, w.dim())), keepdim=True)
    return amax, torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 fake quantization of a weight (scale = the row's amax / 127)."""
    amax, scale = _row_scale(w)
    return _FakeQuant.apply(w, scale, amax)


def fake_quant_act(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """Per-tensor symmetric int8 fake quantization of an activation clipped at the calibrated ``amax`` (> 0)."""
    amax = torch.as_tensor(amax, dtype=torch.float32, device=x.device)
    if amax.is_cuda:  # no host sync in the training step; a zero amax fails at the next sync instead
        torch._assert_async(amax > 0, "fake_quant_act needs a calibrated amax > 0")
    elif not bool(amax > 0):
        raise TrialError(f"int8 QAT needs the layer's calibrated act_amax > 0, but got {amax.item()}. "
                         "Fix: run calibration on the layer's inputs before turning QAT on")
    return _FakeQuant.apply(x, amax / QMAX, amax)


# --- INT8 inference ------------------------------------------------------------------------------------------------

class _StaticInt8(nn.Module):
    """The QAT numerics exactly: the input quantized per tensor with the calibrated scale, an int8 x int8 -> int32
    GEMM (torch._int_mm), rescaled by act_scale * w_scale per output column, plus the bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act_amax: float) -> None:
        super().__init__()
        _, w_scale = _row_scale(weight)
        act_scale = torch.tensor(act_amax, dtype=torch.float32, device=weight.device) / QMAX
        self.register_buffer("weight_int8", _int8_grid(weight.float() / w_scale).to(torch.int8))
        self.register_buffer("act_scale", act_scale)
        self.register_buffer("out_scale", (act_scale * w_scale).flatten())
        self.register_buffer("bias", None if bias is None else bias.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In place after the division, and the int32 product rescaled straight into fp32 (a multiply promotes it):
        # fewer kernels and bytes than the out-of-place chain, with the same values. Detached: no gradient passes
        # an int8 cast anyway, and autograd would clone the tensor before each in-place op.
        q = torch.div(x.detach().float(), self.act_scale).round_().clamp_(-QMAX, QMAX).to(torch.int8)
        rows = q.shape[0]
        if q.is_cuda and rows <= 16:  # cuBLASLt's int8 GEMM wants more than 16 rows: pad with zeros
            q = F.pad(q, (0, 0, 0, 17 - rows))
        y = torch.mul(torch._int_mm(q, self.weight_int8.t())[:rows], self.out_scale)
        return y if self.bias is None else y.add_(self.bias)


def _build_static(weight: torch.Tensor, bias: torch.Tensor | None, act_amax: float | None) -> nn.Module:
    if act_amax is None:
        raise TrialError("int8-static needs the layer's calibrated act_amax, but got none. Fix: calibrate the "
                         "layer before converting it, or pick a dynamic backend")
    return _StaticInt8(weight, bias, act_amax)


def _build_torch_dynamic(weight: torch.Tensor, bias: torch.Tensor | None, act_amax: float | None) -> nn.Module:
    """torch.ao's dynamic quantized Linear (fbgemm/x86/onednn): per-channel int8 weight, the input quantized per
    tensor at run time (uint8, reduce_range). The calibrated amax is not used."""
    import torch.ao.nn.quantized.dynamic as nnqd

    out_features, in_features = weight.shape
    _, scale = _row_scale(weight)
    with warnings.catch_warnings():
        # torch.ao quantized tensors are deprecated in favour of torchao; this backend stays while it is faster here.
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*", category=UserWarning)
        qweight = torch.quantize_per_channel(weight.float(), scale.flatten().double(),
                                             torch.zeros(out_features, dtype=torch.long), 0, torch.qint8)
        layer = nnqd.Linear(in_features, out_features, bias_=bias is not None, dtype=torch.qint8)
        layer.set_weight_bias(qweight, None if bias is None else bias.float())
    return layer


def _build_torchao_dynamic(weight: torch.Tensor, bias: torch.Tensor | None, act_amax: float | None) -> nn.Module:
    """torchao's Int8DynamicActivationInt8WeightConfig: per-row int8 weight, the input quantized per row at run time.
    The calibrated amax is not used."""
    _import_torchao()
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    holder = nn.Sequential(layer)
    # set_inductor_config=False: quantize_ would otherwise change torch._inductor's global config for everyone.
    quantize_(holder, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
    return holder[0]


def _import_torchao() -> None:
    """Import torchao quietly: on a CPU build of torch its CUDA-only extensions fail to load, and it logs a warning
    for each one (and torch one for an enum it registers) in every worker. That is noise, not a problem."""
    import logging

    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        import torchao.quantization  # noqa: F401
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)


_BUILDERS: dict[str, Callable[[torch.Tensor, torch.Tensor | None, float | None], nn.Module]] = {
    "torchao-dynamic": _build_torchao_dynamic, "torch-dynamic": _build_torch_dynamic, "int8-static": _build_static}


def int8_backend_supported(backend: str, device: Any, in_features: int, out_features: int) -> tuple[bool, str]:
    """Whether ``backend`` can run a (in_features -> out_features) INT8 layer on ``device``, and why not."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        return False, f"INT8 layers run on cpu or cuda, not {device.type}"
    if in_features < 2 and backend in ("torchao-dynamic", "int8-static"):
        # Measured with torch 2.13: torch._int_mm against a transposed (K=1) weight returns unset memory on the
        # CPU, and torchao's int8 path cannot reshape a one-column weight.
        return False, f"{backend} gives no right product for a layer with one input feature"
    if backend == "torchao-dynamic":
        try:
            _import_torchao()
        except Exception as e:  # not installed, or built for another torch release (any error at import)
            return False, f"torchao is not importable ({type(e).__name__}: {e}); pip install torchao"
        return True, "torchao Int8DynamicActivationInt8WeightConfig"
    if backend == "torch-dynamic":
        if device.type != "cpu":
            return False, "torch.ao's dynamic quantized Linear has CPU kernels only"
        engine = torch.backends.quantized.engine
        if engine == "none" or engine not in torch.backends.quantized.supported_engines:
            return False, f"this torch build has no quantized CPU engine (engine={engine!r})"
        return True, f"torch.ao dynamic Linear on the {engine} engine"
    if backend == "int8-static":
        if not hasattr(torch, "_int_mm"):
            return False, f"torch {torch.__version__} has no torch._int_mm"
        if device.type == "cuda" and (in_features % 8 or out_features % 8):
            return False, (f"torch._int_mm on CUDA needs in/out features divisible by 8, but got "
                           f"{in_features}x{out_features}")
        return True, "torch._int_mm with the calibrated activation scale"
    return False, f"unknown INT8 backend {backend!r}; known: {list(INT8_BACKENDS)}"


def _seconds_per_call(fns: dict[str, Callable[[torch.Tensor], Any]], x: torch.Tensor, repeats: int = 5,
                      losing: float = LOSING) -> tuple[dict[str, float], set[str]]:
    """Per function: the median over ``repeats`` of the mean time of a call, each repeat long enough (~2 ms) to rise
    above timer noise. The functions take turns within each repeat, so a slow spell of the machine hits them all.
    Freed memory is held, as for every dsnas timing (dsnas.allocator). A function whose faster of two calls is
    ``losing`` times the fastest function's is not timed further (its time is that call's): no spell of a shared
    machine makes a 3x difference, and it could not be chosen. The first function, the reference every ratio is
    taken against, is always timed in full. Returns (times, the functions cut short)."""
    hold_freed_memory()
    # The inputs' GPU, not torch's current one: on cuda:1 a bare synchronize() waited for cuda:0, and every call
    # was timed at its launch, whatever its kernels took.
    sync = (lambda: torch.cuda.synchronize(x.device)) if x.is_cuda else (lambda: None)

    def one_call(fn: Callable[[torch.Tensor], Any]) -> float:
        start = time.perf_counter()
        fn(x)
        sync()
        return time.perf_counter() - start

    single: dict[str, list[float]] = {}
    for name, fn in fns.items():
        fn(x)  # warm-up: first-call allocation and kernel selection
        sync()
        single[name] = [one_call(fn) for _ in range(2)]
    fastest = min(min(v) for v in single.values())
    reference = next(iter(fns))
    short = {name for name, v in single.items() if name != reference and min(v) > losing * fastest}
    iters = {}
    for name, fn in fns.items():
        if name not in short:  # the fastest of three sizes the repeats: one preempted call must not shrink them to 1
            single[name].append(one_call(fn))
            iters[name] = max(1, min(1000, int(0.002 / max(min(single[name]), 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in iters}
    for _ in range(repeats):
        for name in iters:
            fn = fns[name]
            start = time.perf_counter()
            for _ in range(iters[name]):
                fn(x)
            sync()
            samples[name].append((time.perf_counter() - start) / iters[name])
    times = {name: statistics.median(v) for name, v in samples.items()}
    return {name: times.get(name, min(single[name])) for name in fns}, short


def choose_int8_backend(in_features: int, out_features: int, rows: Sequence[int] = DEFAULT_ROWS, *,
                        device: Any = "cpu", backends: Sequence[str] = INT8_BACKENDS) -> tuple[str, dict[str, Any]]:
    """The INT8 backend that runs a (in_features -> out_features) layer fastest here, timed against fp32 F.linear
    at each row count; the answer is cached per shape, device, torch version and thread count.

    Returns (backend, info): info["ratios"][backend] lists fp32 time / int8 time per entry of info["rows"] (> 1 is
    faster than fp32), info["geomean"] ranks them, info["unavailable"] says why a backend was not timed.
    """
    device = torch.device(device)
    key = (in_features, out_features, tuple(rows), str(device), tuple(backends), torch.__version__,
           torch.get_num_threads())
    if key not in _CHOICES:
        _CHOICES[key] = _measure_backends(in_features, out_features, tuple(rows), device, tuple(backends))
    name, info = _CHOICES[key]
    return name, copy.deepcopy(info)


# An int8 product's relative error against fp32 on a unit gaussian input is about 1%; one above this is wrong.
WRONG_PRODUCT = 0.1


def _relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.float() - reference).norm() / reference.norm().clamp_min(1e-12))


def _measure_backends(in_features: int, out_features: int, rows: tuple[int, ...], device: torch.device,
                      backends: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(out_features, in_features, generator=gen) / in_features**0.5).to(device)
    bias = torch.randn(out_features, generator=gen).to(device)
    inputs = {r: torch.randn(r, in_features, generator=gen).to(device) for r in rows}
    kernels, unavailable = {}, {}
    for name in backends:
        ok, why = int8_backend_supported(name, device, in_features, out_features)
        if not ok:
            unavailable[name] = why
            continue
        try:
            kernels[name] = _BUILDERS[name](weight, bias, 4.0)  # 4.0: about the amax of a unit gaussian batch
            with torch.inference_mode():
                error = _relative_error(kernels[name](inputs[rows[0]]), F.linear(inputs[rows[0]], weight, bias))
        except (RuntimeError, ValueError, TypeError, ImportError, NotImplementedError) as e:
            kernels.pop(name, None)
            unavailable[name] = f"failed here: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            continue
        if not error <= WRONG_PRODUCT:  # the fastest kernel must also be right: a broken one would be chosen
            kernels.pop(name)
            unavailable[name] = f"gave a wrong product here (relative error {error:.3g} against fp32)"
    if not kernels:
        raise TrialError(f"no INT8 backend can run on {device}: {unavailable}. Fix: choose another precision "
                         "for this layer")
    with torch.inference_mode():
        fns = {"fp32": lambda x: F.linear(x, weight, bias), **kernels}
        timed = [_seconds_per_call(fns, inputs[r]) for r in rows]
    times = [t for t, _ in timed]
    fp32 = [t["fp32"] for t in times]
    ratios = {n: [t["fp32"] / t[n] for t in times] for n in kernels}
    geomean = {n: statistics.geometric_mean(v) for n, v in ratios.items()}
    best = max(geomean, key=geomean.__getitem__)
    info = {"rows": list(rows), "ratios": ratios, "geomean": geomean, "fp32_us": [t * 1e6 for t in fp32],
            "unavailable": unavailable, "device": str(device), "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            # Per row count, the backends timed by two calls only: LOSING times slower than the fastest.
            "cut_short": [sorted(short) for _, short in timed]}
    return best, info


class Int8Linear(nn.Module):
    """An INT8 linear layer for inference. ``backend`` is the kernel that actually runs; ``reason`` says why it was
    picked over the others; ``ratios`` holds the measurement behind an automatic choice."""

    def __init__(self, kernel: nn.Module, in_features: int, out_features: int, backend: str, reason: str,
                 ratios: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.kernel, self.in_features, self.out_features = kernel, in_features, out_features
        self.backend, self.reason, self.ratios = backend, reason, ratios

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, act_amax: Any = None,
                   backend: str = "auto", rows: Sequence[int] | None = None) -> Int8Linear:
        """Quantize a trained fp32 layer. ``act_amax``: the calibrated input amax (needed by int8-static only);
        ``backend``: one of INT8_BACKENDS, or "auto" to measure them here (choose_int8_backend) at ``rows``, the row
        counts the model will run at (default: 1, 32 and 256)."""
        weight = weight.detach().float()
        bias = None if bias is None else bias.detach().float()
        rows = tuple(rows or DEFAULT_ROWS)
        out_features, in_features = weight.shape
        amax = None if act_amax is None else float(act_amax)
        if amax is not None and not 0.0 < amax < float("inf"):
            raise TrialError(f"an int8 layer's act_amax must be positive and finite, but got {amax}. Fix: "
                             "calibrate on real inputs, or pass None to use a dynamic backend")
        ratios = None
        if backend == "auto":
            allowed = tuple(b for b in INT8_BACKENDS if amax is not None or b != "int8-static")
            backend, ratios = choose_int8_backend(in_features, out_features, rows,
                                                  device=weight.device, backends=allowed)
            reason = _auto_reason(backend, ratios, amax is None)
        elif backend in INT8_BACKENDS:
            ok, why = int8_backend_supported(backend, weight.device, in_features, out_features)
            if not ok:
                raise TrialError(f"the int8 backend {backend!r} cannot run here: {why}. Fix: use backend='auto'")
            reason = "requested by name; the others were not measured"
        else:
            raise TrialError(f"an int8 backend must be 'auto' or one of {list(INT8_BACKENDS)}, but got {backend!r}")
        kernel = _BUILDERS[backend](weight, bias, amax)
        if backend == "torchao-dynamic" and weight.is_cuda and any(r <= 16 for r in rows):
            # torchao's int8 GEMM goes through torch._int_mm, which cuBLASLt runs for more than 16 rows only; below
            # that torchao computes in fp32 (seen on an H200: an aten::mm beside the int8 path at 1 and 16 rows).
            reason += "; at 16 rows or fewer torchao computes in fp32, not int8"
        return cls(kernel, in_features, out_features, backend, reason, ratios)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kernel(x.reshape(-1, self.in_features).float())
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}"


def _auto_reason(best: str, info: dict[str, Any], no_amax: bool) -> str:
    ranked = sorted(info["geomean"].items(), key=lambda kv: -kv[1])
    rows = "/".join(str(r) for r in info["rows"])
    text = (f"fastest measured on {info['device']} (speed vs fp32, geomean over rows {rows}): "
            + ", ".join(f"{n} {g:.2f}x" for n, g in ranked))
    if info["geomean"][best] < 1.0:
        text += "; every int8 backend is slower than fp32 at this shape"
    skipped = dict(info["unavailable"])
    if no_amax:
        skipped["int8-static"] = "no calibrated act_amax"
    if skipped:
        text += "; not measured: " + ", ".join(f"{n} ({why})" for n, why in skipped.items())
    return text


# --- FP8 inference -------------------------------------------------------------------------------------------------

def fp8_supported(device: Any) -> tuple[bool, str]:
    """Whether per-row scaled e4m3 matmuls (torch._scaled_mm) run on ``device``, and why not."""
    device = torch.device(device)
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return False, f"torch {torch.__version__} lacks float8_e4m3fn or torch._scaled_mm"
    if device.type != "cuda":
        return False, f"fp8 matmuls need a CUDA GPU of compute capability >= 8.9, but the device is {device}"
    if not torch.cuda.is_available():
        return False, "CUDA is not available to this process"
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    name = torch.cuda.get_device_name(index)
    if (major, minor) < (8, 9):
        return False, f"{name} has compute capability {major}.{minor}; fp8 tensor cores need >= 8.9"
    return True, f"{name}, compute capability {major}.{minor}, torch._scaled_mm rowwise e4m3"


def fp8_fast_accumulation() -> bool:
    """Whether an fp8 layer's GEMM accumulates in the tensor cores' fast mode (torch._scaled_mm use_fast_accum),
    as torchao's fp8 inference does by default, rather than promoting to fp32 every 128 products. PyTorch's and
    torchao's maintainers measured the rowwise-scaled kernel without it as much slower (pytorch/ao#1325,
    pytorch/pytorch#147971); the H200 check of 2026-12-04 ran without it and found fp8 at 0.74x bf16 at 8192^2.
    Not under CUDA 12.9, whose cuBLASLt fails some rowwise fast-accumulation shapes (pytorch/ao#4582)."""
    return not (torch.version.cuda or "").startswith("12.9")


def fp8_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of a 2-D tensor to float8_e4m3fn with its own scale (amax / 448): (values, scales [rows, 1] fp32).

    Every input of an fp8 layer goes through this, so it is lean: a bf16 input's row maxima are exact in bf16 and
    its division promotes to fp32 itself (no fp32 copies of x), and no clamp is needed (|x| / (amax / 448) exceeds
    448 by at most a rounding, which e4m3 rounds to 448). Per element of x, 25 bytes moved where the plain chain
    moved 33 (bf16: 17 where 45), one kernel fewer (bf16: two); the same values. (torch.linalg.vector_norm's inf-norm
    would not write |x|, but ran 7x slower than abs and amax on a CPU.)"""
    amax = x.detach().abs().amax(dim=1, keepdim=True).float()
    scale = amax.clamp_min_(torch.finfo(torch.float32).tiny).div_(FP8_MAX)
    return torch.div(x, scale).to(torch.float8_e4m3fn), scale


def fp8_dequantize_rows(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return values.float() * scale


class Fp8Linear(nn.Module):
    """An fp8 (e4m3) linear layer: weight quantized per output row once, the input per row at each call, both
    multiplied by torch._scaled_mm with rowwise scales into bf16, accumulating fast where that is safe
    (fp8_fast_accumulation)."""

    def __init__(self, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_fp8.shape
        self.register_buffer("weight_fp8", weight_fp8)  # [out, in] row-major: .t() is the column-major mat2
        self.register_buffer("weight_scale", weight_scale.reshape(1, -1).contiguous())  # [1, out]
        self.register_buffer("bias", None if bias is None else bias.to(torch.bfloat16))
        self.fast_accum = fp8_fast_accumulation()
        self.backend = "scaled_mm-rowwise-e4m3" + ("-fast-accum" if self.fast_accum else "")

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Fp8Linear:
        ok, why = fp8_supported(weight.device)
        if not ok:
            raise TrialError(f"fp8 inference cannot run here: {why}. Fix: choose bf16 or int8 for this layer")
        out_features, in_features = weight.shape
        if in_features % 16 or out_features % 16:
            raise TrialError(f"torch._scaled_mm needs in/out features divisible by 16, but got {in_features}x"
                             f"{out_features}. Fix: use multiples of 16 or another precision for this layer")
        values, scale = fp8_quantize_rows(weight.detach())
        return cls(values, scale, None if bias is None else bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, scale = fp8_quantize_rows(x.reshape(-1, self.in_features))
        y = torch._scaled_mm(values, self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale,
                             bias=self.bias, out_dtype=torch.bfloat16, use_fast_accum=self.fast_accum)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, backend={self.backend}"
