"""A model of your own: a byte-level convolutional classifier of code snippets. dsnas builds it from the arch dict
its search space samples (the [choices] of space.toml plus the task's keys), trains it with your task, applies the
engine's choices to the layers [engine.*] names, measures it and exports it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class SnippetClassifier(nn.Module):
    def __init__(self, width: int, depth: int, kernel: int, hidden: int, n_classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, width)  # bytes
        self.convs = nn.ModuleList(nn.Conv1d(width, width, kernel, padding=kernel // 2) for _ in range(depth))
        self.head = nn.Sequential(nn.Linear(2 * width, hidden), nn.GELU(), nn.Linear(hidden, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Bytes (batch, length) -> class logits (batch, n_classes)."""
        h = self.embed(x).transpose(1, 2)
        for conv in self.convs:
            h = h + torch.relu(conv(h))
        pooled = torch.cat([h.mean(-1), h.amax(-1)], dim=1)
        return self.head(pooled)


def build(arch: dict[str, Any]) -> nn.Module:
    return SnippetClassifier(arch["width"], arch["depth"], arch["kernel"], arch["hidden"], arch["n_classes"])


def describe(arch: dict[str, Any]) -> str:
    """How progress lines and tables show an architecture."""
    return f"w{arch['width']} d{arch['depth']} k{arch['kernel']} h{arch['hidden']}"


def validate(arch: dict[str, Any]) -> None:
    """Raise on an architecture this builder cannot build: the trial fails with the message."""
    if arch["kernel"] % 2 == 0:
        raise ValueError(f"kernel must be odd (same-length padding), got {arch['kernel']}")
