"""flop_util divides by the peak of the precision that ran, layer by layer, never by the fp32 peak for all."""

from __future__ import annotations

import pytest
import torch

from dsnas.kernels.convert import untrained_inference_form
from dsnas.models import build
from dsnas.profiler.utilization import effective_peak, flops_by_precision, layer_precision

H100 = {"fp32": 67e3, "bf16": 989e3, "fp16": 989e3, "fp8": 1979e3, "int8": 1979e3, "bf16-2:4": 1979e3}  # GFLOP/s


def _arch(*layers):
    return {"family": "transformer_lm", "vocab_size": 256, "context": 16, "d_model": 32,
            "layers": [{"n_heads": 2, "ffn_ratio": 2, "precision": p, "sparsity": s} for p, s in layers]}


def test_each_engine_layer_counts_at_its_precision_and_the_rest_at_fp32():
    model = untrained_inference_form(build(_arch(("int8", "dense"), ("fp32", "2:4"))), int8_backend="int8-static")
    per_block = 2 * 64 * (32 * 96 + 32 * 32 + 32 * 64 + 64 * 32)  # qkv, proj, up, down at 64 rows
    shares = flops_by_precision(model, rows=64, total_flops=2 * per_block + 1000)
    assert shares == {"int8": per_block, "fp32": per_block + 1000}  # masked-dense 2:4 fp32 runs at fp32's peak
    assert {layer_precision(m) for m in model.blocks[1].modules() if hasattr(m, "backend")} == {"fp32"}


def test_the_effective_peak_weighs_each_part_by_the_time_it_would_take():
    peak, why = effective_peak({"bf16": 90.0, "fp32": 10.0}, H100)
    assert why == "" and peak == pytest.approx(100 / (90 / 989e3 + 10 / 67e3))
    assert effective_peak({"bf16": 1.0}, H100)[0] == pytest.approx(989e3)  # not the fp32 peak: 15x lower


def test_a_precision_without_a_ceiling_leaves_flop_util_unavailable_with_the_reason():
    peak, why = effective_peak({"int8": 5.0, "fp32": 5.0}, {"fp32": 50.0})  # a CPU: only an fp32 ceiling is measured
    assert peak is None and why == "no int8 FLOP/s ceiling known on this device"


def test_measure_on_the_cpu_reports_no_flop_util_for_an_int8_model_but_says_why():
    from dsnas.profiler import measure
    from dsnas.spec import HardwareSpec, TaskSpec
    from dsnas.tasks import make_task

    task = make_task(TaskSpec("charlm", {"corpus_bytes": 200_000, "context": 16}, "."))
    hardware = HardwareSpec(device="cpu", batch_sizes=(1,), warmup_s=0.01, measure_s=0.02)
    int8 = untrained_inference_form(build(_arch(("int8", "dense"))))
    metrics, profile = measure(int8, task, torch.device("cpu"), hardware)
    assert "flop_util" not in metrics and profile["unavailable"]["flop_util"].startswith("no int8 FLOP/s ceiling")
    fp32 = untrained_inference_form(build(_arch(("fp32", "dense"))))
    metrics, profile = measure(fp32, task, torch.device("cpu"), hardware)  # its own ceilings: a busy host may have
    assert metrics["flop_util"] == pytest.approx(metrics["gflop_s"] / profile["ceilings"]["gemm_gflop_s"])  # moved them


def test_a_low_precision_convolution_counts_at_its_precision_by_its_output_size():
    """A bf16 CNN's FLOPs were all put at fp32's peak on a CPU (the layer does not know its output's size), and
    its flop_util read 1.28. Each convolution's FLOPs are now 2 * outputs * in_channels / groups * kernel area,
    the outputs seen in one call, at its precision; their sum is the whole count's convolution share."""
    from dsnas.kernels.conv import EngineConv2d
    from dsnas.profiler.counting import count_work

    arch = {"family": "cnn", "stem_width": 8, "image_size": 12, "channels": 3, "n_classes": 10,
            "layers": [{"depth": 1, "width": 16, "kernel": 5, "expand": 2, "precision": "bf16"},
                       {"depth": 1, "width": 24, "kernel": 3, "expand": 1}]}
    model = untrained_inference_form(build(arch).eval())
    x = torch.randn(3, 3, 12, 12)
    with torch.inference_mode():
        counted = count_work(lambda: model(x)).flops_by_op
    convs = [m for m in model.modules() if isinstance(m, EngineConv2d)]
    assert {m.precision for m in convs} == {"bf16", "fp32"}
    shares = flops_by_precision(model, rows=3, total_flops=sum(counted.values()), call=lambda: model(x))
    conv_flops = sum(n for op, n in counted.items() if "convolution" in op)
    fp32_convs = 0
    for m in model.modules():  # each fp32 convolution's FLOPs (the stem's is a plain nn.Conv2d), from its input
        if isinstance(m, torch.nn.Conv2d) and getattr(m, "precision", "fp32") == "fp32" and m.in_channels:
            with torch.inference_mode():
                out = m(torch.zeros(3, m.in_channels, *_input_size(model, m, x)))
            fp32_convs += 2 * out.numel() * (m.in_channels // m.groups) * m.weight.shape[2] * m.weight.shape[3]
    assert shares["bf16"] == conv_flops - fp32_convs > 0
    assert shares["bf16"] + shares["fp32"] == sum(counted.values())
    assert effective_peak(shares, {"fp32": 50.0})[1] == "no bf16 FLOP/s ceiling known on this device"
    with pytest.raises(ValueError, match="needs call="):
        flops_by_precision(model, rows=3, total_flops=1.0)


def _input_size(model, layer, x):
    seen = []
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[2:]))
    with torch.inference_mode():
        model(x)
    handle.remove()
    return seen[0]


