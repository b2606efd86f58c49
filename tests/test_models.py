"""The transformer_lm family: per-layer choices are built as asked, and the model is causal."""

from __future__ import annotations

import pytest
import torch

from dsnas.errors import TrialError
from dsnas.models import build, describe

ARCH = {"family": "transformer_lm", "vocab_size": 256, "context": 16, "d_model": 32,
        "layers": [{"n_heads": 4, "ffn_ratio": 1}, {"n_heads": 2, "ffn_ratio": 4}]}


def test_per_layer_choices_are_built():
    model = build(ARCH)
    assert [b.n_heads for b in model.blocks] == [4, 2]
    assert [b.up.out_features for b in model.blocks] == [32, 128]
    assert describe(ARCH) == "d32 L2 h4,2 f1,4"


def test_outputs_do_not_depend_on_future_tokens():
    torch.manual_seed(0)
    model = build(ARCH).eval()
    x = torch.randint(0, 256, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        a, b = model(x), model(y)
    assert a.shape == (2, 16, 256)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize(("change", "message"), [
    ({"d_model": 30}, "must divide d_model"),
    ({"layers": []}, "needs at least one layer"),
    ({"layers": [{"n_heads": 2}]}, "needs \\[.n_heads., .ffn_ratio.\\]"),
    ({"family": "resnet"}, "unknown model family"),
])
def test_invalid_architectures_are_trial_errors(change, message):
    with pytest.raises(TrialError, match=message):
        build({**ARCH, **change})


def test_an_unknown_family_is_named_as_such_not_as_a_missing_key():
    # `dsnas profile arch.json` of {"family": "mlp"} read "it has no key 'unknown model family \'mlp\'...' (add it
    # to the space's [choices], ...)": the family's KeyError was taken for a key the architecture lacks.
    with pytest.raises(TrialError) as err:
        build({**ARCH, "family": "mlp"})
    assert str(err.value).startswith("invalid architecture: [family] unknown model family 'mlp'; known: ")
    assert "no key" not in str(err.value) and "[choices]" not in str(err.value)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_converted_half_mlp_keeps_its_activations_in_half_with_the_same_logits(precision, monkeypatch):
    """The MLP's hidden activations stay bf16/fp16 between `up` and `down` once converted: GELU computes in fp32
    inside and rounds once, so the logits are those of the casts to fp32 and back (see below), two casts fewer
    per block (each of the widest tensor)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dsnas.kernels.convert import convert
    from dsnas.kernels.linear import EngineLinear

    class Casts(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.to, torch.ops.aten._to_copy):  # `to` under inference_mode
                self.count += out.dtype != args[0].dtype  # a conversion, not a no-op `to`
            return out

    torch.manual_seed(0)
    layer = {"n_heads": 2, "ffn_ratio": 4, "precision": precision, "sparsity": "dense"}
    model = build({"family": "transformer_lm", "d_model": 32, "vocab_size": 256, "context": 16,
                   "layers": [layer, layer]})
    convert(model)
    x = torch.randint(0, 256, (4, 16))

    def logits() -> tuple[torch.Tensor, int]:
        with torch.inference_mode(), Casts() as casts:
            return model(x), casts.count

    kept, kept_casts = logits()
    monkeypatch.setattr(EngineLinear, "forward_half", EngineLinear.__call__)  # cast back after `up`, as before
    cast, cast_casts = logits()
    assert kept.dtype == torch.float32
    # The same bits for bf16 on every CPU tried, and for fp16 on an AMX Xeon; without native fp16 ATen's fp16 GELU
    # lands some activations one fp16 ulp from the fp32 kernel's (1 of 8192 here on an AVX2 EPYC, 1.2e-5 in logits
    # of 0.58; about 3% of them on an AVX512 EPYC). Allowed: a quarter of an fp16 ulp at the logits'
    # scale, well below what a cast to the wrong dtype would move them.
    print(f"largest difference: {(kept - cast).abs().max().item():.3g} of {cast.abs().max().item():.3g}")
    assert (kept - cast).abs().max() <= 2**-12 * cast.abs().max()
    assert cast_casts - kept_casts == 2 * 2  # two blocks, two casts each
