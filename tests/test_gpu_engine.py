"""The engine on a real NVIDIA GPU: each precision and 2:4 sparsity inside a transformer LM against the fp32 model,
the fp32 fallback of fp16 training, torch.compile, `dsnas profile` on CUDA, and the NVML steady window.

Every test is marked ``gpu``: skipped without a CUDA device, failed under DSNAS_REQUIRE_GPU=1, as is any skip inside
one (a capability missing on the GPU machine is a finding, so each skip says precisely what is missing)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import torch

from dsnas.kernels.linear import EngineLinear, engine_layers
from dsnas.kernels.quant import fp8_fast_accumulation

pytestmark = pytest.mark.gpu

D_MODEL, N_LAYERS, CONTEXT = 256, 2, 64
FP16_MAX = torch.finfo(torch.float16).max


@pytest.fixture(scope="module")
def task() -> Any:
    from dsnas.spec import TaskSpec
    from dsnas.tasks import make_task

    return make_task(TaskSpec("charlm", {"corpus_bytes": 200_000, "context": CONTEXT}, "."))


def arch(task: Any, precision: str = "fp32", sparsity: str = "dense") -> dict[str, Any]:
    layer = {"n_heads": 4, "ffn_ratio": 4, "precision": precision, "sparsity": sparsity}
    return {"family": "transformer_lm", "d_model": D_MODEL, "layers": [layer] * N_LAYERS, **task.arch_defaults()}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def calibrate(model: torch.nn.Module, layers: dict[str, EngineLinear], x: torch.Tensor) -> None:
    """Each int8 layer's act_amax: the largest |input| it sees on ``x`` (the "max" calibrator)."""
    from dsnas.kernels.calibrate import make_calibrator

    calibrators = {name: make_calibrator("max") for name in layers}
    hooks = [layer.register_forward_pre_hook(lambda _m, args, name=name: calibrators[name].observe(args[0]))
             for name, layer in layers.items()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    for name, layer in layers.items():
        layer.act_amax.fill_(float(calibrators[name].amax()))


def engine_and_reference(task: Any, precision: str, sparsity: str, int8_backend: str, x: torch.Tensor,
                         device: str = "cuda") -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the converted engine model, the fp32 dense model with the same weights and the same 2:4 zeros)."""
    from dsnas.kernels.convert import convert
    from dsnas.kernels.sparsity import magnitude_scores, sparsify_layer
    from dsnas.models import build

    torch.manual_seed(0)
    reference = build(arch(task)).to(device).eval()
    with torch.no_grad():  # the model starts with zero biases: give them values, or a kernel could drop them
        for layer in engine_layers(reference).values():
            layer.bias.normal_(0.0, 0.05)
    model = build(arch(task, precision, sparsity)).to(device).eval()
    missing, unexpected = model.load_state_dict(reference.state_dict(), strict=False)
    assert not unexpected and all(k.endswith((".mask", ".act_amax")) for k in missing), (missing, unexpected)
    layers, reference_layers = engine_layers(model), engine_layers(reference)
    if sparsity == "2:4":
        for name, layer in layers.items():  # the same weights give the same magnitude masks
            sparsify_layer(layer, magnitude_scores(layer.weight.detach()), 2, 4)
            sparsify_layer(reference_layers[name], magnitude_scores(reference_layers[name].weight.detach()), 2, 4)
    if precision == "int8":
        calibrate(model, layers, x)
    convert(model, int8_backend=int8_backend)
    return model, reference


def skip_unless_supported(precision: str, sparsity: str, int8_backend: str) -> None:
    from dsnas.kernels.quant import fp8_supported, int8_backend_supported

    if precision == "int8":
        ok, why = int8_backend_supported(int8_backend, "cuda", D_MODEL, D_MODEL)
        if not ok:
            pytest.skip(f"int8 backend {int8_backend} cannot run here: {why}")
    if precision == "fp8":
        ok, why = fp8_supported("cuda")
        if not ok:
            pytest.skip(f"fp8 cannot run here: {why}")
    capability = torch.cuda.get_device_capability()
    if sparsity == "2:4" and capability < (8, 0):
        pytest.skip(f"compute capability {capability[0]}.{capability[1]} has no sparse tensor cores (2:4 needs 8.0)")


# (precision, sparsity, int8 backend, the backend every layer must record, bound on the logits' relative error
# against the fp32 model). Each bound is 2-6x the error of a CPU emulation of the same numerics (attention in the
# layers' half dtype as on CUDA, e4m3 products accumulated in fp32), noted as "emulated".
ENGINE_CASES = [
    pytest.param("fp32", "dense", "auto", "fp32", 1e-6, id="fp32"),  # the reference's own kernels: no error
    # bf16 keeps 8 significant bits: every GEMM's inputs and output and attention rounded (emulated 5.3e-3).
    pytest.param("bf16", "dense", "auto", "bf16", 2e-2, id="bf16"),
    # fp16 keeps 11 bits, eight times finer than bf16 (emulated 6.9e-4).
    pytest.param("fp16", "dense", "auto", "fp16", 3e-3, id="fp16"),
    # Per-row weights and one activation scale per layer at the calibrated max, steps of amax/127; the integer
    # GEMM is exact, so the GPU's error is the emulated one (3.2e-2).
    pytest.param("int8", "dense", "int8-static", "int8:int8-static", 6e-2, id="int8-static"),
    # A scale per input row at run time: finer than one per tensor (emulated 2.2e-2).
    pytest.param("int8", "dense", "torchao-dynamic", "int8:torchao-dynamic", 6e-2, id="int8-torchao-dynamic"),
    # e4m3 keeps 4 significant bits on both operands (emulated 7.1e-2; tests/test_kernels_quant.py allows 8% for
    # one layer); the tensor cores' fast accumulation adds little beside that.
    pytest.param("fp8", "dense", "auto", "fp8:scaled_mm" + ("-fast-accum" if fp8_fast_accumulation() else ""),
                 1.5e-1, id="fp8"),
    # The reference has the same zeros, so only the dtype's rounding remains: the dense bounds.
    pytest.param("bf16", "2:4", "auto", "cusparselt bf16", 2e-2, id="bf16-2:4"),
    pytest.param("fp16", "2:4", "auto", "cusparselt fp16", 3e-3, id="fp16-2:4"),
]


@pytest.mark.parametrize(("precision", "sparsity", "int8_backend", "backend", "bound"), ENGINE_CASES)
def test_engine_model_on_cuda_matches_fp32_and_records_the_real_backend(task, precision, sparsity, int8_backend,
                                                                         backend, bound):
    skip_unless_supported(precision, sparsity, int8_backend)
    x, _ = task.batches(1, "cuda", seed=0)[0]  # 32 real text windows of 64 bytes: 2048 rows per GEMM
    model, reference = engine_and_reference(task, precision, sparsity, int8_backend, x)
    layers = engine_layers(model)
    assert {name: layer.backend for name, layer in layers.items()} == dict.fromkeys(layers, backend), \
        {name: layer.reason for name, layer in layers.items()}
    with torch.inference_mode():
        got, want = model(x), reference(x)
    err = relative_error(got, want)
    print(f"{torch.cuda.get_device_name()} {precision} {sparsity}: {backend}, logits relative error {err:.2e}")
    assert err < bound
    if sparsity == "2:4":
        from dsnas.kernels.sparsity import sparsity_of

        for layer in layers.values():  # the zeros are stored, not multiplied: the kernel's own packed weight
            assert isinstance(layer.inference.weight, torch.sparse.SparseSemiStructuredTensor), layer.reason
            assert sparsity_of(layer.inference.weight) == 0.5


FALLBACK_STEPS = 3


def test_fp16_training_falls_back_to_fp32_only_in_the_layer_that_overflowed(task):
    from dsnas.kernels.precision import TrainStep
    from dsnas.models import build

    torch.manual_seed(0)
    model = build(arch(task, "fp16")).cuda().train()
    layers = engine_layers(model)
    # The first block's last layer. Its inf reaches every layer of the next block, which must not be blamed; in fp32
    # its output is huge but finite, and the next block's norms scale it back before any of its fp16 layers.
    hot = layers["blocks.0.down"]
    x, y = task.batches(1, "cuda", seed=0)[0]
    seen = []
    hook = hot.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(x)
    hook.remove()
    with torch.no_grad():  # its largest fp32 output becomes twice fp16's largest finite value
        peak = torch.nn.functional.linear(seen[0].float(), hot.weight.float()).abs().max()
        hot.weight.mul_(2 * FP16_MAX / peak)
    step = TrainStep(model, torch.optim.AdamW(model.parameters(), lr=1e-4), fallback_steps=FALLBACK_STEPS)
    try:
        taken = [step.step(task.loss(model, x, y))]  # the loss is NaN: the overflow reached the logits
        assert taken == [False] and step.skipped == 1
        assert {n: m.fallbacks for n, m in layers.items()} == {n: int(m is hot) for n, m in layers.items()}
        losses = []
        for _ in range(FALLBACK_STEPS):
            assert hot.compute_dtype == torch.float32
            assert {m.compute_dtype for m in layers.values() if m is not hot} == {torch.float16}
            loss = task.loss(model, x, y)
            losses.append(loss.item())
            taken.append(step.step(loss))
        # Only the overflowing step was skipped: in fp32 the layer's output, however large, is finite and the next
        # norm scales it back, so the loss is finite and the updates are taken.
        assert taken == [False] + [True] * FALLBACK_STEPS
        assert all(torch.isfinite(torch.tensor(losses))), losses
        assert hot.fallbacks == 1 and hot.fallback_left == 0 and hot.compute_dtype == torch.float16  # fp16 again
        assert sum(m.fallbacks for m in layers.values()) == 1
    finally:
        step.close()


def test_torch_compile_of_a_bf16_engine_model_matches_eager(task):
    x, _ = task.batches(1, "cuda", seed=0)[0]
    model, _ = engine_and_reference(task, "bf16", "dense", "auto", x)
    assert {layer.backend for layer in engine_layers(model).values()} == {"bf16"}
    try:
        compiled = torch.compile(model)
        with torch.no_grad():
            eager, fused = model(x), compiled(x)
    finally:
        torch._dynamo.reset()
    # Inductor fuses the fp32 norms and GELU around the same bf16 GEMMs: differences of a few bf16 ulps (2^-8).
    assert relative_error(fused, eager) < 1e-2


@pytest.mark.parametrize(("sparsity", "backend"), [("dense", "bf16"), ("2:4", "cusparselt bf16")],
                         ids=["bf16", "bf16-2:4"])
def test_dsnas_profile_on_cuda_prints_medians_and_kernels(tmp_path, capsys, sparsity, backend):
    from dsnas.cli import main

    layer = {"n_heads": 4, "ffn_ratio": 4, "precision": "bf16", "sparsity": sparsity}
    path = tmp_path / "arch.json"
    path.write_text(json.dumps({"family": "transformer_lm", "vocab_size": 256, "context": CONTEXT,
                                "d_model": D_MODEL, "layers": [layer] * N_LAYERS}))
    code = main(["profile", str(path), "--device", "cuda", "--kernels", "--cuda-graphs", "--batch-sizes", "1,8",
                 "--measure-s", "0.2", "--max-measure-s", "1"])
    out = capsys.readouterr().out
    print(out)
    assert code == 0
    lines = out.splitlines()
    # Converted on the GPU (a 2:4 layer converted on the CPU would have been masked-dense).
    assert any(line.startswith(f"backend engine:{backend}, dtype bf16,") for line in lines), lines[:3]
    head = next(i for i, line in enumerate(lines) if line.split()[:3] == ["batch", "median", "ms"])
    medians = {row.split()[0]: float(row.split()[1].replace(",", "")) for row in lines[head + 1:head + 3]}
    assert set(medians) == {"1", "8"} and min(medians.values()) > 0, medians
    for bs in ("1", "8"):
        at = next(i for i, line in enumerate(lines) if line.startswith(f"top cuda kernels at batch {bs} "))
        distinct = int(re.search(r"\((\d+) distinct\)", lines[at]).group(1))
        listed = [re.match(r"\s+(\d+) us\s+(\d+)x\s+\S", line) for line in lines[at + 1:at + 1 + min(distinct, 10)]]
        assert distinct > 0 and all(listed), lines[at:at + 11]
        assert sum(int(m.group(1)) for m in listed) > 0 and min(int(m.group(2)) for m in listed) >= 1


def test_steady_window_of_a_bf16_matmul_loop_on_a_real_gpu():
    import pynvml

    from dsnas.profiler.nvml import nvml_handle
    from dsnas.profiler.window import measure_window

    device = torch.device("cuda", torch.cuda.current_device())
    handle, why = nvml_handle(device)
    assert handle is not None, why
    limit_w = pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1e3  # mW
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)  # 1.1 TFLOP a call: compute-bound
    out = torch.empty_like(a)
    gemm = lambda: torch.mm(a, a, out=out)  # noqa: E731  (no allocation between the calls)
    import time

    warm = time.perf_counter() + 0.5  # clocks leave idle, cuBLAS picks its kernel (a 1 s window at 5 calls: 0.77)
    while time.perf_counter() < warm:
        gemm()
        torch.cuda.synchronize(device)
    result = measure_window(handle, gemm, lambda: torch.cuda.synchronize(device), min_s=2.0)
    print(result.as_profile())
    assert result.energy_per_call_j is not None and result.energy_per_call_j > 0, result.unavailable
    assert result.power_w_mean is not None and 0 < result.power_w_mean < limit_w, (result.power_w_mean, limit_w)
    if result.sm_util is None:
        pytest.skip(f"no GPM SM utilization on {torch.cuda.get_device_name(device)}: "
                    f"{result.unavailable.get('sm_util')}")
    assert result.sm_util >= 0.8  # a ratio (GPM's percent / 100): a large GEMM keeps the SMs busy


def test_the_engine_probe_on_a_gpu_offers_bf16_and_times_fp8_and_the_sparse_kernel(tmp_path, monkeypatch):
    """At widths where tensor cores pay, bf16 is offered; fp8 and 2:4 run their own kernels (or say why not)."""
    from dsnas.profiler import engine_probe as ep

    monkeypatch.setenv("DSNAS_CACHE_DIR", str(tmp_path))
    probe = ep.probe_engine(torch.device("cuda"), ep.linear_shapes([(1024, 1024), (1024, 4096)], [2048]))
    assert probe.verdicts["bf16"].offered, probe.table()
    fp8_ok = torch.cuda.get_device_capability() >= (8, 9)
    assert (probe.verdicts["fp8"].speedup is not None) == fp8_ok, probe.table()
    sparse = probe.verdicts["2:4"]
    assert sparse.speedup is not None and ("cusparselt" in sparse.kernel or "cutlass" in sparse.kernel
                                           or "no sparse kernel runs here" in sparse.why), probe.table()