def test_a_plain_model_in_bf16_is_labelled_so_and_not_divided_by_the_fp32_peak():
    """A model of the user's converted with .to(torch.bfloat16) has no engine layer to say its precision: it was
    labelled eager-fp32, float32, and its flop_util divided by the fp32 GEMM peak."""
    import dsnas

    for dtype, backend, name in ((torch.float32, "eager-fp32", "float32"), (torch.bfloat16, "eager-bf16", "bfloat16")):
        report = dsnas.measure(torch.nn.Linear(64, 64).to(dtype), torch.randn(4, 64, dtype=dtype), device="cpu",
                               batch_sizes=(8,), measure_s=0.02, max_measure_s=0.1, warmup_s=0.01)
        assert (report.profile["backend"], report.profile["dtype"]) == (backend, name)
        if dtype == torch.float32:
            assert report.metrics["flop_util"] > 0
        else:
            assert "flop_util" not in report.metrics
            assert report.profile["unavailable"]["flop_util"] == "no bf16 FLOP/s ceiling known on this device"


class _HalfAttention(torch.nn.Module):
    """fp32 weights, attention in bf16: as a bf16 transformer_lm block runs it on CUDA."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.qkv, self.head = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)

    def forward(self, x):
        q, k, v = (t.to(torch.bfloat16).unflatten(-1, (2, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(att.transpose(1, 2).flatten(2).float())


def test_attention_counts_at_the_precision_its_inputs_run_in():
    """A bf16 block's attention runs bf16 on CUDA but was charged to the fp32 peak: flop_util read 1.14x too high
    at context 64 on an H100, 3x at context 1024. Attention's FLOPs now go to the peak of its inputs' dtype."""
    from dsnas.profiler.counting import count_work

    model, x = _HalfAttention(), torch.randn(3, 16, 32)
    with torch.inference_mode():
        counts = count_work(lambda: model(x))
    attention = 4 * 3 * 2 * 16 * 16 * 16  # 4*B*H*T*S*(d/H)
    linears = 2 * 3 * 16 * (32 * 96 + 32 * 32)
    assert counts.flops == attention + linears and counts.flops_at == {"bf16": attention}
    shares = flops_by_precision(model, rows=48, total_flops=counts.flops, seen_at=counts.flops_at)
    assert shares == {"bf16": attention, "fp32": linears}
    peak = effective_peak(shares, H100)[0]
    assert peak == pytest.approx(counts.flops / (attention / 989e3 + linears / 67e3))


def test_an_fp32_convolution_on_cuda_counts_at_tf32_where_cudnn_may_use_it(monkeypatch):
    """cuDNN runs fp32 convolutions on the tensor cores in TF32 by default (torch.backends.cudnn.allow_tf32): at
    the fp32 CUDA-core peak an fp32 CNN's flop_util could pass 1. On the CPU, or with TF32 off, it stays fp32."""
    from dsnas.profiler.counting import flops_seen_at

    class OnCuda(torch.Tensor):
        is_cuda = property(lambda self: True)

    x = torch.zeros(2).as_subclass(OnCuda)
    assert flops_seen_at("convolution", (x,)) == "tf32"
    assert flops_seen_at("convolution", (torch.zeros(2),)) is None  # the CPU: the rest's precision
    assert flops_seen_at("convolution", (x.to(torch.bfloat16),)) is None  # an engine conv: counted by its layer
    assert flops_seen_at("mm", (x,)) is None  # torch's default fp32 matmul is full fp32
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert flops_seen_at("convolution", (x,)) is None
