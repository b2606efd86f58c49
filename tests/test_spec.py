"""Study-file validation: every user-input error is a SpecError with a one-line message that names the file,
the key, the rule and a fix, raised before any work starts (no search, no Ray, no database file)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import check_message

from dsnas.cli import main
from dsnas.errors import SpecError
from dsnas.spec import load_study, read_study

REPO = Path(__file__).resolve().parent.parent
SPACE = REPO / "search_spaces" / "transformer_lm.toml"
DROP = object()  # an override value that removes the key (or section) from the minimal study


@pytest.fixture(autouse=True)
def _restore_sys_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """dsnas puts the study file's folder on sys.path when it imports a "module:callable"; undo that."""
    monkeypatch.setattr(sys, "path", list(sys.path))


# ---------------------------------------------------------------- helpers


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def _toml(doc: dict[str, Any], prefix: str = "") -> str:
    lines = [f"{key} = {_toml_value(value)}" for key, value in doc.items() if not isinstance(value, dict)]
    for key, value in doc.items():
        if isinstance(value, dict):
            lines += ["", f"[{prefix}{key}]", _toml(value, f"{prefix}{key}.")]
    return "\n".join(lines)


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if value is DROP:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def write_study(folder: Path, filename: str = "study.toml", **overrides: Any) -> Path:
    """A minimal valid study (the repo's search space by absolute path, executor kind "local"), with
    ``overrides`` merged in: a dict is a [section] (merged key by key), anything else a top-level key."""
    doc = _merge({"space": {"file": str(SPACE)}, "executor": {"kind": "local"}}, overrides)
    path = folder / filename
    path.write_text(_toml(doc) + "\n")
    return path


def expect_error(path: Path, key: str, rule: str, fix: str | None = None, blame: str = "", **flags: Any) -> str:
    """``blame`` is the flag the message must name when a flag's value broke the rule."""
    with pytest.raises(SpecError) as info:
        load_study(path, **flags)
    return check_message(info.value, f"{path.resolve()}{blame}", key, rule, fix)


