"""Which ceiling an achieved FLOP rate is a share of: each engine layer's FLOPs at the peak of the precision and
kernel it ran (a 2:4 sparse kernel at twice its precision's), attention at its inputs' precision, the rest of the
model (the head, norms) at its weights'. Dividing everything by the fp32 peak made a bf16 model on a GPU look 15
times as busy as it was."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dsnas.profiler.counting import PRECISION_OF


def layer_precision(layer: Any) -> str:
    """The peak a converted EngineLinear runs at: its precision, with "-2:4" when a sparse kernel runs it."""
    if layer.inference is None:  # the training form: int8 computes in fp32 (fake quantization), fp8 in bf16
        return {"int8": "fp32", "fp8": "bf16"}.get(layer.precision, layer.precision)
    return f"{layer.precision}-2:4" if layer.sparse_kernel else layer.precision


def flops_by_precision(model: Any, rows: int, total_flops: float, call: Callable[[], Any] | None = None,
                       seen_at: dict[str, int] | None = None) -> dict[str, float]:
    """FLOPs of one call by the precision that computes them: 2 * rows * in * out for each engine layer (the count
    of the dense layer it stands for), the FLOPs the counter saw at a precision (``seen_at``: Counts.flops_at,
    attention and CUDA's tf32 convolutions) at it, and whatever else was counted in the weights' precision. An
    EngineConv2d's FLOPs depend on its output's size, which the layer does not know: ``call`` (one call of the
    model) is run once to see it where a convolution computes in another precision than fp32. (Without that, a
    bf16 CNN's FLOPs were all divided by the fp32 peak on a CPU: flop_util 1.28.)"""
    from dsnas.kernels.conv import EngineConv2d  # torch loads on first use
    from dsnas.kernels.linear import EngineLinear, engine_layers  # likewise

    out: dict[str, float] = {}
    convs = []
    for layer in engine_layers(model).values():
        key = layer_precision(layer)
        if isinstance(layer, EngineLinear):
            out[key] = out.get(key, 0.0) + 2.0 * rows * layer.in_features * layer.out_features
        elif isinstance(layer, EngineConv2d) and key != "fp32":
            convs.append((layer, key))
    if convs and call is None:
        raise ValueError("flops_by_precision needs call= to count a low-precision convolution's FLOPs")
    for (layer, key), outputs in zip(convs, _output_sizes([layer for layer, _ in convs], call)):
        kernel = layer.weight.shape[2] * layer.weight.shape[3]  # FlopCounterMode's convolution formula
        out[key] = out.get(key, 0.0) + 2.0 * outputs * (layer.in_channels // layer.groups) * kernel
    for key, flops in (seen_at or {}).items():  # never inside an engine layer: no low-precision conv is fp32
        out[key] = out.get(key, 0.0) + flops
    rest = weights_precision(model)  # the rest (the head, norms, a plain model) in its weights' dtype
    out[rest] = out.get(rest, 0.0) + max(0.0, total_flops - sum(out.values()))
    return {k: v for k, v in out.items() if v > 0}


def weights_dtype(model: Any) -> str:
    """torch's name of the dtype of the model's floating-point weights outside its engine layers (most of them, by
    count; "float32" where there are none): what a plain model converted with ``.to(torch.bfloat16)`` computes in.
    (It was taken as fp32 for every model: a bf16 nn.Linear's flop_util was divided by the fp32 peak.)"""
    from dsnas.kernels.linear import engine_layers  # torch loads on first use

    inside = {id(t) for layer in engine_layers(model).values() for t in layer.parameters()}
    counts: dict[str, int] = {}
    for t in model.parameters():
        if id(t) not in inside and t.is_floating_point():
            name = str(t.dtype).removeprefix("torch.")
            counts[name] = counts.get(name, 0) + t.numel()
    return max(counts, key=counts.__getitem__) if counts else "float32"


def weights_precision(model: Any) -> str:
    """weights_dtype in the engine's words: "fp32", "bf16", ..."""
    dtype = weights_dtype(model)
    return PRECISION_OF.get(dtype, dtype)


def _output_sizes(layers: list[Any], call: Callable[[], Any] | None) -> list[int]:
    """The number of output elements each layer gives in one ``call`` (summed over its calls)."""
    if not layers or call is None:
        return []
    import torch

    seen = [0] * len(layers)

    def hook(i: int) -> Callable[..., None]:
        return lambda _module, _args, output: seen.__setitem__(i, seen[i] + output.numel())

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            call()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def effective_peak(flops: dict[str, float], peaks: dict[str, float]) -> tuple[float | None, str]:
    """(FLOP/s the call would reach were each part at its precision's peak, "") or (None, why not): the total over
    the sum of each part's FLOPs / its peak."""
    missing = sorted(k for k in flops if not peaks.get(k))
    if missing:
        return None, f"no {', '.join(missing)} FLOP/s ceiling known on this device"
    if not flops:
        return None, "no FLOPs counted"
    return sum(flops.values()) / sum(f / peaks[k] for k, f in flops.items()), ""
