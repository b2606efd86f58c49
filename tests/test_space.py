"""Search-space files: validation errors (SpecError naming the space file, the key, the rule and a fix),
and how a SearchSpace turns an Optuna trial into an architecture."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
from conftest import check_message
from optuna.trial import FixedTrial

from dsnas.errors import SpecError
from dsnas.models import validate
from dsnas.space import SearchSpace, load_space_file

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "search_spaces" / "transformer_lm.toml"

VALID = """\
family = "transformer_lm"

[choices]
n_layers = [1, 2, 3, 4]
d_model = [32, 64]

[per_layer]
n_heads = [1, 2, 4]
ffn_ratio = [1, 2, 4]
"""


def write_space(folder: Path, text: str) -> Path:
    path = folder / "space.toml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- validation

# (id, file text, key, rule, fix or None where dsnas gives none today)
CASES: list[tuple[str, str, str, str, str | None]] = [
    ("unknown-family", VALID.replace('"transformer_lm"', '"resnet"'), "family",
     "must be one of ['transformer_lm', 'cnn', 'hf_causal_lm'] or a model builder \"module:callable\", but got 'resnet'",
     'family = "transformer_lm"'),
    ("missing-family", VALID.replace('family = "transformer_lm"', ""), "family",
     "must be one of ['transformer_lm', 'cnn', 'hf_causal_lm'] or a model builder", 'family = "transformer_lm"'),
    ("user-family-per-layer", VALID.replace('"transformer_lm"', '"my_model:build"'), "per_layer",
     "is for the built-in families", "put the choices under [choices]"),
    ("engine-group-no-modules", VALID + '[engine.mlp]\nprecision = ["fp32"]\n', "engine.mlp.modules",
     "must be a module-name pattern or a non-empty list of them", "modules = "),
    ("engine-group-bad-precision", VALID + '[engine.mlp]\nmodules = "b.*"\nprecision = ["fp64"]\n',
     "engine.mlp.precision", "must be one or a list (without repeats) of ['fp32'", 'precision = ["fp32", "bf16"]'),
    ("engine-group-unknown-key", VALID + '[engine.mlp]\nmodules = "b.*"\nprecisions = ["fp32"]\n',
     "engine.mlp.precisions", "is not a known key", "did you mean 'precision'?"),
    ("unknown-top-level-key", "layers = 3\n" + VALID, "layers", "is not a known key", "did you mean 'per_layer'?"),
    ("unknown-choice-key", VALID.replace("n_layers =", "n_layer ="), "choices.n_layer",
     "is not a known key", "did you mean 'n_layers'?"),
    ("arch-key-under-per_layer", VALID.replace("ffn_ratio = [1, 2, 4]", "ffn_ratio = [1, 2, 4]\nd_model = [32]"),
     "per_layer.d_model", "is not a known key", "known keys: n_heads, ffn_ratio"),
    ("choices-not-a-table", 'family = "transformer_lm"\nchoices = [1]\n', "choices", "must be a table",
     "write it as [choices]"),
    ("float-in-list", VALID.replace("n_layers = [1, 2, 3, 4]", "n_layers = [1, 2.5]"), "choices.n_layers",
     "must be an integer >= 1 or a non-empty list of them, but got [1, 2.5]", "n_layers = [1, 2, 4]"),
    ("string-choice", VALID.replace("d_model = [32, 64]", 'd_model = "64"'), "choices.d_model",
     "must be an integer >= 1 or a non-empty list of them", "d_model = [1, 2, 4]"),
    ("bool-choice", VALID.replace("ffn_ratio = [1, 2, 4]", "ffn_ratio = [true]"), "per_layer.ffn_ratio",
     "must be an integer >= 1 or a non-empty list of them", "ffn_ratio = [1, 2, 4]"),
    ("empty-list", VALID.replace("n_heads = [1, 2, 4]", "n_heads = []"), "per_layer.n_heads",
     "must be an integer >= 1 or a non-empty list of them, but got []", "n_heads = [1, 2, 4]"),
    ("zero-choice", VALID.replace("n_layers = [1, 2, 3, 4]", "n_layers = [0, 1]"), "choices.n_layers",
     "must be an integer >= 1", "n_layers = [1, 2, 4]"),
    ("d_model-not-divisible", VALID.replace("d_model = [32, 64]", "d_model = [30, 64]"), "choices.d_model",
     "every d_model choice must be divisible by every n_heads choice (30 % 4 != 0)", "multiples of the largest"),
    ("d_model-not-divisible-shared", VALID.replace("d_model = [32, 64]", "d_model = 32\nn_heads = 3")
     .replace("n_heads = [1, 2, 4]\n", ""), "choices.d_model", "(32 % 3 != 0)", "multiples of the largest n_heads"),
    ("layer-key-in-both", VALID.replace("d_model = [32, 64]", "d_model = [32, 64]\nn_heads = 2"), "n_heads",
     "must be given once: under [choices] (shared by all layers) or under [per_layer]",
     "add n_heads = [...] to exactly one of them"),
    ("layer-key-in-neither", VALID.replace("ffn_ratio = [1, 2, 4]\n", ""), "ffn_ratio", "must be given once",
     "add ffn_ratio = [...] to exactly one of them"),
    ("missing-d_model", VALID.replace("d_model = [32, 64]\n", ""), "choices.d_model", "is required",
     "add d_model = [...] under [choices]"),
    ("missing-n_layers", VALID.replace("n_layers = [1, 2, 3, 4]\n", ""), "choices.n_layers", "is required",
     "add n_layers = [...] under [choices]"),
    ("invalid-toml", "family = \n", "-", "must be a readable TOML file (", "the TOML syntax"),
    ("unknown-precision", VALID + 'precision = ["fp32", "int4"]\n', "per_layer.precision",
     "must be one or a non-empty list of ['fp32', 'bf16', 'fp16', 'int8', 'fp8'], but got ['fp32', 'int4']",
     'precision = ["fp32", "bf16"]'),
    ("repeated-sparsity", VALID + 'sparsity = ["2:4", "2:4"]\n', "per_layer.sparsity", "must not repeat a choice",
     'write each choice once: ["2:4"]'),
    ("precision-in-both", VALID.replace("d_model = [32, 64]", 'd_model = [32, 64]\nprecision = "bf16"')
     + 'precision = ["fp32"]\n', "precision", "must be given once", "add precision = [...] to exactly one of them"),
    ("auto-precision-not-alone", VALID + 'precision = ["auto", "int8"]\n', "per_layer.precision",
     '"auto" must stand alone', 'write precision = "auto"'),
    ("engine-not-auto", 'engine = "fast"\n' + VALID, "engine", 'must be "auto"', 'set engine = "auto"'),
    ("engine-auto-and-precision", 'engine = "auto"\n' + VALID + 'precision = ["fp32", "bf16"]\n', "engine",
     '= "auto" decides precision itself', 'remove precision, or remove engine = "auto"'),
    # A repeat is drawn more often (n_layers = [1, 1, 1, 2] drew 1 three times in four), as elsewhere refused.
    ("repeated-integer", VALID.replace("n_layers = [1, 2, 3, 4]", "n_layers = [1, 1, 2]"), "choices.n_layers",
     "must not repeat a choice", "write each choice once: [1, 2]"),
    # layer0.precision is layer 0's own parameter: the group and the layer shared one (or Optuna refused both).
    ("engine-group-named-as-a-layer", VALID + '[engine.layer0]\nmodules = "blocks.0.*"\nprecision = ["fp32", "bf16"]\n',
     "engine.layer0", "the group's name is that of a layer's parameters", "[engine.layer0_group]"),
    # 3.0 == 3 passed the check and failed every trial in torch.
    ("float-kernel", 'family = "cnn"\n[choices]\nstem_width = 8\n[per_layer]\ndepth = 1\nwidth = 8\nexpand = 1\n'
     "kernel = [3.0, 5.0]\n", "per_layer.kernel", "must be one or a non-empty list of [3, 5, 7]", "kernel = [3, 5]"),
    ("user-choice-named-family", 'family = "my_model:build"\n[choices]\nfamily = ["mlp", "conv"]\n', "choices.family",
     "is a name dsnas writes into every architecture", "model_family"),
    ("user-choice-named-engine", 'family = "my_model:build"\n[choices]\nengine = ["eager"]\n', "choices.engine",
     "is a name dsnas writes into every architecture", "model_engine"),
    ("user-choice-true-and-1", 'family = "my_model:build"\n[choices]\nflag = [1, true]\n', "choices.flag",
     "must not repeat a choice (1, 1.0 and true are one choice to Optuna)", "write each choice once"),
    ("sparse-d_model-not-divisible-by-4", VALID.replace("d_model = [32, 64]", "d_model = [34]")
     .replace("n_heads = [1, 2, 4]", "n_heads = [1, 2]") + 'sparsity = ["dense", "2:4"]\n', "choices.d_model",
     "2:4 sparsity needs every d_model divisible by 4", "use multiples of 4"),
]


@pytest.mark.parametrize(("text", "key", "rule", "fix"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_space_error(tmp_path: Path, text: str, key: str, rule: str, fix: str | None) -> None:
    path = write_space(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_space_file(path)
    check_message(info.value, path, key, rule, fix)


def test_a_user_familys_group_may_be_named_as_a_resnet_stage(tmp_path: Path) -> None:
    """A user family has no per-layer parameters to share a name with: [engine.layer4] (torchvision's ResNet
    stages) is its own, and was refused with the built-in families' rule."""
    space = load_space_file(write_space(tmp_path, 'family = "mynet:build"\n[choices]\nwidth = [8]\n'
                                                  '[engine.layer4]\nmodules = ["layer4.*"]\nprecision = ["fp32", "bf16"]\n'))
    assert [g.name for g in space.groups] == ["layer4"]