def free_port() -> int:
    """A localhost port nobody listens on (bound, then closed), so a connect is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ---------------------------------------------------------------- valid studies


def test_minimal_study_loads_with_defaults_and_writes_nothing(tmp_path: Path) -> None:
    path = write_study(tmp_path)
    spec = load_study(path)
    assert spec.path == str(path.resolve())
    assert spec.name == "study"  # the file's stem
    assert spec.storage == f"sqlite:///{tmp_path.resolve() / 'study.db'}"
    assert spec.space.file == str(SPACE)
    assert spec.executor.kind == "local" and spec.executor.address is None
    assert spec.budget.n_trials == 12  # no [budget]: the default budget
    assert [(o.name, o.direction) for o in spec.objectives] == [("accuracy", "maximize"), ("throughput", "maximize")]
    assert spec.task.name == "charlm" and spec.task.params == {}
    assert _files(tmp_path) == {"study.toml"}  # loading a study writes nothing, no .db in particular


def test_relative_paths_resolve_beside_the_study_file(tmp_path: Path) -> None:
    (tmp_path / "spaces").mkdir()
    (tmp_path / "spaces" / "s.toml").write_text(SPACE.read_text())
    (tmp_path / "corpus.txt").write_text("hello world\n" * 200)  # its last tenth holds two contexts of 64
    path = write_study(tmp_path, study={"storage": "sqlite:///res.db"}, space={"file": "spaces/s.toml"},
                       task={"corpus": "corpus.txt"})
    spec = load_study(path)
    assert spec.storage == f"sqlite:///{tmp_path.resolve() / 'res.db'}"
    assert spec.space.file == str((tmp_path / "spaces" / "s.toml").resolve())
    assert spec.task.base_dir == str(tmp_path.resolve())


def test_timeout_alone_is_a_budget(tmp_path: Path) -> None:
    spec = load_study(write_study(tmp_path, budget={"timeout_s": 60}))
    assert spec.budget.n_trials is None and spec.budget.timeout_s == 60.0


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write_study(tmp_path, budget={"n_trials": 5}, executor={"kind": "ray"})
    spec = load_study(path, executor="local", n_trials=3, timeout_s=9.5)
    assert spec.executor.kind == "local"
    assert (spec.budget.n_trials, spec.budget.timeout_s) == (3, 9.5)


# ---------------------------------------------------------------- one error per rule

# (id, overrides, key, rule, fix or None where dsnas gives no fix today)
CASES: list[tuple[str, dict[str, Any], str, str, str | None]] = [
    # unknown keys, with a did-you-mean hint where one is close
    ("unknown-section", {"budgets": {"n_trials": 3}}, "budgets", "is not a known key", "did you mean 'budget'?"),
    ("unknown-study-key", {"study": {"nmae": "x"}}, "study.nmae", "is not a known key", "did you mean 'name'?"),
    ("unknown-budget-key", {"budget": {"n_trial": 3}}, "budget.n_trial", "is not a known key",
     "did you mean 'n_trials'?"),
    ("unknown-constraint", {"hardware": {"constraints": {"max_latency": 5}}}, "hardware.constraints.max_latency",
     "is not a known key", "did you mean 'max_latency_ms'?"),
    ("unknown-key-no-match", {"executor": {"zzz": 1}}, "executor.zzz", "is not a known key",
     "known keys: kind, address"),
    ("unknown-objective", {"objectives": {"accurcy": "maximize"}}, "objectives.accurcy", "is not a known key",
     "did you mean 'accuracy'?"),
    ("unknown-task-param", {"task": {"contxt": 64}}, "task.contxt", "is not a known key", "did you mean 'context'?"),
    # wrong types
    ("n_trials-string", {"budget": {"n_trials": "12"}}, "budget.n_trials", "must be of type int, but got '12'", 'a whole number without quotes'),
    ("n_trials-bool", {"budget": {"n_trials": True}}, "budget.n_trials", "must be of type int", 'a whole number without quotes'),
    ("n_trials-float", {"budget": {"n_trials": 2.5}}, "budget.n_trials", "must be of type int", 'a whole number without quotes'),
    ("timeout-string", {"budget": {"timeout_s": "60"}}, "budget.timeout_s", "must be of type float", 'a number without quotes'),
    ("batch_sizes-item", {"hardware": {"batch_sizes": [1, "a"]}}, "hardware.batch_sizes[1]",
     "must be of type int, but got 'a'", 'a whole number without quotes'),
    ("batch_sizes-scalar", {"hardware": {"batch_sizes": 32}}, "hardware.batch_sizes", "must be a list", 'batch_sizes = [1, 32]'),
    ("study-name-int", {"study": {"name": 5}}, "study.name", "must be of type str", 'a string in quotes'),
    ("storage-int", {"study": {"storage": 5}}, "study.storage", "must be of type str", 'a string in quotes'),
    ("task-param-type", {"task": {"context": "64"}}, "task.context", "must be of type int", 'a whole number without quotes'),
    ("section-not-table", {"budget": 3}, "budget", "must be a table", "write it as [budget]"),
    ("subsection-not-table", {"hardware": {"constraints": 5}}, "hardware.constraints", "must be a table", 'write it as [hardware.constraints]'),
    # out of range
    ("n_trials-zero", {"budget": {"n_trials": 0}}, "budget.n_trials", "must be >= 1", 'n_trials = 12'),
    ("n_trials-negative", {"budget": {"n_trials": -3}}, "budget.n_trials", "must be >= 1", 'n_trials = 12'),
    ("timeout-zero", {"budget": {"timeout_s": 0}}, "budget.timeout_s", "must be > 0", 'timeout_s = 600'),
    ("max_failures-negative", {"budget": {"n_trials": 2, "max_failures": -1}}, "budget.max_failures", "must be >= 0", 'max_failures = 0'),
    ("constraint-negative", {"hardware": {"constraints": {"max_latency_ms": -5}}},
     "hardware.constraints.max_latency_ms", "must be > 0, but got -5.0", "remove it to set no limit"),
    ("constraint-zero", {"hardware": {"constraints": {"max_params": 0}}}, "hardware.constraints.max_params",
     "must be > 0", "remove it to set no limit"),
    ("gpus-fraction", {"executor": {"gpus_per_trial": 0.5}}, "executor.gpus_per_trial",
     "must be 0 or a whole number", "gpus_per_trial = 1"),
    ("gpus-negative", {"executor": {"gpus_per_trial": -1}}, "executor.gpus_per_trial",
     "must be 0 or a whole number", "gpus_per_trial = 1"),
    ("cpus-zero", {"executor": {"cpus_per_trial": 0}}, "executor.cpus_per_trial", "must be > 0", 'cpus_per_trial = 1'),
    ("workers-zero", {"executor": {"workers": 0}}, "executor.workers", "must be >= 1", 'remove it'),
    ("batch_sizes-zero", {"hardware": {"batch_sizes": [0, 32]}}, "hardware.batch_sizes",
     "must be a non-empty list of integers >= 1", "batch_sizes = [1, 32]"),
    ("batch_sizes-empty", {"hardware": {"batch_sizes": []}}, "hardware.batch_sizes",
     "must be a non-empty list of integers >= 1", "batch_sizes = [1, 32]"),
    ("threads-zero", {"hardware": {"threads": 0}}, "hardware.threads", "must be >= 1", 'every core'),
    # 100000 ended in a MemoryError traceback; more than the CPUs here measures an oversubscribed CPU.
    ("threads-over", {"hardware": {"threads": 100000}}, "hardware.threads", "must be at most the",
     "remove it to use them all"),
    ("measure-zero", {"hardware": {"measure_s": 0}}, "hardware.measure_s", "must be > 0", 'measure_s = 0.3'),
    # An endless warm-up or timing held one trial until its timeout; measure_s = inf was told max_measure_s = inf.
    ("measure-inf", {"hardware": {"measure_s": float("inf")}}, "hardware.measure_s", "must be > 0 and finite",
     'measure_s = 0.3'),
    ("warmup-inf", {"hardware": {"warmup_s": float("inf")}}, "hardware.warmup_s", "must be >= 0 and finite",
     'warmup_s = 0.1'),
    ("max-measure-inf", {"hardware": {"max_measure_s": float("inf")}}, "hardware.max_measure_s",
     "must be >= measure_s and finite", 'max_measure_s = 3'),
    ("task-context-zero", {"task": {"context": 0}}, "task.context", "must be >= 1", 'remove context to use its default (64)'),
    ("task-warmup-one", {"task": {"warmup_frac": 1.0}}, "task.warmup_frac", "must be in [0, 1)", 'warmup_frac = 0.1'),
    ("study-name-blank", {"study": {"name": "  "}}, "study.name", "must be a plain name", 'name = "my_study"'),
    # names from a fixed list
    ("unknown-sampler", {"sampler": {"name": "bayes"}}, "sampler.name", "must be one of ['tpe', 'nsga2'",
     'name = "dsnas" (the default)'),
    ("unknown-device", {"hardware": {"device": "tpu"}}, "hardware.device", "must be one of", 'device = "auto"'),
    ("unknown-executor", {"executor": {"kind": "slurm"}}, "executor.kind", "must be one of", 'kind = "ray"'),
    ("bad-direction", {"objectives": {"accuracy": "max"}}, "objectives.accuracy",
     'must be "maximize" or "minimize", but got \'max\'', 'accuracy = "maximize"'),
    ("bad-direction-min-default", {"objectives": {"latency": "down"}}, "objectives.latency",
     'must be "maximize" or "minimize"', 'latency = "minimize"'),
    # storage
    ("storage-not-url", {"study": {"storage": "results.db"}}, "study.storage", "must be an SQLAlchemy database URL",
     "sqlite:///results.db"),
    ("storage-redis", {"study": {"storage": "redis://localhost:6379/0"}}, "study.storage",
     "the database must be one of ['sqlite', 'postgresql', 'mysql']", "sqlite:///"),
    ("storage-sqlite-no-folder", {"study": {"storage": "sqlite:///no_such_dir/s.db"}}, "study.storage",
     "the database's folder must exist", "create "),
    ("storage-sqlite-memory", {"study": {"storage": "sqlite:///:memory:"}}, "study.storage",
     "must name a database file (an in-memory database loses the study)", "sqlite:///"),
    ("storage-sqlite-empty", {"study": {"storage": "sqlite://"}}, "study.storage", "must name a database file",
     "sqlite:///"),
    # files and importable names
    ("space-file-missing", {"space": {"file": "no_such_space.toml"}}, "space.file",
     "the search-space file must exist, but got 'no_such_space.toml'", "check the path"),
    ("space-file-and-callable", {"space": {"callable": "m:f"}}, "space.file", "exactly one of file and callable",
     "callable ="),
    ("space-callable-format", {"space": {"file": DROP, "callable": "no_colon"}}, "space.callable",
     'must look like "module:function"', 'callable = "my_space:sample"'),
    ("space-callable-missing", {"space": {"file": DROP, "callable": "dsnas_no_such_module:space"}}, "space.callable",
     "must name an importable callable (ModuleNotFoundError: No module named 'dsnas_no_such_module')", "on PYTHONPATH"),
    ("corpus-missing", {"task": {"corpus": "no_such_corpus.txt"}}, "task.corpus",
     'must be "stdlib" or an existing text file, but got \'no_such_corpus.txt\'', "check the path"),
    ("task-not-importable", {"task": {"name": "dsnas_no_such_module:make_task"}}, "task.name",
     "must name an importable callable (ModuleNotFoundError: No module named 'dsnas_no_such_module')", "on PYTHONPATH"),
    # The module imports: the name after the ':' is what to change (not "put the module on PYTHONPATH").
    ("task-attr-missing", {"task": {"name": "os:no_such_task"}}, "task.name", "must name an importable callable",
     "name a function or class that"),
    ("task-not-callable", {"task": {"name": "os:sep"}}, "task.name", "must name an importable callable (TypeError: "
     "os:sep is not callable)", "name a function or class that"),
    ("task-unknown-name", {"task": {"name": "char_lm"}}, "task.name", "must be a built-in task (charlm, images)", 'set name = "charlm"'),
    # budget and executor combinations
    ("address-with-local", {"executor": {"address": "127.0.0.1:6379"}}, "executor.address", 'needs kind = "ray"',
     'set kind = "ray"'),
    ("address-no-port", {"executor": {"kind": "ray", "address": "localhost"}}, "executor.address",
     'must be "host:port", "ray://host:port" or "auto"', 'address = "127.0.0.1:6379"'),
    # the engine
    ("engine-unknown-saliency", {"engine": {"saliency": "random"}}, "engine.saliency",
     "must be one of ['hessian', 'wanda', 'magnitude'], but got 'random'", 'saliency = "hessian"'),
    ("engine-unknown-key", {"engine": {"calibrate": "kl"}}, "engine.calibrate", "is not a known key",
     "did you mean 'calibrator'?"),
    ("engine-qat-frac", {"engine": {"qat_frac": 1.5}}, "engine.qat_frac", "must be in [0, 1], but got 1.5",
     "qat_frac = 0.25"),
    ("engine-int8-backend", {"engine": {"int8_backend": "onednn"}}, "engine.int8_backend", "must be one of ['auto'",
     'int8_backend = "auto"'),
    # A sparse or int8 candidate reached the last rung at the end of its first training, on fewer tokens than fp32.
    ("engine-shares-past-a-rung", {"engine": {"finetune_frac": 0.4, "qat_frac": 0.4}}, "engine.finetune_frac",
     "with qat_frac leaves 0.2 of the budget to a sparse or int8 candidate's first training, less than the last "
     "rung's share 1/eta = 0.333 ([fidelity] eta = 3)", "make finetune_frac + qat_frac at most 0.667"),
    # multi-fidelity and the predictor
    ("fidelity-kind", {"fidelity": {"kind": "asha"}}, "fidelity.kind", "must be one of ['none', 'successive_halving'",
     'kind = "successive_halving"'),
    ("fidelity-eta", {"fidelity": {"eta": 1}}, "fidelity.eta", "must be >= 2, but got 1", "eta = 3"),
    ("fidelity-min-fraction", {"fidelity": {"min_fraction": 0.0}}, "fidelity.min_fraction", "must be between 0 and 1",
     "min_fraction = 0.333"),
    ("fidelity-no-rung", {"fidelity": {"min_fraction": 0.5}}, "fidelity.min_fraction", "must be <= 1/eta (1/3)",
     "min_fraction = 0.333"),
    ("fidelity-min-trials", {"fidelity": {"min_trials": 0}}, "fidelity.min_trials", "must be >= 1", "min_trials = 3"),
    ("fidelity-unknown-key", {"fidelity": {"rungs": 3}}, "fidelity.rungs", "is not a known key", "known keys: kind"),
    ("pruning-renamed", {"pruning": {"kind": "none"}}, "pruning", "was renamed [fidelity]",
     "rename the table [pruning] to [fidelity]"),
    ("predictor-margin", {"predictor": {"margin": -0.1}}, "predictor.margin", "must be >= 0", "margin = 0.2"),
    ("predictor-refit-error", {"predictor": {"refit_error": 0}}, "predictor.refit_error", "must be > 0",
     "refit_error = 0.3"),
    ("predictor-recent", {"predictor": {"recent": 0}}, "predictor.recent", "must be >= 3", "its default (5)"),
    # With fewer than 3 kept, the guard never had the 3 it judges by: skipping went on whatever the predictions missed.
    ("predictor-recent-2", {"predictor": {"recent": 2}}, "predictor.recent", "must be >= 3", "recent = 3 or more"),
    ("predictor-refit-every", {"predictor": {"refit_every": 0}}, "predictor.refit_every", "must be >= 1",
     "its default (4)"),
    ("predictor-skip-type", {"predictor": {"skip": 1}}, "predictor.skip", "must be of type bool", "true or false"),
]

@pytest.mark.parametrize(("overrides", "key", "rule", "fix"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_study_error(tmp_path: Path, overrides: dict[str, Any], key: str, rule: str, fix: str | None) -> None:
    path = write_study(tmp_path, **overrides)
    expect_error(path, key, rule, fix)
    assert _files(tmp_path) == {"study.toml"}  # nothing written: no .db, no folder created


@pytest.mark.parametrize("overrides", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_study_error_message_names_a_fix(tmp_path: Path, overrides: dict[str, Any]) -> None:
    with pytest.raises(SpecError) as info:
        load_study(write_study(tmp_path, **overrides))
    assert ". Fix: " in str(info.value)


def test_missing_study_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    expect_error(path, "-", "the study file must exist", "dsnas init")
    assert _files(tmp_path) == set()


def test_study_path_is_a_folder(tmp_path: Path) -> None:
    """It said "the study file must exist" of a folder that does; one with study files names them."""
    expect_error(tmp_path, "-", "must be a study file, and this is a folder", "give a study file's path")
    write_study(tmp_path)
    expect_error(tmp_path, "-", "must be a study file, and this is a folder", "give a study file in it (study.toml)")


def test_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "study.toml"
    path.write_text("[budget]\nn_trials = \n")
    msg = expect_error(path, "-", "must be valid TOML (")
    assert "line 2" in msg


def test_error_in_the_space_file_names_the_space_file(tmp_path: Path) -> None:
    space = tmp_path / "space.toml"
    space.write_text('family = "resnet"\n')
    with pytest.raises(SpecError) as info:
        load_study(write_study(tmp_path, space={"file": "space.toml"}))
    check_message(info.value, space.resolve(), "family", "must be one of ['transformer_lm', 'cnn', 'hf_causal_lm']", 'family = "transformer_lm"')


def test_plugin_task_parameters_must_fit_its_signature(tmp_path: Path) -> None:
    module = f"dsnas_test_task_{uuid.uuid4().hex}"
    (tmp_path / f"{module}.py").write_text(
        "class Table:\n    def arch_defaults(self):\n        return {}\n\n    def fingerprint(self):\n        return {}\n"
        "\n    def evaluate_arch(self, arch, *, seed, rungs, report):\n        return {}\n\n\n"
        "def make(size=1):\n    return Table()\n")
    importlib.invalidate_caches()
    (tmp_path / "space.toml").write_text(SPACE.read_text().replace('engine = "auto"', '') +
                                         'precision = ["fp32", "bf16"]\nsparsity = ["dense"]\n')
    ok = load_study(write_study(tmp_path, task={"name": f"{module}:make", "size": 2}, space={"file": "space.toml"}))
    assert ok.task.params == {"size": 2}
    path = write_study(tmp_path, task={"name": f"{module}:make", "sise": 2}, space={"file": "space.toml"})
    msg = expect_error(path, "task", f"the parameters must fit {module}:make(size=1)")
    assert "['sise']" in msg
    # "auto" would time this device's kernels for models the task never runs here (it evaluates them itself)
    with pytest.raises(SpecError) as info:
        load_study(write_study(tmp_path, task={"name": f"{module}:make"}, space={"file": str(SPACE)}))
    check_message(info.value, SPACE, "engine", "\"auto\" decides from a probe of this device's kernels, but the "
                  f"task '{module}:make' evaluates architectures itself (evaluate_arch) and runs no model here",
                  'list the choices its trials take, e.g. precision = ["fp32", "bf16"]')
    sys.modules.pop(module, None)


def test_cuda_without_a_gpu(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    expect_error(write_study(tmp_path, hardware={"device": "cuda"}), "hardware.device",
                 "cuda needs a visible NVIDIA GPU", 'device = "auto"')


def test_fp8_choices_are_refused_where_trials_run_on_the_cpu(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this GPU runs fp8")
    space = tmp_path / "space.toml"
    space.write_text(SPACE.read_text().replace('engine = "auto"\n', "")
                     .replace("[per_layer]\n", '[per_layer]\nprecision = ["fp32", "fp8"]\n'))
    path = write_study(tmp_path, space={"file": "space.toml"}, hardware={"device": "cpu"})
    with pytest.raises(SpecError) as info:
        load_study(path)
    check_message(info.value, space.resolve(), "precision", "fp8 needs an NVIDIA GPU of compute capability 8.9",
                  'remove "fp8"')
    # An [engine.NAME] group's choices too (they were let through: every trial trained, then failed converting).
    space.write_text(SPACE.read_text().replace('engine = "auto"\n', "")
                     + '[engine.mlp]\nmodules = ["blocks.*.up"]\nprecision = ["fp32", "fp8"]\n')
    with pytest.raises(SpecError) as info:
        load_study(path)
    check_message(info.value, space.resolve(), "engine.mlp.precision", "fp8 needs an NVIDIA GPU", 'remove "fp8"')


@pytest.mark.parametrize("name, good, bad", [
    ("transformer_lm", "blocks.*.up", "blocks.*.mlp.*"),
    ("cnn", "stages.*", "blocks.*"),
])
def test_an_engine_group_pattern_no_module_matches_is_refused_before_any_work(tmp_path: Path, name, good, bad):
    """A built-in family's module names are known: a pattern matching none failed every trial (engine.md's own
    example did, on every family). It is refused at load, naming the key and the family's module names."""
    space = tmp_path / "space.toml"
    shipped = (REPO / "search_spaces" / f"{name}.toml").read_text().replace('engine = "auto"\n', "")
    task = {"name": "images"} if name == "cnn" else {}
    path = write_study(tmp_path, space={"file": "space.toml"}, hardware={"device": "cpu"}, task=task)
    space.write_text(shipped + f'[engine.mine]\nmodules = ["{bad}"]\nprecision = ["fp32", "bf16"]\n')
    with pytest.raises(SpecError) as info:
        load_study(path)
    check_message(info.value, space.resolve(), "engine.mine.modules", f"{bad!r} matches none of the largest",
                  f"name some of {'tok' if name == 'transformer_lm' else 'stem'}")
    assert f"{good}," in str(info.value)  # the pattern that works is among the names it lists
    space.write_text(shipped + f'[engine.mine]\nmodules = ["{good}"]\nprecision = ["fp32", "bf16"]\n')
    load_study(path)
    # A stage only the deeper candidates have (the 2-layer ones failed every trial): refused, naming the smallest.
    deep = "blocks.3.up" if name == "transformer_lm" else "stages.2.*"
    space.write_text(shipped + f'[engine.mine]\nmodules = ["{deep}"]\nprecision = ["fp32", "bf16"]\n')
    with pytest.raises(SpecError) as info:
        load_study(path)
    assert f"{deep!r} matches none of the smallest" in str(info.value), info.value


