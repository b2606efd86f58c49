"""A model family of the user's: examples/own_model runs as a study (built, trained, engine applied, measured,
exported, loaded), with its figures checked against the architecture; and bad builders and patterns say why."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import dsnas
from dsnas.cli import main
from dsnas.errors import SpecError, TrialError
from dsnas.kernels.conv import EngineConv2d
from dsnas.kernels.groups import apply_groups
from dsnas.kernels.linear import EngineLinear
from dsnas.models import build, describe
from dsnas.spec import load_study

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "own_model"


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """The example, copied and run as a 3-trial study with a small training budget (as CI runs it)."""
    folder = tmp_path_factory.mktemp("own_model")
    for name in ("snippet_model.py", "snippet_task.py", "space.toml", "study.toml"):
        shutil.copy(EXAMPLE / name, folder / name)
    study_file = folder / "study.toml"
    study_file.write_text(study_file.read_text().replace("train_snippets = 12_000", "train_snippets = 1_500")
                          .replace("n_trials = 6", "n_trials = 3"))
    return folder, dsnas.search(str(study_file)).study


def _conv_params(arch: dict) -> int:
    w, k, h, c = arch["width"], arch["kernel"], arch["hidden"], arch["n_classes"]
    return 256 * w + arch["depth"] * (w * w * k + w) + (2 * w * h + h) + (h * c + c)


def test_the_example_study_trains_measures_and_applies_the_engine(searched):
    folder, study = searched
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 3
    for t in done:
        arch = t.user_attrs["arch"]
        assert arch["family"] == "snippet_model:build"
        assert t.user_attrs["accuracy"] > 1 / 6 + 0.1  # six packages: well above chance
        assert t.user_attrs["params"] == _conv_params(arch)
        # FLOPs of one snippet: the convolutions over every position and the two head layers (2 per multiply-add).
        w, length = arch["width"], 96
        flops = arch["depth"] * 2 * length * w * w * arch["kernel"] + 2 * (2 * w * arch["hidden"] +
                                                                          arch["hidden"] * arch["n_classes"])
        assert t.user_attrs["flops_bs1"] == pytest.approx(flops, rel=0.01)
        layers = t.user_attrs["profile"]["engine"]["layers"]
        assert set(layers) == {"head.0", "head.2"}  # the [engine.head] group's two linear layers, no others
        assert {row["precision"] for row in layers.values()} == {t.params.get("head.precision", "fp32")}
        assert t.user_attrs["arch_short"].startswith(f"w{w} d{arch['depth']} k{arch['kernel']} h{arch['hidden']}")
        assert f"head={layers['head.0']['precision']}" in t.user_attrs["arch_short"]


def test_the_example_exports_and_loads_back_without_pickle(searched):
    folder, study = searched
    best = max((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: t.values[0])
    out = folder / "bundle"
    assert main(["export", str(folder / "study.toml"), "--trial", str(best.number), "--out", str(out)]) == 0
    doc = json.loads((out / "arch.json").read_text())
    assert doc["arch"]["family"] == "snippet_model:build"
    probe = dsnas.export.read_probe(out)
    model = dsnas.load(str(out))
    with torch.inference_mode():
        assert torch.allclose(model(probe["input"]).float(), probe["logits"], atol=1e-5)
    # Elsewhere, with the study's folder gone: one line that says which module to make importable.
    doc["task"]["base_dir"] = str(folder / "gone")
    (out / "arch.json").write_text(json.dumps(doc))
    code = f"import dsnas\ntry:\n    dsnas.load({str(out)!r})\nexcept dsnas.DsnasError as e:\n    print(e)"
    said = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/").stdout
    assert "the model builder 'snippet_model:build' cannot be imported" in said
    assert "make the module 'snippet_model' importable" in said and len(said.strip().splitlines()) == 1
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "`dsnas.load` builds the model with `snippet_model:build`, the study's own code" in card


def test_a_builder_edited_since_the_trial_trained_is_not_exported_as_its_model(searched, capsys):
    """tanh for relu in the builder (the same shapes): the export went through, its ONNX file was said to disagree
    with "the measured model", and `dsnas.load` gave other logits. A layer added: "re-export the trial"."""
    folder, study = searched
    best = max((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: t.values[0])
    source = (folder / "snippet_model.py").read_text(encoding="utf-8")
    export = ["export", str(folder / "study.toml"), "--trial", str(best.number), "--out", str(folder / "edited")]
    try:
        (folder / "snippet_model.py").write_text(source.replace("torch.relu(", "torch.tanh("), encoding="utf-8")
        assert main(export) == 2
        err = capsys.readouterr().err
        assert f"trial {best.number}: the model rebuilt from its stored weights gives other logits" in err
        assert "the code of 'snippet_model:build'" in err and "Fix: restore the builder's code" in err
        (folder / "snippet_model.py").write_text(source.replace("nn.GELU(), ", "nn.GELU(), nn.Linear(hidden, "
                                                                "hidden), "), encoding="utf-8")
        assert main(export) == 2
        err = capsys.readouterr().err
        assert "the weights do not fit the architecture" in err and ".edited." not in err  # not the work folder
        assert "if the code of 'snippet_model:build' changed since the trial trained, restore it" in err
    finally:
        (folder / "snippet_model.py").write_text(source, encoding="utf-8")
    assert not (folder / "edited").exists()
    assert main(export) == 0  # as it was: exported


def test_a_bundle_named_fp8_is_not_said_to_need_an_fp8_gpu(searched, capsys):
    """Export told an fp8 trial by "fp8" anywhere in the error, whose words name the bundle's path: a builder edited
    since, exported to --out edited_fp8, was said to have fp8 layers that need a CUDA GPU (it had none)."""
    folder, study = searched
    best = max((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: t.values[0])
    assert "fp8" not in json.dumps(best.user_attrs["arch"])
    source = (folder / "snippet_model.py").read_text(encoding="utf-8")
    try:
        (folder / "snippet_model.py").write_text(source.replace("nn.GELU(), ", "nn.GELU(), nn.Linear(hidden, "
                                                                "hidden), "), encoding="utf-8")
        assert main(["export", str(folder / "study.toml"), "--trial", str(best.number), "--out",
                     str(folder / "edited_fp8")]) == 2
        err = capsys.readouterr().err
        assert "the weights do not fit the architecture" in err and "CUDA GPU" not in err
    finally:
        (folder / "snippet_model.py").write_text(source, encoding="utf-8")


def test_a_probe_an_older_dsnas_took_in_training_mode_fails_neither_export_nor_verify(searched, capsys,
                                                                                       monkeypatch):
    """A probe without its mode (an older dsnas's, whose task left dropout on) differs from the rebuilt model's
    logits: export's ONNX check and the model card said the ONNX file disagreed, and verify failed the bundle. The
    bundle's probe is then the rebuilt model's, said so; an older bundle's is shown, not compared. But where the
    model's training mode changes nothing (this one has no dropout), the difference is the code's: refused, as an
    edited builder is (a remade probe shipped tanh for relu, and verify's probe check passed it)."""
    from safetensors import safe_open
    from safetensors.torch import load, save_file

    from dsnas.export.bundle import REMADE_PROBE, eval_mode_probe
    from dsnas.spec import load_study
    from dsnas.storage import artifact_dir

    folder, study = searched
    best = max((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: t.values[0])
    stored = artifact_dir(load_study(folder / "study.toml")) / best.user_attrs["probe_artifact"]
    kept = stored.read_bytes()
    probe = load(kept)
    try:
        noisy = {"input": probe["input"], "logits": probe["logits"] + 0.5 * torch.randn_like(probe["logits"])}
        save_file(noisy, stored)  # no metadata: as an older dsnas wrote it, dropout's random logits
        out = folder / "old_probe"
        import dsnas.export.bundle as bundle_module

        given, write = {}, bundle_module.write_model_files
        monkeypatch.setattr(bundle_module, "write_model_files",
                            lambda model, example, where: given.update(example=example.clone()) or write(model, example,
                                                                                                        where))
        export = ["export", str(folder / "study.toml"), "--trial", str(best.number), "--out", str(out)]
        assert main(export) == 2
        assert "the code of 'snippet_model:build'" in capsys.readouterr().err and not out.exists()
        monkeypatch.setattr(bundle_module, "_mode_matters", lambda *args: True)  # as a model with dropout
        assert main(export) == 0
        said = capsys.readouterr()
        assert "its probe, taken by an older dsnas in no recorded mode, differs" in said.out + said.err
        assert eval_mode_probe(out / "probe.safetensors")
        with safe_open(str(out / "probe.safetensors"), framework="pt") as f:
            assert f.metadata().items() >= REMADE_PROBE.items()
        assert "disagree" not in (out / "README.md").read_text(encoding="utf-8")
        # The model files and the ONNX check got the probe's input as it is (the file it was read from was
        # rewritten under it: token ids of 2e18 reached onnxruntime).
        assert torch.equal(given["example"].cpu(), probe["input"])
        assert main(["verify", str(out), "--latency-tol", "10"]) == 0  # the probe and accuracy (speed: test_verify)
        capsys.readouterr()
        # A bundle an older dsnas wrote, with such a probe: shown, not compared, and the fix named (verify's probe
        # row, without measuring the speed again).
        from dsnas.export.verify import _probe_check

        save_file(noisy, out / "probe.safetensors")
        row = _probe_check(out, dsnas.load(out), torch.device("cpu"), "cpu")
        assert not row.compared and not row.failed
        assert "not compared: the probe of an older dsnas says no model mode" in row.verdict
        assert "export the trial again" in row.verdict
    finally:
        stored.write_bytes(kept)


def test_training_mode_matters_to_a_model_with_dropout_or_batch_norm_only():
    from dsnas.export.bundle import _mode_matters

    x = torch.randn(4, 8)
    for layer, matters in ((nn.Dropout(0.5), True), (nn.BatchNorm1d(16), True), (nn.ReLU(), False)):
        model = nn.Sequential(nn.Linear(8, 16), layer, nn.Linear(16, 4)).eval()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.inference_mode():
            logits = model(x)
        assert _mode_matters(model, x, logits) is matters
        assert not model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_the_probe_holds_the_models_logits_in_eval_mode(tmp_path):
    """A task whose evaluate() ended with model.train() left dropout on: the probe held random logits, export then
    refused the trial as built by edited code, and verify failed its probe."""
    from dsnas.export.bundle import eval_mode_probe
    from dsnas.worker import probe_bytes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.Dropout(0.5), nn.Linear(64, 4)).train()
    batch = torch.randn(2, 8)
    (tmp_path / "probe.safetensors").write_bytes(probe_bytes(model, batch))
    probe = dsnas.export.read_probe(tmp_path)
    with torch.inference_mode():
        assert torch.equal(probe["logits"], model.eval()(batch))
    assert eval_mode_probe(tmp_path / "probe.safetensors")
    from safetensors.torch import save_file

    save_file(probe, tmp_path / "old.safetensors")  # an older dsnas's probe: no mode said, so not judged by export
    assert not eval_mode_probe(tmp_path / "old.safetensors")


def test_a_pattern_that_matches_nothing_names_it_and_lists_the_modules():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(TrialError, match=r"engine group 'mlp': the pattern 'blocks\.\*' matches no module of the "
                                         r"model; its modules are: 0, 1, 2"):
        apply_groups(model, [{"group": "mlp", "modules": ["blocks.*"], "precision": "bf16", "sparsity": "dense"}])


def test_groups_convert_linear_and_conv_in_place_keeping_ties_and_outputs():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.embed = nn.Embedding(10, 8)
            self.out = nn.Linear(8, 10, bias=False)
            self.out.weight = self.embed.weight
            self.attn = nn.MultiheadAttention(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.conv(x).mean((2, 3)))

    model = Tied()
    x = torch.randn(2, 3, 6, 6)
    before = model(x)
    left = apply_groups(model, [{"group": "all", "modules": ["conv", "out", "attn.out_proj"], "precision": "bf16",
                                 "sparsity": "dense"}])
    assert isinstance(model.conv, EngineConv2d) and isinstance(model.out, EngineLinear)
    assert model.out.weight is model.embed.weight  # the tie survives: the same Parameter
    assert set(left) == {"attn.out_proj"} and "nn.MultiheadAttention" in left["attn.out_proj"]
    after = model(x)
    assert torch.allclose(after, before, atol=0.05, rtol=0.05) and not torch.equal(after, before)  # bf16, same weights
    # A group that decides no layer would make its sampled choice change nothing: the trial fails, saying why.
    with pytest.raises(TrialError, match="engine group 'c' decides no layer: conv: int8 dense convolution: no INT8 "
                                         "convolution kernel"):
        apply_groups(Tied(), [{"group": "c", "modules": ["conv"], "precision": "int8", "sparsity": "dense"}])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_two_engine_layers_tied_to_one_weight_count_its_parameters_once(precision):
    """A model whose two matched layers share one weight counted it once per layer: 142 parameters for a model of
    110 (torch's count, and dsnas's without the group), the same model measured apart by an fp32 group alone."""
    from dsnas.kernels.convert import convert, inference_size

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 4)
            self.tie = nn.Linear(8, 4, bias=False)
            self.tie.weight = self.fc.weight
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.fc(x) + self.tie(x))

    unique = sum(p.numel() for p in Tied().parameters())
    assert inference_size(Tied()) == (unique, 4 * unique)
    model = Tied()
    apply_groups(model, [{"group": "g", "modules": ["fc", "tie"], "precision": precision, "sparsity": "dense"}])
    assert model.fc.weight is model.tie.weight
    assert inference_size(model) == (unique, 4 * unique)  # one fp32 weight, read by both
    convert(model)
    # Converted, each layer holds its own bf16 copy of the weight: both are read, the parameters are still one set.
    held = 4 * unique if precision == "fp32" else 2 * (32 + 4) + 2 * 32 + 4 * (4 * 2 + 2)  # fc, tie, head
    assert inference_size(model) == (unique, held)


