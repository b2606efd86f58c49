"""Which ceiling an achieved FLOP rate is a share of: each part of the FLOPs at the peak of the precision its op
ran in (dsnas.profiler.counting.flops_seen_at; a 2:4 sparse kernel at twice its precision's). Dividing everything by
the fp32 peak made a bf16 model on a GPU look 15 times as busy as it was."""

from __future__ import annotations

from typing import Any


def weights_dtype(model: Any) -> str:
    """torch's name of the dtype of the model's floating-point weights outside its engine layers (most of them, by
    count; "float32" where there are none): what a plain model converted with ``.to(torch.bfloat16)`` computes in.
    (It was taken as fp32 for every model: a bf16 nn.Linear's flop_util was divided by the fp32 peak.)"""
    from dsnas.kernels.convert import held_tensors, packed_tensors  # torch loads on first use
    from dsnas.kernels.linear import engine_layers  # likewise

    layers = engine_layers(model).values()
    inside = {id(t) for layer in layers for t in layer.parameters()}
    counts: dict[str, int] = {}
    own = [t for t in model.parameters() if id(t) not in inside and t.is_floating_point()]
    # torch.ao's quantized layers hold their weights packed (a quantize_dynamic model: "qint8", not fp32)
    held = [h for t in own for h in held_tensors(t)]  # a torchao int8 weight: its int8 data, not "float32"
    for t in held + packed_tensors(model, skip={id(m) for layer in layers for m in layer.modules()}):
        name = str(t.dtype).removeprefix("torch.")
        counts[name] = counts.get(name, 0) + t.numel()
    return max(counts, key=counts.__getitem__) if counts else "float32"


def effective_peak(flops: dict[str, float], peaks: dict[str, float]) -> tuple[float | None, str]:
    """(FLOP/s the call would reach were each part at its precision's peak, "") or (None, why not): the total over
    the sum of each part's FLOPs / its peak."""
    missing = sorted(k for k in flops if not peaks.get(k))
    if missing:
        return None, f"no {', '.join(missing)} FLOP/s ceiling known on this device"
    if not flops:
        return None, "no FLOPs counted"
    return sum(flops.values()) / sum(f / peaks[k] for k, f in flops.items()), ""
