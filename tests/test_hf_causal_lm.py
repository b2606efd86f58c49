"""The hf_causal_lm family: transformers Llama / Qwen2 models built from a config, their sizes as asked, their
parameter count as computed by hand, saved for transformers to load, and trained by the charlm task."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

import optuna  # noqa: E402
import torch  # noqa: E402

import dsnas.models  # noqa: E402
import dsnas.space  # noqa: E402
from dsnas.errors import Invalid, SpecError, TrialError  # noqa: E402
from dsnas.models import hf_causal_lm  # noqa: E402
from dsnas.space import load_space_file  # noqa: E402
from dsnas.tasks.charlm import CharLMConfig, CharLMTask  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "search_spaces" / "hf_causal_lm.toml"
TASK = {"vocab_size": 256, "context": 16}
# hidden 32 = 4 heads of 8; 2 key/value heads of 8 (GQA groups of 2); a gated MLP of 48; two layers.
ARCH = {"family": "hf_causal_lm", "architecture": "llama", "hidden_size": 32, "n_heads": 4, "n_kv_heads": 2,
        "intermediate_size": 48, "layers": [{}, {}], **TASK}


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The family as dsnas.models.FAMILIES will list it (until it is registered there)."""
    if "hf_causal_lm" not in dsnas.models.FAMILIES:
        families = (*dsnas.models.FAMILIES, "hf_causal_lm")
        monkeypatch.setattr(dsnas.models, "FAMILIES", families)
        monkeypatch.setattr(dsnas.space, "FAMILIES", families)