def test_missing_space_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(SpecError) as info:
        load_space_file(path)
    check_message(info.value, path, "-", "must be a readable TOML file (")


@pytest.mark.parametrize("text", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_space_error_message_names_a_fix(tmp_path: Path, text: str) -> None:
    with pytest.raises(SpecError) as info:
        load_space_file(write_space(tmp_path, text))
    assert ". Fix: " in str(info.value)


# ---------------------------------------------------------------- sampling


def test_valid_space_loads(tmp_path: Path) -> None:
    space = load_space_file(write_space(tmp_path, VALID))
    assert space == SearchSpace(family="transformer_lm", choices={"n_layers": (1, 2, 3, 4), "d_model": (32, 64)},
                                per_layer={"n_heads": (1, 2, 4), "ffn_ratio": (1, 2, 4)})


def test_sample_fixed_trial_gives_one_entry_per_layer(tmp_path: Path) -> None:
    space = load_space_file(write_space(tmp_path, VALID))
    params = {"n_layers": 3, "d_model": 64,
              "layer0.n_heads": 1, "layer0.ffn_ratio": 4,
              "layer1.n_heads": 2, "layer1.ffn_ratio": 1,
              "layer2.n_heads": 4, "layer2.ffn_ratio": 2}
    arch = space.sample(FixedTrial(params))
    assert arch == {"family": "transformer_lm", "d_model": 64,
                    "layers": [{"n_heads": 1, "ffn_ratio": 4}, {"n_heads": 2, "ffn_ratio": 1},
                               {"n_heads": 4, "ffn_ratio": 2}]}
    validate({**arch, "vocab_size": 256, "context": 64})  # the family can build what the space samples


def test_parameters_used_and_arch_of_say_what_a_sampler_of_whole_architectures_needs(tmp_path: Path) -> None:
    """dsnas's sampler proposes every parameter at once: a per-layer key for each layer of the deepest model, of
    which an architecture uses those of its own layers; arch_of builds what sample would from the same answers."""
    space = load_space_file(write_space(tmp_path, VALID))
    parameters = space.parameters()
    assert parameters == {"n_layers": (1, 2, 3, 4), "d_model": (32, 64),
                          **{f"layer{i}.{k}": (1, 2, 4) for i in range(4) for k in ("n_heads", "ffn_ratio")}}
    params = {name: options[-1] for name, options in parameters.items()} | {"n_layers": 2}
    used = space.used(params)
    assert sorted(used) == ["d_model", "layer0.ffn_ratio", "layer0.n_heads", "layer1.ffn_ratio", "layer1.n_heads",
                            "n_layers"]
    assert space.arch_of(params) == space.sample(FixedTrial(used))


def asked_afresh(space, params):
    """What ``used`` says, found by a sampling pass of its own (no names remembered from earlier calls)."""
    from dsnas.space import _Answers

    asked = _Answers(params, record=True)
    space.sample(asked)
    return {name: params[name] for name in asked.asked if name in params}


@pytest.mark.parametrize("name", ["transformer_lm", "transformer_lm_wide", "transformer_lm_gpu", "cnn", "by width",
                                  "sparse beside bf16"])
def test_used_names_remembered_per_depth_and_width_are_those_a_fresh_pass_asks(tmp_path: Path, name: str) -> None:
    """``used`` finds the names once per combination of model-wide choices (dsnas's sampler calls it ~20,000 times
    a proposal); on random candidates, some missing parameters, it says what a fresh sampling pass says."""
    import random

    if name == "by width":
        space = load_space_file(write_space(tmp_path, 'engine = "auto"\n' + VALID.replace("[32, 64]", "[32, 64, 96]")))
        space = space.resolved(("fp32", "bf16", "int8"), ("dense",), {
            "32": {"precision": ["fp32"], "sparsity": ["dense"]},
            "64": {"precision": ["fp32", "bf16"], "sparsity": ["dense"]}})
    elif name == "sparse beside bf16":  # the names asked depend on each layer's precision too
        space = load_space_file(REPO / "search_spaces" / "transformer_lm_gpu.toml")
        space = space.resolved(("fp32", "bf16", "int8"), ("dense", "2:4"), sparse_with=("bf16",))
    else:
        space = load_space_file(REPO / "search_spaces" / f"{name}.toml")
        if space.by_device:
            space = space.resolved(("fp32", "bf16", "int8"), ("dense", "2:4"))
    rng = random.Random(0)
    parameters = space.parameters()
    for _ in range(400):
        params = {n: rng.choice(options) for n, options in parameters.items() if rng.random() > 0.05}
        assert space.used(params) == asked_afresh(space, params), params
    if not space.sparse_with:
        assert 0 < len(space._asked) <= math.prod(len(o) + 1 for o in space.choices.values())  # + 1: not given


def test_engine_choices_are_sampled_per_layer_and_default_when_absent(tmp_path: Path) -> None:
    text = VALID.replace("d_model = [32, 64]", "d_model = [32, 64]\ngrad_checkpoint = [0, 1]")
    space = load_space_file(write_space(tmp_path, text + 'precision = ["fp32", "int8"]\nsparsity = ["dense", "2:4"]\n'))
    params = {"n_layers": 1, "d_model": 32, "grad_checkpoint": 1, "layer0.n_heads": 2, "layer0.ffn_ratio": 1,
              "layer0.precision": "int8", "layer0.sparsity": "2:4"}
    arch = space.sample(FixedTrial(params))
    assert arch == {"family": "transformer_lm", "d_model": 32, "grad_checkpoint": 1,
                    "layers": [{"n_heads": 2, "ffn_ratio": 1, "precision": "int8", "sparsity": "2:4"}]}
    validate({**arch, "vocab_size": 256, "context": 64})
    plain = load_space_file(write_space(tmp_path, VALID)).sample(FixedTrial({k: v for k, v in params.items()
                                                                             if "sion" not in k and "spar" not in k
                                                                             and "grad" not in k}))
    assert "precision" not in plain["layers"][0]  # absent choices keep their defaults (fp32, dense)


@pytest.mark.parametrize("path", sorted((REPO / "search_spaces").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_space_loads_and_samples_buildable_archs(path: Path) -> None:
    space = load_space_file(path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        validate({**space.sample(study.ask()), **TASK_KEYS[space.family]})


TASK_KEYS = {"transformer_lm": {"vocab_size": 256, "context": 64}, "cnn": {"image_size": 16, "channels": 1,
                                                                            "n_classes": 10},
             "hf_causal_lm": {"vocab_size": 256, "context": 64}}


def test_sample_study_ask_names_per_layer_params(tmp_path: Path) -> None:
    space = load_space_file(write_space(tmp_path, VALID))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_layers = set()
    for _ in range(12):
        trial = study.ask()
        arch = space.sample(trial)
        n = trial.params["n_layers"]
        assert len(arch["layers"]) == n
        seen_layers.add(n)
        assert set(trial.params) == {"n_layers", "d_model"} | {f"layer{i}.{k}" for i in range(n)
                                                               for k in ("n_heads", "ffn_ratio")}
        assert [layer["n_heads"] for layer in arch["layers"]] == [trial.params[f"layer{i}.n_heads"] for i in range(n)]
        assert arch["d_model"] == trial.params["d_model"]
        validate({**arch, "vocab_size": 256, "context": 64})
    assert len(seen_layers) > 1  # the random sampler did vary the depth


def test_shared_layer_key_gives_every_layer_the_same_value(tmp_path: Path) -> None:
    text = VALID.replace("d_model = [32, 64]", "d_model = [32, 64]\nn_heads = [1, 2, 4]").replace(
        "n_heads = [1, 2, 4]\nffn_ratio", "ffn_ratio")
    space = load_space_file(write_space(tmp_path, text))
    assert "n_heads" in space.choices and "n_heads" not in space.per_layer
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(12):
        trial = study.ask()
        arch = space.sample(trial)
        n = trial.params["n_layers"]
        assert len(arch["layers"]) == n
        assert {layer["n_heads"] for layer in arch["layers"]} == {trial.params["n_heads"]}
        assert not any(name.endswith(".n_heads") for name in trial.params)
        assert "n_heads" not in arch  # shared, but still a per-layer key of the architecture
        assert {f"layer{i}.ffn_ratio" for i in range(n)} <= set(trial.params)


def test_single_value_is_fixed_not_searched(tmp_path: Path) -> None:
    text = VALID.replace("n_layers = [1, 2, 3, 4]", "n_layers = 2").replace("d_model = [32, 64]", "d_model = [64]")
    space = load_space_file(write_space(tmp_path, text))
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    arch = space.sample(trial)
    assert arch["d_model"] == 64 and len(arch["layers"]) == 2
    assert "n_layers" not in trial.params and "d_model" not in trial.params
    assert set(trial.params) == {"layer0.n_heads", "layer0.ffn_ratio", "layer1.n_heads", "layer1.ffn_ratio"}


# ---------------------------------------------------------------- shipped files


SPACES = sorted((REPO / "search_spaces").glob("*.toml"))


def test_the_repo_ships_search_spaces() -> None:
    assert SHIPPED in SPACES


@pytest.mark.parametrize("path", SPACES, ids=[p.name for p in SPACES])
def test_shipped_space_loads_and_samples(path: Path) -> None:
    space = load_space_file(path)
    arch = space.sample(optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask())
    assert arch["family"] == space.family and len(arch["layers"]) >= 1


def test_auto_engine_choices_are_fp32_dense_until_the_device_decides(tmp_path: Path) -> None:
    """`precision = "auto"` and `engine = "auto"` hold fp32 / dense only (safe anywhere) until resolved with what
    the engine probe found paying; 2:4 is dropped where the widths cannot take it."""
    auto = load_space_file(write_space(tmp_path, VALID + 'precision = "auto"\n'))
    assert auto.by_device == ("precision",) and auto.per_layer["precision"] == ("fp32",)
    offered = auto.resolved(("fp32", "bf16", "int8"), ("dense", "2:4"))
    assert offered.per_layer["precision"] == ("fp32", "bf16", "int8") and "sparsity" not in offered.per_layer
    engine = load_space_file(write_space(tmp_path, 'engine = "auto"\n' + VALID))
    assert engine.by_device == ("precision", "sparsity")
    assert (engine.per_layer["precision"], engine.per_layer["sparsity"]) == (("fp32",), ("dense",))
    resolved = engine.resolved(("fp32", "int8"), ("dense", "2:4"))
    assert resolved.per_layer["sparsity"] == ("dense", "2:4") and not resolved.by_device
    odd = load_space_file(write_space(tmp_path, 'engine = "auto"\n' + VALID.replace("[32, 64]", "[34]")
                                      .replace("[1, 2, 4]", "[1, 2]", 1)))
    assert odd.resolved(("fp32",), ("dense", "2:4")).per_layer["sparsity"] == ("dense",)
    assert auto.linear_widths() == [(32, 32), (64, 64), (32, 128), (64, 256)]


def test_a_shared_sparsity_beside_per_layer_precisions_leaves_the_layers_no_sparse_kernel_takes_dense(
        tmp_path: Path) -> None:
    """The sparsity shared by all layers is asked before any layer's precision exists: it is asked, and a layer
    whose precision no sparse kernel takes is dense (it got 2:4 beside fp32 and int8)."""
    text = VALID.replace("d_model = [32, 64]", 'd_model = [32, 64]\nsparsity = ["dense", "2:4"]') + \
        'precision = "auto"\n'
    resolved = load_space_file(write_space(tmp_path, text)).resolved(("fp32", "bf16", "int8"), ("dense", "2:4"),
                                                                     sparse_with=("bf16",))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    pairs = set()
    for _ in range(40):
        trial = study.ask()
        arch = resolved.sample(trial)
        pairs |= {(layer["precision"], layer["sparsity"]) for layer in arch["layers"]}
        assert resolved.arch_of(trial.params) == arch
        study.tell(trial, 0.0)
    assert pairs == {("fp32", "dense"), ("int8", "dense"), ("bf16", "dense"), ("bf16", "2:4")}


def test_a_width_the_probe_never_timed_is_fp32_dense(tmp_path: Path) -> None:
    """A resumed study whose space gained d 96 offered it every precision of the stored offer, though nothing was
    measured at it (int8 paid at 64 only)."""
    space = load_space_file(write_space(tmp_path, 'engine = "auto"\n' + VALID.replace("[32, 64]", "[32, 64, 96]")))
    by_width = {"32": {"precision": ["fp32"], "sparsity": ["dense"]},
                "64": {"precision": ["fp32", "int8"], "sparsity": ["dense"]}}  # probed before 96 was added
    resolved = space.resolved(("fp32", "int8"), ("dense",), by_width)
    assert resolved.width_offer[96] == {"precision": ("fp32",), "sparsity": ("dense",)}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        arch = resolved.sample(study.ask())
        if arch["d_model"] == 96:
            assert {layer["precision"] for layer in arch["layers"]} == {"fp32"}


@pytest.mark.parametrize("where", ["per layer", "shared"])
def test_a_sparsity_is_asked_only_beside_a_precision_a_sparse_kernel_takes(tmp_path: Path, where: str) -> None:
    """On a GPU whose probe ran cuSPARSELt in bf16, a 2:4 (or Hessian-"auto") layer of fp32, int8 or fp8 multiplies
    its zeros densely: slower and less exact than its dense form. Such a layer is dense without a question; a bf16
    layer is asked, and the parameters alone still make the architecture."""
    engine = 'precision = "auto"\nsparsity = ["dense", "2:4", "auto"]\n'
    text = VALID + engine if where == "per layer" else \
        VALID.replace("d_model = [32, 64]", "d_model = [32, 64]\n" + engine)
    space = load_space_file(write_space(tmp_path, text))
    resolved = space.resolved(("fp32", "bf16", "int8"), ("dense", "2:4"), sparse_with=("bf16",))
    assert resolved.parameters() == space.resolved(("fp32", "bf16", "int8"), ("dense", "2:4")).parameters()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    pairs = set()
    for _ in range(60):
        trial = study.ask()
        arch = resolved.sample(trial)
        for i, layer in enumerate(arch["layers"]):
            pairs.add((layer["precision"], layer["sparsity"]))
            name = "sparsity" if where == "shared" else f"layer{i}.sparsity"
            assert (name in trial.params) == (layer["precision"] == "bf16"), (trial.params, arch)
        assert resolved.arch_of(trial.params) == arch
        assert resolved.used({**trial.params, **{n: o[0] for n, o in resolved.parameters().items()
                                                 if n not in trial.params}}) == trial.params
        study.tell(trial, 0.0)
    assert pairs == {("fp32", "dense"), ("int8", "dense"), ("bf16", "dense"), ("bf16", "2:4"), ("bf16", "auto")}
    # Without sparse_with (a CPU, an older study's offer), every pair is asked, as before.
    plain = space.resolved(("fp32", "bf16", "int8"), ("dense", "2:4"))
    assert plain.sparse_with == () and ("fp32", "2:4") in {
        (layer["precision"], layer["sparsity"]) for _ in range(30)
        for layer in plain.sample(optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=_)).ask())["layers"]}
    # A space whose precisions are listed, not "auto", keeps every pair the user listed.
    listed = load_space_file(write_space(tmp_path, text.replace('"auto"\n', '["fp32", "bf16"]\n', 1)))
    assert listed.resolved(("fp32",), ("dense",), sparse_with=("bf16",)).sparse_with == ()


def test_an_offer_by_width_samples_each_width_only_from_what_pays_there(tmp_path: Path) -> None:
    """bf16 that pays at d 64 and loses at d 32 is never drawn at d 32 (no parameter there), and a width offered a
    smaller set than the space's takes it under its own parameter name, since an Optuna parameter keeps one set."""
    import optuna

    space = load_space_file(write_space(tmp_path, 'engine = "auto"\n' + VALID.replace("[32, 64]", "[32, 64, 96]")))
    by_width = {"32": {"precision": ["fp32"], "sparsity": ["dense"]},
                "64": {"precision": ["fp32", "bf16"], "sparsity": ["dense"]},
                "96": {"precision": ["fp32", "bf16", "int8"], "sparsity": ["dense"]}}
    resolved = space.resolved(("fp32", "bf16", "int8"), ("dense",), by_width)
    params = resolved.parameters()
    assert params["layer0.precision"] == ("fp32", "bf16", "int8") and params["layer3.precision@64"] == ("fp32", "bf16")
    assert not any(name.endswith("@32") for name in params) and "layer0.sparsity" not in params
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen: dict[int, set[str]] = {32: set(), 64: set(), 96: set()}
    for _ in range(60):
        trial = study.ask()
        arch = resolved.sample(trial)
        seen[arch["d_model"]] |= {layer["precision"] for layer in arch["layers"]}
        assert set(trial.params) <= set(params) | {"n_layers", "d_model"}
        assert resolved.arch_of(trial.params) == arch  # the parameters alone make the same architecture
        study.tell(trial, 0.0)
    assert seen == {32: {"fp32"}, 64: {"fp32", "bf16"}, 96: {"fp32", "bf16", "int8"}}
    # A candidate with every parameter set (as dsnas's sampler draws one) uses only its own width's engine options.
    every = {name: options[-1] for name, options in params.items()} | {"d_model": 64, "n_layers": 2}
    assert resolved.used(every) == {"d_model": 64, "n_layers": 2, "layer0.n_heads": 4, "layer0.ffn_ratio": 4,
                                    "layer0.precision@64": "bf16", "layer1.n_heads": 4, "layer1.ffn_ratio": 4,
                                    "layer1.precision@64": "bf16"}
    # A study that stored no offer by width (an older one) offers every width the whole offer, under one name.
    older = space.resolved(("fp32", "bf16", "int8"), ("dense",)).parameters()
    assert not any("@" in name for name in older) and older["layer3.precision"] == ("fp32", "bf16", "int8")


def test_options_of_another_type_are_other_options_to_a_resumed_study(tmp_path: Path) -> None:
    """Optuna took [3.0, 5.0] for the stored [3, 5] (equal in Python): a user builder then got kernel 3.0, and each
    trial of the resumed study failed with a TypeError in torch, stored FAIL, where other options are refused."""
    path = tmp_path / "space.toml"
    path.write_text('family = "my_model:build"\n[choices]\nkernel = [3.0, 5.0]\nbias = [true, false]\n')
    space = load_space_file(path)
    assert space.changed_options({"kernel": (3, 5)}) == ("choices.kernel", "kernel", (3, 5), (3.0, 5.0))
    assert space.changed_options({"bias": (1, 0)}) == ("choices.bias", "bias", (1, 0), (True, False))
    assert space.changed_options({"kernel": (3.0, 5.0), "bias": (True, False)}) is None
