"""An inverted-residual (MobileNetV2-style) image classifier: each entry of ``arch["layers"]`` is one stage whose
depth, width, depthwise kernel, expansion ratio and precision are choices; its convolutions are the engine's."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dsnas.errors import require
from dsnas.kernels.conv import CONV_PRECISIONS, NOT_FOR_CONV, EngineConv2d

# What a search space may choose: once per model, and once per stage (a "layer" of the search space).
ARCH_KEYS = ("n_layers", "stem_width")
OPTIONAL_ARCH_KEYS: dict[str, Any] = {}
LAYER_KEYS = ("depth", "width", "kernel", "expand", "precision")
REQUIRED_LAYER_KEYS = ("depth", "width", "kernel", "expand")
LAYER_DEFAULTS = {"precision": "fp32"}
NAMED_CHOICES = {"precision": CONV_PRECISIONS, "kernel": (3, 5, 7)}
# What the task fixes.
TASK_KEYS = ("image_size", "channels", "n_classes")
# A stage downsamples only while the feature map is larger than this: a 16x16 input keeps a 4x4 map at the end.
MIN_DOWNSAMPLE = 4


def check_choices(options: dict[str, tuple[Any, ...]]) -> None:
    """Reject a search space that can produce an architecture this family cannot build: the engine has no
    convolution kernel for int8, fp8 or 2:4 sparsity."""
    for key, allowed in (("precision", CONV_PRECISIONS), ("sparsity", ("dense",))):
        refused = [v for v in options.get(key, ()) if v not in allowed]
        if refused:
            reason = NOT_FOR_CONV.get(refused[0], "not a convolution choice")
            require(False, key, f"a convolution stage takes {list(allowed)} ({refused[0]}: {reason})",
                    list(options[key]), f"remove {refused}")


def validate(arch: dict[str, Any]) -> None:
    for key in ("stem_width", "layers", *TASK_KEYS):
        require(key in arch, key, "the architecture needs this key", None)
    for key in ("stem_width", *TASK_KEYS):
        require(_positive_int(arch[key]), key, "must be an integer >= 1", arch[key])
    require(arch["n_classes"] >= 2, "n_classes", "must be >= 2", arch["n_classes"])
    require(isinstance(arch["layers"], list) and len(arch["layers"]) >= 1, "layers", "needs at least one stage",
            arch["layers"])
    for i, layer in enumerate(arch["layers"]):
        require(isinstance(layer, dict) and set(REQUIRED_LAYER_KEYS) <= set(layer) <= set(LAYER_KEYS),
                f"layers[{i}]", f"needs {list(REQUIRED_LAYER_KEYS)} and may have {list(LAYER_DEFAULTS)}", layer)
        for key in ("depth", "width", "expand"):
            require(_positive_int(layer[key]), f"layers[{i}].{key}", "must be an integer >= 1", layer[key])
        for key, allowed in NAMED_CHOICES.items():
            value = layer.get(key, LAYER_DEFAULTS.get(key))
            require(value in allowed and not isinstance(value, (bool, float)), f"layers[{i}].{key}",  # 3.0 == 3
                    f"must be one of {list(allowed)}", value)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def describe(arch: dict[str, Any]) -> str:
    """A short human-readable form, e.g. ``stem16 s3 d1,2,2 w16,24,32 k3,5,3 e1,4,6``."""
    layers = arch["layers"]
    text = f"stem{arch['stem_width']} s{len(layers)}"
    for key in REQUIRED_LAYER_KEYS:
        text += f" {key[0]}{','.join(str(layer[key]) for layer in layers)}"
    for key, default in LAYER_DEFAULTS.items():  # shown only when some stage differs from the default
        values = [layer.get(key, default) for layer in layers]
        if any(v != default for v in values):
            text += f" {key[0]}{','.join(values)}"
    return text


def strides(arch: dict[str, Any]) -> list[int]:
    """The stride of each stage's first block: 2 for every stage after the first while the map is larger than
    MIN_DOWNSAMPLE, else 1."""
    size, out = arch["image_size"], []
    for i in range(len(arch["layers"])):
        stride = 2 if i > 0 and size > MIN_DOWNSAMPLE else 1
        size = (size + stride - 1) // stride  # padding kernel // 2 with an odd kernel: ceil(size / stride)
        out.append(stride)
    return out


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int, precision: str, act: bool) -> nn.Sequential:
    # No conv bias: the BatchNorm after it has one. The norm and the activation stay fp32.
    parts: list[nn.Module] = [EngineConv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups,
                                           bias=False, precision=precision), nn.BatchNorm2d(cout)]
    if act:
        parts.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*parts)


class InvertedResidual(nn.Module):
    """1x1 expansion (skipped when expand is 1), kxk depthwise, 1x1 linear projection; a residual connection when
    the shape is kept."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, precision: str) -> None:
        super().__init__()
        hidden = cin * expand
        parts = [_conv_bn(cin, hidden, 1, 1, 1, precision, act=True)] if expand != 1 else []
        parts += [_conv_bn(hidden, hidden, kernel, stride, hidden, precision, act=True),
                  _conv_bn(hidden, cout, 1, 1, 1, precision, act=False)]  # linear bottleneck: no ReLU6
        self.body = nn.Sequential(*parts)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class CNN(nn.Module):
    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        width = arch["stem_width"]
        # The stem and the classifier stay fp32: they are a small share of the work and sensitive to rounding.
        self.stem = nn.Sequential(nn.Conv2d(arch["channels"], width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU6(inplace=True))
        stages = []
        for layer, stride in zip(arch["layers"], strides(arch)):
            blocks = []
            for b in range(layer["depth"]):
                blocks.append(InvertedResidual(width, layer["width"], layer["kernel"], stride if b == 0 else 1,
                                               layer["expand"], layer.get("precision", LAYER_DEFAULTS["precision"])))
                width = layer["width"]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(width, arch["n_classes"])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (batch, channels, size, size) -> the last stage's feature map."""
        return self.stages(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (batch, channels, size, size) -> class logits (batch, n_classes)."""
        return self.head(self.features(x).mean(dim=(2, 3)))


def build(arch: dict[str, Any]) -> nn.Module:
    return CNN(arch)
