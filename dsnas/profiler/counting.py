"""Algorithmic counts of one call, seen at PyTorch's dispatcher: FLOPs (torch's FlopCounterMode, with the formulas it
lacks for the kernels dsnas runs) and the bytes each op reads and writes. Counts of what the program asks for, not
hardware counters: caches, fusion and write-allocate traffic make the DRAM bytes a machine really moves differ."""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Ops that only make a new view of existing data or ask for metadata: they move no bytes. Non-mutating ops whose
# outputs all alias an input are caught generically (a view, or reshape/contiguous/to when they return their input);
# these are listed because their schemas do not say so (_unsafe_view) or to keep the rule explicit for common ones.
NO_DATA_OPS = frozenset({"view", "_unsafe_view", "_reshape_alias", "transpose", "expand", "t", "permute", "detach",
                         "alias", "as_strided", "squeeze", "unsqueeze", "lift_fresh"})
# Allocations move no data; ops that overwrite their first argument without reading it.
ALLOCATION_OPS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})
WRITE_ONLY_OPS = frozenset({"copy_", "fill_", "zero_"})
# Words in the names of the ops whose work the FLOP count stands for: matrix products, convolutions, attention and
# recurrent cells (``aten._int_mm``, ``quantized::linear_dynamic``, ``aten._scaled_dot_product_flash_attention``).
# One of these that runs with no FLOP formula is work missing from the count, and Counts.uncounted names it.
# Elementwise ops, norms, softmax and reductions are left out of the FLOP count by definition (torch's as ours), so
# they are not reported.
MATRIX_OP_WORDS = frozenset({"mm", "bmm", "addmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "matmul",
                             "einsum", "linear", "bilinear", "trilinear", "conv", "convolution", "conv1d", "conv2d",
                             "conv3d", "attention", "attn", "transformer", "rnn", "lstm", "gru"})
# (transformer: the fused encoder layer nn.TransformerEncoder runs in eval mode, aten._transformer_encoder_layer_fwd;
# trilinear: nn.Bilinear's aten._trilinear. Neither has a formula: counted as nothing, and said so.)
# SDPA's fused kernels whose first arguments are query, key, value as (batch, heads, length, head dim), and their
# backward ops (grad_out, query, key, value, ...). torch 2.13 has formulas for the CUDA ones, none for the CPU's
# flash kernel, which SDPA runs on a CPU; one is registered here only where torch has none.
SDPA_FORWARD_OPS = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
SDPA_BACKWARD_OPS = tuple(f"{name}_backward" for name in SDPA_FORWARD_OPS)


@dataclass(frozen=True)
class Counts:
    """What one call asked for. ``flops``: 2 per multiply-add of the matrix products, convolutions and attention
    (FlopCounterMode's definition); ``bytes``: count_bytes' count; ``uncounted``: the names of the ops of those
    kinds that ran with no FLOP formula, so their work is missing from ``flops`` (empty when nothing is missing)."""

    flops: int
    bytes: int
    uncounted: tuple[str, ...] = ()
    flops_by_op: dict[str, int] = field(default_factory=dict)
    bytes_by_op: dict[str, int] = field(default_factory=dict)
    # Every counted FLOP by the precision its op computes in (flops_seen_at): dsnas.profiler.utilization divides
    # each part by that precision's peak.
    flops_at: dict[str, int] = field(default_factory=dict)


def count_bytes(call: Callable[[], Any]) -> int:
    """Bytes the ops of one ``call()`` read plus write: per op, the nbytes (numel x element size) of every
    tensor argument plus every tensor result, and the weights inside packed-parameter objects (torch.ao's quantized
    Linear: the int8 weight, its fp32 per-channel scales and the bias). Views and metadata ops (view, reshape when
    it returns a view, transpose, expand, t, permute, detach, alias, _unsafe_view, ...) count 0; a reshape,
    contiguous or dtype conversion that copies counts as the copy it is. An in-place op counts its tensor as read
    and written (copy_/fill_/zero_: written only); an ``out=`` tensor counts as written only.

    Algorithmic, not measured DRAM traffic. Under torch.inference_mode some composite ops (linear, layer_norm)
    reach the dispatcher whole and are counted as one op rather than as their parts."""
    counter = _byte_counter_class()()
    with counter:
        call()
    return counter.total