def _build(**change: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return hf_causal_lm.build({**ARCH, **change})


@pytest.mark.parametrize("architecture", hf_causal_lm.ARCHITECTURES)
def test_logits_are_batch_time_vocab(architecture):
    model = _build(architecture=architecture)
    assert model.hf.config.model_type == architecture
    logits = model(torch.randint(0, 256, (3, 16)))
    assert logits.shape == (3, 16, 256) and logits.dtype == torch.float32


def test_parameter_count_is_the_hand_computed_one():
    v, h, a, kv, i, n = 256, 32, 4, 2, 48, 2
    head = h // a
    attention = h * a * head + 2 * h * kv * head + a * head * h  # q, k and v (GQA: kv heads), o
    mlp = 3 * h * i  # gate, up, down
    per_layer = attention + mlp + 2 * h  # two RMSNorm weights
    llama = v * h + n * per_layer + h  # embeddings tied with the head; the final RMSNorm
    assert llama == 23712
    model = _build()
    assert model.hf.lm_head.weight is model.hf.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == llama
    qwen2 = llama + n * (a * head + 2 * kv * head)  # Qwen2: biases on q, k and v
    assert sum(p.numel() for p in _build(architecture="qwen2").parameters()) == qwen2


@pytest.mark.parametrize("architecture", hf_causal_lm.ARCHITECTURES)
def test_sizes_are_honored(architecture):
    model = _build(architecture=architecture, hidden_size=64, n_kv_heads=1, intermediate_size=40, layers=[{}] * 3)
    layers = model.hf.model.layers
    assert len(layers) == 3
    attn, mlp = layers[0].self_attn, layers[0].mlp
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (64, 16, 16)
    assert (mlp.gate_proj.out_features, mlp.down_proj.in_features) == (40, 40)
    assert model.hf.config.max_position_embeddings == 16 and model.hf.config.vocab_size == 256
    assert model.hf.config._attn_implementation == "sdpa"


def test_outputs_do_not_depend_on_future_tokens():
    model = _build().eval()
    x = torch.randint(0, 256, (2, 16))
    y = x.clone()
    y[:, 10:] = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize(("options", "key", "rule"), [
    ({"hidden_size": (64, 62), "n_heads": (4,)}, "hidden_size", "divisible by every n_heads choice \\(62 % 4 != 0\\)"),
    ({"hidden_size": (24,), "n_heads": (8,)}, "hidden_size", "even width.*24 / 8 = 3"),
    ({"n_heads": (4, 6), "n_kv_heads": (2, 4)}, "n_kv_heads", "\\(6 % 4 != 0\\)"),
    ({"hidden_size": (64,), "sparsity": ("dense",)}, "sparsity", "by module name"),
])
def test_check_choices_rejects_what_cannot_build(options, key, rule):
    with pytest.raises(Invalid, match=rule) as caught:
        hf_causal_lm.check_choices(options)
    assert caught.value.key == key


def test_a_space_file_error_names_the_key(tmp_path, registered):
    text = SHIPPED.read_text().replace("n_kv_heads = [1, 2, 4]", "n_kv_heads = [3]")
    (tmp_path / "space.toml").write_text(text)
    with pytest.raises(SpecError, match="\\[choices.n_kv_heads\\] every n_heads choice must be divisible"):
        load_space_file(tmp_path / "space.toml")


@pytest.mark.parametrize(("change", "message"), [
    ({"hidden_size": 30}, "\\[hidden_size\\] every hidden_size choice must be divisible"),
    ({"n_kv_heads": 3}, "\\[n_kv_heads\\]"),
    ({"architecture": "gpt2"}, "\\[architecture\\] must be one of \\['llama', 'qwen2'\\]"),
    ({"layers": []}, "needs at least one layer"),
    ({"layers": [{"n_heads": 2}]}, "\\[layers\\[0\\]\\] must be empty"),
    ({"intermediate_size": 0}, "\\[intermediate_size\\] must be an integer >= 1"),
])
def test_invalid_architectures_are_trial_errors(registered, change, message):
    with pytest.raises(TrialError, match=message):
        dsnas.models.validate({**ARCH, **change})


def test_describe():
    arch = {**ARCH, "hidden_size": 128, "intermediate_size": 344}
    assert hf_causal_lm.describe(arch) == "llama h128 L2 a4/kv2 i344"


def test_linear_widths_are_the_projections_and_the_widest_mlp():
    options = {"hidden_size": (64, 128), "intermediate_size": (128, 344)}
    assert hf_causal_lm.linear_widths(options) == [(64, 64), (128, 128), (64, 344), (128, 344)]


def test_every_combination_of_the_shipped_space_is_valid(registered):
    space = load_space_file(SHIPPED)
    assert space.family == "hf_causal_lm" and space.per_layer == {}
    keys = list(space.choices)
    combos = list(itertools.product(*space.choices.values()))
    assert len(combos) == 2 * 2 * 2 * 1 * 3 * 3
    for values in combos:
        arch = dict(zip(keys, values))
        arch["layers"] = [{}] * arch.pop("n_layers")
        hf_causal_lm.validate({**arch, **TASK})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(3):
        arch = {**space.sample(study.ask()), **TASK}
        assert arch["layers"] and all(layer == {} for layer in arch["layers"])
        model = dsnas.models.build(arch)
        assert len(model.hf.model.layers) == len(arch["layers"])
        assert model(torch.zeros(1, 16, dtype=torch.long)).shape == (1, 16, 256)


@pytest.mark.parametrize("architecture", hf_causal_lm.ARCHITECTURES)
def test_save_pretrained_loads_in_transformers_with_the_same_logits(tmp_path, architecture):
    model = _build(architecture=architecture).eval()
    hf_causal_lm.save_pretrained(model, tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))  # no pickle
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.model_type == architecture and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model(x))
    # Saved for deployment with its KV cache on (generate() fed the whole prefix again at each step without it);
    # the model in hand keeps training's setting.
    assert loaded.config.use_cache and loaded.generation_config.use_cache and not model.hf.config.use_cache


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_hf_export_of_a_model_with_an_engine_group(tmp_path, precision):
    """A group that left every layer fp32 dense changes nothing transformers builds: hf/ was refused for it."""
    from dsnas.export.bundle import _save_pretrained
    from dsnas.kernels.convert import untrained_inference_form
    from dsnas.models import build, describe

    arch = {**ARCH, "engine": [{"group": "mlp", "modules": ["hf.model.layers.*.mlp.*"], "precision": precision,
                                "sparsity": "dense"}]}
    assert describe(arch) == f"llama h32 L2 a4/kv2 i48 mlp={precision}"  # the group's choice is in the name
    torch.manual_seed(0)
    model = untrained_inference_form(build(arch).eval())
    said = _save_pretrained(model, tmp_path / "hf")
    if precision == "bf16":
        assert said.startswith("unavailable: engine layers (hf.model.layers.0.mlp.down_proj, ") and \
            not (tmp_path / "hf").exists()
        return
    assert said == "hf/"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(loaded[1].values()), loaded[1]  # every weight it expected, nothing it did not
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded[0].eval()(input_ids=x).logits, model(x))


