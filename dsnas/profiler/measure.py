"""Measure a trained model on the device that trained it: latency and throughput at each configured
batch size, peak memory, parameter count, and how each number was obtained."""

from __future__ import annotations

import os
from typing import Any

from dsnas.profiler.device import fingerprint
from dsnas.profiler.memory import peak_memory
from dsnas.profiler.timing import cpu_threads, time_calls


def measure(model: Any, task: Any, device: Any, hardware: Any) -> tuple[dict[str, float], dict[str, Any]]:
    """Returns (numeric metrics, profile). The caller holds the device exclusively."""
    import torch

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    threads = (hardware.threads or os.cpu_count()) if device.type == "cpu" else None
    metrics: dict[str, float] = {"params": float(sum(p.numel() for p in model.parameters()))}
    weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    profile: dict[str, Any] = {"fingerprint": fingerprint(device), "batches": {}, "backend": "eager-fp32"}
    peaks = []
    model.eval()
    with cpu_threads(threads) as used, torch.inference_mode():
        profile["threads"] = used if device.type == "cpu" else None
        for bs in sorted(hardware.batch_sizes):
            batch = task.example_batch(bs, device)
            timing = time_calls(lambda: model(batch), sync, warmup_s=hardware.warmup_s,
                                measure_s=hardware.measure_s)
            peak = peak_memory(lambda: model(batch), device, weight_bytes)
            flops = count_flops(lambda: model(batch))
            tokens = bs * task.tokens_per_example
            metrics[f"latency_ms_bs{bs}"] = timing.median_ms
            metrics[f"throughput_tok_s_bs{bs}"] = tokens / (timing.median_ms / 1e3)
            metrics[f"gflop_s_bs{bs}"] = flops / (timing.median_ms / 1e3) / 1e9
            profile["batches"][str(bs)] = {**timing.as_dict(), "peak_bytes": peak.bytes, "flops": flops}
            if peak.bytes is None:
                profile["memory_unavailable"] = peak.reason
            else:
                peaks.append(peak.bytes)
            profile["memory_method"] = peak.method
    small, large = min(hardware.batch_sizes), max(hardware.batch_sizes)
    metrics["latency_ms"] = metrics[f"latency_ms_bs{small}"]
    metrics["throughput_tok_s"] = metrics[f"throughput_tok_s_bs{large}"]
    metrics["gflop_s"] = metrics[f"gflop_s_bs{large}"]  # achieved, from counted FLOPs over the median latency
    metrics["flops_per_token"] = profile["batches"][str(large)]["flops"] / (large * task.tokens_per_example)
    if peaks:
        metrics["peak_memory_mb"] = max(peaks) / 2**20
    return metrics, profile


def count_flops(call: Any) -> int:
    """FLOPs of one call as torch's dispatch-level counter sees them (matmuls and attention; 2 per
    multiply-add): an algorithmic count, not a hardware counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        call()
    return int(counter.get_total_flops())
