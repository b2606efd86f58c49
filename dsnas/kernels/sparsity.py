"""N:M sparsity: saliency (magnitude, Wanda, Hessian), masks, and the 2:4 inference weight or masked-dense and why."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from dsnas.errors import TrialError

__all__ = [
    "SALIENCY_METHODS",
    "check_nm",
    "collect_input_norms",
    "cusparselt_supported",
    "cutlass_sparse_supported",
    "hessian_scores",
    "hessian_traces",
    "hutchinson_diag",
    "magnitude_scores",
    "nm_mask",
    "sparsify_layer",
    "rank_layers_by_sensitivity",
    "saliency",
    "sparse_backend",
    "sparsity_of",
    "to_semi_structured",
    "wanda_scores",
]

SALIENCY_METHODS = ("magnitude", "hessian", "wanda")
# Semi-structured kernels take 2:4 only (at most 2 kept in every 4 consecutive inputs); of the dtypes torch lists,
# fp8 has no plain matmul there (torch._scaled_mm only) and CUTLASS's fp32 is not offered by cuSPARSELt at all.
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16, torch.int8)
# Largest max|sparse - dense| / max|dense| accepted from the one-off check: both sides accumulate in fp32 and round
# once, so they differ by about one ulp of the output; a wrong packing is off by order one.
_CHECK_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _groups(x: Tensor, m: int, what: str) -> Tensor:
    """x [..., in] viewed as [..., in/m, m]: the N:M groups run along the input dimension."""
    if x.dim() < 1 or x.shape[-1] % m:
        raise TrialError(f"N:M sparsity groups {m} consecutive input weights, so in_features must be a multiple of "
                         f"m={m}, but got {what} of shape {tuple(x.shape)}. Fix: pick in_features divisible by {m} or "
                         "leave this layer dense")
    return x.reshape(*x.shape[:-1], x.shape[-1] // m, m)


def _check_pattern(n: int, m: int) -> None:
    if not 0 < n <= m:
        raise TrialError(f"an N:M pattern keeps n of every m weights with 0 < n <= m, but got n={n}, m={m}. "
                         "Fix: use a pattern such as 2:4")


def nm_mask(scores: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """Bool mask of scores' shape keeping the n highest scores in every m consecutive entries of the last dim.

    Ties go to the earlier position (a stable sort), so the mask is the same on every run and every device.
    """
    _check_pattern(n, m)
    groups = _groups(scores, m, "the scores")
    if torch.isnan(scores).any():
        raise TrialError(f"N:M scores must not be NaN, but {int(torch.isnan(scores).sum())} of {scores.numel()} "
                         "are. Fix: check the weights and calibration data the scores came from")
    # topk does not promise which of equal scores it returns; a stable descending sort does.
    keep = torch.argsort(groups, dim=-1, descending=True, stable=True)[..., :n]
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device).scatter_(-1, keep, True)
    return mask.reshape(scores.shape)


def check_nm(mask: Tensor, n: int = 2, m: int = 4) -> None:
    """Raise TrialError unless every group of m consecutive inputs keeps exactly n weights."""
    _check_pattern(n, m)
    kept = _groups(mask, m, "the mask").to(torch.int32).sum(-1)
    bad = (kept != n).nonzero()
    if len(bad):
        where = tuple(int(i) for i in bad[0])
        raise TrialError(f"an {n}:{m} mask keeps exactly {n} of every {m} weights, but {len(bad)} group(s) do not "
                         f"(first: group {where} keeps {int(kept[where])}). Fix: build the mask with nm_mask")


def sparsity_of(weight: Tensor) -> float:
    """Share of the weight's entries that are exactly zero."""
    if isinstance(weight, torch.sparse.SparseSemiStructuredTensor):
        weight = weight.to_dense()
    return float((weight == 0).sum()) / max(weight.numel(), 1)


# --- saliency: higher = more important -----------------------------------------------------------------------------


def magnitude_scores(weight: Tensor) -> Tensor:
    return weight.detach().abs()


def wanda_scores(weight: Tensor, input_norm: Tensor) -> Tensor:
    """|W_ij| * ||X_j||_2 (Wanda, Sun et al. 2023): a small weight on a loud input can matter more than a big one."""
    if input_norm.shape != weight.shape[-1:]:
        raise TrialError(f"Wanda needs one input norm per input feature, shape ({weight.shape[-1]},), but got "
                         f"{tuple(input_norm.shape)}. Fix: collect the norms with collect_input_norms on this layer")
    return weight.detach().abs() * input_norm.to(weight.device, torch.float32)


