"""INT8 fake quantization (values and straight-through gradients), the INT8 inference backends against fp32, the
measured backend choice, and the FP8 helpers (CPU) and layer (GPU)."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from dsnas.errors import TrialError
from dsnas.kernels.quant import (
    INT8_BACKENDS,
    Fp8Linear,
    Int8Linear,
    choose_int8_backend,
    fake_quant_act,
    fake_quant_weight,
    fp8_dequantize_rows,
    fp8_quantize_rows,
    fp8_supported,
    int8_backend_supported,
)


def _layer(out_features=48, in_features=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen) / in_features**0.5
    return weight, torch.randn(out_features, generator=gen), torch.randn(3, 5, in_features, generator=gen)


def test_fake_quant_weight_rounds_each_row_to_its_own_grid():
    w = torch.tensor([[2.54, -1.27, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [127.0, 63.5, 0.4, -126.6]])
    q = fake_quant_weight(w)
    # Row 0: scale 0.02 -> -63.5 steps rounds half to even (-64), 25 steps stays; row 1 stays zero (no 0/0);
    # row 2: scale 1 -> 63.5 rounds to 64, 0.4 to 0, -126.6 to -127.
    expected = torch.tensor([[2.54, -1.28, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [127.0, 64.0, 0.0, -127.0]])
    assert torch.allclose(q, expected, atol=1e-6)


def test_fake_quant_act_clips_at_amax():
    x = torch.tensor([0.4, 0.5, 1.5, 126.6, 200.0, -300.0])
    q = fake_quant_act(x, torch.tensor(127.0))  # scale 1
    assert torch.equal(q, torch.tensor([0.0, 0.0, 2.0, 127.0, 127.0, -127.0]))


def test_fake_quant_gradients_pass_inside_and_stop_outside_the_clip_range():
    x = torch.tensor([0.4, -3.0, 126.6, 127.0, 200.0, -300.0], requires_grad=True)
    fake_quant_act(x, torch.tensor(127.0)).mul(torch.arange(1.0, 7.0)).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0]))

    w = torch.randn(4, 8, requires_grad=True)
    fake_quant_weight(w).sum().backward()
    assert torch.equal(w.grad, torch.ones(4, 8))  # the row amax is the row's own max: nothing is clipped


def test_qat_layer_trains_through_fake_quantization():
    weight, bias, x = _layer()
    w = weight.clone().requires_grad_(True)
    y = F.linear(fake_quant_act(x, torch.tensor(2.0)), fake_quant_weight(w), bias)
    y.square().mean().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_fake_quant_act_keeps_the_dtype_and_refuses_an_uncalibrated_amax():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    assert fake_quant_act(x, torch.tensor(3.0)).dtype == torch.bfloat16
    with pytest.raises(TrialError, match="act_amax > 0"):
        fake_quant_act(x, torch.zeros(()))


@pytest.mark.parametrize("backend", INT8_BACKENDS)
def test_int8_linear_is_close_to_fp32(backend):
    weight, bias, x = _layer()
    ok, why = int8_backend_supported(backend, "cpu", 40, 48)
    if not ok:
        pytest.skip(why)
    layer = Int8Linear.from_float(weight, bias, torch.tensor(x.abs().max().item()), backend)
    with torch.inference_mode():
        y = layer(x)
    ref = F.linear(x, weight, bias)
    assert layer.backend == backend and y.shape == ref.shape and y.dtype == torch.float32
    assert (y - ref).norm() / ref.norm() < 0.03  # 8 bits: about 1% of the output scale


def test_int8_static_reproduces_the_qat_numerics():
    weight, bias, x = _layer()
    amax = torch.tensor(2.5)
    layer = Int8Linear.from_float(weight, bias, amax, "int8-static")
    with torch.inference_mode():
        y = layer(x)
    assert torch.allclose(y, F.linear(fake_quant_act(x, amax), fake_quant_weight(weight), bias), atol=1e-5)


def test_torch_dynamic_backend_hides_its_deprecation_warning():
    weight, bias, x = _layer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer = Int8Linear.from_float(weight, None, None, "torch-dynamic")
        with torch.inference_mode():
            layer(x)


def test_int8_backend_errors_name_the_rule():
    weight, bias, _ = _layer()
    with pytest.raises(TrialError, match="int8-static needs the layer's calibrated act_amax"):
        Int8Linear.from_float(weight, bias, None, "int8-static")
    with pytest.raises(TrialError, match="must be 'auto' or one of"):
        Int8Linear.from_float(weight, bias, 1.0, "fbgemm")
    with pytest.raises(TrialError, match="positive and finite"):
        Int8Linear.from_float(weight, bias, float("inf"), "torch-dynamic")
    assert not int8_backend_supported("torch-dynamic", "meta", 8, 8)[0]


def test_choose_int8_backend_measures_and_caches():
    name, info = choose_int8_backend(32, 32, rows=(1, 17))
    assert name in INT8_BACKENDS and info["rows"] == [1, 17]
    assert set(info["ratios"]) | set(info["unavailable"]) == set(INT8_BACKENDS)
    assert all(len(r) == 2 and min(r) > 0 for r in info["ratios"].values())
    assert info["geomean"][name] == max(info["geomean"].values()) and info["threads"] == torch.get_num_threads()
    again = choose_int8_backend(32, 32, rows=(1, 17))
    assert again == (name, info)
    again[1]["ratios"].clear()  # the caller's copy: the cache keeps its own
    assert choose_int8_backend(32, 32, rows=(1, 17))[1]["ratios"]
    layer = Int8Linear.from_float(torch.randn(32, 32), torch.randn(32), 3.0, name)  # the chosen one really runs
    assert layer(torch.randn(2, 32)).shape == (2, 32)


def test_a_backend_three_times_slower_than_the_fastest_is_timed_by_two_calls():
    """Choosing a backend: one whose faster of two calls is LOSING times the fastest function's is timed no further
    (torch._int_mm at 0.26 s a call took 41 s of an engine probe on an AVX2 EPYC); the others are timed in full."""
    import collections
    import time

    from dsnas.kernels.quant import _seconds_per_call

    calls: collections.Counter[str] = collections.Counter()

    def sleeping(name, seconds):
        def fn(x):
            calls[name] += 1
            time.sleep(seconds)
        return fn

    fns = {"fp32": sleeping("fp32", 0.002), "close": sleeping("close", 0.003), "slow": sleeping("slow", 0.05)}
    times, short = _seconds_per_call(fns, torch.zeros(1))
    assert short == {"slow"} and calls["slow"] == 3  # a warm-up and two calls
    assert calls["close"] == calls["fp32"] == 1 + 3 + 5  # a warm-up, three single calls, five repeats of one
    assert 0.05 <= times["slow"] < 0.2 and times["close"] / times["fp32"] == pytest.approx(1.5, rel=0.3)
    # The reference (the first function) is timed in full however slow: every ratio is taken against it.
    calls.clear()
    _, short = _seconds_per_call({"fp32": fns["slow"], "int8": fns["fp32"]}, torch.zeros(1), repeats=1)
    assert short == set() and calls["slow"] == 1 + 3 + 1


def test_choosing_a_backend_on_cuda_n_waits_for_that_gpu(monkeypatch):
    """The INT8 backends of a layer on cuda:1 (dsnas profile --device cuda:1) are timed to the end of their kernels
    there: a bare torch.cuda.synchronize() waited for the current GPU (cuda:0), so each call was timed at its launch."""
    from dsnas.kernels.quant import _seconds_per_call

    class OnCuda1(torch.Tensor):
        is_cuda = property(lambda self: True)
        device = property(lambda self: torch.device("cuda", 1))

    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: waited.append(args))
    _seconds_per_call({"fp32": lambda x: None, "int8": lambda x: None}, torch.zeros(2, 8).as_subclass(OnCuda1),
                      repeats=1)
    assert waited and set(waited) == {(torch.device("cuda", 1),)}


def test_auto_without_amax_skips_the_static_backend_and_says_why():
    weight, bias, x = _layer(32, 32)
    layer = Int8Linear.from_float(weight, bias, None, "auto")
    assert layer.backend != "int8-static" and "int8-static (no calibrated act_amax)" in layer.reason
    assert "int8-static" not in layer.ratios["ratios"]
    assert layer(x[..., :32]).shape == (3, 5, 32)


def test_fp8_rows_round_trip_within_e4m3_precision():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 64, generator=gen) * torch.logspace(-3, 3, 6)[:, None]
    x[2] = 0.0
    values, scale = fp8_quantize_rows(x)
    assert values.dtype == torch.float8_e4m3fn and scale.shape == (6, 1) and scale.dtype == torch.float32
    back = fp8_dequantize_rows(values, scale)
    # 3 mantissa bits: a relative error of at most 2^-4 for normal values, 2^-10 * scale in the subnormal range.
    assert torch.all((back - x).abs() <= x.abs() * 2**-4 + scale * 2**-10 + 1e-12)
    assert torch.equal(back[2], torch.zeros(64))
    top = x.abs().argmax(dim=1)
    assert torch.allclose(back.gather(1, top[:, None]), x.gather(1, top[:, None]), rtol=1e-6)  # amax -> 448 exactly


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_rows_equal_the_plain_formula_and_move_fewer_bytes(dtype):
    """The lean quantizer gives the plain chain's bytes exactly (zeros, inf, nan and subnormal rows included), and
    moves per element of x 25 bytes (fp32) or 17 (16-bit) where the plain chain moved 33 or 45 (count_bytes: each
    op reads its inputs and writes its outputs once), in fewer ops: each is a kernel launch on a GPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dsnas.profiler.counting import count_bytes

    def plain(x):
        amax = x.detach().float().abs().amax(dim=1, keepdim=True)
        scale = amax.clamp_min(torch.finfo(torch.float32).tiny) / 448.0
        return (x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scale

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(200, 96, generator=gen) * torch.logspace(-20, 20, 200)[:, None]).to(dtype)
    x[3], x[4, 5], x[5, 1], x[6] = 0.0, float("nan"), float("inf"), torch.finfo(dtype).tiny / 4
    (want, want_scale), (got, got_scale) = plain(x), fp8_quantize_rows(x)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(got_scale.nan_to_num(), want_scale.nan_to_num())
    per_element = {torch.float32: (25, 33), torch.bfloat16: (17, 45), torch.float16: (17, 45)}[dtype]
    lean_bytes, plain_bytes = count_bytes(lambda: fp8_quantize_rows(x)), count_bytes(lambda: plain(x))
    # Beside the passes over x, a few over the 200 row scales (at most 4 bytes each way per op).
    assert per_element[0] * x.numel() < lean_bytes < per_element[0] * x.numel() + 40 * 200
    assert per_element[1] * x.numel() < plain_bytes < per_element[1] * x.numel() + 40 * 200
    with Ops() as lean:
        fp8_quantize_rows(x)
    with Ops() as chain:
        plain(x)
    assert len(lean.names) == len(chain.names) - (1 if dtype == torch.float32 else 2)