def test_the_engine_section_loads(tmp_path: Path) -> None:
    spec = load_study(write_study(tmp_path, engine={"saliency": "wanda", "qat_frac": 0.4, "compile": True}))
    assert (spec.engine.saliency, spec.engine.qat_frac, spec.engine.compile) == ("wanda", 0.4, True)
    assert load_study(write_study(tmp_path)).engine.calibrator == "kl"


# ---------------------------------------------------------------- Ray address


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_unreachable_ray_address(tmp_path: Path, scheme: str) -> None:
    address = f"{scheme}127.0.0.1:{free_port()}"
    path = write_study(tmp_path, executor={"kind": "ray", "address": address})
    msg = expect_error(path, "executor.address", "no Ray cluster answers there", "ray start --head")
    assert repr(address) in msg


def test_an_address_where_something_else_than_a_ray_head_answers_is_refused(tmp_path: Path) -> None:
    """A web server (or Ray's dashboard) on the port passed the connect check, then Ray retried it for 14 minutes."""
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        address = f"127.0.0.1:{server.server_address[1]}"
        path = write_study(tmp_path, executor={"kind": "ray", "address": address})
        expect_error(path, "executor.address", f"{address} answers, but not as a Ray head does (gRPC)",
                     "the GCS port, 6379 by default")
    finally:
        server.shutdown()
        server.server_close()


