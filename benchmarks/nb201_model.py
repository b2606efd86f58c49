"""NAS-Bench-201 networks built from an arch: the macro skeleton and cell of Dong & Yang, "NAS-Bench-201: Extending
the scope of reproducible neural architecture search" (ICLR 2020), layer for layer as in their AutoDL-Projects code
(`TinyNetwork`, `InferCell`, `ResNetBasicblock`), so that a network built here has the benchmark's parameter count.

An arch is a dict with one operation per cell edge (`edge_i_j`: the operation from node j to node i) and, optionally,
the macro settings `num_classes`, `channels` and `cells_per_stage`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

EDGES = ("edge_1_0", "edge_2_0", "edge_2_1", "edge_3_0", "edge_3_1", "edge_3_2")
OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
# The benchmark's own settings: CIFAR-100's classes, C = 16, N = 5.
SETTINGS = {"num_classes": 100, "channels": 16, "cells_per_stage": 5}
NODES = 4  # node 0 is the cell's input, node 3 its output

_EDGE_NAME = re.compile(r"([a-z0-9_]+)~(\d+)")


def validate(arch: Mapping[str, Any]) -> None:
    """Raise ValueError, naming the key, when an edge is missing or unknown, or a macro setting is no positive int."""
    for edge in EDGES:
        if edge not in arch:
            raise ValueError(f"the arch has no {edge!r}: a NAS-Bench-201 cell needs an operation on each of {EDGES}")
        if arch[edge] not in OPS:
            raise ValueError(f"{edge} = {arch[edge]!r} is not a NAS-Bench-201 operation; use one of {OPS}")
    for key in SETTINGS:
        value = arch.get(key, SETTINGS[key])
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive int, but got {key} = {value!r}")


def arch_string(arch: Mapping[str, Any]) -> str:
    """The benchmark's name of the cell, `|op~0|+|op~0|op~1|+|op~0|op~1|op~2|`: node by node, each input's
    operation and the node it comes from, as the NAS-Bench-201 API indexes its table."""
    nodes = ("|" + "|".join(f"{arch[f'edge_{i}_{j}']}~{j}" for j in range(i)) + "|" for i in range(1, NODES))
    return "+".join(nodes)


def parse(text: str) -> dict[str, str]:
    """The edges of an arch string written by `arch_string` (or taken from the NAS-Bench-201 API)."""
    nodes = text.split("+")
    if len(nodes) != NODES - 1:
        raise ValueError(f"a NAS-Bench-201 arch string has {NODES - 1} nodes separated by '+', but got {text!r}")
    arch = {}
    for i, node in enumerate(nodes, start=1):
        inputs = node.strip("|").split("|")
        matches = [_EDGE_NAME.fullmatch(item) for item in inputs]
        if len(inputs) != i or None in matches or [int(m.group(2)) for m in matches] != list(range(i)):
            raise ValueError(f"node {i} of {text!r} must read |op~0|...|op~{i - 1}|, but reads {node!r}")
        arch.update({f"edge_{i}_{j}": m.group(1) for j, m in enumerate(matches)})
    validate(arch)
    return arch


def describe(arch: Mapping[str, Any]) -> str:
    """The arch string, followed by the macro settings that differ from the benchmark's: the string alone names
    the cell, and would name a network of another size as if it were the benchmark's."""
    validate(arch)
    changed = [f"{key}={arch[key]}" for key, default in SETTINGS.items() if arch.get(key, default) != default]
    return " ".join([arch_string(arch), *changed])


class ReLUConvBN(nn.Sequential):
    """The benchmark's convolution: ReLU, then a bias-free conv (BN's shift makes a bias redundant), then BN."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__(
            nn.ReLU(inplace=False),  # not in place: the same node feeds several edges
            nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(c_out),
        )


class Zero(nn.Module):
    """The `none` operation: no connection. It keeps the node's shape, so that a node whose inputs are all `none`
    still sums to a tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul(0.0)


def operation(name: str, channels: int) -> nn.Module:
    """One cell edge; inside a cell every edge keeps the channels and the resolution."""
    if name == "nor_conv_3x3":
        return ReLUConvBN(channels, channels, 3)
    if name == "nor_conv_1x1":
        return ReLUConvBN(channels, channels, 1)
    if name == "avg_pool_3x3":
        # Border pixels average over their real neighbours only, as in the benchmark.
        return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    if name == "skip_connect":
        return nn.Identity()
    if name == "none":
        return Zero()
    raise ValueError(f"{name!r} is not a NAS-Bench-201 operation; use one of {OPS}")


class Cell(nn.Module):
    """The searched cell: node i is the sum over j < i of edge_i_j applied to node j; node 3 is the output."""

    def __init__(self, arch: Mapping[str, Any], channels: int) -> None:
        super().__init__()
        self.edges = nn.ModuleDict({edge: operation(arch[edge], channels) for edge in EDGES})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        for i in range(1, NODES):
            nodes.append(sum(self.edges[f"edge_{i}_{j}"](nodes[j]) for j in range(i)))
        return nodes[-1]


class ResidualReduction(nn.Module):
    """Between stages: a ResNet basic block of stride 2 that doubles the channels; its shortcut halves the
    resolution with a 2x2 average pool and matches the channels with a 1x1 conv."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv_a = ReLUConvBN(c_in, c_out, 3, stride=2)
        self.conv_b = ReLUConvBN(c_out, c_out, 3)
        self.shortcut = nn.Sequential(nn.AvgPool2d(2, stride=2), nn.Conv2d(c_in, c_out, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.conv_b(self.conv_a(x))


class Network(nn.Module):
    """The macro skeleton: stem, three stages of N cells at C, 2C and 4C channels with a residual reduction
    between stages, then BN + ReLU, global average pooling and a linear classifier."""

    def __init__(self, arch: Mapping[str, Any], num_classes: int, channels: int, cells_per_stage: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
        layers: list[nn.Module] = []
        for stage in range(3):
            width = channels * 2**stage
            if stage > 0:
                layers.append(ResidualReduction(width // 2, width))
            layers.extend(Cell(arch, width) for _ in range(cells_per_stage))
        self.cells = nn.Sequential(*layers)
        self.lastact = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits only: AutoDL-Projects also returns the pooled features, which nothing here reads."""
        features = self.pool(self.lastact(self.cells(self.stem(images))))
        return self.classifier(features.flatten(1))


def build(arch: Mapping[str, Any]) -> Network:
    """The NAS-Bench-201 network of an arch, at the benchmark's settings unless the arch sets its own."""
    validate(arch)
    settings = {key: arch.get(key, default) for key, default in SETTINGS.items()}
    return Network(arch, **settings)