def hessian_scores(weight: Tensor, hessian_diag: Tensor) -> Tensor:
    """diag(H)_i * w_i^2: Optimal Brain Damage's estimate of the loss increase when w_i is zeroed (the 1/2 dropped,
    the order is the same). A negative noisy diagonal ranks a weight as the cheapest to drop, as OBD would.
    On a trained transformer, hutchinson_diag's per-weight estimate is noise at any affordable probe count: two
    independent estimates pick the same 2:4 masks at chance, where Wanda's agree on 99% (benchmarks/saliency.py)."""
    if hessian_diag.shape != weight.shape:
        raise TrialError(f"the Hessian diagonal has the weight's shape {tuple(weight.shape)}, but got "
                         f"{tuple(hessian_diag.shape)}. Fix: pass this weight's entry of hutchinson_diag")
    w = weight.detach().to(torch.float32)
    return hessian_diag.to(w.device, torch.float32) * w * w


def saliency(method: str, weight: Tensor, *, input_norm: Tensor | None = None,
             hessian_diag: Tensor | None = None) -> Tensor:
    """Scores by name: "magnitude" (|w|), "wanda" (needs input_norm), "hessian" (needs hessian_diag)."""
    if method == "magnitude":
        return magnitude_scores(weight)
    needs = {"wanda": ("input_norm", input_norm), "hessian": ("hessian_diag", hessian_diag)}
    if method not in needs:
        raise TrialError(f"saliency method must be one of {SALIENCY_METHODS}, but got {method!r}. "
                         "Fix: use one of those names")
    name, given = needs[method]
    if given is None:
        raise TrialError(f"saliency {method!r} needs {name}, but got none. Fix: pass {name}=...")
    return wanda_scores(weight, given) if method == "wanda" else hessian_scores(weight, given)


def hutchinson_diag(loss_fn: Callable[[], Tensor], params: Sequence[Tensor], samples: int, seed: int) -> list[Tensor]:
    """Hutchinson's estimate of diag(H) of the loss for each param: the mean of v * Hv over Rademacher vectors v.

    loss_fn is called once; each sample is one Hessian-vector product by double backward through that graph.
    The vectors come from a CPU generator seeded with ``seed``, so an estimate is the same on any device.
    Returns float32 tensors shaped like the params.
    """
    if samples < 1:
        raise TrialError(f"Hutchinson needs samples >= 1, but got {samples}. Fix: use 8 or more (a per-layer "
                         "trace is usable at 8; a per-weight diagonal needs far more, see benchmarks/saliency.py)")
    if not all(p.requires_grad for p in params):
        raise TrialError("the Hessian is taken with respect to params that require grad, but some do not. "
                         "Fix: pass trainable parameters")
    params = list(params)
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True, allow_unused=True)
    # A param the loss ignores, or one it is linear in, has no curvature: its Hv is exactly zero.
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    if not live:
        return sums
    gen = torch.Generator().manual_seed(seed)
    for s in range(samples):
        vs = [torch.randint(0, 2, p.shape, generator=gen).to(p.device, p.dtype) * 2 - 1 for p in params]
        hvs = torch.autograd.grad([grads[i] for i in live], [params[i] for i in live], [vs[i] for i in live],
                                  retain_graph=s < samples - 1, allow_unused=True)
        for i, hv in zip(live, hvs, strict=True):
            if hv is not None:
                sums[i] += (vs[i] * hv.detach()).to(torch.float32)
    return [t / samples for t in sums]


def hessian_traces(diags: Sequence[Tensor]) -> list[float]:
    """Per layer, the trace of its Hessian block: the sum of its diagonal estimate."""
    return [float(d.sum()) for d in diags]


