"""flop_util divides by the peak of the precision that ran, layer by layer, never by the fp32 peak for all."""

from __future__ import annotations

import pytest
import torch

from dsnas.kernels.convert import untrained_inference_form
from dsnas.models import build
from dsnas.profiler.counting import count_work, flops_seen_at
from dsnas.profiler.utilization import effective_peak

H100 = {"fp32": 67e3, "bf16": 989e3, "fp16": 989e3, "fp8": 1979e3, "int8": 1979e3, "bf16-2:4": 1979e3}  # GFLOP/s


def _arch(*layers):
    return {"family": "transformer_lm", "vocab_size": 256, "context": 16, "d_model": 32,
            "layers": [{"n_heads": 2, "ffn_ratio": 2, "precision": p, "sparsity": s} for p, s in layers]}


def test_each_engine_layer_counts_at_its_precision_and_the_rest_at_fp32():
    model = untrained_inference_form(build(_arch(("int8", "dense"), ("fp32", "2:4"))), int8_backend="int8-static")
    per_block = 2 * 64 * (32 * 96 + 32 * 32 + 32 * 64 + 64 * 32)  # qkv, proj, up, down at 64 rows
    with torch.inference_mode():
        counts = count_work(lambda: model(torch.randint(0, 256, (4, 16))))
    # masked-dense 2:4 fp32 runs at fp32's peak, as do attention and the head
    assert counts.flops_at == {"int8": per_block, "fp32": counts.flops - per_block}
    assert counts.flops - per_block > per_block


def test_every_counted_flop_is_charged_to_the_precision_its_op_ran_in():
    """The split went by engine layers (2 * tokens * in * out each) and charged the rest to the weights' dtype: a
    bf16 layer over 16 patches of an image was charged for 1 row of 16 (images count one item per example), an
    autocast model's bf16 matmuls went to the fp32 peak (flop_util 0.98 where a CPU has no bf16 ceiling), and a
    quantize_dynamic model's int8 ones too (flop_util 1.76). Each op's FLOPs now go to the precision it computes in."""
    from dsnas.kernels.linear import EngineLinear

    class Patches(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = EngineLinear(48, 32, precision="bf16")
            self.head = torch.nn.Linear(32, 10)

        def forward(self, x):  # (B, 16 * 48) -> 16 patches of 48
            return self.head(self.embed(x.unflatten(1, (16, 48))).mean(1))

    model = untrained_inference_form(Patches())
    with torch.inference_mode():
        counts = count_work(lambda: model(torch.randn(2, 16 * 48)))
    assert counts.flops_at == {"bf16": 2 * 2 * 16 * 48 * 32, "fp32": 2 * 2 * 32 * 10}

    linear = torch.nn.Linear(64, 64)

    def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return linear(torch.randn(8, 64))

    with torch.inference_mode():
        assert count_work(autocast).flops_at == {"bf16": 2 * 8 * 64 * 64}
    quantized = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(64, 64)),
                                                       {torch.nn.Linear}, dtype=torch.qint8)
    with torch.inference_mode():
        assert count_work(lambda: quantized(torch.randn(8, 64))).flops_at == {"int8": 2 * 8 * 64 * 64}


def test_a_users_quantize_dynamic_model_is_measured_with_its_packed_weights():
    """Its int8 weights sit in packed objects that parameters() does not list: it measured 0 parameters, its weights
    left out of peak memory, labelled eager-fp32, and its flop_util divided by the fp32 peak."""
    import dsnas

    fp32 = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256))
    int8 = torch.ao.quantization.quantize_dynamic(fp32, {torch.nn.Linear}, dtype=torch.qint8)
    report = dsnas.measure(int8, torch.randn(4, 256), device="cpu", batch_sizes=(8,), measure_s=0.02,
                           max_measure_s=0.1, warmup_s=0.01)
    weights = 2 * 256 * 1024  # int8, one byte each
    assert report.metrics["params"] == weights + 1024 + 256  # and the biases
    assert (report.profile["backend"], report.profile["dtype"]) == ("eager-int8", "qint8")
    assert "flop_util" not in report.metrics
    assert report.profile["unavailable"]["flop_util"] == "no int8 FLOP/s ceiling known on this device"
    assert report.metrics["peak_memory_mb"] * 2**20 >= weights


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
    if fp32_share(metrics, profile) is not None:  # moved them
        assert metrics["flop_util"] == pytest.approx(metrics["gflop_s"] / profile["ceilings"]["gemm_gflop_s"])


def fp32_share(metrics, profile):
    """flop_util, or None where this busy machine left the CPU ceilings measured disturbed (no share is taken of
    ceilings too low: tests/test_ceilings.py), and the profile says so."""
    if "disturbed" in profile["ceilings"]["details"]:
        assert profile["unavailable"]["flop_util"].startswith("the CPU ceilings were not measured undisturbed")
        return None
    return metrics["flop_util"]


