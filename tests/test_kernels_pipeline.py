"""The worker's engine steps on a real (tiny) task: sparsify -> fine-tune -> calibrate + QAT -> convert, the accuracy
after each step, what ran recorded per layer, and a search whose space has precision and sparsity choices."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_SPACE, TINY_STUDY

from dsnas.errors import TrialError
from dsnas.kernels import pipeline
from dsnas.kernels.convert import convert, training_state
from dsnas.kernels.linear import EngineLinear, engine_layers
from dsnas.kernels.sparsity import check_nm
from dsnas.models import build
from dsnas.spec import EngineSpec
from dsnas.tasks.charlm import CharLMConfig, CharLMTask


@pytest.fixture(scope="module")
def task() -> CharLMTask:
    return CharLMTask(CharLMConfig(corpus_bytes=200_000, context=16, batch_size=8, train_tokens=4096,
                                   val_tokens=512), ".")


def _arch(*layers: tuple[str, str]) -> dict:
    return {"family": "transformer_lm", "vocab_size": 256, "context": 16, "d_model": 32,
            "layers": [{"n_heads": 2, "ffn_ratio": 2, "precision": p, "sparsity": s} for p, s in layers]}


def _run(task: CharLMTask, arch: dict, **engine: object) -> tuple[torch.nn.Module, dict, dict]:
    torch.manual_seed(0)
    model = build(arch)
    task.train(model, "cpu", seed=0, checkpoint=lambda: None)
    spec = EngineSpec(calibration_batches=2, hessian_samples=2, **engine)
    metrics, info = pipeline.run(model, task, "cpu", spec, seed=0, checkpoint=lambda: None)
    pipeline.finish(model, spec, info)
    return model, metrics, info


def test_fine_tuning_and_qat_come_out_of_the_training_budget():
    engine = EngineSpec(finetune_frac=0.2, qat_frac=0.3)
    assert pipeline.main_fraction(build(_arch(("fp32", "dense"))), engine) == 1.0
    assert pipeline.main_fraction(build(_arch(("fp32", "2:4"))), engine) == 0.8
    assert pipeline.main_fraction(build(_arch(("int8", "dense"), ("bf16", "2:4"))), engine) == 0.5


def test_a_task_that_cannot_fine_tune_is_refused_before_any_training():
    from dsnas.errors import TrialError

    class Plain:  # a user's task written for dense fp32 models only
        def train(self, model, device, *, seed, checkpoint):
            raise AssertionError("must not train")

    pipeline.check_task(build(_arch(("fp32", "dense"))), Plain())
    with pytest.raises(TrialError, match=r"batches\(\), loss\(\), train\(fraction=\), train\(lr_scale=\)"):
        pipeline.check_task(build(_arch(("int8", "dense"))), Plain())


def test_dense_fp32_models_skip_every_step(task):
    model, metrics, info = _run(task, _arch(("fp32", "dense")))
    assert metrics == {"fallbacks": 0.0}
    assert {row["backend"] for row in info["layers"].values()} == {"fp32"}


@pytest.mark.parametrize("saliency", ["hessian", "wanda", "magnitude"])
def test_sparse_and_int8_layers_go_through_every_step_in_order(task, saliency):
    model, metrics, info = _run(task, _arch(("int8", "2:4"), ("bf16", "dense")), saliency=saliency)
    assert [k for k in metrics if k not in pipeline.COUNTS] == [
        "accuracy_trained", "accuracy_sparsified", "accuracy_finetuned", "accuracy_calibrated", "accuracy_qat",
        "fallbacks"]
    assert info["sparsity"]["pruned"] == ["blocks.0.down", "blocks.0.proj", "blocks.0.qkv", "blocks.0.up"]
    for name, layer in engine_layers(model).items():
        row = info["layers"][name]
        if name.startswith("blocks.0"):
            check_nm(layer.weight != 0, 2, 4)  # fine-tuning and QAT kept the mask
            assert row["backend"].startswith("int8:") and row["zero_share"] == 0.5
            assert row["reason"].startswith("2:4 zeros computed densely") and row["sparse_kernel"] is False
            assert info["calibration"]["amax"][name] > 0
        else:
            assert row["backend"] == "bf16"


@pytest.mark.parametrize("calibrator", ["kl", "max", "percentile"])
def test_an_int8_layer_whose_input_is_all_zeros_fails_naming_the_layer_not_asking_for_calibration(task, calibrator):
    torch.manual_seed(0)
    model = build(_arch(("int8", "dense")))
    with torch.no_grad():  # `down` sees GELU(0) = 0 on every input: its calibrated range is 0
        model.blocks[0].up.weight.zero_()
        model.blocks[0].up.bias.zero_()
    spec = EngineSpec(calibration_batches=2, calibrator=calibrator)
    with pytest.raises(TrialError, match=r"int8 layer blocks\.0\.down saw only zeros") as caught:
        pipeline.run(model, task, "cpu", spec, seed=0, checkpoint=lambda: None)
    assert "run calibration" not in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("calibrator", ["kl", "max", "percentile"])
def test_an_int8_layer_the_forward_never_runs_fails_calibration_naming_it(calibrator):
    class TwoHeads(torch.nn.Module):  # `aux` is a head its forward does not use
        def __init__(self) -> None:
            super().__init__()
            self.body, self.aux = EngineLinear(8, 2, precision="int8"), EngineLinear(8, 2, precision="int8")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    model = TwoHeads()
    batches = type("Task", (), {"batches": staticmethod(lambda n, device, seed: [(torch.randn(4, 8), None)] * n)})()
    spec = EngineSpec(calibration_batches=2, calibrator=calibrator)
    with pytest.raises(TrialError, match=r"int8 calibration needs each int8 layer's inputs, but \['aux'\] saw none"):
        pipeline._calibrate(model, batches, "cpu", spec, engine_layers(model), seed=0)


def test_the_default_saliency_is_signal_two_independent_sparsifications_keep_the_same_weights(task):
    """Two trials sparsifying the same trained weights with the default engine but other seeds (other calibration batches,
    other probes) keep nearly the same weights. Measured on this model: wanda (the default) agrees on 97-99% of
    positions; hessian at 8 Hutchinson probes (the default before) on 50-52%, chance 50% (benchmarks/saliency.py)."""
    torch.manual_seed(0)
    trained = build(_arch(("fp32", "2:4")))
    task.train(trained, "cpu", seed=0, checkpoint=lambda: None)
    masks, saliencies = [], set()
    for seed in (0, 1):
        model = copy.deepcopy(trained)
        _, info = pipeline.run(model, task, "cpu", EngineSpec(finetune_frac=0.0), seed=seed, checkpoint=lambda: None)
        saliencies.add(info["sparsity"]["saliency"])
        masks.append(torch.cat([layer.mask.flatten() for layer in engine_layers(model).values()]))
    assert float((masks[0] == masks[1]).float().mean()) >= 0.9
    assert saliencies == {"wanda"}


def test_auto_sparsity_sparsifies_the_less_sensitive_half_by_hessian_trace(task):
    _, _, info = _run(task, _arch(("fp32", "auto"), ("fp32", "auto")), saliency="magnitude")
    traces = info["sparsity"]["traces"]
    assert len(traces) == 8 and len(info["sparsity"]["auto_sparsified"]) == 4
    per_weight = {n: t / w for n, t, w in zip(traces, traces.values(), _weights(_arch(("fp32", "dense")) | {
        "layers": [{"n_heads": 2, "ffn_ratio": 2}] * 2}))}
    kept_dense = set(traces) - set(info["sparsity"]["auto_sparsified"])
    assert max(per_weight[n] for n in info["sparsity"]["auto_sparsified"]) <= min(per_weight[n] for n in kept_dense)
    assert {info["layers"][n]["backend"] for n in kept_dense} == {"fp32"}


def test_fp16_layers_take_their_hessian_in_fp32_where_fp16_products_overflow():
    # Large activations (inputs of 1e4) overflow fp16's Hessian-vector products, which no loss scale guards: every
    # trace came out NaN, and the "auto" layers were ranked on NaN.
    torch.manual_seed(0)
    model = torch.nn.Sequential(EngineLinear(8, 4, precision="fp16"), torch.nn.ReLU(),
                                EngineLinear(4, 8, precision="fp16"), torch.nn.ReLU(),
                                EngineLinear(8, 2, bias=False, precision="fp16"))
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0)) * 1e4
    task = type("Task", (), {"loss": staticmethod(lambda m, x, y: F.cross_entropy(m(x).float(), y))})()
    layers = list(engine_layers(model).values())
    diags = pipeline._hessian_diag(model, task, [(x, (x[:, 0] > 0).long())], [m.weight for m in layers], 2, 0)
    assert all(bool(torch.isfinite(d).all()) for d in diags)
    assert [m.fallback_left for m in layers] == [0, 0, 0]  # the layers compute in fp16 again


def _weights(arch: dict) -> list[int]:
    return [m.weight.numel() for m in engine_layers(build(arch)).values()]


def test_a_reloaded_model_converts_to_the_same_outputs(task):
    from dsnas.kernels.convert import int8_backends
    from dsnas.kernels.linear import layer_report

    model, _, _ = _run(task, _arch(("int8", "2:4")))
    again = build(_arch(("int8", "2:4")))
    again.load_state_dict(training_state(model))
    convert(again, recorded=int8_backends(layer_report(model)))
    x = torch.randint(0, 256, (3, 16))
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_the_untrained_form_measures_every_int8_backend_the_trained_model_may_ship():
    """The static backend needs an activation range; the untrained form gets a stand-in, so the backend chosen
    before training is chosen among the same candidates as after calibration (and is what ships)."""
    from dsnas.kernels.convert import untrained_inference_form

    model = untrained_inference_form(build(_arch(("int8", "dense"))))
    for layer in engine_layers(model).values():
        assert "int8-static" in layer.inference.ratios["ratios"], layer.reason
        assert "no calibrated act_amax" not in layer.reason
    static = untrained_inference_form(build(_arch(("int8", "dense"))), int8_backend="int8-static")
    assert {m.backend for m in engine_layers(static).values()} == {"int8:int8-static"}


def test_the_int8_backend_is_timed_at_the_rows_the_model_is_measured_at(tmp_path):
    """Batch sizes 1 and 4 of 16-token examples: 16 and 64 rows, not the default 1/32/256."""
    from dsnas.kernels.convert import untrained_inference_form

    model = untrained_inference_form(build(_arch(("int8", "dense"))), rows=[16, 64])
    assert {tuple(m.inference.ratios["rows"]) for m in engine_layers(model).values()} == {(16, 64)}
    study = tmp_path / "tiny.toml"
    (tmp_path / "space.toml").write_text(ENGINE_SPACE.replace('["fp32", "bf16", "int8"]', '["int8"]'))
    study.write_text(TINY_STUDY.format(space=tmp_path / "space.toml").replace("n_trials = 3", "n_trials = 1"))
    from dsnas.cli import main
    from dsnas.spec import load_study
    from dsnas.study import open_study

    assert main(["search", str(study)]) == 0
    (trial,) = open_study(load_study(study), create=False).trials
    reasons = {row["reason"] for row in trial.user_attrs["profile"]["engine"]["layers"].values()}
    assert all("over rows 16/64" in r for r in reasons), reasons  # context 16 x batch sizes 1 and 4


ENGINE_SPACE = TINY_SPACE.replace("d_model = [16, 32]", "d_model = [32]") + \
    'precision = ["fp32", "bf16", "int8"]\nsparsity = ["dense", "2:4"]\n'


def test_a_search_with_precision_and_sparsity_choices_runs_end_to_end(tmp_path: Path):
    import optuna

    from dsnas.cli import main

    space = tmp_path / "space.toml"
    space.write_text(ENGINE_SPACE)
    study = tmp_path / "tiny.toml"
    study.write_text(TINY_STUDY.format(space=space).replace("n_trials = 3", "n_trials = 4")
                     + "[engine]\nhessian_samples = 2\ncalibration_batches = 2\n")
    assert main(["search", str(study)]) == 0
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'tiny.db'}").trials
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 4
    choices = {t.params[k] for t in done for k in t.params if k.endswith((".precision", ".sparsity"))}
    assert len(choices) >= 3  # the sampler did explore the engine's choices
    for t in done:
        layers = t.user_attrs["profile"]["engine"]["layers"]
        assert len(layers) == 4 * len([k for k in t.params if k.endswith(".precision")])
        assert all(row["backend"] for row in layers.values())
        if any(v == "int8" for v in t.params.values()):
            assert "accuracy_qat" in t.user_attrs and t.user_attrs["engine_s"] > 0


def test_the_compile_option_measures_the_compiled_model():
    from dsnas.spec import HardwareSpec, TaskSpec
    from dsnas.trial import TrialRequest
    from dsnas.worker import run_trial

    arch = {"family": "transformer_lm", "vocab_size": 256, "context": 16, "d_model": 32,
            "layers": [{"n_heads": 2, "ffn_ratio": 2}]}
    task = TaskSpec("charlm", {"corpus_bytes": 200_000, "context": 16, "batch_size": 8, "train_tokens": 1024,
                               "val_tokens": 512})
    hardware = HardwareSpec(device="cpu", batch_sizes=(2,), warmup_s=0.01, measure_s=0.02)
    result = run_trial(TrialRequest(0, arch, task, hardware, seed=0, engine=EngineSpec(compile=True)))
    assert result.profile["engine"]["compiled"] is True
    assert result.metrics["flops_per_token"] > 0 and result.metrics["latency_ms"] > 0


def test_an_int8_layer_measured_before_training_keeps_the_measured_reason_for_its_backend():
    """With successive halving (the default) the backend is chosen, by measurement, on the untrained form; the
    trained model then converted to it "by name", and the profile said "requested by name; the others were not
    measured" where docs/engine.md promises the measured ratios."""
    from dsnas.spec import HardwareSpec, TaskSpec
    from dsnas.trial import TrialRequest
    from dsnas.worker import run_trial

    arch = {"family": "transformer_lm", "vocab_size": 256, "context": 16, "d_model": 32,
            "layers": [{"n_heads": 2, "ffn_ratio": 2, "precision": "int8"}]}
    task = TaskSpec("charlm", {"corpus_bytes": 200_000, "context": 16, "batch_size": 8, "train_tokens": 1024,
                               "val_tokens": 512})
    hardware = HardwareSpec(device="cpu", batch_sizes=(2,), warmup_s=0.01, measure_s=0.02)
    engine = EngineSpec(hessian_samples=2, calibration_batches=2)
    result = run_trial(TrialRequest(0, arch, task, hardware, seed=0, engine=engine, rungs=(0.5,)))
    layers = result.profile["engine"]["layers"]
    assert len(layers) == 4 and all(row["backend"].startswith("int8:") for row in layers.values())
    for row in layers.values():
        assert row["reason"].startswith("fastest measured on cpu (speed vs fp32"), row["reason"]