def test_2_4_on_the_tied_lm_head_is_left_alone_with_the_reason():
    """lm_head shares the token table: pruning it in place zeroed half of the input embedding, unsaid."""
    from dsnas.models import build

    arch = {**ARCH, "engine": [{"group": "head", "modules": ["hf.lm_head"], "precision": "fp32", "sparsity": "2:4"},
                               {"group": "mlp", "modules": ["hf.model.layers.*.mlp.*"], "precision": "fp32",
                                "sparsity": "2:4"}]}
    with pytest.raises(TrialError, match="engine group 'head' decides no layer: hf.lm_head: 2:4 sparsity on a "
                                         "weight tied to hf.model.embed_tokens's would zero half of"):
        build(arch)  # the trial fails saying why, as a group that decides nothing does
    arch["engine"][0]["sparsity"] = "dense"  # the head at fp32 dense (a choice it may also take) decides it
    model = build(arch)
    assert model.hf.lm_head.weight is model.hf.model.embed_tokens.weight and not model.dsnas_left_alone


def test_save_pretrained_refuses_another_family(tmp_path):
    with pytest.raises(Exception, match="takes a model of the hf_causal_lm family, not a Linear"):
        hf_causal_lm.save_pretrained(torch.nn.Linear(2, 2), tmp_path)


def test_charlm_training_learns():
    task = CharLMTask(CharLMConfig(corpus_bytes=200_000, train_tokens=20_000, context=32, batch_size=16), ".")
    model = _build(hidden_size=64, n_kv_heads=2, intermediate_size=128, **task.arch_defaults())
    before = task.evaluate(model, torch.device("cpu"))
    trained = task.train(model, torch.device("cpu"), seed=0, checkpoint=lambda: None)
    after = task.evaluate(model, torch.device("cpu"))
    assert trained["train_steps"] == 20_000 // (16 * 32)
    assert before["val_loss"] > 5.0  # about ln 256: untrained
    assert after["val_loss"] < before["val_loss"] - 1.5  # about 5.4 -> 2.7
    # Chance is 1/256, but with tied embeddings an untrained model predicts its input byte again, right about 30% of
    # the time in indented Python source: training must beat that copy, not chance (about 0.30 -> 0.39).
    assert after["accuracy"] > before["accuracy"] + 0.05


def test_a_missing_transformers_is_a_trial_error_with_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(TrialError, match='needs the transformers package: pip install "dsnas\\[hf\\]"'):
        hf_causal_lm.build(ARCH)
    hf_causal_lm.validate(ARCH)  # checking an architecture needs no transformers


def test_importing_the_family_does_not_import_transformers():
    code = "import sys, dsnas.models.hf_causal_lm; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_hf_study_searches_exports_and_transformers_loads_the_winner(tmp_path):
    """The family end to end: a 2-trial study on the byte-level task, the better trial exported, and the
    save_pretrained folder loaded by transformers itself gives the logits the search recorded for it."""
    from transformers import AutoModelForCausalLM

    from dsnas.cli import main
    from dsnas.export import read_probe
    from tests.conftest import TINY_STUDY

    space = tmp_path / "hf_space.toml"
    space.write_text((REPO / "search_spaces" / "hf_causal_lm.toml").read_text()
                     .replace("n_layers = [1, 2]", "n_layers = [1]").replace("hidden_size = [64, 128]", "hidden_size = [64]"))
    study = tmp_path / "hf.toml"
    study.write_text(TINY_STUDY.format(space=space).replace("n_trials = 3", "n_trials = 2"))
    assert main(["search", str(study)]) == 0
    assert main(["export", str(study), "--pick", "max-accuracy", "--out", str(tmp_path / "b")]) == 0
    probe = read_probe(tmp_path / "b")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "hf").eval()
    with torch.inference_mode():
        logits = model(input_ids=probe["input"]).logits
    assert torch.allclose(logits, probe["logits"], atol=1e-4)