def test_a_layer_of_weights_without_an_engine_form_is_left_alone_saying_why():
    """A Conv1d (the example's own model is made of them) was dropped without a word: the trial was labelled
    conv=bf16 and ran fp32."""
    model = nn.ModuleDict({"conv": nn.Conv1d(8, 8, 3), "act": nn.ReLU(), "head": nn.Linear(8, 2)})
    left = apply_groups(model, [{"group": "g", "modules": ["*"], "precision": "bf16", "sparsity": "dense"}])
    assert left == {"conv": "Conv1d has no engine form (the engine converts nn.Linear and nn.Conv2d)"}
    assert isinstance(model["head"], EngineLinear) and type(model["conv"]) is nn.Conv1d
    with pytest.raises(TrialError, match=r"engine group 'g' decides no layer: conv: Conv1d has no engine form"):
        apply_groups(nn.ModuleDict({"conv": nn.Conv1d(8, 8, 3)}),
                     [{"group": "g", "modules": ["conv"], "precision": "bf16", "sparsity": "dense"}])


def test_a_group_decides_the_built_in_familys_layers_it_names():
    """A built-in family's layers are engine layers already: a group that names them sets their precision and
    sparsity (it once left the family's, so a sampled group choice changed nothing); the others keep theirs."""
    arch = {"family": "transformer_lm", "vocab_size": 256, "context": 16, "d_model": 32,
            "layers": [{"n_heads": 2, "ffn_ratio": 2, "precision": "fp32", "sparsity": "dense"}] * 2,
            "engine": [{"group": "mlp", "modules": ["blocks.*.up", "blocks.*.down"], "precision": "int8",
                        "sparsity": "2:4"},
                       {"group": "first", "modules": ["blocks.0.*"], "precision": "bf16", "sparsity": "dense"}]}
    torch.manual_seed(0)
    model = build(arch)
    layers = {name: (m.precision, m.sparsity) for name, m in model.named_modules() if isinstance(m, EngineLinear)}
    assert layers == {"blocks.0.qkv": ("bf16", "dense"), "blocks.0.proj": ("bf16", "dense"),
                      "blocks.0.up": ("int8", "2:4"), "blocks.0.down": ("int8", "2:4"),  # the first group took them
                      "blocks.1.qkv": ("fp32", "dense"), "blocks.1.proj": ("fp32", "dense"),
                      "blocks.1.up": ("int8", "2:4"), "blocks.1.down": ("int8", "2:4")}
    assert model.blocks[1].up.mask is not None and model.blocks[1].up.act_amax is not None
    assert model.dsnas_left_alone == {}
    # The same architecture builds the same layers again, so saved weights load into it (export, dsnas.load).
    again = build(arch)
    again.load_state_dict(model.state_dict())
    assert model(torch.randint(0, 256, (2, 16))).shape == (2, 16, 256)