def test_fp8_is_refused_on_cpu_with_the_reason():
    ok, why = fp8_supported("cpu")
    assert not ok and "CUDA" in why
    with pytest.raises(TrialError, match="fp8 inference cannot run here"):
        Fp8Linear.from_float(torch.randn(32, 32), None)


@pytest.mark.parametrize(("cuda", "fast"), [("13.0", True), ("12.6", True), ("12.9", False), (None, True)])
def test_an_fp8_layer_accumulates_fast_but_under_cuda_12_9_and_scales_each_row(monkeypatch, cuda, fast):
    """torch._scaled_mm is faked by the product it stands for (no fp8 GEMM runs on a CPU): the input's row scales
    on its rows, the weight's on the output's columns. The layer asks for fast accumulation except under CUDA
    12.9, names it in its backend, and its output is the layer's within e4m3's rounding."""
    seen = {}

    def scaled_mm(a, b, *, scale_a, scale_b, bias, out_dtype, use_fast_accum):
        seen.update(fast=use_fast_accum, dtypes=(a.dtype, b.dtype))
        return ((a.float() * scale_a) @ (b.float() * scale_b) + bias.float()).to(out_dtype)

    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    weight, bias, x = _layer(48, 64)
    layer = Fp8Linear(*fp8_quantize_rows(weight), bias)
    y = layer(x)
    assert seen == {"fast": fast, "dtypes": (torch.float8_e4m3fn, torch.float8_e4m3fn)}
    assert layer.backend.endswith("-fast-accum") is fast and y.shape == (3, 5, 48) and y.dtype == x.dtype
    ref = F.linear(x, weight, bias)
    assert (y - ref).norm() / ref.norm() < 0.08  # as on the GPU (test_fp8_linear_on_gpu)