def test_a_per_layer_table_in_an_hf_space_says_to_use_engine_groups(tmp_path):
    """It said '[per_layer.precision] is not a known key. Fix: known keys: ' with nothing after it."""
    from dsnas.errors import SpecError
    from dsnas.space import load_space_file

    space = tmp_path / "space.toml"
    space.write_text((REPO / "search_spaces" / "hf_causal_lm.toml").read_text() +
                     '\n[per_layer]\nprecision = ["fp32", "bf16"]\n')
    with pytest.raises(SpecError, match=r"\[per_layer\] the hf_causal_lm family has no per-layer choices.*Fix: remove "
                                        r"\[per_layer\]; choose the engine by module name in \[engine.NAME\] tables"):
        load_space_file(space)


def test_a_study_of_the_family_without_transformers_stops_before_any_work(tmp_path, monkeypatch, capsys):
    """It started the search (the Ray executor starts Ray first), and every trial failed saying to install
    transformers, each stored in the study as a failed trial."""
    from dsnas.cli import main
    from tests.conftest import TINY_STUDY

    space = tmp_path / "hf_space.toml"
    space.write_text(SHIPPED.read_text(encoding="utf-8"), encoding="utf-8")
    study = tmp_path / "hf.toml"
    study.write_text(TINY_STUDY.format(space=space), encoding="utf-8")
    monkeypatch.setitem(sys.modules, "transformers", None)  # as where it is not installed: find_spec says None
    assert main(["search", str(study)]) == 2
    assert f"{space}: [family] the hf_causal_lm family needs the transformers package, which is not installed, but " \
           "got 'hf_causal_lm'. Fix: pip install \"dsnas[hf]\"" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.db"))  # no study was made


def test_loading_a_bundle_without_transformers_says_to_install_it(tmp_path, monkeypatch):
    """dsnas.load, verify, profile and export said the bundle's [arch] was not a buildable architecture, with the fix
    to export the trial again (which failed the same way)."""
    import json

    import dsnas
    from dsnas.errors import DsnasError

    (tmp_path / "arch.json").write_text(json.dumps({"_type": "dsnas.bundle", "_version": 2, "arch": ARCH}),
                                        encoding="utf-8")
    monkeypatch.setitem(sys.modules, "transformers", None)  # as where it is not installed
    with pytest.raises(DsnasError) as caught:
        dsnas.load(tmp_path)
    assert str(caught.value) == f"{tmp_path / 'arch.json'}: the hf_causal_lm family needs the transformers package, " \
                                'which is not installed. Fix: pip install "dsnas[hf]"'


def test_engine_auto_in_an_hf_space_is_named_as_written(tmp_path, registered):
    """It read "[per_layer.precision] ..., but got ['fp32']": a key and a value the file does not have."""
    space = tmp_path / "space.toml"
    space.write_text('engine = "auto"\n' + SHIPPED.read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(SpecError, match=r"space.toml: \[engine\] the hf_causal_lm family takes the engine by module "
                                        r"name, not per layer \(engine = \"auto\"\), but got 'auto'. Fix: remove"):
        load_space_file(space)


def test_a_failed_save_pretrained_leaves_no_hf_folder(tmp_path, monkeypatch):
    """What transformers wrote before failing (config.json and generation_config.json, no weights) stayed in the
    bundle as hf/, which metrics.json called unavailable and from_pretrained refused."""
    from dsnas.export.bundle import _save_pretrained

    def fails_after_the_config(model, folder):
        model.hf.config.save_pretrained(str(folder))
        raise RuntimeError("cannot save the weights")

    monkeypatch.setattr(hf_causal_lm, "save_pretrained", fails_after_the_config)
    said = _save_pretrained(_build().eval(), tmp_path / "hf")
    assert said == "unavailable: save_pretrained failed (RuntimeError: cannot save the weights)"
    assert not (tmp_path / "hf").exists()