def test_measuring_before_training_leaves_the_seeded_generator_as_training_without_rungs_finds_it(monkeypatch):
    """With rungs the untrained form is built and measured before training; both drew from torch's global
    generator (the probe's weights; the host-speed probes' and CPU ceilings' random matrices, as often as the load
    and the caches decided), which a model's dropout trains with: one seed gave 0.3379, 0.3604 and 0.3745."""
    import dsnas.worker
    from dsnas.spec import HardwareSpec, TaskSpec
    from dsnas.trial import TrialRequest
    from dsnas.worker import run_trial

    arch = {"family": "transformer_lm", "vocab_size": 256, "context": 16, "d_model": 32,
            "layers": [{"n_heads": 2, "ffn_ratio": 2}]}
    task = TaskSpec("charlm", {"corpus_bytes": 200_000, "context": 16, "batch_size": 8, "train_tokens": 256,
                               "val_tokens": 512})
    hardware = HardwareSpec(device="cpu", batch_sizes=(2,), warmup_s=0.01, measure_s=0.02)
    seen, train, measure = [], CharLMTask.train, dsnas.worker.measure

    def recording_train(self, model, device, **kwargs):
        seen.append(torch.rand(4))  # what a dropout mask would draw first
        return train(self, model, device, **kwargs)

    def measure_drawing(draws):
        def drawing(*args, **kwargs):
            torch.randn(draws, 8)  # as host_speed.probe_ms does, once per probe
            return measure(*args, **kwargs)
        return drawing

    monkeypatch.setattr(CharLMTask, "train", recording_train)
    run_trial(TrialRequest(0, arch, task, hardware, seed=3))
    for draws in (1, 3):
        monkeypatch.setattr(dsnas.worker, "measure", measure_drawing(draws))
        run_trial(TrialRequest(0, arch, task, hardware, seed=3, rungs=(0.5,)))
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[0], seen[2]), seen


