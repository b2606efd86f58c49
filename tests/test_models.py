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