def test_unreachable_ray_address_auto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")
    path = write_study(tmp_path, executor={"kind": "ray", "address": "auto"})
    expect_error(path, "executor.address", "no Ray cluster answers there", "ray start --head")


# ---------------------------------------------------------------- flags (CLI overrides)


def test_flag_out_of_range(tmp_path: Path) -> None:
    # Its fix names the flag: it was "set n_trials = 12", a key of the file the flag had overridden.
    expect_error(write_study(tmp_path), "budget.n_trials", "must be >= 1", blame=" with --n-trials 0", n_trials=0,
                 fix="e.g. --n-trials 12, or leave --n-trials out (the file's value is used)")
    expect_error(write_study(tmp_path), "budget.timeout_s", "must be > 0", blame=" with --timeout -5.0",
                 timeout_s=-5.0, fix="e.g. --timeout 600, or leave --timeout out (the file's value is used)")


def test_flag_address_with_a_local_executor_in_the_file(tmp_path: Path) -> None:
    # The address is right; the file's kind is what the rule needs changed (it said "correct --address").
    path = write_study(tmp_path, executor={"kind": "local"})
    expect_error(path, "executor.address", 'needs kind = "ray"', blame=" with --address 127.0.0.1:6379",
                 address="127.0.0.1:6379", fix='set kind = "ray", or leave --address out (the file\'s value is used)')


