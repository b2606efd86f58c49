"""A decoder-only transformer language model whose width and depth are fixed per model and whose
attention heads and FFN ratio may differ per layer."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dsnas.errors import require

# What a search space may choose: once per model, and once per layer.
ARCH_KEYS = ("n_layers", "d_model")
LAYER_KEYS = ("n_heads", "ffn_ratio")
# What the task fixes.
TASK_KEYS = ("vocab_size", "context")


def check_choices(options: dict[str, tuple[int, ...]]) -> None:
    """Reject a search space that can produce an architecture this family cannot build."""
    for d in options.get("d_model", ()):
        for h in options.get("n_heads", ()):
            require(d % h == 0, "d_model", f"every d_model choice must be divisible by every n_heads choice "
                    f"({d} % {h} != 0)", list(options["d_model"]), "use multiples of the largest n_heads")


def validate(arch: dict[str, Any]) -> None:
    for key in ("d_model", "layers", *TASK_KEYS):
        require(key in arch, key, "the architecture needs this key", None)
    require(len(arch["layers"]) >= 1, "layers", "needs at least one layer", arch["layers"])
    for i, layer in enumerate(arch["layers"]):
        require(set(layer) == set(LAYER_KEYS), f"layers[{i}]", f"needs exactly {list(LAYER_KEYS)}", layer)
        require(arch["d_model"] % layer["n_heads"] == 0, f"layers[{i}].n_heads", "must divide d_model",
                layer["n_heads"])


def describe(arch: dict[str, Any]) -> str:
    """A short human-readable form, e.g. ``d64 L2 h2,4 f4,2``."""
    layers = arch["layers"]
    heads = ",".join(str(layer["n_heads"]) for layer in layers)
    ffn = ",".join(str(layer["ffn_ratio"]) for layer in layers)
    return f"d{arch['d_model']} L{len(layers)} h{heads} f{ffn}"


class Block(nn.Module):
    """Pre-norm attention + MLP; attention runs through SDPA (fused kernels where the device has them)."""

    def __init__(self, d_model: int, n_heads: int, ffn_ratio: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.up = nn.Linear(d_model, ffn_ratio * d_model)
        self.down = nn.Linear(ffn_ratio * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class TransformerLM(nn.Module):
    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        d = arch["d_model"]
        self.tok = nn.Embedding(arch["vocab_size"], d)
        self.pos = nn.Embedding(arch["context"], d)
        self.blocks = nn.ModuleList(Block(d, layer["n_heads"], layer["ffn_ratio"]) for layer in arch["layers"])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, arch["vocab_size"], bias=False)
        self.head.weight = self.tok.weight  # tied: fewer parameters, better small-data LMs
        self.apply(_init)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (batch, time) -> next-token logits (batch, time, vocab)."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _init(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def build(arch: dict[str, Any]) -> nn.Module:
    return TransformerLM(arch)
