"""The engine's convolution: per-layer precision (fp32, bf16, fp16) with the same fp32 fallback as EngineLinear.
INT8, FP8 and 2:4 are not offered for convolutions: the engine wires no quantized or semi-structured sparse
convolution kernel (torch's quantized conv needs a whole-model FX/PT2E flow, and cuSPARSELt multiplies matrices,
not convolutions), and a choice without a kernel would be measured as something it is not."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dsnas.kernels.linear import LOW, EngineLayer

CONV_PRECISIONS = ("fp32", "bf16", "fp16")
NOT_FOR_CONV = {
    "int8": "no INT8 convolution kernel is wired into the engine (torch's quantized conv needs whole-model "
            "FX/PT2E quantization)",
    "fp8": "torch._scaled_mm multiplies matrices; there is no FP8 convolution kernel",
    "2:4": "the semi-structured sparse kernels (cuSPARSELt, CUTLASS) multiply matrices, not convolutions",
    "auto": "the semi-structured sparse kernels (cuSPARSELt, CUTLASS) multiply matrices, not convolutions",
}


class CastConv2d(nn.Module):
    """The inference form of a bf16/fp16 convolution: the weight stored in that dtype (no per-call cast)."""

    def __init__(self, conv: nn.Conv2d, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.weight = nn.Parameter(conv.weight.detach().to(dtype), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().to(dtype), requires_grad=False)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        # reflect, replicate or circular padding is done apart, as nn.Conv2d does: F.conv2d pads only with zeros
        self.padding_mode = conv.padding_mode
        self.pad = tuple(conv._reversed_padding_repeated_twice)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, padding = x.to(self.dtype), self.padding
        if self.padding_mode != "zeros":
            x, padding = F.pad(x, self.pad, mode=self.padding_mode), 0
        return F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)


class EngineConv2d(EngineLayer, nn.Conv2d):
    """nn.Conv2d whose precision is a choice of the search; trains in that dtype with an on-device overflow flag
    (the training step falls back to fp32 for a while after an overflow), and converts to :class:`CastConv2d`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 groups: int = 1, bias: bool = True, *, precision: str = "fp32", sparsity: str = "dense",
                 **conv: Any) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups,
                         bias=bias, **conv)
        refused = NOT_FOR_CONV.get(precision) or NOT_FOR_CONV.get(sparsity)
        if refused or precision not in CONV_PRECISIONS or sparsity != "dense":
            raise ValueError(f"a convolution takes precision one of {list(CONV_PRECISIONS)} and dense sparsity, "
                             f"got {precision!r}, {sparsity!r}" + (f": {refused}" if refused else ""))
        self.precision, self.sparsity = precision, sparsity
        self.mask = None
        self.fallback_left = 0
        self.fallbacks = 0
        self.overflow = None
        self.inference = None
        self.backend = "dense"
        self.reason = ""

    @property
    def out_features(self) -> int:
        """Output channels, under the name the engine's size counts read (one bias and scale per output)."""
        return self.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inference is not None:
            return self.inference(x).to(x.dtype)
        dtype = self.compute_dtype
        if dtype == torch.float32:
            return super().forward(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        out = self._conv_forward(x.to(dtype), self.weight.to(dtype), bias)
        self.watch_overflow(out, x, self.training)
        return out.to(x.dtype)

    def convert(self) -> None:
        """Into the inference form: the weight stored at the layer's precision."""
        if self.precision in LOW:
            self.inference = CastConv2d(self, LOW[self.precision])
            self.backend = self.precision
        else:
            self.backend = "fp32"

    def extra_repr(self) -> str:
        conv = super().extra_repr()  # says ", bias=False" of a bias freed with the master; its inference form has it
        conv = conv.replace(", bias=False", "", 1) if self.shed_bias else conv
        return f"{conv}, precision={self.precision}, backend={self.backend}"
