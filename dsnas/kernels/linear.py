"""The engine's linear layer: per-layer precision (fp32, bf16, fp16, int8, fp8) and N:M sparsity, trained in a
training form and converted once, after training, into the inference form that is measured and shipped."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dsnas.kernels.choices import PRECISIONS, SPARSITIES
from dsnas.kernels.quant import fake_quant_act, fake_quant_weight

LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
SPARSE_KERNELS = ("cusparselt", "cutlass")  # the semi-structured kernels convert may name as a layer's backend
# The dtype each precision trains in: int8 trains in fp32 and then with fake quantization (QAT); fp8 trains in bf16
# and is converted to per-row scaled fp8 for inference (fp8 training is out of scope).
TRAIN_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.float32,
               "fp8": torch.bfloat16}


class EngineLayer:
    """What every engine layer carries beside its module (EngineLinear here, EngineConv2d in dsnas.kernels.conv):
    ``precision`` and ``sparsity``, the N:M ``mask`` (None when dense), the fp32 fallback state the training step
    drives, and once converted, ``inference`` and the ``backend`` that runs it (with the ``reason`` a faster one did
    not)."""

    precision: str
    sparsity: str
    mask: torch.Tensor | None
    fallback_left: int
    fallbacks: int
    overflow: torch.Tensor | None
    inference: nn.Module | None
    backend: str
    reason: str
    # Once convert.shed_training_form has freed what only training needs: the mask's share of zeros (an
    # inference-only model still says which pattern it runs), and whether an fp32 master bias was freed.
    shed_zero_share: float | None = None
    shed_bias = False

    @property
    def zero_share(self) -> float | None:
        """The share of weights the N:M mask zeroes; None for a dense layer (no mask)."""
        if self.mask is None:
            return self.shed_zero_share
        return 1.0 - int(self.mask.sum()) / self.mask.numel()  # counted exactly: one zero in 10^8 is sparse

    @property
    def pattern(self) -> str:
        """"2:4" where the mask zeroes weights, else "dense" (a sparse choice the Hessian left dense)."""
        return "2:4" if self.zero_share else "dense"

    @property
    def sparse_kernel(self) -> bool:
        """Whether a semi-structured sparse kernel runs this layer (else its zeros, if any, are multiplied)."""
        return self.backend.split(" ")[0] in SPARSE_KERNELS

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float32 if self.fallback_left > 0 else TRAIN_DTYPE[self.precision]

    def watch_overflow(self, out: torch.Tensor, x: torch.Tensor, training: bool) -> None:
        """Raise this layer's overflow flag when its low-precision output is not finite though its input was. On
        the device, no host sync: TrainStep reads every layer's flag at once, once per step. A layer is to blame
        only when its input was finite: the layers after an overflow see its inf and would fall back too."""
        if self.overflow is not None and training:
            self.overflow.logical_or_(~torch.isfinite(out).all() & torch.isfinite(x).all())


class EngineLinear(EngineLayer, nn.Linear):
    """nn.Linear whose precision and sparsity are choices of the search.

    Training form: the weight times the N:M ``mask`` (when sparse), optionally fake-quantized (QAT), computed in the
    layer's dtype with an on-device overflow flag; an overflowed layer computes in fp32 for ``fallback_left`` steps.
    Inference form: ``inference`` (an INT8, FP8 or semi-structured sparse module) once ``convert`` has run.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, precision: str = "fp32",
                 sparsity: str = "dense") -> None:
        super().__init__(in_features, out_features, bias)
        if precision not in PRECISIONS or sparsity not in SPARSITIES:
            raise ValueError(f"precision must be one of {PRECISIONS} and sparsity one of {SPARSITIES}, "
                             f"but got {precision!r}, {sparsity!r}")
        self.precision, self.sparsity = precision, sparsity
        # Buffers exist from construction so that saved weights load into a freshly built model.
        if sparsity != "dense":
            self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool))
        else:
            self.mask = None
        if precision == "int8":
            self.register_buffer("act_amax", torch.zeros(()))  # set by calibration before QAT
        self.qat = False
        self.baked = False  # the mask has been multiplied into the weight for good (convert)
        self.fallback_left = 0  # steps left in fp32 after an overflow
        self.fallbacks = 0  # how often this layer fell back
        self.overflow: torch.Tensor | None = None  # a one-element bool view into the step's flags (TrainStep)
        self.inference: nn.Module | None = None
        self.backend = "dense"  # what runs at inference; set by convert
        self.reason = ""  # why a faster backend did not run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inference is not None:
            return self.inference(x).to(x.dtype)
        w = self.weight if self.mask is None or self.baked else self.weight * self.mask
        if self.qat:
            x, w = fake_quant_act(x, self.act_amax), fake_quant_weight(w)
        dtype = self.compute_dtype
        if dtype == torch.float32:
            return F.linear(x, w, self.bias)
        bias = None if self.bias is None else self.bias.to(dtype)
        out = F.linear(x.to(dtype), w.to(dtype), bias)
        self.watch_overflow(out, x, self.training)
        return out.to(x.dtype)

    @property
    def half_inference(self) -> bool:
        """Converted to a bf16/fp16 linear (convert.CastLinear, dense or 2:4)."""
        return getattr(self.inference, "dtype", None) in (torch.bfloat16, torch.float16)

    def forward_half(self, x: torch.Tensor) -> torch.Tensor:
        """As ``forward``, but a converted bf16/fp16 layer hands its output on in that dtype instead of casting it
        back: for a next step that computes in fp32 inside and rounds to it once (GELU), whose result the next
        layer casts to that dtype anyway, so the same bits arrive without two casts of the widest tensor."""
        return self.inference(x) if self.half_inference else self(x)

    def extra_repr(self) -> str:
        # A bias freed with the fp32 master (convert.shed_training_form) is still the layer's: its inference form
        # adds it. nn.Linear's own repr said bias=False of every such layer of a dsnas.load'ed model.
        bias = self.bias is not None or self.shed_bias
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={bias}, "
                f"precision={self.precision}, sparsity={self.sparsity}, backend={self.backend}")


def engine_layers(model: nn.Module) -> dict[str, Any]:
    """The engine layers of ``model`` by module name: EngineLinear and EngineConv2d."""
    return {name: m for name, m in model.named_modules() if isinstance(m, EngineLayer)}


def layer_report(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per layer: the choices, what ran at inference and why, the fallbacks, the share of zero weights."""
    out = {}
    for name, m in engine_layers(model).items():
        row: dict[str, Any] = {"precision": m.precision, "sparsity": m.sparsity, "backend": m.backend,
                               "fallbacks": m.fallbacks}
        if m.zero_share is not None:
            row["zero_share"] = round(m.zero_share, 4)
            # Whether the zeros are skipped by a sparse kernel or multiplied densely (the reason says why).
            row["sparse_kernel"] = m.sparse_kernel
        if m.reason:
            row["reason"] = m.reason
        out[name] = row
    return out
