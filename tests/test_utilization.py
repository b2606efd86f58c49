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
    metrics, _ = measure(fp32, task, torch.device("cpu"), hardware)
    assert metrics["flop_util"] == pytest.approx(metrics["gflop_s"] / profile["ceilings"]["gemm_gflop_s"])