def test_a_trial_counts_the_tokens_fine_tuning_and_qat_trained_on():
    """Fine-tuning and QAT come out of the training budget, so a 2:4 int8 candidate trains on about as many tokens as
    a dense one; its trial said train_tokens 14,848 (the first training's) where it trained on 29,184."""
    from dsnas.spec import HardwareSpec, TaskSpec
    from dsnas.trial import TrialRequest
    from dsnas.worker import run_trial

    task = TaskSpec("charlm", {"corpus_bytes": 200_000, "context": 16, "batch_size": 8, "train_tokens": 2048,
                               "val_tokens": 512})
    hardware = HardwareSpec(device="cpu", batch_sizes=(2,), warmup_s=0.01, measure_s=0.02)
    engine = EngineSpec(hessian_samples=2, calibration_batches=2, int8_backend="torch-dynamic")
    trained = {}
    for layer in (("fp32", "dense"), ("int8", "2:4")):
        result = run_trial(TrialRequest(0, _arch(layer), task, hardware, seed=0, engine=engine))
        trained[layer] = result.metrics
    dense, compressed = trained[("fp32", "dense")], trained[("int8", "2:4")]
    # 16 steps of 128 tokens; the compressed one 8 + 4 fine-tuning + 4 QAT
    assert dense["train_steps"] == 16 and dense["train_tokens"] == 2048
    assert compressed["train_steps"] == 16 and compressed["train_tokens"] == 2048
    assert compressed["skipped_steps"] == 0