def test_importing_the_quant_modules_touches_no_hardware():
    code = ("import sys, torch, dsnas.kernels.quant, dsnas.kernels.calibrate; "
            "print(torch.cuda.is_initialized(), 'torchao' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("rows", [1, 5, 32])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.gpu
def test_fp8_linear_on_gpu(rows, with_bias):
    ok, why = fp8_supported("cuda")
    if not ok:
        pytest.skip(why)
    weight, bias, _ = _layer(48, 64)
    weight, bias = weight.cuda(), bias.cuda() if with_bias else None
    x = torch.randn(rows, 64, device="cuda")
    layer = Fp8Linear.from_float(weight, bias)
    y = layer(x)
    ref = F.linear(x, weight, bias)
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert (y - ref).norm() / ref.norm() < 0.08  # e4m3 on both operands, bf16 out


@pytest.mark.parametrize("backend", ["int8-static", "torchao-dynamic"])
@pytest.mark.gpu
def test_int8_linear_on_gpu(backend):
    weight, bias, x = _layer(48, 64)
    weight, bias, x = weight.cuda(), bias.cuda(), x.cuda()  # 15 rows: int8-static pads them past cuBLASLt's 16
    layer = Int8Linear.from_float(weight, bias, torch.tensor(x.abs().max().item()), backend)
    y = layer(x)
    ref = F.linear(x, weight, bias)
    assert (y - ref).norm() / ref.norm() < 0.03


def test_a_layer_with_one_input_feature_never_gets_a_kernel_that_computes_it_wrong():
    """torch._int_mm against a transposed one-column weight returned unset memory on the CPU (errors of 2e5 on
    outputs of 3), and `auto` chose it; torchao's path failed with a bare RuntimeError."""
    gen = torch.Generator().manual_seed(0)
    weight, bias, x = torch.randn(64, 1, generator=gen), torch.randn(64, generator=gen), torch.randn(32, 1,
                                                                                                    generator=gen)
    for backend in ("int8-static", "torchao-dynamic"):
        ok, why = int8_backend_supported(backend, "cpu", 1, 64)
        assert not ok and "one input feature" in why
        with pytest.raises(TrialError, match="one input feature"):
            Int8Linear.from_float(weight, bias, 3.0, backend)
    layer = Int8Linear.from_float(weight, bias, 3.0, "auto", rows=(32,))
    assert layer.backend == "torch-dynamic"
    assert (layer(x) - F.linear(x, weight, bias)).abs().max() < 0.1


def test_a_fast_backend_that_computes_wrong_is_never_chosen(monkeypatch):
    """Every backend's product is checked against fp32 once before it is timed: the fastest wrong kernel won."""
    from dsnas.kernels import quant

    class Wrong(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(*x.shape[:-1], 24)  # instant, and wrong

    monkeypatch.setitem(quant._BUILDERS, "int8-static", lambda weight, bias, amax: Wrong())
    name, info = choose_int8_backend(24, 24, rows=(9,), backends=("int8-static", "torch-dynamic"))
    assert name == "torch-dynamic" and "wrong product" in info["unavailable"]["int8-static"]
