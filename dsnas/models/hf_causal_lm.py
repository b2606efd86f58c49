"""A Hugging Face ``transformers`` causal language model (Llama or Qwen2) built from a config with random weights,
nothing downloaded; its size fields are the search space's choices. Needs the extra: ``pip install "dsnas[hf]"``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from dsnas.errors import DsnasError, TrialError, require

# What a search space may choose, all once per model: a transformers config has one size for every layer.
ARCH_KEYS = ("architecture", "n_layers", "hidden_size", "n_heads", "n_kv_heads", "intermediate_size")
OPTIONAL_ARCH_KEYS: dict[str, Any] = {}
LAYER_KEYS: tuple[str, ...] = ()
REQUIRED_LAYER_KEYS: tuple[str, ...] = ()
# transformers' model_type of each architecture: Qwen2 is Llama's layout with biases on q, k and v.
ARCHITECTURES = ("llama", "qwen2")
NAMED_CHOICES = {"architecture": ARCHITECTURES}
# What the task fixes.
TASK_KEYS = ("vocab_size", "context")
SIZE_KEYS = ("hidden_size", "n_heads", "n_kv_heads", "intermediate_size")
INSTALL_HINT = 'pip install "dsnas[hf]"'
# The package the family builds with, which a study or a bundle of it needs installed (dsnas.models.missing_package).
REQUIRES = "transformers"


def check_choices(options: dict[str, tuple[Any, ...]]) -> None:
    """Reject a search space that can produce an architecture this family cannot build."""
    for key in ("precision", "sparsity"):  # what engine = "auto" adds per layer: this family has no layer choices
        require(key not in options, key, 'the hf_causal_lm family takes the engine by module name, not per layer '
                '(engine = "auto")', list(options.get(key, ())),
                'remove engine = "auto" and add [engine.mlp] modules = ["*.mlp.*"] precision = ["fp32", "bf16"]')
    hidden, heads = options.get("hidden_size", ()), options.get("n_heads", ())
    for h in hidden:
        for a in heads:
            require(h % a == 0, "hidden_size", f"every hidden_size choice must be divisible by every n_heads choice "
                    f"({h} % {a} != 0)", list(hidden), "use multiples of the largest n_heads")
            # RoPE rotates the two halves of each head against each other.
            require(h // a % 2 == 0, "hidden_size", f"every head must have an even width, hidden_size / n_heads "
                    f"(got {h} / {a} = {h // a})", list(hidden), "use multiples of twice the largest n_heads")
    for a in heads:
        for kv in options.get("n_kv_heads", ()):
            require(a % kv == 0, "n_kv_heads", f"every n_heads choice must be divisible by every n_kv_heads choice "
                    f"({a} % {kv} != 0): query heads share key/value heads in equal groups",
                    list(options["n_kv_heads"]), "use divisors of the smallest n_heads")


def linear_widths(options: dict[str, tuple[Any, ...]]) -> list[tuple[int, int]]:
    """(in, out) of the linear layers a space can build, two per width: the attention's output projection and the
    widest MLP's up projection. The engine probe times its choices at these."""
    widest = max(options.get("intermediate_size", (1,)))
    return [(h, h) for h in options["hidden_size"]] + [(h, widest) for h in options["hidden_size"]]


def validate(arch: dict[str, Any]) -> None:
    for key in ("architecture", *SIZE_KEYS, "layers", *TASK_KEYS):
        require(key in arch, key, "the architecture needs this key", None)
    require(arch["architecture"] in ARCHITECTURES, "architecture", f"must be one of {list(ARCHITECTURES)}",
            arch["architecture"])
    for key in (*SIZE_KEYS, *TASK_KEYS):
        require(_positive_int(arch[key]), key, "must be an integer >= 1", arch[key])
    layers = arch["layers"]
    require(isinstance(layers, list) and len(layers) >= 1, "layers", "needs at least one layer", layers)
    for i, layer in enumerate(layers):
        require(layer == {}, f"layers[{i}]", "must be empty: every layer of a transformers config has the same "
                "sizes, chosen under [choices]", layer)
    check_choices({key: (arch[key],) for key in SIZE_KEYS})


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def describe(arch: dict[str, Any]) -> str:
    """A short human-readable form, e.g. ``llama h128 L2 a4/kv2 i344``."""
    return (f"{arch['architecture']} h{arch['hidden_size']} L{len(arch['layers'])} "
            f"a{arch['n_heads']}/kv{arch['n_kv_heads']} i{arch['intermediate_size']}")


def _transformers() -> Any:
    # Deferred: transformers is an optional extra, and importing it takes seconds.
    try:
        import transformers
    except ImportError:
        raise TrialError(f"the hf_causal_lm family needs the transformers package: {INSTALL_HINT}") from None
    return transformers


def config_of(arch: dict[str, Any]) -> Any:
    """The transformers config of ``arch`` (a ``LlamaConfig`` or ``Qwen2Config``)."""
    transformers = _transformers()
    return transformers.AutoConfig.for_model(
        arch["architecture"], vocab_size=arch["vocab_size"], max_position_embeddings=arch["context"],
        hidden_size=arch["hidden_size"], num_hidden_layers=len(arch["layers"]),
        num_attention_heads=arch["n_heads"], num_key_value_heads=arch["n_kv_heads"],
        intermediate_size=arch["intermediate_size"],
        tie_word_embeddings=True,  # as transformer_lm: fewer parameters, better small-data LMs
        attention_dropout=0.0, use_cache=False,
        bos_token_id=None, eos_token_id=None)  # bytes have no special tokens: generation must not stop at byte 2


class HFCausalLM(nn.Module):
    """The transformers model as ``self.hf``, called the way dsnas's tasks call a language model."""

    def __init__(self, hf: nn.Module) -> None:
        super().__init__()
        self.hf = hf

    def forward(self, idx: Tensor) -> Tensor:
        """Token ids (batch, time) -> next-token logits (batch, time, vocab)."""
        return self.hf(input_ids=idx, use_cache=False).logits


def build(arch: dict[str, Any]) -> nn.Module:
    config = config_of(arch)
    # SDPA: fused attention kernels where the device has them; both architectures support it.
    hf = _transformers().AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return HFCausalLM(hf)


def save_pretrained(model: nn.Module, folder: str | Path) -> None:
    """Write the inner transformers model (config.json + model.safetensors) to ``folder``, loadable by
    ``transformers.AutoModelForCausalLM.from_pretrained(folder)`` without dsnas."""
    if not isinstance(model, HFCausalLM):
        raise DsnasError(f"save_pretrained takes a model of the hf_causal_lm family, not a {type(model).__name__}")
    from transformers.utils import logging as hf_logging  # transformers loads on first use

    hf_logging.disable_progress_bar()  # a bar for one small shard is noise in `dsnas export`'s report
    # Training runs without a KV cache; the saved model is for deployment, where generate() without one fed the
    # whole prefix again at every step (2,528 tokens for 64 new ones after 7).
    saved = model.hf.config.use_cache, getattr(model.hf.generation_config, "use_cache", None)
    model.hf.config.use_cache = True
    if model.hf.generation_config is not None:
        model.hf.generation_config.use_cache = True
    try:
        # safetensors is the default since transformers 4.35 and the only format since 5 (no pickle).
        model.hf.save_pretrained(str(folder))
    finally:
        model.hf.config.use_cache = saved[0]
        if model.hf.generation_config is not None:
            model.hf.generation_config.use_cache = saved[1]