def test_a_low_precision_convolution_counts_at_its_precision_by_its_output_size():
    """A bf16 CNN's FLOPs were all put at fp32's peak on a CPU (the layer does not know its output's size), and
    its flop_util read 1.28. Each convolution's FLOPs, 2 * outputs * in_channels / groups * kernel area, go to the
    precision it ran in; their sum is the whole count's convolution share."""
    from dsnas.kernels.conv import EngineConv2d

    arch = {"family": "cnn", "stem_width": 8, "image_size": 12, "channels": 3, "n_classes": 10,
            "layers": [{"depth": 1, "width": 16, "kernel": 5, "expand": 2, "precision": "bf16"},
                       {"depth": 1, "width": 24, "kernel": 3, "expand": 1}]}
    model = untrained_inference_form(build(arch).eval())
    x = torch.randn(3, 3, 12, 12)
    with torch.inference_mode():
        counted = count_work(lambda: model(x)).flops_by_op
    convs = [m for m in model.modules() if isinstance(m, EngineConv2d)]
    assert {m.precision for m in convs} == {"bf16", "fp32"}
    with torch.inference_mode():
        shares = count_work(lambda: model(x)).flops_at
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
            assert (fp32_share(report.metrics, report.profile) or 1.0) > 0
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
    model, x = _HalfAttention(), torch.randn(3, 16, 32)
    with torch.inference_mode():
        counts = count_work(lambda: model(x))
    attention = 4 * 3 * 2 * 16 * 16 * 16  # 4*B*H*T*S*(d/H)
    linears = 2 * 3 * 16 * (32 * 96 + 32 * 32)
    assert counts.flops == attention + linears and counts.flops_at == {"bf16": attention, "fp32": linears}
    peak = effective_peak(counts.flops_at, H100)[0]
    assert peak == pytest.approx(counts.flops / (attention / 989e3 + linears / 67e3))


def test_fp32_work_on_cuda_counts_at_tf32_where_torch_lets_the_tensor_cores_run_it(monkeypatch):
    """cuDNN runs fp32 convolutions on the tensor cores in TF32 by default (torch.backends.cudnn.allow_tf32), and
    matmuls too once a user sets torch.set_float32_matmul_precision("high"): at the fp32 CUDA-core peak flop_util
    read 8x high, up to 3. On the CPU, or with TF32 off, fp32 stays fp32; attention keeps its inputs' dtype."""

    class OnCuda(torch.Tensor):
        is_cuda = property(lambda self: True)

    x = torch.zeros(2).as_subclass(OnCuda)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")  # torch's default
        assert flops_seen_at("convolution", (x,)) == "tf32"
        assert flops_seen_at("convolution", (torch.zeros(2),)) == "fp32"  # the CPU
        assert flops_seen_at("convolution", (x.to(torch.bfloat16),)) == "bf16"
        assert flops_seen_at("mm", (x,)) == "fp32"  # torch's default fp32 matmul is full fp32
        torch.set_float32_matmul_precision("high")
        assert flops_seen_at("mm", (x,)) == flops_seen_at("addmm", (x, x, x)) == "tf32"
        assert flops_seen_at("_scaled_dot_product_efficient_attention", (x,)) == "fp32"
        assert flops_seen_at("mm", (torch.zeros(2),)) == "fp32"  # the CPU
    finally:
        torch.set_float32_matmul_precision(before)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert flops_seen_at("convolution", (x,)) == "fp32"


def test_tf32_set_through_fp32_precision_is_read_without_raising():
    """PyTorch's documented TF32 switch since 2.9 is fp32_precision; once it is set, reading the legacy allow_tf32
    raises RuntimeError ("mix of the legacy and new APIs"), so every count of a CUDA model failed (its flops, bytes
    and flop_util missing, "the model's ops could not be counted"). The new setting is read, and says tf32 or not."""

    class OnCuda(torch.Tensor):
        is_cuda = property(lambda self: True)

    x = torch.zeros(2).as_subclass(OnCuda)
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = matmul.fp32_precision, conv.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert flops_seen_at("mm", (x,)) == "tf32"
        matmul.fp32_precision, conv.fp32_precision = "ieee", "ieee"
        assert flops_seen_at("mm", (x,)) == flops_seen_at("convolution", (x,)) == "fp32"
        conv.fp32_precision = "tf32"
        assert flops_seen_at("convolution", (x,)) == "tf32"
    finally:
        matmul.fp32_precision, conv.fp32_precision = before


