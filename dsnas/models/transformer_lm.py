"""A decoder-only transformer language model whose width and depth are fixed per model and whose attention heads,
FFN ratio, precision and N:M sparsity may differ per layer; its linear layers are the engine's (dsnas.kernels)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dsnas.errors import require
from dsnas.kernels.linear import PRECISIONS, SPARSITIES, EngineLinear

# What a search space may choose: once per model, and once per layer. Optional keys have defaults, so spaces and
# stored architectures written before they existed stay valid.
ARCH_KEYS = ("n_layers", "d_model")
WIDTH_KEY = "d_model"  # the engine layers' width: the probe's offer may differ from one d_model to the next
OPTIONAL_ARCH_KEYS = {"grad_checkpoint": 0}  # 1: recompute each block in backward (less memory, more time)
LAYER_KEYS = ("n_heads", "ffn_ratio", "precision", "sparsity")
REQUIRED_LAYER_KEYS = ("n_heads", "ffn_ratio")
LAYER_DEFAULTS = {"precision": "fp32", "sparsity": "dense"}
NAMED_CHOICES = {"precision": PRECISIONS, "sparsity": SPARSITIES, "grad_checkpoint": (0, 1)}
# What the task fixes.
TASK_KEYS = ("vocab_size", "context")


def check_choices(options: dict[str, tuple[Any, ...]]) -> None:
    """Reject a search space that can produce an architecture this family cannot build."""
    if any(s != "dense" for s in options.get("sparsity", ())):
        require(all(d % 4 == 0 for d in options.get("d_model", ())), "d_model",
                "2:4 sparsity needs every d_model divisible by 4 (groups of 4 inputs)", list(options["d_model"]),
                "use multiples of 4, or remove the sparse choices")
    for d in options.get("d_model", ()):
        for h in options.get("n_heads", ()):
            require(d % h == 0, "d_model", f"every d_model choice must be divisible by every n_heads choice "
                    f"({d} % {h} != 0)", list(options["d_model"]), "use multiples of the largest n_heads")


def linear_widths(options: dict[str, tuple[Any, ...]]) -> list[tuple[int, int]]:
    """(in, out) of the engine layers a space can build, two per width: the attention's output projection and the
    widest FFN's up projection. The engine probe times its choices at these."""
    ratio = max(options.get("ffn_ratio", (1,)))
    return [(d, d) for d in options["d_model"]] + [(d, ratio * d) for d in options["d_model"]]


def validate(arch: dict[str, Any]) -> None:
    for key in ("d_model", "layers", *TASK_KEYS):
        require(key in arch, key, "the architecture needs this key", None)
    require(len(arch["layers"]) >= 1, "layers", "needs at least one layer", arch["layers"])
    require(arch.get("grad_checkpoint", 0) in (0, 1), "grad_checkpoint", "must be 0 or 1", arch.get("grad_checkpoint"))
    for i, layer in enumerate(arch["layers"]):
        require(set(REQUIRED_LAYER_KEYS) <= set(layer) <= set(LAYER_KEYS), f"layers[{i}]",
                f"needs {list(REQUIRED_LAYER_KEYS)} and may have {list(LAYER_DEFAULTS)}", layer)
        require(arch["d_model"] % layer["n_heads"] == 0, f"layers[{i}].n_heads", "must divide d_model",
                layer["n_heads"])
        for key in LAYER_DEFAULTS:
            require(layer.get(key, LAYER_DEFAULTS[key]) in NAMED_CHOICES[key], f"layers[{i}].{key}",
                    f"must be one of {list(NAMED_CHOICES[key])}", layer.get(key))
        if layer.get("sparsity", "dense") != "dense":
            require(arch["d_model"] % 4 == 0, f"layers[{i}].sparsity", "N:M sparsity needs d_model divisible by 4",
                    arch["d_model"])


def describe(arch: dict[str, Any]) -> str:
    """A short human-readable form, e.g. ``d64 L2 h2,4 f4,2``."""
    layers = arch["layers"]
    heads = ",".join(str(layer["n_heads"]) for layer in layers)
    ffn = ",".join(str(layer["ffn_ratio"]) for layer in layers)
    text = f"d{arch['d_model']} L{len(layers)} h{heads} f{ffn}"
    for key, default in LAYER_DEFAULTS.items():  # shown only when some layer differs from the default
        values = [layer.get(key, default) for layer in layers]
        if any(v != default for v in values):
            text += f" {key[0]}{','.join(values)}"
    return text


class Block(nn.Module):
    """Pre-norm attention + MLP; attention runs through SDPA (fused kernels where the device has them)."""

    def __init__(self, d_model: int, n_heads: int, ffn_ratio: int, precision: str = "fp32",
                 sparsity: str = "dense") -> None:
        super().__init__()
        self.n_heads = n_heads
        self.precision = precision
        # The residual stream, the norms and the softmax stay fp32; the four linear layers take the block's choices.
        engine = {"precision": precision, "sparsity": sparsity}
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = EngineLinear(d_model, 3 * d_model, **engine)
        self.proj = EngineLinear(d_model, d_model, **engine)
        self.ln2 = nn.LayerNorm(d_model)
        self.up = EngineLinear(d_model, ffn_ratio * d_model, **engine)
        self.down = EngineLinear(ffn_ratio * d_model, d_model, **engine)

    @property
    def inference_form(self) -> int:
        """2 where the MLP hands bf16/fp16 activations on (forward), 1 where it runs as before this did: the
        inference signature's "form" (dsnas.kernels.convert.inference_signature)."""
        return 2 if self.half_mlp else 1

    @property
    def half_mlp(self) -> bool:
        """Whether `up` hands its bf16/fp16 output on uncast (forward): only where `down` takes that dtype. An
        [engine] group may give them different precisions, and an fp32 or int8 `down` takes fp32."""
        dtype = getattr(self.up.inference, "dtype", None)
        return self.up.half_inference and getattr(self.down.inference, "dtype", None) == dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        if x.is_cuda and self.precision in ("bf16", "fp16", "fp8"):
            # CUDA's fused attention kernels accumulate the scores in fp32 even for half inputs; the CPU ones do
            # not (DESIGN.md), so on the CPU attention stays fp32.
            dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(att.to(x.dtype).transpose(1, 2).reshape(b, t, d))
        # Converted to bf16/fp16, the MLP's hidden activations stay in that dtype: GELU computes in fp32 inside and
        # rounds once, as the cast into `down` did, so the logits are the same bits in bf16 (in fp16 an ulp apart on
        # some activations where the CPU has no native fp16: docs/engine.md) without two casts of the widest tensor
        # (1.6-1.8x a bf16 d384 model's throughput on an AMX CPU).
        up = self.up.forward_half if self.half_mlp else self.up
        return x + self.down(F.gelu(up(self.ln2(x)))).to(x.dtype)


class TransformerLM(nn.Module):
    def __init__(self, arch: dict[str, Any]) -> None:
        super().__init__()
        d = arch["d_model"]
        self.tok = nn.Embedding(arch["vocab_size"], d)
        self.pos = nn.Embedding(arch["context"], d)
        self.blocks = nn.ModuleList(Block(d, **layer) for layer in arch["layers"])
        self.grad_checkpoint = bool(arch.get("grad_checkpoint", 0))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, arch["vocab_size"], bias=False)
        self.head.weight = self.tok.weight  # tied: fewer parameters, better small-data LMs
        self.apply(_init)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (batch, time) -> next-token logits (batch, time, vocab)."""
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(self.ln_f(x))


def _init(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def build(arch: dict[str, Any]) -> nn.Module:
    return TransformerLM(arch)
