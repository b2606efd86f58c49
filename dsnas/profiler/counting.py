"""Algorithmic counts of one call, seen at PyTorch's dispatcher: FLOPs (torch's FlopCounterMode) and the bytes each
aten op reads and writes. Counts of what the program asks for, not hardware counters: caches, fusion and
write-allocate traffic make the DRAM bytes a machine really moves differ from these."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from typing import Any

# Ops that only make a new view of existing data or ask for metadata: they move no bytes. Schema-declared views
# (func.is_view) and non-mutating ops whose outputs all alias an input are caught generically; these are listed
# because their schemas do not say so (_unsafe_view) or to keep the rule explicit for the common ones.
NO_DATA_OPS = frozenset({"view", "_unsafe_view", "_reshape_alias", "transpose", "expand", "t", "permute", "detach",
                         "alias", "as_strided", "squeeze", "unsqueeze", "lift_fresh"})
# Allocations move no data; ops that overwrite their first argument without reading it.
ALLOCATION_OPS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})
WRITE_ONLY_OPS = frozenset({"copy_", "fill_", "zero_"})


def count_bytes(call: Callable[[], Any]) -> int:
    """Bytes the aten ops of one ``call()`` read plus write: per op, the nbytes (numel x element size) of every
    tensor argument plus every tensor result. Views and metadata ops (view, reshape when it returns a view,
    transpose, expand, t, permute, detach, alias, _unsafe_view, ...) count 0; a reshape or contiguous that
    copies counts as the copy it is. An in-place op counts its tensor as read and written (copy_/fill_/zero_:
    written only); an ``out=`` tensor counts as written only.

    Algorithmic, not measured DRAM traffic. Under torch.inference_mode some composite ops (linear, layer_norm)
    reach the dispatcher whole and are counted as one op rather than as their parts."""
    counter = _byte_counter_class()()
    with counter:
        call()
    return counter.total


def count_flops_and_bytes(call: Callable[[], Any]) -> tuple[int, int]:
    """(FLOPs, bytes) of ONE ``call()``: FlopCounterMode's count (2 per multiply-add; matmuls, convolutions,
    attention) and count_bytes' count, from the same run. Works under torch.inference_mode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = _byte_counter_class()()
    # The byte counter is entered last, so it is on top of the mode stack and sees each op as count_bytes alone
    # would; the flop counter beneath may then decompose ops it has no formula for without double-counting bytes.
    with FlopCounterMode(display=False, custom_mapping=_int8_flops()) as flops, counter:
        call()
    return int(flops.get_total_flops()), counter.total


def op_bytes(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    """Bytes one dispatched op reads plus writes, by the rules of count_bytes."""
    import torch
    from torch.utils._pytree import tree_leaves

    name = func.overloadpacket.__name__
    if name in NO_DATA_OPS or name in ALLOCATION_OPS or getattr(func, "is_view", False):
        return 0
    outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    ins = [t for t in tree_leaves((args, {k: v for k, v in kwargs.items() if k != "out"}))
           if isinstance(t, torch.Tensor)]
    mutates = func._schema.is_mutable
    if not mutates and (not outs or all(any(torch._C._is_alias_of(o, i) for i in ins) for o in outs)):
        return 0  # a metadata query (no tensor result) or a view the schema did not declare (reshape, contiguous)
    if name in WRITE_ONLY_OPS and ins:
        ins = ins[1:]
    return sum(t.nbytes for t in ins) + sum(t.nbytes for t in outs)


@functools.cache
def _byte_counter_class() -> type:
    """Built on first use, so that importing this module does not import torch."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class ByteCounterMode(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.total = 0
            self.by_op: Counter[str] = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            n = op_bytes(func, args, kwargs, out)
            self.total += n
            self.by_op[str(func.overloadpacket)] += n
            return out

    return ByteCounterMode


def _int8_flops() -> dict[Any, Callable[..., int]]:
    """FLOP formulas torch's counter lacks for the engine's INT8 kernels (2 per multiply-add, as for fp32), so an
    int8 layer counts the same work as the fp32 layer it replaces."""
    import torch

    def int_mm(a_shape: Any, b_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    def linear_dynamic(x_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        rows = 1
        for size in x_shape[:-1]:
            rows *= size
        return 2 * rows * x_shape[-1] * out_shape[-1]

    mapping: dict[Any, Callable[..., int]] = {torch.ops.aten._int_mm: int_mm}
    if hasattr(torch.ops.quantized, "linear_dynamic"):
        mapping[torch.ops.quantized.linear_dynamic] = linear_dynamic
    return mapping
