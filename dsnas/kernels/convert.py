"""After training: each EngineLinear becomes the inference form its choices ask for, on the device at hand, and
records the backend that actually runs (never a silent dense stand-in for a sparse or quantized layer)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dsnas.errors import TrialError
from dsnas.kernels.conv import EngineConv2d
from dsnas.kernels.linear import LOW, EngineLinear, engine_layers
from dsnas.kernels.quant import Fp8Linear, Int8Linear, fp8_supported
from dsnas.kernels.sparsity import magnitude_scores, sparsify_layer, to_semi_structured


class CastLinear(nn.Module):
    """A bf16/fp16 linear whose weight is stored in that dtype (no per-call weight cast), optionally a
    semi-structured sparse weight; inputs are cast in, outputs back by EngineLinear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.dtype), self.weight, self.bias)


def convert(model: nn.Module, *, int8_backend: str = "auto", recorded: dict[str, str] | None = None,
            rows: Sequence[int] | None = None, reasons: dict[str, str] | None = None) -> None:
    """Put every EngineLinear of ``model`` into its inference form, in place. ``recorded`` maps layer names to the
    INT8 backend used when the model was measured, so a reloaded model runs the same code where it can; ``rows``:
    the row counts the model will be measured at, where an "auto" INT8 backend is timed; ``reasons``: why each
    recorded backend was chosen then (with its measured ratios), kept in place of "requested by name"."""
    model.eval()
    for name, layer in engine_layers(model).items():
        if layer.inference is not None:
            continue
        with torch.no_grad():
            if isinstance(layer, EngineConv2d):
                layer.convert()
            else:
                _convert_layer(layer, (recorded or {}).get(name, int8_backend), rows)
                if name in (reasons or {}) and layer.backend == f"int8:{(recorded or {}).get(name)}":
                    layer.reason = reasons[name]  # type: ignore[index]


def _convert_layer(layer: EngineLinear, int8_backend: str, rows: Sequence[int] | None = None) -> None:
    if layer.mask is not None:
        layer.weight.mul_(layer.mask)  # baked once, so no forward pass multiplies by the mask again
        layer.baked = True
    weight = layer.weight.detach()
    bias = None if layer.bias is None else layer.bias.detach()
    sparse = layer.pattern == "2:4"
    if layer.precision == "int8":
        amax = layer.act_amax if bool(layer.act_amax > 0) else None
        layer.inference = Int8Linear.from_float(weight, bias, amax, int8_backend, rows)
        layer.backend, layer.reason = f"int8:{layer.inference.backend}", layer.inference.reason
        if sparse:  # said, not hidden: the 2:4 zeros are multiplied like any other weight
            layer.reason = f"2:4 zeros computed densely: the INT8 kernels here are dense; {layer.reason}"
    elif layer.precision == "fp8":
        ok, why = fp8_supported(weight.device)
        if not ok:
            raise TrialError(f"a layer chose fp8, which cannot run here: {why}")
        layer.inference = Fp8Linear.from_float(weight, bias)
        layer.backend = "fp8:scaled_mm" + ("-fast-accum" if layer.inference.fast_accum else "")
        if sparse:
            layer.reason = "2:4 zeros computed densely: torch._scaled_mm has no sparse form"
    elif layer.precision in LOW:
        dtype = LOW[layer.precision]
        if sparse:
            stored, kind, layer.reason = to_semi_structured(weight, layer.mask, dtype)
            layer.backend = f"{kind} {layer.precision}"
        else:
            stored, layer.backend = weight.to(dtype), layer.precision
        layer.inference = CastLinear(stored, bias, dtype)
    elif sparse:
        layer.backend = "masked-dense fp32"
        layer.reason = "fp32 has no semi-structured sparse kernel; the zeros are computed densely"
    else:
        layer.backend = "fp32"


# The activation range an untrained int8 layer is converted with: about the amax of a unit Gaussian batch. Only
# timings are taken of the untrained form, and they do not depend on it; the trained layer converts with its
# calibrated range.
UNTRAINED_ACT_AMAX = 4.0