def test_int8_fp8_and_semi_structured_ops_count_at_their_kernels_peaks(monkeypatch):
    class Sparse(torch.Tensor):
        pass

    monkeypatch.setattr(torch.sparse, "SparseSemiStructuredTensor", Sparse, raising=False)
    x = torch.zeros(2, dtype=torch.bfloat16)
    assert flops_seen_at("linear", (x, x.as_subclass(Sparse))) == "bf16-2:4"
    assert flops_seen_at("_int_mm", (torch.zeros(2, dtype=torch.int8),)) == "int8"
    assert flops_seen_at("_int_mm", (torch.zeros(2, dtype=torch.uint8),)) == "int8"  # torchao's activations
    assert flops_seen_at("linear_dynamic", (torch.zeros(2),)) == "int8"  # fp32 in, quantized inside
    if hasattr(torch, "float8_e4m3fn"):
        assert flops_seen_at("_scaled_mm", (torch.zeros(2).to(torch.float8_e4m3fn),)) == "fp8"


def test_work_that_is_not_8_bit_integers_is_not_charged_to_int8():
    """A complex einsum (a spectral layer) or an int64 matmul went to the int8 peak: on a CPU flop_util said "no int8
    ceiling", on a GPU it would divide by the int8 tensor cores'."""
    assert flops_seen_at("bmm", (torch.zeros(2, dtype=torch.complex64),)) == "complex64"
    assert flops_seen_at("mm", (torch.zeros(2, dtype=torch.int64),)) == "int64"
    assert flops_seen_at("mm", (torch.quantize_per_tensor(torch.zeros(2), 0.1, 0, torch.qint8),)) == "int8"


def test_flop_util_is_not_a_share_of_the_work_counted_when_part_ran_uncounted_or_could_not_be_counted():
    """nn.Bilinear's product has no FLOP formula: a share of the peak of the part counted read as a (too low)
    figure. A model whose ops no counter can run under (torch.cond) failed its measurement: it is timed now,
    its counts said to be missing, and why."""
    import dsnas

    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pair, self.head = torch.nn.Bilinear(32, 32, 32), torch.nn.Linear(32, 4)

        def forward(self, x):
            return self.head(self.pair(x, x))

    class Branching(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)

        def forward(self, x):
            return torch.cond(x.sum() > 0, lambda t: self.a(t), lambda t: self.b(t), (x,))

    protocol = {"device": "cpu", "batch_sizes": (4,), "measure_s": 0.02, "max_measure_s": 0.1, "warmup_s": 0.01}
    mixed = dsnas.measure(Mixed(), torch.randn(2, 32), **protocol)
    assert "flop_util" not in mixed.metrics and mixed.metrics["flops_bs4"] > 0
    assert mixed.profile["unavailable"]["flop_util"].startswith("part of the work was not counted (aten._trilinear")
    branching = dsnas.measure(Branching(), torch.randn(2, 32), **{**protocol, "batch_sizes": (1, 4)})
    assert branching.metrics["latency_ms"] > 0 and "flops_bs4" not in branching.metrics  # both sizes timed
    assert branching.profile["unavailable"]["flops"].startswith("the model's ops could not be counted")
    assert " at 0x" not in branching.profile["unavailable"]["flops"]  # no object address in what is stored


def test_an_fp16_quantize_dynamic_model_is_sized_and_labelled_fp16():
    """Its weights unpack as fp32 tensors: it was labelled fp32 and its weights counted at 4 bytes."""
    from dsnas.kernels.convert import inference_size
    from dsnas.profiler.counting import count_bytes
    from dsnas.profiler.utilization import weights_dtype

    fp16 = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(256, 512)), {torch.nn.Linear},
                                                  dtype=torch.float16)
    assert inference_size(fp16) == (256 * 512 + 512, 2 * (256 * 512 + 512))
    assert weights_dtype(fp16) == "float16"
    x = torch.randn(1, 256)
    with torch.inference_mode():
        assert count_bytes(lambda: fp16(x)) == x.nbytes + 2 * (256 * 512 + 512) + 512 * 4


def test_a_torchao_quantized_model_is_sized_and_labelled_by_the_data_its_weights_hold():
    """torchao's Int8Tensor says float32 (the dtype it computes in) of data it holds in int8: a user's
    quantize_(model, Int8WeightOnlyConfig()) model had its weights counted at 4 bytes and was labelled eager-fp32."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    from dsnas.kernels.convert import inference_size
    from dsnas.profiler.utilization import weights_dtype

    model = torch.nn.Sequential(torch.nn.Linear(256, 512))
    quantize_(model, Int8WeightOnlyConfig())
    # int8 weights, an fp32 scale and an int8 zero point per row, the fp32 bias
    assert inference_size(model) == (256 * 512 + 512, 256 * 512 + 512 * 4 + 512 + 512 * 4)
    assert weights_dtype(model) == "int8"