@pytest.mark.parametrize("down", ["fp32", "int8", "fp16"])
def test_a_group_may_give_up_and_down_different_precisions(down):
    """`up` in bf16 handed its bf16 output to an fp32 `down` once converted: every such trial failed with "mat1 and
    mat2 must have the same dtype", and an int8 `down` rounded its output to bf16."""
    from dsnas.kernels.convert import convert

    arch = {"family": "transformer_lm", "vocab_size": 256, "context": 16, "d_model": 32,
            "layers": [{"n_heads": 2, "ffn_ratio": 2, "precision": "fp32", "sparsity": "dense"}],
            "engine": [{"group": "up", "modules": ["blocks.*.up"], "precision": "bf16", "sparsity": "dense"},
                       {"group": "down", "modules": ["blocks.*.down"], "precision": down, "sparsity": "dense"}]}
    torch.manual_seed(0)
    model = build(arch).eval()
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        trained = model(x)
        if down == "int8":
            model.blocks[0].down.act_amax.fill_(4.0)  # as calibration sets it
        convert(model, int8_backend="int8-static" if down == "int8" else "auto")
        converted = model(x)
    assert model.blocks[0].inference_form == 1  # `up` casts back: `down` does not take bf16
    # the converted form computes as the training form did, to int8's rounding where `down` is int8
    assert (converted - trained).abs().max() <= (0.1 if down == "int8" else 0.0)


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "odd_models.py").write_text(textwrap.dedent("""
        from torch import nn

        def raises(arch):
            raise RuntimeError(f"width {arch['width']} is too wide")

        def not_a_module(arch):
            return "a model"

        def mlp(arch):
            return nn.Sequential(nn.Linear(4, arch["width"]), nn.ReLU(), nn.Linear(arch["width"], 2))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a_builder_that_raises_or_returns_no_module_fails_the_trial_with_the_reason(user_module):
    with pytest.raises(TrialError, match="the model builder odd_models:raises raised RuntimeError: width 8 is too"):
        build({"family": "odd_models:raises", "width": 8}, user_module)
    with pytest.raises(TrialError, match="returned a str, not a torch.nn.Module"):
        build({"family": "odd_models:not_a_module", "width": 8}, user_module)
    model = build({"family": "odd_models:mlp", "width": 8, "engine": [
        {"group": "first", "modules": ["0"], "precision": "bf16", "sparsity": "dense"}]}, user_module)
    assert isinstance(model[0], EngineLinear) and type(model[2]) is nn.Linear
    # No describe() beside the builder: the sampled choices, and the engine's.
    assert describe({"family": "odd_models:mlp", "width": 8, "n_in": 4, "engine": [
        {"group": "first", "modules": ["0"], "precision": "bf16", "sparsity": "dense"}]}, ("n_in",)) == \
        "width=8 first=bf16"


def test_a_key_the_users_validate_reads_that_the_space_lacks_is_named_as_missing(user_module):
    """A space without a key its validate() reads failed every trial with "invalid architecture: kernel"."""
    from dsnas.models import validate

    (user_module / "checked_models.py").write_text(textwrap.dedent("""
        def build(arch):
            raise AssertionError("validate() comes first")

        ACTS = {"relu": 0}

        def validate(arch):
            if arch["kernel"] % 2 == 0:
                raise ValueError("kernel must be odd")
            ACTS[arch.get("act", "relu")]
    """))
    with pytest.raises(TrialError, match=r"invalid architecture: it has no key 'kernel' \(add it to the space's "
                                         r"\[choices\]"):
        validate({"family": "checked_models:build", "width": 8}, user_module)
    with pytest.raises(TrialError, match="invalid architecture: ValueError: kernel must be odd"):
        validate({"family": "checked_models:build", "width": 8, "kernel": 4}, user_module)
    # A value looked up (act = "swish" where the builder knows relu) is not a missing key of the architecture.
    with pytest.raises(TrialError, match="invalid architecture: KeyError: 'swish'$"):
        validate({"family": "checked_models:build", "width": 8, "kernel": 3, "act": "swish"}, user_module)


def test_a_builder_that_cannot_be_imported_stops_the_study_before_any_work(tmp_path: Path):
    (tmp_path / "space.toml").write_text('family = "no_such_module_here:build"\n[choices]\nwidth = [8]\n')
    (tmp_path / "study.toml").write_text('[space]\nfile = "space.toml"\n[budget]\nn_trials = 1\n'
                                         '[executor]\nkind = "local"\n')
    with pytest.raises(SpecError) as caught:
        load_study(tmp_path / "study.toml")
    text = str(caught.value)
    assert text.startswith(f"{tmp_path / 'study.toml'}: [family (in {tmp_path / 'space.toml'})] must name an "
                           "importable callable (ModuleNotFoundError")
    assert "\n" not in text


def test_a_choice_named_as_a_key_the_task_fixes_is_refused_before_any_work(user_module: Path):
    """[choices] context = [32, 64, 128] under charlm: the task's context 16 went into every architecture, the
    choices collapsed to one without a word, and the search stopped on "the space is (nearly) exhausted"."""
    (user_module / "space.toml").write_text('family = "odd_models:mlp"\n[choices]\nwidth = [8, 16]\n'
                                            "context = [32, 64, 128]\n")
    (user_module / "study.toml").write_text('[space]\nfile = "space.toml"\n[task]\nname = "charlm"\ncontext = 16\n'
                                            '[budget]\nn_trials = 1\n[executor]\nkind = "local"\n')
    with pytest.raises(SpecError) as caught:
        load_study(user_module / "study.toml")
    text = str(caught.value)
    assert text.startswith(f"{user_module / 'space.toml'}: [choices.context] is fixed by the task 'charlm'"), text
    assert "Fix: remove [choices] context and set it in the study file's [task]" in text and "\n" not in text


def test_measure_any_model_counts_its_work_and_times_it_with_the_trial_protocol():
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10))
    report = dsnas.measure(model, torch.randn(3, 256), device="cpu", batch_sizes=(1, 8), threads=1,
                           measure_s=0.05, max_measure_s=0.5)
    m = report.metrics
    per_row = 2 * (256 * 512 + 512 * 10)  # two multiply-adds' worth per weight, per input row
    assert m["flops_bs1"] == per_row and m["flops_bs8"] == 8 * per_row
    assert m["params"] == 256 * 512 + 512 + 512 * 10 + 10
    assert m["throughput_tok_s"] == pytest.approx(8 * 1000 / m["latency_ms_bs8"], rel=1e-6)
    assert report.profile["batches"]["8"]["repeats"] >= 10 and report.profile["threads"] == 1
    assert model.training  # measured in eval mode, handed back in training mode as it came
    assert f"profile of Sequential ({int(m['params'])} parameters)" in str(report)
    with pytest.raises(dsnas.DsnasError, match="example_input must be a tensor"):
        dsnas.measure(model, [1, 2], device="cpu")
    # Each module's own mode: a frozen part of a model in training, a dropout kept on in one in eval (MC dropout).
    model[0].eval()
    dsnas.measure(model, torch.randn(3, 256), device="cpu", batch_sizes=(1,), measure_s=0.02, max_measure_s=0.2)
    assert [module.training for module in model.modules()] == [True, False, True, True]
    with pytest.raises(dsnas.DsnasError, match="model: must be a torch.nn.Module, got function"):
        dsnas.measure(lambda x: x, torch.randn(3, 256), device="cpu")
    with pytest.raises(dsnas.DsnasError, match="example_input must be a tensor whose first dimension is the batch, "
                                               "of one row or more"):
        dsnas.measure(model, torch.randn(0, 256), device="cpu")
    # One example without its batch dimension, which the model itself takes: cut into rows of one number, it ended
    # in torch's traceback. One line, and the modes handed back as they came.
    with pytest.raises(dsnas.DsnasError) as caught:
        dsnas.measure(model, torch.randn(256), device="cpu")
    text = str(caught.value)
    assert text.startswith("dsnas.measure: the model failed on a batch of 1 rows of example_input ((1,): "
                           "RuntimeError: ") and "takes the example (256,) whole" in text, text
    assert "x.unsqueeze(0) for a single example" in text
    assert [module.training for module in model.modules()] == [True, False, True, True]
    with pytest.raises(RuntimeError, match="dtype"):  # the model's own error, batched right: as it is, not advice
        dsnas.measure(model, torch.randn(3, 256, dtype=torch.float64), device="cpu")
    for sizes in ([1.0, 32.0], ["1", "32"], [True]):  # an IndexError and a TypeError deep inside, before
        with pytest.raises(dsnas.DsnasError, match=r"dsnas.measure batch_sizes: must be a non-empty list of integers"):
            dsnas.measure(model, torch.randn(3, 256), device="cpu", batch_sizes=sizes)


def test_measure_a_frozen_torchscript_model_which_has_no_mode():
    """torch.jit.freeze's module has no training attribute: reading each module's mode was an AttributeError."""
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    frozen = torch.jit.freeze(torch.jit.script(model))
    report = dsnas.measure(frozen, torch.randn(2, 16), device="cpu", batch_sizes=(1, 4), measure_s=0.02,
                           max_measure_s=0.1)
    assert report.metrics["flops_bs4"] == 4 * 2 * (16 * 32 + 32 * 4)


def test_a_frozen_torchscript_models_weights_are_its_parameters_at_their_dtype():
    """torch.jit.freeze turns parameters into graph constants: the model measured 0 parameters, a peak memory
    without its weights and, in bf16, the dtype float32."""
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 4)).eval().bfloat16()
    frozen = torch.jit.freeze(torch.jit.script(model))
    report = dsnas.measure(frozen, torch.randn(2, 64, dtype=torch.bfloat16), device="cpu", batch_sizes=(1,),
                           measure_s=0.02, max_measure_s=0.1)
    weights = 64 * 128 + 128 + 128 * 4 + 4
    assert report.metrics["params"] == weights and report.profile["dtype"] == "bfloat16"
    assert report.metrics["peak_memory_mb"] * 2**20 >= 2 * weights


def test_a_frozen_torchscript_model_counts_the_submodules_it_was_told_to_keep():
    """preserved_attrs keeps a submodule as a plain attribute whose weights parameters() does not list: a model
    frozen with one measured 4,160 of its 8,840 parameters (those of the part frozen into constants)."""
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(64, 64)
            self.kept = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))

        def forward(self, x):
            return self.kept(self.first(x))

    from dsnas.kernels.convert import inference_size

    model = Two().eval()
    weights = 2 * (64 * 64 + 64) + 64 * 8 + 8
    for preserved in (["kept"], ["kept", "first"]):
        frozen = torch.jit.freeze(torch.jit.script(model), preserved_attrs=preserved)
        assert inference_size(frozen) == (weights, 4 * weights), preserved
    assert inference_size(torch.jit.script(model)) == (weights, 4 * weights)  # parameters, each once


def test_measure_a_torch_export_module_which_refuses_eval_as_it_was_exported():
    """ExportedProgram.module() refuses eval() (NotImplementedError): dsnas.measure took that for the model failing
    on a batch and said its first dimension was not a batch. Its graph keeps the mode it was exported in."""
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 4)).eval()
    x = torch.randn(2, 16)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    protocol = {"device": "cpu", "batch_sizes": (1, 4), "measure_s": 0.02, "max_measure_s": 0.1}
    report = dsnas.measure(exported, x, **protocol)
    assert report.metrics["flops_bs4"] == 4 * 2 * (16 * 32 + 32 * 4)
    assert report.metrics["params"] == 16 * 32 + 32 + 32 * 4 + 4
    # Exported for 2 rows only: the error names that too, and the batch size it takes.
    fixed = torch.export.export(model, (x,)).module()
    with pytest.raises(dsnas.DsnasError) as caught:
        dsnas.measure(fixed, x, **protocol)
    assert "or the model takes batches of 2 rows only" in str(caught.value)
    assert "or batch_sizes=[2] (torch.export: export with a dynamic batch dimension" in str(caught.value)


def test_measure_of_a_batched_example_that_fails_at_one_batch_size_shows_the_models_error_not_advice():
    """A model whose squeeze() drops the batch of one row failed at batch size 1 and ran on the example of 4 rows:
    dsnas.measure said the example's first dimension was not a batch and to unsqueeze it, which it was."""

    class Squeezed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.log_softmax(self.fc(x).squeeze(), dim=1)

    with pytest.raises(IndexError, match="Dimension out of range"):  # the model's own error, as it is
        dsnas.measure(Squeezed(), torch.randn(4, 64), device="cpu")


def test_measure_a_model_of_several_inputs_given_as_a_tuple_a_dict_or_a_function():
    """forward(x, y) or forward(input_ids=..., mask=...) could not be measured: the batch went in as one argument."""

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(16, 32)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            assert x.shape[0] == mask.shape[0]
            return self.proj(x) * mask

    protocol = {"device": "cpu", "batch_sizes": (2, 8), "measure_s": 0.02, "max_measure_s": 0.1}
    for example in ((torch.randn(3, 16), torch.ones(3, 32)), {"x": torch.randn(3, 16), "mask": torch.ones(3, 32)},
                    lambda b: (torch.randn(b, 16), torch.ones(b, 32))):
        report = dsnas.measure(Two(), example, **protocol)
        assert report.metrics["flops_bs8"] == 8 * 2 * 16 * 32  # the rows of every input repeated to the batch size
        assert report.what == "Two (544 parameters)"
    # Compiled, it is said compiled and named as itself (the wrapper that unpacks the inputs hid torch.compile's
    # _orig_mod: "eager-fp32", "OptimizedModule"); dynamo's eager backend compiles in a second, as inductor would not.
    report = dsnas.measure(torch.compile(Two(), backend="eager"), example, **{**protocol, "batch_sizes": (8,)})
    assert report.profile["backend"] == "compiled-eager-fp32" and report.what == "Two (544 parameters)"
    assert report.metrics["flops_bs8"] == 8 * 2 * 16 * 32  # counted as its eager self


def test_a_model_that_diverged_or_returns_a_tuple_fails_its_trial_before_it_costs_more():
    """A user's task may train on through a nan loss: its model completed at a constant prediction's accuracy and
    exported. A model returning (logits, features) was measured and trained, then failed at the export probe with
    "'tuple' object has no attribute 'float'"."""
    from types import SimpleNamespace

    from dsnas.worker import _check_finite, _check_output

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    _check_finite(model)
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(TrialError, match=r"^training diverged: 1 weight tensor holds nan or inf after the task's "
                                         r"train\(\) \(first 2.weight\)$"):
        _check_finite(model)

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.body(x), x

    task = SimpleNamespace(example_batch=lambda n, device: torch.randn(n, 4))
    _check_output(nn.Linear(4, 2), task, "cpu", "odd_models:mlp")
    pair = Pair()
    with pytest.raises(TrialError, match=r"must return one tensor \(the logits\) for the task's example_batch, got a "
                                         r"tuple. Fix: return the logits only, in the model odd_models:pair builds"):
        _check_output(pair, task, "cpu", "odd_models:pair")
    assert pair.training  # left in the mode it was built in


def test_a_task_whose_example_batch_is_not_one_tensor_fails_its_trial_before_training():
    """A task of (x, mask) batches, with a model taking the pair, trained and measured its candidate, then failed the
    trial at the export probe with "'tuple' object has no attribute 'cpu'"."""
    from types import SimpleNamespace

    from dsnas.worker import _check_output

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 2)

        def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            x, mask = batch
            return self.body(x) * mask

    task = SimpleNamespace(example_batch=lambda n, device: (torch.randn(n, 4), torch.ones(n, 1)))
    with pytest.raises(TrialError, match=r"^the task's example_batch\(\) must return one tensor .* got a tuple. Fix: "
                                         r"return one tensor from it .* the model odd_models:masked builds take it$"):
        _check_output(Masked(), task, "cpu", "odd_models:masked")


def test_an_engine_choice_on_a_layer_the_forward_never_calls_fails_its_trial_before_training():
    """A forward calling F.linear(x, self.fc.weight, self.fc.bias) never runs fc: under an [engine] group that made
    it bf16, the trial reported "engine:bf16" and "ran as bf16" and counted its weight at bf16, where fp32 ran."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from dsnas.kernels.groups import apply_groups
    from dsnas.worker import _check_output

    class ReadsTheWeight(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(F.linear(x, self.fc.weight, self.fc.bias))

    task = SimpleNamespace(example_batch=lambda n, device: torch.randn(n, 4))
    model = ReadsTheWeight()
    apply_groups(model, [{"group": "body", "modules": ["*"], "precision": "bf16", "sparsity": "dense"}])
    with pytest.raises(TrialError, match=r"^the engine chose bf16 dense for fc, but the model's forward never calls "
                                         r"it .* Fix: call the module in the forward of the model own:m builds, or "
                                         r"leave it out of the \[engine\] group's modules$"):
        _check_output(model, task, "cpu", "own:m")
    assert model.training  # left in the mode it was built in
    called = ReadsTheWeight()
    apply_groups(called, [{"group": "body", "modules": ["out"], "precision": "bf16", "sparsity": "dense"}])
    _check_output(called, task, "cpu", "own:m")  # every engine layer runs


def test_an_optimized_for_inference_torchscript_model_counts_each_weight_once():
    """torch.jit.optimize_for_inference leaves each weight's original constant in the graph, unread, beside the
    transposed copy its matmul reads: the model measured twice its parameters and its weights' memory twice."""
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 4)).eval()
    optimized = torch.jit.optimize_for_inference(torch.jit.script(model))
    report = dsnas.measure(optimized, torch.randn(2, 64), device="cpu", batch_sizes=(1,), measure_s=0.02,
                           max_measure_s=0.1)
    assert report.metrics["params"] == 64 * 128 + 128 + 128 * 4 + 4