def untrained_inference_form(model: nn.Module, int8_backend: str = "auto",
                             rows: Sequence[int] | None = None, recorded: dict[str, str] | None = None) -> nn.Module:
    """A freshly built model in the inference form a trial would measure: 2:4 layers get a magnitude mask (the
    kernels need the pattern; timings do not depend on which weights are kept), int8 layers a stand-in activation
    range (so that the static backend, which needs one, is a candidate as it is for the trained model), then
    ``convert`` (``recorded``: the INT8 backend each layer ran when it was measured, as ``convert`` takes it)."""
    for layer in engine_layers(model).values():
        if layer.sparsity != "dense":
            sparsify_layer(layer, magnitude_scores(layer.weight.detach()), 2, 4)
        if layer.precision == "int8" and not bool(layer.act_amax > 0):
            layer.act_amax.fill_(UNTRAINED_ACT_AMAX)
    convert(model, int8_backend=int8_backend, recorded=recorded, rows=rows)
    return model


BYTES_PER_WEIGHT = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "fp8": 1}


def inference_size(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes of the weights inference uses). A converted layer keeps its fp32 master weight (saved
    weights are the training form) beside its inference form; count each weight once, at its inference width.
    Bytes are algorithmic: a weight at its dtype's width, a bias (where there is one) as the inference form keeps it
    (bf16/fp16 layers and fp8's in 2 bytes, int8's in fp32), and int8's and fp8's fp32 per-row scales."""
    params, nbytes = 0, 0
    engine = engine_layers(model)
    inside = {id(t) for layer in engine.values() for t in [*layer.parameters(), *layer.buffers()]}
    # A weight an engine layer shares with another module (a head tied to the token table) is still read at fp32
    # there when the layer converts it: both forms are used at inference.
    layers = {id(m) for layer in engine.values() for m in layer.modules()}
    shared = {id(t) for m in model.modules() if id(m) not in layers for t in m.parameters(recurse=False)}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in inside:
            params += t.numel() if isinstance(t, nn.Parameter) else 0
            nbytes += sum(held.numel() * held.element_size() for held in held_tensors(t))
    for t in packed_tensors(model, skip=layers):  # a user's own torch.ao quantized layers (quantize_dynamic)
        params += t.numel()
        nbytes += quantized_bytes(t)
    # Engine layers tied to each other (two layers given one weight) hold one set of parameters: a model measured
    # 142 where it has 110, with or without an fp32 group. Each converted layer holds its own inference copy, read.
    seen: set[int] = set()
    for layer in engine.values():
        width = BYTES_PER_WEIGHT[layer.precision] if layer.inference is not None else 4
        weights = _weight_numel(layer)
        biases = layer.out_features if layer.shed_bias else 0 if layer.bias is None else layer.bias.numel()
        again = {id(t) for t in (layer.weight, layer.bias) if t is not None and id(t) in seen}
        seen.update(id(t) for t in (layer.weight, layer.bias) if t is not None)
        new_weights = 0 if id(layer.weight) in again else weights
        new_biases = 0 if layer.bias is not None and id(layer.bias) in again else biases
        params += new_weights + new_biases
        converted = layer.inference is not None
        scaled = converted and layer.precision in ("int8", "fp8")  # fp32 per-row scales
        bias_width = 2 if converted and layer.precision in ("bf16", "fp16", "fp8") else 4
        nbytes += (_weight_bytes(layer, weights * width) + biases * bias_width) if converted else \
            (new_weights + new_biases) * 4
        nbytes += 4 * layer.out_features if scaled else 0
        if converted and width != 4 and id(layer.weight) in shared:
            nbytes += weights * 4  # its fp32 form, for the module it is tied to
    return params, nbytes


def _weight_bytes(layer: Any, dense: int) -> int:
    """Bytes of a converted layer's weight: ``dense`` (its count at its width), or what a semi-structured sparse
    weight holds (cuSPARSELt's or CUTLASS's kept half and its metadata: 0.5625x a bf16 weight's dense bytes),
    which says the dense shape and dtype of data it does not hold."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    stored = getattr(layer.inference, "weight", None)
    if isinstance(stored, torch.Tensor) and is_traceable_wrapper_subclass(stored):
        return sum(t.numel() * t.element_size() for t in held_tensors(stored))
    return dense


def _weight_numel(layer: Any) -> int:
    """An engine layer's weight count, also once its fp32 master is shed (shed_training_form)."""
    if layer.weight is not None:
        return layer.weight.numel()
    if isinstance(layer, EngineConv2d):
        return layer.out_channels * (layer.in_channels // layer.groups) * math.prod(layer.kernel_size)
    return layer.in_features * layer.out_features


def shed_training_form(model: nn.Module, check: Callable[[], Any] | None = None) -> str:
    """Free what only training needs from a converted model, in place: each engine layer's fp32 master weight and
    bias where its inference form holds its own copy (bf16, fp16, int8, fp8), and every baked N:M mask (the layer keeps
    its share of zeros, so its pattern and report stay as they were). A converted model held both forms: a loaded
    bf16 model 2.7x the weight bytes its measurement counted, an int8 one 3.8x. A master also used by a module
    outside the engine layers (a head tied to the token table) stays, as inference_size counts it. ``check``: a call
    of the model (its probe) that must still run once shed; where it fails (a user's forward that reads a layer's
    weight itself), everything is put back and the reason returned. Returns "" when shed."""
    shed = _shed(model)
    if check is None or not shed:
        return ""
    try:
        with torch.inference_mode():
            check()
    except Exception as e:  # reading a freed weight (None) raises a TypeError or AttributeError; any failure puts back
        _put_back(shed)
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return ""


def masters_read_bytes(model: nn.Module, call: Callable[[], Any]) -> int:
    """Bytes of what shed_training_form would free (fp32 masters, baked masks) where ``call`` (one forward) cannot
    run without them: a user's forward that reads a layer's weight itself. dsnas.load keeps them for such a model,
    so its measurement counts them in its weights; 0 where the inference form runs alone. The model is left as it
    was."""
    shed = _shed(model)
    if not shed:
        return 0
    try:
        with torch.inference_mode():
            call()
    except Exception:  # a freed weight read: the training form is needed at inference
        return sum(sum(t.numel() * t.element_size() for t in held_tensors(held)) for _, _, held, _ in shed)
    finally:
        _put_back(shed)
    return 0


# (layer, attribute, what it held, the layer's (shed_zero_share, shed_bias) before): what _put_back restores
_Shed = list[tuple[Any, str, Any, tuple[float | None, bool]]]


def _shed(model: nn.Module) -> _Shed:
    """Free, in place, what only training needs (see shed_training_form); returns what was freed."""
    layers = engine_layers(model)
    inside = {id(m) for layer in layers.values() for m in layer.modules()}
    used_outside = {id(t) for m in model.modules() if id(m) not in inside for t in m.parameters(recurse=False)}
    shed: _Shed = []
    for layer in layers.values():
        # A mask convert multiplied into the weight for good; an fp32 layer (no inference form) keeps its weight:
        # it is the one inference reads.
        names = ["mask"] if layer.mask is not None and layer.baked else []
        if layer.inference is not None:
            names += [n for n in ("weight", "bias") if getattr(layer, n) is not None and
                      id(getattr(layer, n)) not in used_outside]
        before = (layer.shed_zero_share, layer.shed_bias)
        if "mask" in names:
            layer.shed_zero_share = layer.zero_share
        layer.shed_bias = layer.shed_bias or "bias" in names  # (shed again, it stays shed)
        for name in names:
            shed.append((layer, name, getattr(layer, name), before))
            setattr(layer, name, None)
    return shed


def _put_back(shed: _Shed) -> None:
    for layer, name, held, (zero_share, bias) in shed:
        setattr(layer, name, held)
        layer.shed_zero_share, layer.shed_bias = zero_share, bias


def held_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold ``t``'s data: a tensor subclass's inner ones (torchao's quantized weights:
    Int8Tensor's int8 qdata, its scales and zero points), else ``t``. Such a weight says the dtype it computes in
    (float32) of data it holds in int8: a user's quantize_(model, Int8WeightOnlyConfig()) model measured its weights
    at 4 bytes each (a peak memory 2x what it holds) and labelled itself eager-fp32."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if not is_traceable_wrapper_subclass(t):
        return [t]
    names = t.__tensor_flatten__()[0]
    return [held for name in names if isinstance(getattr(t, name, None), torch.Tensor)
            for held in held_tensors(getattr(t, name))]


def held_bytes(model: nn.Module) -> int:
    """Bytes of every tensor storage ``model`` holds, each storage once: its parameters and buffers, a tensor
    subclass's inner tensors, torch.ao's packed weights (with their per-row scales, as the fp32 they are packed as:
    quantized_bytes). What the memory holds, to set beside inference_size's count of what inference reads."""
    storages = {}
    for t in [h for t in [*model.parameters(), *model.buffers()] for h in held_tensors(t)] + packed_tensors(model):
        key = t.data_ptr() if t.is_quantized else t.untyped_storage().data_ptr()
        storages[key] = quantized_bytes(t) if t.is_quantized else t.untyped_storage().nbytes()
    return sum(storages.values())


def packed_tensors(model: nn.Module, skip: set[int] | frozenset[int] = frozenset()) -> list[torch.Tensor]:
    """The tensors held by torch.ao's packed-parameter objects in ``model`` outside the modules whose ids are in
    ``skip``: a quantized Linear's int8 weight and bias live in a ScriptObject that neither parameters() nor
    buffers() lists (a user's quantize_dynamic model measured 0 parameters and no weight memory). So do the
    constants of a TorchScript graph (_graph_constants)."""
    from torch.utils._pytree import tree_leaves

    found: list[torch.Tensor] = []
    for module in model.modules():
        if id(module) in skip:
            continue
        # fp16 dynamic quantization's weights unpack as fp32 tensors; its module says they are held in fp16
        half = getattr(module, "dtype", None) == torch.float16
        for value in vars(module).values():
            if isinstance(value, torch.ScriptObject) and value._has_method("unpack"):
                found += [t.half() if half and t.dtype == torch.float32 else t
                          for t in tree_leaves(value.unpack()) if isinstance(t, torch.Tensor)]
        found += _graph_constants(module)
    return found


def _graph_constants(module: nn.Module) -> list[torch.Tensor]:
    """The tensors a TorchScript module's graph holds outside its parameters and buffers: torch.jit.freeze turns
    the parameters into constants (a frozen model measured 0 parameters, its weights left out of its peak memory and
    its dtype taken as fp32), and the submodules it was told to keep (``preserved_attrs``) into plain attributes
    that parameters() does not list (a model measured 4,160 of its 8,840 parameters)."""
    if not isinstance(module, torch.jit.ScriptModule):
        return []
    try:
        graph = module.graph
    except (AttributeError, RuntimeError):  # a script module without a forward
        return []
    # Only those the graph reads: torch.jit.optimize_for_inference leaves each weight's constant behind, unread,
    # beside the transposed copy its matmul reads (a 68,362-parameter model measured 136,458, its weights twice).
    found = [node.output().toIValue() for node in graph.findAllNodes("prim::Constant")
             if node.output().type().kind() == "TensorType" and node.output().uses()]
    own = {t.data_ptr() for t in [*module.parameters(), *module.buffers()]}
    seen: set[int] = set()
    for t in _attribute_tensors(graph, module._c):
        if t.data_ptr() not in own | seen:
            seen.add(t.data_ptr())
            found.append(t)
    return found


def _attribute_tensors(graph: Any, owner: Any, depth: int = 0) -> list[torch.Tensor]:
    """The tensors ``graph`` reads by attribute (prim::GetAttr chains from its first input, ``owner``), through
    the methods it calls on the objects it reaches."""
    objects = {next(iter(graph.inputs())).unique(): owner}
    found: list[torch.Tensor] = []
    for node in graph.findAllNodes("prim::GetAttr") + graph.findAllNodes("prim::CallMethod"):
        source = objects.get(next(iter(node.inputs())).unique())
        if source is None:
            continue
        if node.kind() == "prim::GetAttr":
            value = source.getattr(node.s("name"))
            objects[node.output().unique()] = value
            if isinstance(value, torch.Tensor) and node.output().uses():
                found.append(value)
        elif depth < 8 and isinstance(source, torch.ScriptObject):  # a kept submodule's own forward, not inlined
            found += _attribute_tensors(source._get_method(node.s("name")).graph, source, depth + 1)
    return found


def quantized_bytes(t: torch.Tensor) -> int:
    """A tensor's bytes, a quantized one's with its scales as the fp32 they are packed as (per channel or per
    tensor; the zero points, all 0 in a symmetric scheme, are left out, as inference_size does)."""
    if not t.is_quantized:
        return t.nbytes
    per_channel = t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
    return t.nbytes + 4 * (t.q_per_channel_scales().numel() if per_channel else 1)


def int8_reasons(layers: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Why each INT8 layer of a layer report ran its backend (an "auto" choice: the measured ratios)."""
    return {name: row["reason"] for name, row in layers.items()
            if str(row.get("backend", "")).startswith("int8:") and row.get("reason")}


def int8_backends(layers: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The INT8 backend each layer ran, from a layer report (``layer_report``, or a trial's
    ``profile["engine"]["layers"]``), for ``convert(recorded=...)`` when the model is loaded again."""
    return {name: row["backend"].removeprefix("int8:") for name, row in layers.items()
            if str(row.get("backend", "")).startswith("int8:")}


def inference_signature(model: nn.Module) -> dict[str, Any]:
    """What runs: per engine layer its precision, its sparsity pattern (2:4 where a mask zeroes weights) and the
    backend that ran; and whether the model is torch.compile'd. A measurement is of the model whose signature it
    records, and a shipped model with another signature needs measuring again."""
    eager = getattr(model, "_orig_mod", model)
    layers = {}
    for name, m in engine_layers(eager).items():
        layers[name] = f"{m.precision} {m.pattern} {m.backend if m.inference is not None else 'unconverted'}"
    signature = {"compiled": eager is not model, "layers": layers}
    # "form" names the inference code where a model's modules say it changed (``inference_form``): a transformer
    # block whose MLP now keeps bf16/fp16 activations (2) was slower before, so measurements of it are stale (the
    # measurement key) and an older bundle says so; every other model's signature stays as it was.
    form = max((getattr(m, "inference_form", 1) for m in eager.modules()), default=1)
    if form > 1:
        signature["form"] = form
    return signature


def signature_difference(measured: dict[str, Any], shipped: dict[str, Any]) -> str:
    """'' when two signatures are the same, else the first difference in words."""
    if measured.get("compiled") != shipped.get("compiled"):
        return f"compiled {measured.get('compiled')} was measured, compiled {shipped.get('compiled')} ships"
    if measured.get("form", 1) != shipped.get("form", 1):
        return f"inference code form {measured.get('form', 1)} was measured, form {shipped.get('form', 1)} ships"
    before, after = measured.get("layers", {}), shipped.get("layers", {})
    for name in sorted(set(before) | set(after)):
        if before.get(name) != after.get(name):
            return f"layer {name}: {before.get(name, 'absent')!r} was measured, {after.get(name, 'absent')!r} ships"
    return ""


def training_state(model: nn.Module) -> dict[str, Any]:
    """The state dict without the engine layers' inference forms (they are rebuilt from it by ``convert``); a
    user's own module named `inference` keeps its weights."""
    forms = tuple(f"{name}.inference." if name else "inference." for name in engine_layers(model))
    return {k: v for k, v in model.state_dict().items() if not k.startswith(forms)}


def unique_state(model: Any) -> dict[str, Any]:
    """The training-form state dict (``convert`` rebuilds the inference forms from it) with each tensor once:
    tied weights share storage, and safetensors stores each tensor once; loading the first name re-fills every
    alias."""
    out, seen = {}, set()
    for name, tensor in training_state(model).items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            out[name] = tensor.detach().cpu().contiguous()
    return out
