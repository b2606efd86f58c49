"""Which ceiling an achieved FLOP rate is a share of: each engine layer's FLOPs at the peak of the precision and
kernel it ran (a 2:4 sparse kernel at twice its precision's), the rest of the model (attention, the head, norms) at
fp32's. Dividing everything by the fp32 peak made a bf16 model on a GPU look 15 times as busy as it was."""

from __future__ import annotations

from typing import Any


def layer_precision(layer: Any) -> str:
    """The peak a converted EngineLinear runs at: its precision, with "-2:4" when a sparse kernel runs it."""
    if layer.inference is None:  # the training form: int8 computes in fp32 (fake quantization), fp8 in bf16
        return {"int8": "fp32", "fp8": "bf16"}.get(layer.precision, layer.precision)
    return f"{layer.precision}-2:4" if layer.sparse_kernel else layer.precision


def flops_by_precision(model: Any, rows: int, total_flops: float) -> dict[str, float]:
    """FLOPs of one call by the precision that computes them: 2 * rows * in * out for each engine layer (the count
    of the dense layer it stands for), and whatever else was counted as fp32. An EngineConv2d's FLOPs depend on its
    output's size, which the layer does not know: they stay in the fp32 share, so a bf16 convolution's share of the
    ceiling reads high."""
    from dsnas.kernels.linear import EngineLinear, engine_layers  # torch loads on first use

    out: dict[str, float] = {}
    for layer in engine_layers(model).values():
        if not isinstance(layer, EngineLinear):
            continue
        key = layer_precision(layer)
        out[key] = out.get(key, 0.0) + 2.0 * rows * layer.in_features * layer.out_features
    out["fp32"] = out.get("fp32", 0.0) + max(0.0, total_flops - sum(out.values()))
    return {k: v for k, v in out.items() if v > 0}


def effective_peak(flops: dict[str, float], peaks: dict[str, float]) -> tuple[float | None, str]:
    """(FLOP/s the call would reach were each part at its precision's peak, "") or (None, why not): the total over
    the sum of each part's FLOPs / its peak."""
    missing = sorted(k for k in flops if not peaks.get(k))
    if missing:
        return None, f"no {', '.join(missing)} FLOP/s ceiling known on this device"
    if not flops:
        return None, "no FLOPs counted"
    return sum(flops.values()) / sum(f / peaks[k] for k, f in flops.items()), ""
