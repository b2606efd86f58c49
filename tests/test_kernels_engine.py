"""The engine's linear layer and mixed precision: each precision against an fp32 reference, overflow falls back to
fp32 and retries, loss scaling where fp16 needs it, gradient checkpointing, and the inference forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsnas.kernels.convert import convert, held_bytes, training_state
from dsnas.kernels.linear import EngineLinear, layer_report
from dsnas.kernels.precision import TrainStep
from dsnas.models import build, describe
from dsnas.tasks.loop import train_steps

# Relative error of a low-precision matmul of N(0,1) data at these sizes: bf16 keeps 8 mantissa bits, fp16 11.
TOLERANCE = {"fp32": 1e-6, "bf16": 2e-2, "fp16": 3e-3}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_each_precision_matches_fp32_within_its_tolerance(precision):
    torch.manual_seed(0)
    layer = EngineLinear(64, 48, precision=precision)
    x = torch.randn(32, 64)
    reference = F.linear(x, layer.weight, layer.bias)
    out = layer(x)
    assert out.dtype == torch.float32  # the residual stream stays fp32
    error = (out - reference).norm() / reference.norm()
    assert error <= TOLERANCE[precision]
    if precision != "fp32":
        assert error > 0  # it really computed in low precision


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_inference_form_stores_the_weight_in_its_dtype_and_agrees(precision):
    torch.manual_seed(0)
    layer = EngineLinear(64, 48, precision=precision)
    x = torch.randn(8, 64)
    with torch.no_grad():
        before = layer(x)
        convert(layer)
        after = layer(x)
    assert layer.inference.weight.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert layer.backend == precision
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def _overflowing_model(precision: str = "fp16") -> nn.Module:
    model = nn.Sequential(EngineLinear(8, 8, precision=precision), nn.Linear(8, 1))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    return model


def test_an_injected_overflow_falls_back_to_fp32_then_retries_low_precision():
    model = _overflowing_model()
    layer = model[0]
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), fallback_steps=3)
    big = torch.full((4, 8), 1e4)  # 8 inputs * 1e4 = 8e4 > fp16's 65504: inf in fp16, finite in fp32
    loss = model(big).sum()
    assert not torch.isfinite(loss)
    assert not step.step(loss)  # skipped, not diverged: the layer is to blame
    assert not step.diverged()
    assert layer.fallbacks == 1 and layer.fallback_left == 3 and layer.compute_dtype == torch.float32
    for _ in range(3):
        loss = model(big).sum()
        assert torch.isfinite(loss)
        assert step.step(loss)
    assert layer.fallback_left == 0 and layer.compute_dtype == torch.float16  # retries fp16
    assert not step.step(model(big).sum())
    assert layer.fallbacks == 2
    assert layer_report(model)["0"]["fallbacks"] == 2
    step.close()
    assert layer.overflow is None


def test_only_the_layer_that_overflowed_falls_back_not_the_layers_its_inf_reaches():
    model = nn.Sequential(EngineLinear(8, 8, precision="fp16"), EngineLinear(8, 8, precision="fp16"),
                          EngineLinear(8, 1, precision="fp16"))
    with torch.no_grad():
        model[0].weight.fill_(1.0)  # 8 inputs * 1e4 overflows fp16 here; the later layers only receive its inf
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0), fallback_steps=3)
    assert not step.step(model(torch.full((4, 8), 1e4)).sum())
    assert [m.fallbacks for m in model] == [1, 0, 0]
    step.close()


def test_a_step_in_which_a_layer_overflowed_is_skipped_even_when_the_loss_is_finite():
    class Finite(nn.Module):  # what a clamp or nan_to_num downstream does: the loss hides the overflow
        def forward(self, x):
            return torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)

    model = nn.Sequential(EngineLinear(8, 8, precision="fp16"), Finite(), nn.Linear(8, 1))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    before = model[2].weight.detach().clone()
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), fallback_steps=3)
    loss = model(torch.full((4, 8), 1e4)).sum()
    assert torch.isfinite(loss)
    assert not step.step(loss) and step.skipped == 1 and model[0].fallbacks == 1
    assert torch.equal(model[2].weight, before)  # no update taken
    step.close()


def test_a_non_finite_loss_with_no_layer_to_blame_is_divergence():
    model = nn.Sequential(EngineLinear(4, 1, precision="bf16"))
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert not step.step(model(torch.ones(2, 4)).sum() * float("nan"))
    assert step.diverged()


def test_overflow_flags_stay_on_the_device_until_the_step():
    model = _overflowing_model()
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.0))
    model(torch.full((2, 8), 1e4))
    assert bool(step.flags[0])  # set by the forward pass itself, without a host read in the layer
    step.step(model(torch.ones(2, 8)).sum())
    assert not bool(step.flags.any()) and model[0].fallbacks == 1


def test_fp16_turns_on_loss_scaling_and_bf16_does_not():
    assert TrainStep(_overflowing_model("fp16"), torch.optim.SGD([nn.Parameter(torch.ones(1))])).scaler.is_enabled()
    assert not TrainStep(_overflowing_model("bf16"), torch.optim.SGD([nn.Parameter(torch.ones(1))])).scaler.is_enabled()


def test_a_second_fp16_training_starts_at_the_loss_scale_the_first_ended_at():
    # Gradients of ~1e3 overflow fp16 at the default scale 2**16: the first training halves its way down, skipping
    # steps. The engine's fine-tuning after it is short; starting again from 2**16 it skipped 8 of its 10 steps
    # here (all of them in a trial, which failed as diverged).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 8), nn.ReLU(),
                          EngineLinear(8, 2, bias=False, precision="fp16"))
    gen = torch.Generator().manual_seed(0)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(5, 6, generator=gen) * 1e4
        return x, (x[:, 0] > 0).long()

    def train(steps: int) -> int:
        return train_steps(model, steps, batch, lambda x, y: F.cross_entropy(model(x).float(), y), lr=1e-2,
                           warmup_frac=0.1, fallback_steps=20, checkpoint=lambda: None)[1]

    assert train(40) >= 8  # halving its way down from 2**16
    assert train(10) <= 2  # the fine-tuning takes its steps


ARCH = {"family": "transformer_lm", "vocab_size": 256, "context": 16, "d_model": 32,
        "layers": [{"n_heads": 2, "ffn_ratio": 2, "precision": "bf16", "sparsity": "2:4"},
                   {"n_heads": 4, "ffn_ratio": 1, "precision": "int8"}]}


def test_the_family_builds_engine_layers_with_each_blocks_choices():
    model = build(ARCH)
    first, second = model.blocks
    assert {first.qkv.precision, first.up.precision, second.down.precision} == {"bf16", "int8"}
    assert first.qkv.mask is not None and second.qkv.mask is None
    assert "act_amax" in dict(second.up.named_buffers())
    assert describe(ARCH) == "d32 L2 h2,4 f2,1 pbf16,int8 s2:4,dense"


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = build({**ARCH, "layers": [{"n_heads": 2, "ffn_ratio": 2}] * 2})
    checked = build({**ARCH, "grad_checkpoint": 1, "layers": [{"n_heads": 2, "ffn_ratio": 2}] * 2})
    checked.load_state_dict(plain.state_dict())
    x = torch.randint(0, 256, (2, 16))
    for model in (plain, checked):
        model(x).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), checked.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_the_training_state_leaves_out_inference_forms_and_reloads():
    torch.manual_seed(0)
    model = build({**ARCH, "layers": [{"n_heads": 2, "ffn_ratio": 2, "precision": "bf16"}]})
    convert(model)
    state = training_state(model)
    assert not [k for k in state if ".inference." in k]
    again = build({**ARCH, "layers": [{"n_heads": 2, "ffn_ratio": 2, "precision": "bf16"}]})
    again.load_state_dict(state)
    convert(again)
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_a_converted_model_counts_each_weight_once_at_its_inference_width():
    from dsnas.kernels.convert import inference_size

    sizes = {}
    for precision in ("fp32", "bf16"):
        model = build({**ARCH, "layers": [{"n_heads": 2, "ffn_ratio": 2, "precision": precision}]})
        convert(model)
        sizes[precision] = inference_size(model)
    plain = build({**ARCH, "layers": [{"n_heads": 2, "ffn_ratio": 2}]})
    assert sizes["fp32"][0] == sizes["bf16"][0] == sum(p.numel() for p in plain.parameters())
    linear = sum(m.weight.numel() + m.bias.numel() for m in plain.modules() if isinstance(m, EngineLinear))
    assert sizes["fp32"][1] - sizes["bf16"][1] == 2 * linear  # weights and biases, 4 bytes each -> 2


@pytest.mark.parametrize("arch", [
    {**ARCH, "layers": [{"n_heads": 2, "ffn_ratio": 2, "precision": "bf16"}, {"n_heads": 2, "ffn_ratio": 2}]},
    {"family": "cnn", "stem_width": 8, "image_size": 12, "channels": 3, "n_classes": 10,
     "layers": [{"depth": 1, "width": 16, "kernel": 3, "expand": 2, "precision": "bf16"},
                {"depth": 1, "width": 24, "kernel": 3, "expand": 1}]},
], ids=["transformer_lm", "cnn"])
def test_the_counted_weight_bytes_are_those_the_inference_form_holds(arch):
    """A bias was counted at 4 bytes on every engine layer: also where there is none (every convolution of the
    cnn family) and where the inference form keeps it in bf16."""
    from dsnas.kernels.convert import inference_size
    from dsnas.kernels.linear import engine_layers

    model = build(arch)
    convert(model)
    layers = engine_layers(model).values()
    inside = {id(t) for layer in layers for t in [*layer.parameters(), *layer.buffers()]}
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if id(t) not in inside)
    for layer in layers:
        form = layer.inference if layer.inference is not None else layer  # fp32: the layer itself runs
        held += sum(t.numel() * t.element_size() for t in [form.weight, form.bias] if t is not None)
    assert inference_size(model)[1] == held


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_converted_convolution_pads_as_its_padding_mode_says(padding_mode, precision):
    """The converted form padded every border with zeros: a reflect convolution's border pixels were 0.6 off in
    the measured and shipped model, where its training form was within bf16's rounding."""
    from dsnas.kernels.conv import EngineConv2d

    torch.manual_seed(0)
    conv = EngineConv2d(3, 8, 3, padding=1, padding_mode=padding_mode, precision=precision).eval()
    reference = nn.Conv2d(3, 8, 3, padding=1, padding_mode=padding_mode)
    reference.load_state_dict(conv.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        exact = reference(x)
        convert(conv)
        converted = conv(x)
    assert conv.inference is not None
    error = (converted - exact).norm() / exact.norm()
    assert error < (1e-2 if precision == "bf16" else 2e-3), error


def test_the_training_state_keeps_a_users_module_named_inference():
    """Every key with ".inference." was left out of a trial's weights and its bundle, so a user's head named
    `inference` shipped random weights, and load_bundle took them for tied aliases without a word."""
    model = nn.ModuleDict({"layer": EngineLinear(8, 8, precision="bf16"),
                           "head": nn.ModuleDict({"inference": nn.Linear(8, 2)})})
    convert(model)
    assert model["layer"].inference is not None  # the engine layer's inference form: rebuilt, not stored
    assert sorted(training_state(model)) == ["head.inference.bias", "head.inference.weight", "layer.bias",
                                             "layer.weight"]


def test_a_weight_tied_to_another_module_counts_both_forms_once_converted():
    """A bf16 head tied to the token table: the lookup still reads the fp32 table, the head its bf16 copy. The
    table was counted once, at bf16's width."""
    from dsnas.kernels.convert import inference_size

    model = nn.ModuleDict({"embed": nn.Embedding(256, 64), "head": EngineLinear(64, 256, bias=False,
                                                                                  precision="bf16")})
    model["head"].weight = model["embed"].weight
    convert(model)
    params, nbytes = inference_size(model)
    assert params == 256 * 64 and nbytes == 256 * 64 * 4 + 256 * 64 * 2


@pytest.mark.parametrize(("precision", "sparsity", "backend"), [
    ("bf16", "dense", None), ("fp16", "dense", None), ("bf16", "2:4", None), ("fp32", "2:4", None),
    ("int8", "dense", "torch-dynamic"), ("int8", "dense", "int8-static"), ("int8", "dense", "torchao-dynamic"),
    ("int8", "2:4", "int8-static")])
def test_a_model_shed_of_its_training_form_holds_the_bytes_its_measurement_counted(precision, sparsity, backend):
    """A converted layer kept its fp32 master weight, bias and mask beside its inference form: a loaded bf16 model
    held 2.7x the weight bytes its measurement counted (peak_memory_mb), an int8 one 3.8x. Shed, it holds them
    (within 0.5%: an int8 kernel's scalars, torchao's zero points), and runs and reports as before."""
    from dsnas.kernels.convert import inference_signature, inference_size, shed_training_form, untrained_inference_form

    if backend == "torchao-dynamic":
        pytest.importorskip("torchao")
    torch.manual_seed(0)
    model = build({**ARCH, "d_model": 128, "layers": [{"n_heads": 2, "ffn_ratio": 4, "precision": precision,
                                                       "sparsity": sparsity}] * 2})
    untrained_inference_form(model, int8_backend=backend or "auto")
    x = torch.randint(0, ARCH["vocab_size"], (3, ARCH["context"]))
    with torch.inference_mode():
        before = model(x)
    counted, signature, report = inference_size(model), inference_signature(model), layer_report(model)
    assert held_bytes(model) > 1.2 * counted[1]  # both forms
    shed_training_form(model)
    with torch.inference_mode():
        assert torch.equal(model(x), before)
    assert (inference_size(model), inference_signature(model), layer_report(model)) == (counted, signature, report)
    assert held_bytes(model) == pytest.approx(counted[1], rel=0.005)


def test_shedding_keeps_a_master_another_module_reads_and_a_convolutions_counts():
    from dsnas.kernels.convert import inference_size, shed_training_form

    tied = nn.ModuleDict({"embed": nn.Embedding(256, 64), "head": EngineLinear(64, 256, bias=False,
                                                                                 precision="bf16")})
    tied["head"].weight = tied["embed"].weight
    convert(tied)
    shed_training_form(tied)
    assert tied["head"].weight is tied["embed"].weight  # the lookup reads it
    assert inference_size(tied) == (256 * 64, 256 * 64 * 4 + 256 * 64 * 2) and held_bytes(tied) == 256 * 64 * 6
    cnn = build({"family": "cnn", "stem_width": 8, "image_size": 12, "channels": 3, "n_classes": 10,
                 "layers": [{"depth": 1, "width": 16, "kernel": 3, "expand": 2, "precision": "bf16"}]})
    convert(cnn)
    counted = inference_size(cnn)
    shed_training_form(cnn)
    assert inference_size(cnn) == counted and held_bytes(cnn) == counted[1]


class ReadsTheWeight(nn.Module):
    """A user's model whose own forward reads its engine layer's weight besides calling the layer (a tie by hand)."""

    def __init__(self):
        super().__init__()
        self.fc = EngineLinear(8, 8, precision="bf16", sparsity="2:4")

    def forward(self, x):
        return self.fc(x) + x @ self.fc.weight.t()


def test_a_model_whose_own_forward_reads_a_master_weight_keeps_it():
    """A user's forward that reads an engine layer's weight itself (a tie by hand): shed, it would fail on every
    call after dsnas.load. Checked on a call (the bundle's probe), everything is put back and the reason said."""
    from dsnas.kernels.convert import inference_size, shed_training_form

    torch.manual_seed(0)
    model = ReadsTheWeight()
    sparsify = model.fc.mask.view(-1, 4)
    sparsify[:, :2] = False
    convert(model)
    x = torch.randn(2, 8)
    with torch.inference_mode():
        before = model(x)
    counted, held = inference_size(model), held_bytes(model)
    why = shed_training_form(model, lambda: model(x))
    assert why.startswith("TypeError") or why.startswith("AttributeError"), why
    with torch.inference_mode():
        assert torch.equal(model(x), before)
    assert model.fc.mask is not None and model.fc.bias is not None and model.fc.shed_zero_share is None
    assert (inference_size(model), held_bytes(model), layer_report(model)["fc"]["zero_share"]) == (counted, held, 0.5)
    plain = nn.Sequential(EngineLinear(8, 8, precision="bf16"))
    convert(plain)
    assert shed_training_form(plain, lambda: plain(x)) == "" and plain[0].weight is None  # runs without it


def test_a_measurement_counts_the_masters_a_models_own_forward_reads():
    """dsnas.load keeps the fp32 masters of a model whose own forward reads a layer's weight, but its measurement
    counted the inference form's weights alone: its peak memory fell short of what the loaded model holds by the
    masters and masks (here 3.4x the weights counted). Now it counts them, and says so; a model whose inference form
    runs alone counts none, and either is left as it was."""
    from dsnas.kernels.convert import inference_signature, inference_size, masters_read_bytes
    from dsnas.profiler.measure import _weight_bytes

    x = torch.randn(2, 8)
    plain = nn.Sequential(EngineLinear(8, 8, precision="bf16", sparsity="2:4"))
    for model, reads in ((ReadsTheWeight(), True), (plain, False)):
        convert(model)
        with torch.inference_mode():
            before = model(x)
        counted, held, signature = inference_size(model), held_bytes(model), inference_signature(model)
        assert masters_read_bytes(model, lambda m=model: m(x)) == (held - counted[1] if reads else 0)
        profile = {}
        assert _weight_bytes(model, x, profile) == (held if reads else counted[1])
        assert ("masters_read" in profile) == reads
        with torch.inference_mode():
            assert torch.equal(model(x), before)
        assert (inference_size(model), held_bytes(model), inference_signature(model)) == (counted, held, signature)
        if reads:  # bf16 weight and bias 128 + 16 counted; held besides: fp32 master 256, bias 32, mask 64
            assert (counted[1], held) == (144, 496)


def test_a_layer_shed_of_its_master_bias_still_prints_its_bias():
    """print(dsnas.load(bundle)) said bias=False of every bf16 layer: nn.Linear's repr read the freed master."""
    from dsnas.kernels.conv import EngineConv2d
    from dsnas.kernels.convert import shed_training_form

    model = nn.Sequential(EngineLinear(8, 8, precision="bf16"), EngineLinear(8, 8, bias=False, precision="bf16"),
                          EngineConv2d(2, 4, 3, precision="fp16"))
    convert(model)
    before = repr(model)
    shed_training_form(model)
    assert model[0].bias is None and repr(model) == before
    assert "bias=True" in repr(model[0]) and "bias=False" in repr(model[1]) and "bias" not in repr(model[2])


def test_loading_keeps_the_masters_where_shedding_changes_the_models_output(tmp_path, caplog):
    """A user's forward that passes a layer's bias on where None is taken too ran once shed, with other logits: the
    load compares the outputs on the bundle's probe, not only that the forward runs."""
    from safetensors.torch import save_file

    from dsnas.export.bundle import _shed

    class PassesItsBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = EngineLinear(8, 8, precision="bf16")

        def forward(self, x):
            return self.fc(x) + (0 if self.fc.bias is None else self.fc.bias)

    torch.manual_seed(0)
    x = torch.randn(2, 8)
    for model, kept in ((PassesItsBias(), True), (nn.Sequential(EngineLinear(8, 8, precision="bf16")), False)):
        convert(model)
        with torch.inference_mode():
            save_file({"input": x, "logits": model(x)}, tmp_path / "probe.safetensors")
            before = model(x)
        caplog.clear()
        _shed(model, tmp_path, torch.device("cpu"))
        layer = next(m for m in model.modules() if isinstance(m, EngineLinear))
        assert (layer.weight is not None, layer.bias is not None) == (kept, kept)
        assert ("its output on the probe changed" in caplog.text) == kept
        with torch.inference_mode():
            assert torch.equal(model(x), before)