def test_measure_reports_which_backend_each_engine_layer_ran_and_why():
    """The whole profile said which backends ran (engine:bf16+fp32+int8:...), never which layer ran which, nor why
    a faster kernel did not: a trial's profile holds that per layer, dsnas.measure's and dsnas profile's did not."""
    from dsnas.kernels.convert import convert
    from dsnas.kernels.linear import EngineLinear, layer_report

    model = nn.Sequential(EngineLinear(64, 64, precision="bf16"), nn.ReLU(),
                          EngineLinear(64, 64, precision="int8", sparsity="2:4"), EngineLinear(64, 8))
    model[2].act_amax.fill_(4.0)
    model[2].mask.view(-1, 4)[:, :2] = False
    convert(model, int8_backend="torch-dynamic")
    report = dsnas.measure(model, torch.randn(2, 64), device="cpu", batch_sizes=(1,), measure_s=0.02,
                           max_measure_s=0.1)
    assert report.profile["engine"]["layers"] == layer_report(model)
    lines = [line for line in str(report).splitlines() if line.startswith("engine: ")]
    assert lines == ["engine: bf16 dense ran as bf16: 0",
                     "engine: int8 2:4 ran as int8:torch-dynamic: 2; 2:4 zeros computed densely: the INT8 kernels "
                     "here are dense; requested by name; the others were not measured",
                     "engine: fp32 dense ran as fp32: 3"]
    plain = dsnas.measure(nn.Linear(4, 4), torch.randn(2, 4), device="cpu", batch_sizes=(1,), measure_s=0.02,
                          max_measure_s=0.1)
    assert "engine" not in plain.profile and "engine: " not in str(plain)