def count_work(call: Callable[[], Any]) -> Counts:
    """FLOPs, bytes and the ops whose FLOPs are missing, of ONE ``call()``, from the same run (see Counts).
    Works under torch.inference_mode."""
    flops = _flop_counter_class()()
    nbytes = _byte_counter_class()()
    # The byte counter is entered last, so it is on top of the mode stack and sees each op as count_bytes alone
    # would; the flop counter beneath may then decompose ops it has no formula for without double-counting bytes.
    with flops, nbytes:
        call()
    by_op = {str(op): int(n) for op, n in flops.get_flop_counts().get("Global", {}).items()}
    return Counts(int(flops.get_total_flops()), nbytes.total, tuple(sorted(flops.uncounted)), by_op,
                  dict(nbytes.by_op), dict(flops.at))


def count_flops_and_bytes(call: Callable[[], Any]) -> tuple[int, int]:
    """(FLOPs, bytes) of ONE ``call()``: count_work's figures without the list of uncounted ops."""
    counts = count_work(call)
    return counts.flops, counts.bytes


def op_bytes(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> int:
    """Bytes one dispatched op reads plus writes, by the rules of count_bytes."""
    import torch
    from torch.utils._pytree import tree_leaves

    name = func.overloadpacket.__name__
    if name in NO_DATA_OPS or name in ALLOCATION_OPS:
        return 0
    from dsnas.kernels.convert import held_tensors  # torch loads on first use

    outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    leaves = tree_leaves((args, {k: v for k, v in kwargs.items() if k != "out"}))
    ins = [t for t in leaves if isinstance(t, torch.Tensor)]
    if name in WRITE_ONLY_OPS and ins:
        ins = ins[1:]
    # A tensor subclass (a semi-structured 2:4 weight) says the dense shape and dtype of data it does not hold:
    # count the tensors that hold it (its kept half and metadata), and a transpose that swaps them moves nothing.
    ins = [held for t in ins for held in held_tensors(t)]
    outs = [held for t in outs for held in held_tensors(t)]
    # Not func.is_view: reshape, contiguous and to() declare an alias in their schemas, and under inference mode
    # they reach the dispatcher whole, copying or not; whether the result shares the input's memory says which.
    mutates = func._schema.is_mutable
    if not mutates and (not outs or all(any(_is_alias(o, i) for i in ins) for o in outs)):
        return 0  # a metadata query (no tensor result) or a view
    if name == "embedding" and len(ins) >= 2 and ins[0].dim() == 2:
        # A lookup reads the rows it gathers, at most the whole table (each row once, as a weight is read once),
        # not the table: a 50,257-row vocabulary counted whole made a 16-token call's bytes 1.9x what it reads.
        table, ids = ins[0], ins[1]
        rows = min(ids.numel(), table.shape[0])
        return rows * table.shape[1] * table.element_size() + ids.nbytes + sum(t.nbytes for t in outs)
    # fp16 packed weights unpack as fp32 tensors: held, and read, at 2 bytes each
    half = name.endswith("_fp16")
    packed = sum(_packed_bytes(leaf, half) for leaf in leaves if isinstance(leaf, torch.ScriptObject))
    return sum(t.nbytes for t in ins) + packed + sum(t.nbytes for t in outs)


def _is_alias(a: Any, b: Any) -> bool:
    import torch

    try:
        return torch._C._is_alias_of(a, b)
    except (RuntimeError, NotImplementedError):  # a wrapper subclass (a semi-structured weight) has no storage
        return False


def _packed_bytes(obj: Any, half: bool = False) -> int:
    """Bytes of the tensors a packed-parameter object holds (torch.ao's LinearPackedParams: its ``unpack()`` gives
    the quantized weight and the bias), by dsnas.kernels.convert.quantized_bytes; ``half``: fp16 ones."""
    import torch
    from torch.utils._python_dispatch import _disable_current_modes
    from torch.utils._pytree import tree_leaves

    from dsnas.kernels.convert import quantized_bytes  # torch loads on first use

    if not obj._has_method("unpack"):
        return 0
    with _disable_current_modes():  # reading the weights back is bookkeeping, not work of the call counted
        tensors = [t for t in tree_leaves(obj.unpack()) if isinstance(t, torch.Tensor)]
        return sum(t.nbytes // 2 if half and t.dtype == torch.float32 else quantized_bytes(t) for t in tensors)


def is_matrix_op(name: str) -> bool:
    """Whether an op's name without its namespace (``_int_mm``, ``linear_dynamic``,
    ``_scaled_dot_product_flash_attention_for_cpu``) says it is of a kind the FLOP count covers (MATRIX_OP_WORDS)."""
    return any(word in MATRIX_OP_WORDS for word in name.split("_"))


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


@functools.cache
def _flop_counter_class() -> type:
    """FlopCounterMode with dsnas's extra formulas, noting the matrix-class ops that ran without one. It sees an op
    after its decomposition into ops with formulas (aten.linear -> aten.addmm), so an op it names ran as such."""
    from torch.utils.flop_counter import FlopCounterMode

    class DsnasFlopCounter(FlopCounterMode):
        def __init__(self) -> None:
            super().__init__(display=False,
                             custom_mapping={**_attention_flops(), **_int8_flops(), **_linear_flops(),
                                             **_kept_whole()})
            self.uncounted: set[str] = set()
            self.at: Counter[str] = Counter()

        def _count_flops(self, func_packet, out, args, kwargs):
            name = getattr(func_packet, "__name__", "")
            if func_packet not in self.flop_registry:
                if is_matrix_op(name):
                    self.uncounted.add(str(func_packet))
                return super()._count_flops(func_packet, out, args, kwargs)
            before = self.flop_counts["Global"][func_packet]
            result = super()._count_flops(func_packet, out, args, kwargs)
            self.at[flops_seen_at(name, args)] += self.flop_counts["Global"][func_packet] - before
            return result

    return DsnasFlopCounter


def flops_seen_at(name: str, args: tuple[Any, ...]) -> str:
    """The precision an op computes in, from what it computes on, as the peaks are named (Ceilings.by_precision):
    its first tensor's dtype ("bf16" under autocast or in a bf16 engine layer, "fp8" for torch._scaled_mm's
    inputs), "int8" for integer inputs (torch._int_mm) and torch.ao's packed int8 weights (its input is quantized
    inside: quantized::linear_dynamic takes fp32), "tf32" for an fp32 matrix product or convolution on CUDA where
    torch lets the tensor cores run it (``torch.backends.cuda.matmul.allow_tf32``, cuDNN's ``allow_tf32``; attention
    keeps its dtype), and "-2:4" after it where a semi-structured sparse weight runs. (Taken from each op, not from
    the layers: a layer's rows are not the tokens where a model reshapes, an autocast matmul has fp32 weights, and
    torchao's int8 runs fp32 at 16 rows or fewer on CUDA; each was charged to another peak than the one it ran at.)"""
    import torch

    if name == "linear_dynamic" or any(isinstance(a, torch.ScriptObject) for a in args):
        return "int8"
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors:
        return "fp32"
    first = tensors[0]
    dtype = str(first.dtype).removeprefix("torch.")
    if not first.is_floating_point():  # int8 only for 8-bit integers: a complex or int64 matmul is not int8 work
        return "int8" if first.is_quantized or dtype in ("int8", "uint8") else dtype
    precision = "fp8" if dtype.startswith("float8") else PRECISION_OF.get(dtype, dtype)
    if precision == "fp32" and first.is_cuda and "attention" not in name and _tf32_allowed("convolution" in name):
        precision = "tf32"
    if any(_semi_structured(a) for a in tensors):
        precision += "-2:4"
    return precision


def _tf32_allowed(convolution: bool) -> bool:
    """Whether torch lets the tensor cores run an fp32 convolution (cuDNN) or matmul (cuBLAS) at tf32. Read through
    ``fp32_precision`` where it is set: once a user sets TF32 that way (torch.backends.cuda.matmul.fp32_precision =
    "tf32", PyTorch's documented way since 2.9), reading the legacy ``allow_tf32`` raises RuntimeError ("mix of the
    legacy and new APIs"), and every count of a CUDA model failed: its flops, bytes and flop_util missing."""
    import torch

    backend = torch.backends.cudnn.conv if convolution else torch.backends.cuda.matmul
    precision = getattr(backend, "fp32_precision", None)  # absent before torch 2.9; "none": set the legacy way
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    return bool(torch.backends.cudnn.allow_tf32 if convolution else torch.backends.cuda.matmul.allow_tf32)


def _semi_structured(t: Any) -> bool:
    import torch

    kind = getattr(getattr(torch, "sparse", None), "SparseSemiStructuredTensor", None)
    return kind is not None and isinstance(t, kind)


PRECISION_OF = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64", "qint8": "int8"}


def _attention_flops() -> dict[Any, Callable[..., int]]:
    """torch's own SDPA formulas for the SDPA kernels its counter has none for. Forward: QK^T and AV, 2 FLOPs per
    multiply-add, 4*B*H*T*S*D; backward: torch's 5 matrix products. Like torch's formulas they ignore is_causal: a
    causal kernel may skip the masked half, but the math path computes every product and torch's fused formulas
    count every one, so all paths count the same work."""
    import torch
    from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

    def forward(q_shape: Any, k_shape: Any, v_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return sdpa_flop_count(q_shape, k_shape, v_shape)

    def backward(grad_shape: Any, q_shape: Any, k_shape: Any, v_shape: Any, *args: Any, out_shape: Any = None,
                 **kwargs: Any) -> int:
        return sdpa_backward_flop_count(grad_shape, q_shape, k_shape, v_shape)

    mapping: dict[Any, Callable[..., int]] = {}
    for names, formula in ((SDPA_FORWARD_OPS, forward), (SDPA_BACKWARD_OPS, backward)):
        for name in names:
            op = getattr(torch.ops.aten, name, None)
            if op is not None and op not in flop_registry:
                mapping[op] = formula
    return mapping


def _linear_flop_count(x_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """2 * rows * in * out for a linear layer (aten.linear, quantized::linear_dynamic): rows are every dimension of
    the input but the last."""
    return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * out_shape[-1]


def _linear_flops() -> dict[Any, Callable[..., int]]:
    """aten.linear counted whole, 2 * rows * in * out (what its parts, addmm or mm, count). Under inference mode it
    reaches the dispatcher whole, and torch's counter would decompose it into ops a semi-structured sparse weight
    does not support: on an H200 every trial with a cuSPARSELt layer failed with "can't perform requested op
    (expand.default)" while its FLOPs were counted."""
    import torch

    # Both keys: FlopCounterMode decomposes any op whose overload (aten.linear.default) is not a key of its registry,
    # and counts by the packet (aten.linear).
    return {torch.ops.aten.linear: _linear_flop_count, torch.ops.aten.linear.default: _linear_flop_count}


def _kept_whole() -> dict[Any, Callable[..., int]]:
    """Ops the counter must run as they are, with no FLOPs: torch's Python decomposition of dropout, which the
    counter runs for an op without a formula, clones its input where eval-mode dropout hands it back, so every
    nn.Dropout of a model in eval counted its activations read and written (2x its tensor's bytes) that no call
    moves."""
    import torch

    def nothing(*args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return 0

    # Both keys, as for aten.linear (_linear_flops).
    return {torch.ops.aten.dropout: nothing, torch.ops.aten.dropout.default: nothing}


def _int8_flops() -> dict[Any, Callable[..., int]]:
    """FLOP formulas torch's counter lacks for the engine's INT8 kernels (2 per multiply-add, as for fp32), so an
    int8 layer counts the same work as the fp32 layer it replaces."""
    import torch

    def int_mm(a_shape: Any, b_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    mapping: dict[Any, Callable[..., int]] = {torch.ops.aten._int_mm: int_mm}
    if hasattr(torch.ops.quantized, "linear_dynamic"):
        mapping[torch.ops.quantized.linear_dynamic] = _linear_flop_count
    return mapping
