"""Dispatch-level counts: FLOPs and the bytes each aten op reads and writes, exact on small known cases, in one
call of the model, under every autograd mode."""

from __future__ import annotations

import pytest
import torch

from dsnas.profiler.counting import count_bytes, count_flops_and_bytes

MODES = [torch.enable_grad, torch.no_grad, torch.inference_mode]
B, IN, OUT = 3, 8, 5


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return torch.nn.Linear(IN, OUT), torch.randn(B, IN)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.__name__)
def test_linear_flops_and_bytes_are_exact(linear, mode):
    layer, x = linear
    with mode():
        flops, nbytes = count_flops_and_bytes(lambda: layer(x))
        alone = count_bytes(lambda: layer(x))
    assert flops == 2 * B * IN * OUT
    assert nbytes == alone == 4 * (B * IN + IN * OUT + OUT + B * OUT)  # input + weight + bias + output (addmm)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.__name__)
def test_a_batched_linear_adds_no_bytes_for_its_reshapes(linear, mode):
    layer, _ = linear
    x = torch.randn(2, B, IN)
    with mode():
        flops, nbytes = count_flops_and_bytes(lambda: layer(x))
    assert flops == 2 * 2 * B * IN * OUT
    assert nbytes == 4 * (2 * B * IN + IN * OUT + OUT + 2 * B * OUT)


@pytest.mark.parametrize("view", [
    lambda x: x.view(-1), lambda x: x.reshape(-1), lambda x: x.t(), lambda x: x.transpose(0, 1),
    lambda x: x.permute(1, 0), lambda x: x[:1].expand(4, -1), lambda x: x.detach(), lambda x: x.unsqueeze(0),
    lambda x: x[1:], lambda x: x.contiguous(),
], ids=["view", "reshape", "t", "transpose", "permute", "expand", "detach", "unsqueeze", "slice", "contiguous"])
def test_views_move_no_bytes(view):
    x = torch.randn(4, 6)
    assert count_bytes(lambda: view(x)) == 0


def test_a_reshape_that_must_copy_counts_the_copy():
    x = torch.randn(4, 6)
    assert count_bytes(lambda: x.t().reshape(-1)) == 2 * x.nbytes  # read once, write once


def test_in_place_and_out_ops():
    a, b = torch.zeros(10), torch.ones(10)
    assert count_bytes(lambda: a.add_(b)) == 3 * a.nbytes  # reads a and b, writes a
    assert count_bytes(lambda: a.copy_(b)) == 2 * a.nbytes  # copy_ does not read what it overwrites
    assert count_bytes(lambda: torch.add(a, b, out=a)) == 3 * a.nbytes  # out= is written, not read
    assert count_bytes(lambda: torch.empty(1000)) == 0  # an allocation moves nothing


def test_the_model_runs_once_and_both_counts_agree_under_inference_mode():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    x = torch.randn(4, 10, 16)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    with torch.inference_mode():
        flops, nbytes = count_flops_and_bytes(lambda: model(x))
        assert len(calls) == 1
        assert nbytes == count_bytes(lambda: model(x))
    assert flops == 2 * 40 * (16 * 32 + 32 * 4)
    linear1 = 4 * (40 * 16 + 16 * 32 + 32 + 40 * 32)
    gelu = 4 * (2 * 40 * 32)
    linear2 = 4 * (40 * 32 + 32 * 4 + 4 + 40 * 4)
    assert nbytes == linear1 + gelu + linear2


def test_int8_layers_count_the_work_of_the_fp32_layer_they_replace():
    import torch

    from dsnas.kernels.convert import convert
    from dsnas.models import build
    from dsnas.profiler.counting import count_flops_and_bytes

    counts = {}
    for precision, backend in [("fp32", "auto"), ("int8", "torch-dynamic"), ("int8", "int8-static")]:
        model = build({"family": "transformer_lm", "vocab_size": 256, "context": 16, "d_model": 32,
                       "layers": [{"n_heads": 2, "ffn_ratio": 2, "precision": precision}]})
        for module in model.modules():
            if hasattr(module, "act_amax"):
                module.act_amax.fill_(3.0)
        convert(model, int8_backend=backend)
        with torch.inference_mode():
            counts[backend] = count_flops_and_bytes(lambda m=model: m(torch.randint(0, 256, (2, 16))))[0]
    assert counts["torch-dynamic"] == counts["int8-static"] == counts["auto"] > 0