def rank_layers_by_sensitivity(names: Sequence[str], traces: Sequence[float], params_count: Sequence[int]) -> list[str]:
    """Layer names, least sensitive (first to sparsify) first; equal sensitivities keep the given order."""
    if not len(names) == len(traces) == len(params_count):
        raise TrialError(f"one trace and one weight count per layer, but got {len(names)} names, {len(traces)} "
                         f"traces, {len(params_count)} counts. Fix: pass aligned lists")
    if any(c <= 0 for c in params_count):
        raise TrialError(f"every layer has at least one weight, but got counts {list(params_count)}. "
                         "Fix: count each layer's weights with weight.numel()")
    # The trace sums curvature over every weight, so a layer 4x larger has ~4x the trace at the same curvature per
    # weight. Ranking raw traces would keep the largest layers dense for their size alone, and those are the GEMMs
    # where 2:4 pays off; the mean curvature per weight (HAWQ-V2's average trace) compares layers fairly.
    per_weight = [t / c for t, c in zip(traces, params_count, strict=True)]
    order = sorted(range(len(names)), key=lambda i: per_weight[i])
    return [names[i] for i in order]


def collect_input_norms(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable) -> dict[str, Tensor]:
    """Per named layer, the L2 norm of each input feature over every row the layer saw in ``batches`` (for Wanda).

    A batch is passed as ``model(batch)``, or ``model(*batch)`` when it is a tuple or list. The model's train/eval
    mode is left as the caller set it. The hooks are removed afterwards, also when the forward raises.
    """
    squares: dict[str, Tensor] = {}

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            x = inputs[0].detach()
            x2 = x.reshape(-1, x.shape[-1]).to(torch.float32).pow(2).sum(0)
            squares[name] = x2 if name not in squares else squares[name] + x2

        return hook

    handles = [layer.register_forward_hook(hook_for(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                if isinstance(batch, tuple | list):
                    model(*batch)
                else:
                    model(batch)
    finally:
        for handle in handles:
            handle.remove()
    silent = [name for name in layers if name not in squares]
    if silent:
        raise TrialError(f"Wanda needs each pruned layer's inputs, but {silent} saw none in calibration. "
                         "Fix: pass at least one batch that runs through every named layer")
    return {name: squares[name].sqrt() for name in layers}


def sparsify_layer(layer: nn.Module, scores: Tensor, n: int = 2, m: int = 4) -> Tensor:
    """Zero all but the n best-scoring of every m weights of ``layer.weight`` and keep the mask as its ``mask`` buffer.

    Works for a plain nn.Linear (the buffer is registered) and for one that already has a mask (it is replaced).
    """
    weight = layer.weight
    if scores.shape != weight.shape:
        raise TrialError(f"scores must have the weight's shape {tuple(weight.shape)}, but got {tuple(scores.shape)}. "
                         "Fix: score this layer's own weight")
    mask = nm_mask(scores, n, m).to(weight.device)
    with torch.no_grad():
        weight.mul_(mask)
    if "mask" in layer._buffers:
        layer._buffers["mask"] = mask
    else:
        layer.__dict__.pop("mask", None)  # a plain `mask = None` attribute, as a dense layer may carry
        layer.register_buffer("mask", mask)
    return mask


# --- inference: the semi-structured sparse weight, or the masked dense one and why ------------------------------------


def cusparselt_supported(device: torch.device) -> tuple[bool, str]:
    """cuSPARSELt needs a torch built with it and sparse tensor cores (compute capability >= 8.0)."""
    if not torch.backends.cusparselt.is_available():
        return False, f"this torch build ({torch.__version__}) has no cuSPARSELt"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        return False, f"compute capability {major}.{minor} < 8.0 has no sparse tensor cores"
    return True, ""


def cutlass_sparse_supported(device: torch.device) -> tuple[bool, str]:
    """torch's CUTLASS 2:4 kernels are compiled for compute capability 8.x only (they refuse 9.0 and later)."""
    if getattr(torch.version, "hip", None):
        return False, "CUTLASS sparse kernels are CUDA-only and this is a ROCm build"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 8:
        return False, f"CUTLASS sparse kernels run on compute capability 8.x only, got {major}.{minor}"
    return True, ""


_BACKENDS = {
    "cusparselt": (cusparselt_supported, torch.sparse.SparseSemiStructuredTensorCUSPARSELT),
    "cutlass": (cutlass_sparse_supported, torch.sparse.SparseSemiStructuredTensorCUTLASS),
}


def _shape_fits(shape: tuple[int, ...], dtype: torch.dtype, kernel: type) -> str:
    """'' when the kernel takes this weight shape, else why not (sizes from torch's own constraint table)."""
    limits = kernel._DTYPE_SHAPE_CONSTRAINTS.get(dtype)
    if limits is None:
        return f"no {str(dtype).removeprefix('torch.')} kernel"
    rows, cols = limits.sparse_min_rows, limits.sparse_min_cols
    if shape[0] < rows or shape[0] % rows or shape[1] < cols or shape[1] % cols:
        return f"shape {shape} is not a multiple of ({rows}, {cols})"
    return ""


def sparse_backend(weight_shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> tuple[str, str]:
    """("cusparselt" | "cutlass", "") when a semi-structured kernel can take this weight, else ("masked-dense", why).

    cuSPARSELt is preferred: it is the maintained path and the only one on compute capability 9.0 and later.
    """
    device, shape = torch.device(device), tuple(int(s) for s in weight_shape)
    if not torch.cuda.is_available():
        return "masked-dense", "no CUDA device"
    if device.type != "cuda":
        return "masked-dense", f"the weight is on {device}, not a CUDA device"
    if len(shape) != 2:
        return "masked-dense", f"semi-structured kernels take a 2-D weight, got shape {shape}"
    if dtype not in SEMI_STRUCTURED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SEMI_STRUCTURED_DTYPES)
        return "masked-dense", f"dtype {str(dtype).removeprefix('torch.')} has no semi-structured kernel ({names} do)"
    refusals = []
    for name, (supported, kernel) in _BACKENDS.items():
        why = supported(device)[1] or _shape_fits(shape, dtype, kernel)
        if not why:
            return name, ""
        refusals.append(f"{name}: {why}")
    return "masked-dense", "; ".join(refusals)


def _two_of_four(mask: Tensor) -> str:
    """'' when every 4 consecutive inputs keep at most 2 weights (what the kernels store), else why not."""
    if mask.shape[-1] % 4:
        return f"in_features {mask.shape[-1]} is not a multiple of 4"
    most = int(mask.reshape(*mask.shape[:-1], -1, 4).to(torch.int32).sum(-1).max()) if mask.numel() else 0
    return "" if most <= 2 else f"the mask keeps {most} of some 4 consecutive weights; semi-structured kernels take 2:4"


def _matches_dense(sparse: Tensor, dense: Tensor) -> str:
    """'' when the sparse matmul reproduces the masked dense one, else the disagreement."""
    if dense.dtype == torch.int8:
        # CUDA has no plain int8 dense matmul to compare with; the identity makes the product exact.
        probe = torch.eye(dense.shape[1], dtype=dense.dtype, device=dense.device)
        return "" if torch.equal(torch.nn.functional.linear(probe, sparse), dense.t()) else "int8 product differs"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, dense.shape[1], generator=gen).to(dense.device, dense.dtype)
    got, want = torch.nn.functional.linear(x, sparse).float(), torch.nn.functional.linear(x, dense).float()
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    return "" if err <= _CHECK_TOLERANCE[dense.dtype] else f"relative error {err:.3g} against masked dense"


def to_semi_structured(weight: Tensor, mask: Tensor, dtype: torch.dtype) -> tuple[Tensor, str, str]:
    """The masked weight in ``dtype`` as a semi-structured sparse tensor: (tensor, backend, "").

    When no sparse kernel can take it, or its product disagrees with the masked dense one (checked once, here),
    returns (masked dense weight, "masked-dense", reason) instead. An int8 weight must already hold int8 values.
    """
    if mask.shape != weight.shape:
        raise TrialError(f"the mask has the weight's shape {tuple(weight.shape)}, but got {tuple(mask.shape)}. "
                         "Fix: build it with nm_mask from this weight's scores")
    dense = weight.detach().masked_fill(~mask.to(weight.device, torch.bool), 0).to(dtype).contiguous()
    why = _two_of_four(mask)
    backend, reason = ("masked-dense", why) if why else sparse_backend(dense.shape, dtype, dense.device)
    if backend == "masked-dense":
        return dense, backend, reason
    cls = torch.sparse.SparseSemiStructuredTensor
    forced = cls._FORCE_CUTLASS
    cls._FORCE_CUTLASS = backend == "cutlass"  # to_sparse_semi_structured reads this class-wide switch
    try:
        sparse = torch.sparse.to_sparse_semi_structured(dense)
        wrong = _matches_dense(sparse, dense)
    except RuntimeError as exc:
        wrong = f"failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    finally:
        cls._FORCE_CUTLASS = forced
    if wrong:
        return dense, "masked-dense", f"{backend} {wrong}"
    return sparse, backend, ""