def test_flag_executor_local_with_an_address_in_the_file(tmp_path: Path) -> None:
    path = write_study(tmp_path, executor={"kind": "ray", "address": "127.0.0.1:6379"})
    expect_error(path, "executor.address", 'needs kind = "ray"', executor="local")  # the file's address is to blame


def test_unknown_override_is_a_programming_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="unknown override"):
        load_study(write_study(tmp_path), n_trial=3)


# ---------------------------------------------------------------- the CLI


@pytest.mark.parametrize(("overrides", "key"), [
    ({"budget": {"n_trials": 0}}, "[budget.n_trials] must be >= 1"),
    ({"sampler": {"name": "bayes"}}, "[sampler.name] must be one of"),
    ({"study": {"storage": "sqlite:///:memory:"}}, "[study.storage] must name a database file"),
    ({"task": {"contxt": 64}}, "[task.contxt] is not a known key"),
], ids=["range", "sampler", "storage", "task-key"])
def test_cli_search_bad_study(tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: dict[str, Any],
                              key: str) -> None:
    path = write_study(tmp_path, **overrides)
    assert main(["search", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(f"dsnas: error: {path.resolve()}: "), err
    assert key in err
    assert "Traceback" not in err
    assert _files(tmp_path) == {"study.toml"}  # no .db beside the study file


def test_cli_search_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", str(tmp_path / "nope.toml")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("dsnas: error: ") and "[-] the study file must exist" in err
    assert _files(tmp_path) == set()


def test_cli_search_bad_flag_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_study(tmp_path)
    assert main(["search", str(path), "--n-trials", "0"]) == 2
    _, err = capsys.readouterr()
    assert err.count("\n") == 1 and "[budget.n_trials] must be >= 1" in err and "Traceback" not in err
    assert _files(tmp_path) == {"study.toml"}


# ---------------------------------------------------------------- shipped files


STUDIES = sorted((REPO / "studies").glob("*.toml"))


def test_the_repo_ships_studies() -> None:
    assert STUDIES


@pytest.mark.parametrize("path", STUDIES, ids=[p.name for p in STUDIES])
def test_shipped_study_loads(path: Path) -> None:
    """Every shipped study reads; it loads to run where its device is (a GPU study on a CPU-only machine gives
    the one-line error that says so, before any work)."""
    before = _files(path.parent)
    spec = read_study(path)
    assert spec.path == str(path.resolve())
    assert Path(spec.space.file or "").is_file() or spec.space.callable
    if spec.hardware.device == "cuda" and not torch.cuda.is_available():
        with pytest.raises(SpecError) as e:
            load_study(path)
        assert e.value.key == "hardware.device" and "cuda needs a visible NVIDIA GPU" in str(e.value)
        assert str(e.value).count("\n") == 0 and str(path.resolve()) in str(e.value)
    else:
        load_study(path)
    assert _files(path.parent) == before  # loading wrote nothing beside it


# ---------------------------------------------------------------- known dsnas bugs (see the report)


def test_storage_url_with_a_bad_port(tmp_path: Path) -> None:
    expect_error(write_study(tmp_path, study={"storage": "postgresql://u@h:abc/db"}), "study.storage",
                 "must be an SQLAlchemy database URL")


@pytest.mark.skipif(importlib.util.find_spec("psycopg") is not None, reason="the postgresql driver is installed")
def test_storage_driver_missing(tmp_path: Path) -> None:
    expect_error(write_study(tmp_path, study={"storage": "postgresql://u@h/db"}), "study.storage",
                 "needs its database driver", "pip install the driver")


def test_flag_with_a_section_that_is_not_a_table(tmp_path: Path) -> None:
    expect_error(write_study(tmp_path, budget=3), "budget", "must be a table", n_trials=5)


def test_negative_sampler_seed(tmp_path: Path) -> None:
    expect_error(write_study(tmp_path, sampler={"seed": -1}), "sampler.seed", "must be in [0, 2**31)")


def test_study_name_that_makes_a_default_storage_path_in_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(SpecError):
        load_study(write_study(tmp_path, study={"name": "no_such_dir/study"}))
    assert _files(tmp_path) == {"study.toml"}


# A module beside the study that fails to import was told to be put beside the study file, where it was.
@pytest.mark.parametrize("body, fix", [
    ("def make(:\n", "correct the syntax of {file} at line 1"),
    ("raise RuntimeError('boom')\n", "run `python -c 'import {module}'` in {folder} to see where importing it fails"),
    ("import dsnas_no_such_dependency\n", "install dsnas_no_such_dependency (which {module} imports) where dsnas runs"),
], ids=["syntax", "raises", "dependency-missing"])
def test_task_module_that_fails_to_import(tmp_path: Path, body: str, fix: str) -> None:
    module = f"dsnas_test_broken_{uuid.uuid4().hex}"
    (tmp_path / f"{module}.py").write_text(body, encoding="utf-8")
    importlib.invalidate_caches()
    try:
        expect_error(write_study(tmp_path, task={"name": f"{module}:make"}), "task.name",
                     "must name an importable callable",
                     fix.format(file=tmp_path / f"{module}.py", module=module, folder=tmp_path))
    finally:
        sys.modules.pop(module, None)


def test_the_budget_defaults_are_the_dataclass_ones_and_depend_on_each_other():
    """One source of defaults (BudgetSpec, which docs/study-file.md is generated from): 12 trials unless a timeout
    bounds the study, and as many failures as trials (10 without a trial count)."""
    from dsnas.spec import BudgetSpec

    assert (BudgetSpec().n_trials, BudgetSpec().max_failures) == (12, 12)
    assert (BudgetSpec(max_failures=2).n_trials, BudgetSpec(max_failures=2).max_failures) == (12, 2)
    timed = BudgetSpec(timeout_s=60)
    assert (timed.n_trials, timed.max_failures) == (None, 10)
    assert BudgetSpec(n_trials=30).max_failures == 30


def test_the_samplers_own_settings_reach_it_and_bad_ones_are_one_line_errors(tmp_path: Path) -> None:
    """[sampler] keys other than name and seed are the Optuna sampler's own: passed to it as they are, checked
    against its signature (name, type) and by building it once (its own range checks)."""
    from dsnas.run import make_sampler

    spec = load_study(write_study(tmp_path, sampler={"name": "tpe", "constant_liar": True, "n_startup_trials": 5}))
    sampler = make_sampler(spec, 0)
    assert sampler._constant_liar is True and sampler._n_startup_trials == 5
    nsga = load_study(write_study(tmp_path, sampler={"name": "nsga2", "population_size": 20}))
    assert make_sampler(nsga, 0)._population_size == 20
    expect_error(write_study(tmp_path, sampler={"name": "tpe", "constant_lair": True}), "sampler.constant_lair",
                 "is not a setting of Optuna's TPESampler", "did you mean 'constant_liar'?")
    odd = write_study(tmp_path, sampler={"name": "dsnas"})
    odd.write_text(odd.read_text().replace("[sampler]\n", '[sampler]\n"\\r" = 1\n'))  # a quoted key: a line break
    expect_error(odd, "sampler.'\\r'", "is not a setting of dsnas's DsnasSampler", "its settings: startup")
    expect_error(write_study(tmp_path, sampler={"name": "tpe", "n_startup_trials": "5"}), "sampler.n_startup_trials",
                 "must be of type int, as TPESampler takes it", "n_startup_trials = 10")
    expect_error(write_study(tmp_path, sampler={"name": "tpe", "multivariate": 1}), "sampler.multivariate",
                 "must be of type bool", "multivariate = true")
    expect_error(write_study(tmp_path, sampler={"name": "nsga2", "population_size": 1}), "sampler",
                 "Optuna's NSGAIISampler refuses these settings", "correct the value")
    for key, value in (("pool", -1), ("startup", -2), ("time_s", 0)):  # dsnas's own: once, pool -1 failed every trial
        expect_error(write_study(tmp_path, sampler={"name": "dsnas", key: value}), "sampler",
                     f"dsnas's DsnasSampler refuses these settings ({key} must be", "correct the value")
    expect_error(write_study(tmp_path, sampler={"name": "tpe", "gamma": 0.1}), "sampler.gamma",
                 "cannot be set in a study file")
    assert load_study(write_study(tmp_path, sampler={"name": "random"})).sampler.settings == {}


@pytest.mark.parametrize("folder", ["exp?1", "pct%41x"])
def test_the_default_database_is_beside_the_study_file_whatever_its_folder_is_called(tmp_path: Path, folder: str) -> None:
    """The URL was built as text: "?" began a query (two studies in exp?1 and exp?2 shared the database "exp") and
    "%41" was read as "A"."""
    from dsnas.storage import sqlite_file

    (tmp_path / folder).mkdir()
    spec = read_study(write_study(tmp_path / folder, study={"name": "q"}))
    assert sqlite_file(spec.storage) == tmp_path / folder / "q.db"


def test_a_space_whose_family_the_task_cannot_complete_is_refused_before_any_work(tmp_path: Path) -> None:
    """A cnn space with charlm (or transformer_lm with images) created the database and failed every trial with
    "[image_size] the architecture needs this key", naming neither the space nor the task."""
    space = tmp_path / "cnn.toml"
    space.write_text('family = "cnn"\n[choices]\nn_layers = [1]\nstem_width = [8]\n[per_layer]\ndepth = [1]\n'
                     'width = [16]\nkernel = [3]\nexpand = [1]\n')
    path = write_study(tmp_path, space={"file": str(space)})
    expect_error(path, "task.name", "the cnn family of", 'pair cnn with "images"')
    assert not list(tmp_path.glob("*.db"))


def test_the_built_in_tasks_fix_the_architecture_keys_the_check_expects() -> None:
    from dsnas.spec import TaskSpec
    from dsnas.tasks import BUILTIN_ARCH_KEYS, make_task

    charlm = make_task(TaskSpec("charlm", {"train_tokens": 2048, "val_tokens": 512}, str(REPO)))
    assert tuple(charlm.arch_defaults()) == BUILTIN_ARCH_KEYS["charlm"]
    pytest.importorskip("sklearn")
    images = make_task(TaskSpec("images", {}, str(REPO)))
    assert tuple(images.arch_defaults()) == BUILTIN_ARCH_KEYS["images"]


def test_a_corpus_too_short_for_its_validation_split_is_refused_before_any_work(tmp_path: Path) -> None:
    """It passed the checks, the database was created, and the driver stopped with a line naming no key."""
    (tmp_path / "small.txt").write_text("x" * 600)
    path = write_study(tmp_path, task={"corpus": "small.txt", "context": 64})
    expect_error(path, "task.corpus", "must be long enough that its last tenth (the validation split, 60 bytes) "
                 "holds two contexts of 64", "give a text of at least 1320 bytes, or a shorter context")
    (tmp_path / "small.txt").write_text("x" * 1320)
    load_study(path)  # long enough
    assert not list(tmp_path.glob("*.db"))


def test_a_stdlib_corpus_too_short_for_its_validation_split_is_refused_naming_the_least_that_works(
        tmp_path: Path) -> None:
    """The standard library's validation split is every 10th file: below the first nine files' size it is empty.
    corpus_bytes = 20000 passed the loader and failed the run in a line naming neither the key nor a fix."""
    from dsnas.tasks.charlm import CharLMConfig, read_corpus, stdlib_split

    held_out, enough = stdlib_split(20_000, 2 * 65)
    assert held_out == 0 and enough is not None and enough > 20_000
    path = write_study(tmp_path, task={"corpus_bytes": 20_000, "context": 64})
    expect_error(path, "task.corpus_bytes", "must read enough of the standard library that its validation split",
                 f"set corpus_bytes >= {enough}")
    assert not list(tmp_path.glob("*.db"))
    # The least it names works, and one byte less does not: read_corpus's own split, not an estimate of it.
    assert len(read_corpus(CharLMConfig(corpus_bytes=enough), str(tmp_path))[1]) >= 2 * 65
    with pytest.raises(SpecError):
        read_corpus(CharLMConfig(corpus_bytes=enough - 1), str(tmp_path))


def test_a_study_without_a_space_table_takes_the_shipped_space_wherever_it_is(tmp_path: Path) -> None:
    """The default was a path relative to the study file: outside a checkout, a file of only [study] and [budget]
    was refused for a [space.file] the user never wrote."""
    from dsnas.spec import shipped

    (tmp_path / "s.toml").write_text('[study]\nname = "ns"\n[budget]\nn_trials = 1\n')
    spec = read_study(tmp_path / "s.toml")
    assert Path(spec.space.file) == shipped("search_spaces/transformer_lm.toml").resolve()
    assert Path(spec.space.file).is_file()


@pytest.mark.parametrize("url", [
    "postgresql+nosuchdriver://dsnas:Secr3tPW@127.0.0.1:5432/db",  # a driver SQLAlchemy does not know
    "postgresql+psycopg://dsnas:Secr3tPW@127.0.0.1:notaport/db",  # not a URL SQLAlchemy parses
    "oracle://dsnas:Secr3tPW@127.0.0.1/db",  # a database dsnas does not store in
    "postgresql+psycopg2://dsnas:Secr3tPW@127.0.0.1/db",  # a driver that is not installed
])
def test_a_storage_url_that_is_refused_is_printed_without_its_password(tmp_path: Path, url: str) -> None:
    """usage.md: dsnas never prints a password. The study file's refusals printed the URL as given."""
    import importlib.util

    if "psycopg2" in url and importlib.util.find_spec("psycopg2"):
        pytest.skip("psycopg2 is installed here")
    with pytest.raises(SpecError) as info:
        load_study(write_study(tmp_path, study={"storage": url}))
    assert "Secr3tPW" not in str(info.value) and "dsnas:***@" in str(info.value), info.value


def test_a_password_given_as_a_query_parameter_is_masked_too() -> None:
    from dsnas.config import masked_url
    from dsnas.storage import display_url

    url = "postgresql+psycopg://dsnas@db.example/hunt?sslmode=require&password=Secr3tPW"
    assert "Secr3tPW" not in display_url(url) and "password=***" in display_url(url)
    assert masked_url("sqlite:////tmp/a:b@c/x.db") == "sqlite:////tmp/a:b@c/x.db"  # a path is not a password
