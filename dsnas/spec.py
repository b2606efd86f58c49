"""Study file (TOML) -> validated dataclasses. Every user-input error is raised here, before any work starts."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import socket
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from dsnas.config import build_section, is_there, masked_url, reject_unknown, require_spec, section_table, typed
from dsnas.errors import SpecError, require
from dsnas.models import forget_families, is_user_family, missing_package
from dsnas.plugins import ShadowedModule, import_callable
from dsnas.space import AUTO, load_space_file
from dsnas.tasks import BUILTIN_TASKS, arch_keys, check_params, check_task, forget_built, make_task, runs_own_trials

# Objective name -> (metric key reported by the worker, default direction).
OBJECTIVES: dict[str, tuple[str, str]] = {
    "accuracy": ("accuracy", "maximize"),
    "throughput": ("throughput_tok_s", "maximize"),
    "latency": ("latency_ms", "minimize"),
    "params": ("params", "minimize"),
    "peak_memory": ("peak_memory_mb", "minimize"),
    "loss": ("val_loss", "minimize"),
}
# Each sampler name and its class: Optuna's (in optuna.samplers), and dsnas's own (dsnas.sampler).
SAMPLER_CLASSES = {"tpe": "TPESampler", "nsga2": "NSGAIISampler", "nsga3": "NSGAIIISampler", "gp": "GPSampler",
                   "random": "RandomSampler", "dsnas": "DsnasSampler"}
SAMPLERS = tuple(SAMPLER_CLASSES)
EXECUTORS = ("ray", "local")
DEVICES = ("auto", "cpu", "cuda")
STORAGE_BACKENDS = ("sqlite", "postgresql", "mysql")
REPEATS = ("reuse", "retrain")


@dataclass(frozen=True)
class Objective:
    name: str
    direction: str

    @property
    def metric(self) -> str:
        return OBJECTIVES[self.name][0]


@dataclass(frozen=True)
class SamplerSpec:
    """Any other key is a setting of the sampler `name` names, passed to it as it is (e.g. `startup = 8` for dsnas,
    `constant_liar = true` or `n_startup_trials = 5` for tpe, `population_size = 20` for nsga2), checked against
    its signature. "dsnas", the default, is dsnas's own (see docs/search-strategy.md): it proposes by expected
    hypervolume improvement, knowing the hardware figures a task gives before training (`hardware(arch)`) and
    modelling the rest; it needed at most half of TPE's evaluations to reach 90% and 95% of the true front on
    every NAS-Bench-201 pair measured. On a `[space] callable`, which declares no choices, the run uses "tpe" and
    says so."""

    name: str = "dsnas"  # the sampler: dsnas's own, or Optuna's ("tpe", "nsga2", "gp", "random", ...)
    # seeds which candidates are tried; moves on by the stored trials and by each earlier run of `dsnas search` on
    # the study when it resumes (so that two drivers started together try different candidates)
    seed: int | None = 0
    settings: dict[str, Any] = field(default_factory=dict)  # the sampler's own keyword arguments

    def __post_init__(self) -> None:
        require(self.name in SAMPLERS, "name", f"must be one of {list(SAMPLERS)}", self.name,
                'set name = "dsnas" (the default), or one of Optuna\'s, e.g. "tpe"')
        require(self.seed is None or 0 <= self.seed < 2**31, "seed", "must be in [0, 2**31)", self.seed,
                "e.g. seed = 0")


@dataclass(frozen=True)
class BudgetSpec:
    # Trials to evaluate: completed plus pruned at a rung (stored ones count; one the predictor skipped does not).
    # Default: 12, or no limit when timeout_s is set.
    n_trials: int | None = None
    timeout_s: float | None = None  # no new trial starts after this many seconds
    # Stop after more failed trials than this in one run; default: n_trials, or 10 when there is no n_trials
    max_failures: int | None = None
    # A trial running longer fails, and its worker is reclaimed; its own time: from when it starts on a worker, less
    # its waits for another trial's measurement
    trial_timeout_s: float | None = None
    retries: int = 1  # times a trial whose worker died (crash, OOM kill, lost node) is run again
    storage_outage_s: float = 120.0  # how long the driver waits for a lost database before it stops
    # A candidate already evaluated under the same task, training budget, engine and measurement settings: "reuse"
    # its stored result (not trained again, not counted in n_trials), or "retrain" it (a second seed)
    repeats: str = "reuse"

    def __post_init__(self) -> None:
        require(self.storage_outage_s >= 0, "storage_outage_s", "must be >= 0", self.storage_outage_s,
                "set it in seconds, e.g. storage_outage_s = 120 (0 stops at the first lost connection)")
        require(self.trial_timeout_s is None or self.trial_timeout_s > 0, "trial_timeout_s", "must be > 0",
                self.trial_timeout_s, "set it in seconds, e.g. trial_timeout_s = 600, or remove it")
        require(self.retries >= 0, "retries", "must be >= 0", self.retries, "set retries = 0 to never re-run")
        require(self.repeats in REPEATS, "repeats", f"must be one of {list(REPEATS)}", self.repeats,
                'set repeats = "reuse" (or "retrain" to train a repeated candidate again)')
        if self.n_trials is None and self.timeout_s is None:
            object.__setattr__(self, "n_trials", 12)  # frozen: the defaults are settled once, here
        require(self.n_trials is None or self.n_trials >= 1, "n_trials", "must be >= 1", self.n_trials,
                "set n_trials = 12, or remove it and set timeout_s")
        require(self.timeout_s is None or self.timeout_s > 0, "timeout_s", "must be > 0", self.timeout_s,
                "set timeout_s in seconds, e.g. timeout_s = 600, or remove it")
        require(self.max_failures is None or self.max_failures >= 0, "max_failures", "must be >= 0",
                self.max_failures, "set max_failures = 0 to stop at the first failed trial, or remove it")
        if self.max_failures is None:
            object.__setattr__(self, "max_failures", self.n_trials or 10)


@dataclass(frozen=True)
class SpaceSpec:
    # A search-space file (docs/search-space.md), relative to the study file; default, when callable is not set
    # either: the shipped "../search_spaces/transformer_lm.toml"
    file: str | None = None
    callable: str | None = None  # or "module:function": function(trial) -> arch dict

    def __post_init__(self) -> None:
        if self.file is None and self.callable is None:
            object.__setattr__(self, "file", "../search_spaces/transformer_lm.toml")
        require((self.file is None) != (self.callable is None), "file",
                "exactly one of file and callable must be set", None,
                'set file = "../search_spaces/transformer_lm.toml" or callable = "my_module:my_space"')
        if self.callable is not None:
            require(_is_import_path(self.callable), "callable", 'must look like "module:function"',
                    self.callable, 'e.g. callable = "my_space:sample" for def sample(trial) in my_space.py')


@dataclass(frozen=True)
class Constraints:
    """Limits: a trial over one is infeasible, stored but never on the front."""

    max_latency_ms: float | None = None  # at the smallest batch size
    max_peak_memory_mb: float | None = None  # the most over the batch sizes, in MiB (2**20 bytes), as measured
    max_params: int | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            require(value is None or value > 0, f.name, "must be > 0", value, "remove it to set no limit")

    def items(self) -> list[tuple[str, float]]:
        """(metric key, limit) of each limit that is set; a trial is feasible when metric <= limit."""
        return [(f.name.removeprefix("max_"), float(getattr(self, f.name)))
                for f in dataclasses.fields(self) if getattr(self, f.name) is not None]


@dataclass(frozen=True)
class HardwareSpec:
    device: str = "auto"  # "auto": a GPU if there is one
    batch_sizes: tuple[int, ...] = (1, 32)  # latency is the smallest's, throughput the largest's
    # CPU threads while measuring; default: the CPUs this process may use.
    threads: int | None = None  # At most those where the search starts its own workers (no Ray address)
    warmup_s: float = 0.1  # warm-up before each batch size is timed
    measure_s: float = 0.3  # at least this long (and 10 calls) per batch size ...
    max_measure_s: float = 3.0  # ... then on until the median is known to ci_tolerance, or this long at most
    ci_tolerance: float = 0.05  # half-width of the median's 95% confidence interval, relative to the median
    steady_s: float = 1.0  # GPU: a window this long looping the model, over which NVML/GPM sample
    cuda_graphs: bool = False  # GPU: time CUDA-graph replays (no launch overhead) besides eager calls
    kernels: bool = False  # per-kernel times through torch.profiler (costs a profiled call per batch size)
    constraints: Constraints = field(default_factory=Constraints)

    def __post_init__(self) -> None:
        require(self.device in DEVICES, "device", f"must be one of {list(DEVICES)}", self.device,
                'set device = "auto"')
        require(len(self.batch_sizes) > 0 and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1
                                                  for b in self.batch_sizes), "batch_sizes",
                "must be a non-empty list of integers >= 1", list(self.batch_sizes), "e.g. batch_sizes = [1, 32]")
        require(self.threads is None or self.threads >= 1, "threads", "must be >= 1", self.threads,
                "remove it to measure with every core")
        # Finite, each: warmup_s = inf (or `dsnas profile --measure-s inf`) timed one model until the trial's
        # timeout, and measure_s = inf was told "Fix: e.g. max_measure_s = inf". NaN fails the comparisons too.
        require(0 <= self.warmup_s < math.inf, "warmup_s", "must be >= 0 and finite", self.warmup_s,
                "e.g. warmup_s = 0.1")
        require(0 < self.measure_s < math.inf, "measure_s", "must be > 0 and finite", self.measure_s,
                "e.g. measure_s = 0.3")
        require(self.measure_s <= self.max_measure_s < math.inf, "max_measure_s", "must be >= measure_s and finite",
                self.max_measure_s, f"e.g. max_measure_s = {max(3.0, 10 * self.measure_s):g}")
        require(0 < self.ci_tolerance < 1, "ci_tolerance", "must be between 0 and 1", self.ci_tolerance,
                "e.g. ci_tolerance = 0.05 (5%)")
        require(0.2 <= self.steady_s < math.inf, "steady_s",
                "must be >= 0.2 (GPM samples must be > 100 ms apart) and finite",
                self.steady_s, "e.g. steady_s = 1.0")


@dataclass(frozen=True)
class ExecutorSpec:
    kind: str = "ray"  # "local" runs trials one at a time in this process (debugging, one-GPU machines)
    address: str | None = None  # a running Ray cluster, "host:port" or "auto"; default: start a local Ray
    workers: int | None = None  # default: as many trials as the resources allow
    cpus_per_trial: float = 1.0  # Ray resources of one trial
    gpus_per_trial: float = 0.0  # whole GPUs; 0: one when the device is a GPU

    def __post_init__(self) -> None:
        require(self.kind in EXECUTORS, "kind", f"must be one of {list(EXECUTORS)}", self.kind,
                'set kind = "ray" (or "local" to run trials in this process)')
        require(self.workers is None or self.workers >= 1, "workers", "must be >= 1", self.workers,
                "remove it to run as many trials at once as the resources allow")
        require(self.cpus_per_trial > 0, "cpus_per_trial", "must be > 0", self.cpus_per_trial,
                "e.g. cpus_per_trial = 1")
        require(self.gpus_per_trial == 0 or self.gpus_per_trial >= 1 and float(self.gpus_per_trial).is_integer(),
                "gpus_per_trial", "must be 0 or a whole number: a measurement owns its GPU",
                self.gpus_per_trial, "use gpus_per_trial = 1")
        require(self.address is None or self.kind == "ray", "address", 'needs kind = "ray"', self.address,
                'set kind = "ray", or remove address to run locally')


@dataclass(frozen=True)
class EngineSpec:
    """How the engine (dsnas.kernels) turns a trained candidate with sparse or low-precision layers into what ships:
    sparsify -> fine-tune -> calibrate + QAT -> convert. A candidate whose layers are all dense fp32 skips it all."""

    # Which weights 2:4 keeps: "wanda" (|w|*||x||), "magnitude" or "hessian" (diag(H)*w^2). Not hessian: on the
    # quickstart's d128 L2 model two independent Hutchinson estimates pick the same 2:4 masks at chance (50.1% of
    # positions at 8 probes, already 7-9% of a trial's training; 52.4% at 64 probes x 8 batches, 5.4x the training),
    # and it fine-tunes to 0.5 points below wanda; wanda's masks agree on 99.5% for 1% (benchmarks/saliency.py).
    saliency: str = "wanda"
    hessian_samples: int = 8  # Hutchinson probes for the "auto" layers' traces and for saliency "hessian"
    finetune_frac: float = 0.25  # fine-tuning after sparsifying, as a share of the task's training budget
    calibrator: str = "kl"  # INT8 activation ranges: "kl" (TensorRT's entropy), "percentile" or "max"
    calibration_batches: int = 8  # batches the INT8 calibrator observes
    qat_frac: float = 0.25  # quantization-aware training, as a share of the task's training budget
    lr_scale: float = 0.3  # fine-tuning and QAT run at this share of the task's learning rate
    fallback_steps: int = 20  # a low-precision layer that overflowed computes in fp32 this many steps
    int8_backend: str = "auto"  # "auto" (the fastest measured here), "torchao-dynamic", "torch-dynamic", "int8-static"
    # Measure the candidate under torch.compile (inductor) instead of eager. `dsnas verify` and `dsnas profile`
    # compile the exported bundle before timing it, and its card says to (dsnas.load gives the eager model). On a
    # 2-core EPYC compile ran d64 L2 models 1.34-1.45x faster, d256 1.10x, for 4-10 s of compile time each.
    compile: bool = False

    def __post_init__(self) -> None:
        choices = {"saliency": ("hessian", "wanda", "magnitude"), "calibrator": ("kl", "percentile", "max"),
                   "int8_backend": ("auto", "torchao-dynamic", "torch-dynamic", "int8-static")}
        for key, allowed in choices.items():
            require(getattr(self, key) in allowed, key, f"must be one of {list(allowed)}", getattr(self, key),
                    f'e.g. {key} = "{allowed[0]}"')
        for key in ("finetune_frac", "qat_frac"):
            require(0 <= getattr(self, key) <= 1, key, "must be in [0, 1]", getattr(self, key),
                    f"e.g. {key} = 0.25 (0 skips the step)")
        require(self.finetune_frac + self.qat_frac <= 0.9, "qat_frac", "finetune_frac + qat_frac must be <= 0.9: "
                "both come out of the task's training budget, and the first training needs the rest",
                self.finetune_frac + self.qat_frac, "e.g. finetune_frac = 0.25 and qat_frac = 0.25")
        require(0 < self.lr_scale <= 1, "lr_scale", "must be in (0, 1]", self.lr_scale, "e.g. lr_scale = 0.3")
        for key in ("hessian_samples", "calibration_batches", "fallback_steps"):
            require(getattr(self, key) >= 1, key, "must be >= 1", getattr(self, key),
                    f"remove {key} to use its default ({getattr(EngineSpec, key)})")


FIDELITY_KINDS = ("none", "successive_halving", "hyperband")
TRAINED = ("accuracy", "val_loss")  # the metrics training changes; the rest (hardware figures) are known at rung 0


@dataclass(frozen=True)
class FidelitySpec:
    kind: str = "successive_halving"  # "none" trains every candidate fully
    eta: int = 3  # at each rung, the best 1/eta of the trials that reached it go on
    # The first rung: the smallest share 1/eta**k of the budget that is at least this. 1/3 (one rung, with eta 3):
    # on the quickstart's task the accuracy at 1/9 of the budget says little about the end (Spearman 0.56 over 108
    # recorded models), at 1/3 it says much (0.86); benchmarks/search_efficiency.py prints it.
    min_fraction: float = 1 / 3
    min_trials: int = 3  # a rung stops nobody until this many trials of the bracket have reached it
    margin: float = 0.015  # a rung's lead in accuracy (or loss) counts only beyond this share of the value

    def __post_init__(self) -> None:
        require(self.kind in FIDELITY_KINDS, "kind", f"must be one of {list(FIDELITY_KINDS)}", self.kind,
                'set kind = "successive_halving" or "hyperband", or "none" to train every candidate fully')
        require(self.eta >= 2, "eta", "must be >= 2", self.eta, "e.g. eta = 3 (keep the best third at each rung)")
        require(0 < self.min_fraction < 1, "min_fraction", "must be between 0 and 1 (a share of the training budget)",
                self.min_fraction, "e.g. min_fraction = 0.333")
        require(self.min_fraction * self.eta <= 1 + 1e-9, "min_fraction", f"must be <= 1/eta (1/{self.eta}) for a "
                "rung to fit below the full budget", self.min_fraction,
                f"e.g. min_fraction = {int(1000 / self.eta) / 1000:g}")
        require(self.min_trials >= 1, "min_trials", "must be >= 1", self.min_trials, "e.g. min_trials = 3")
        require(0 <= self.margin < 1, "margin", "must be in [0, 1) (a share of the objective's value)", self.margin,
                "e.g. margin = 0.015; 0 compares rung values exactly")

    @property
    def enabled(self) -> bool:
        return self.kind != "none"


MIN_CHECKED = 3  # held-out checks before the recent errors, not the cross-validation, decide whether to trust it


@dataclass(frozen=True)
class PredictorSpec:
    skip: bool = True  # skip candidates predicted over a [hardware.constraints] limit
    margin: float = 0.2  # ... by more than this share of the limit; also the error above which skipping pauses
    refit_error: float = 0.3  # a measurement this far from its prediction re-fits the predictor before the next one
    refit_every: int = 4  # and it is re-fitted after this many new measurements anyway
    recent: int = 5  # how many recent held-out errors the guard looks at (at least 3)

    def __post_init__(self) -> None:
        require(self.margin >= 0, "margin", "must be >= 0", self.margin, "e.g. margin = 0.2 (20% over the limit)")
        require(self.refit_error > 0, "refit_error", "must be > 0", self.refit_error, "e.g. refit_error = 0.3")
        require(self.refit_every >= 1, "refit_every", "must be >= 1", self.refit_every,
                f"remove refit_every to use its default ({PredictorSpec.refit_every})")
        # The guard trusts the recent errors once it has MIN_CHECKED of them: with fewer kept, it never had them,
        # and skipping went on whatever the recent predictions missed by.
        require(self.recent >= MIN_CHECKED, "recent", f"must be >= {MIN_CHECKED}, the held-out checks the guard "
                "needs before it judges the predictor by them", self.recent,
                f"set recent = {MIN_CHECKED} or more, or remove it to use its default ({PredictorSpec.recent})")


@dataclass(frozen=True)
class TaskSpec:
    name: str = "charlm"  # the built-in task, or "module:factory" (docs/own-model.md); other keys: its parameters
    params: dict[str, Any] = field(default_factory=dict)
    base_dir: str = "."  # relative paths in params resolve here (the study file's folder)


@dataclass(frozen=True)
class StudySpec:
    path: str
    name: str
    storage: str
    seed: int
    objectives: tuple[Objective, ...]
    sampler: SamplerSpec
    budget: BudgetSpec
    space: SpaceSpec
    task: TaskSpec
    hardware: HardwareSpec
    executor: ExecutorSpec
    engine: EngineSpec = field(default_factory=EngineSpec)
    fidelity: FidelitySpec = field(default_factory=FidelitySpec)
    predictor: PredictorSpec = field(default_factory=PredictorSpec)
    callbacks: tuple[str, ...] = ()  # "module:callable" of Optuna-style callbacks (study, trial), after each trial
    # Each trial's arch and profile as JSON artifact files as it finishes (they are in its attributes anyway, and
    # `dsnas dashboard` writes the files it shows when it starts): two files and four commits a trial, so off unless
    # a dashboard must show them live.
    json_artifacts: bool = False

    @property
    def base_dir(self) -> Path:
        return Path(self.path).parent

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]


_SECTIONS = ("study", "objectives", "sampler", "budget", "space", "task", "hardware", "executor", "engine", "fidelity",
             "predictor")


def load_study(path: str | os.PathLike[str], **overrides: Any) -> StudySpec:
    """Read and validate a study file to run it: :func:`read_study`, then the user's plug-ins imported and the task's
    parameters checked (:func:`check_plugins`), then what this machine must offer (:func:`check_machine`)."""
    spec = read_study(path, **overrides)
    forget_built()  # a run reads its task's data as it is now, not as an earlier run in this process did
    forget_families()  # and imports a user family's builder as its file is now
    check_sampler(spec)
    check_plugins(spec)
    check_machine(spec)
    return spec


def read_study(path: str | os.PathLike[str], **overrides: Any) -> StudySpec:
    """Read and validate a study file without running anything: no plug-in is imported, no Ray address or GPU is
    checked, so that a study that ran on a cluster reads (report, export, dashboard) on a laptop. ``overrides``
    (executor, address, n_trials, timeout_s) stand for CLI flags."""
    path = Path(path).resolve()
    where = str(path)
    if is_there(path.is_dir):  # it said "must exist" of a folder that does
        studies = sorted(f.name for f in path.glob("*.toml"))[:3]
        raise SpecError(where, "-", "must be a study file, and this is a folder", None,
                        f"give a study file in it ({', '.join(studies)})" if studies else "give a study file's path")
    if not is_there(path.is_file):
        raise SpecError(where, "-", "the study file must exist", None, "check the path, or run `dsnas init DIR`")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # bad TOML or UTF-8, an int of > 4300 digits, nesting too deep
        raise SpecError(where, "-", f"must be valid TOML ({e})", None, "correct the TOML syntax there") from None
    except OSError as e:  # unreadable: its permissions
        raise SpecError(where, "-", f"must be readable ({e.strerror})", None, "check its permissions") from None
    flags = _apply_overrides(raw, overrides)
    try:
        spec = _build_study(where, path, raw)
    except SpecError as e:
        if e.key not in flags:
            raise
        raise SpecError(f"{where} with {flags[e.key]}", e.key, e.rule, e.got, _flag_fix(e, flags[e.key])) from None
    local = f"{where} with {flags['executor.kind']}" if "executor.kind" in flags else where  # the flag chose it
    require_spec(local, "budget.trial_timeout_s", spec.budget.trial_timeout_s is None or spec.executor.kind != "local",
                 "needs the ray executor: the local executor runs a trial in this process and cannot stop it",
                 spec.budget.trial_timeout_s, 'set [executor] kind = "ray", or remove trial_timeout_s'
                 + (f" (or leave out {flags['executor.kind']})" if "executor.kind" in flags else ""))
    # A sparse or int8 candidate trains on the budget less fine-tuning and QAT first, and reports at its rungs within
    # that training: a rung beyond it fired at its end, on fewer tokens than an fp32 peer's at the same rung.
    first = 1 - spec.engine.finetune_frac - spec.engine.qat_frac
    last_rung = 1 / spec.fidelity.eta
    require_spec(where, "engine.finetune_frac", not spec.fidelity.enabled or last_rung <= first + 1e-9,
                 f"with qat_frac leaves {first:.3g} of the budget to a sparse or int8 candidate's first training, "
                 f"less than the last rung's share 1/eta = {last_rung:.3g} ([fidelity] eta = {spec.fidelity.eta}): "
                 "it would reach that rung on fewer tokens than its peers",
                 spec.engine.finetune_frac + spec.engine.qat_frac,
                 f"make finetune_frac + qat_frac at most {1 - last_rung:.3g}, or raise [fidelity] eta")
    return spec


def _build_study(where: str, path: Path, raw: dict[str, Any]) -> StudySpec:
    # [pruning] was the old name of [fidelity]: "pruning" named three things (2:4 weights, trials stopped at a
    # rung, the predictor's skip), now called sparsity, fidelity and skipping.
    require_spec(where, "pruning", "pruning" not in raw, "was renamed [fidelity] (successive halving and hyperband)",
                 None, "rename the table [pruning] to [fidelity]; its keys are unchanged")
    reject_unknown(where, "", raw, _SECTIONS)
    study = section_table(where, raw, "study")
    reject_unknown(where, "study.", study, ("name", "storage", "seed", "callbacks", "json_artifacts"))
    name = typed(where, "study.name", study.get("name", path.stem), str)
    require_spec(where, "study.name", re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) is not None,
                 "must be a plain name (letters, digits, '_', '-', '.'): it names the database and folders",
                 name, 'e.g. name = "my_study"')
    seed = typed(where, "study.seed", study.get("seed", 0), int)
    require_spec(where, "study.seed", 0 <= seed < 2**31, "must be in [0, 2**31)", seed, "e.g. seed = 0")
    callbacks = typed(where, "study.callbacks", study.get("callbacks", []), tuple[str, ...])
    for target in callbacks:
        require_spec(where, "study.callbacks", _is_import_path(target), 'each must look like "module:callable"',
                     target, 'e.g. callbacks = ["my_callbacks:log_trial"], with my_callbacks.py beside the study file')
    return StudySpec(
        path=where,
        name=name,
        storage=_storage_url(where, study.get("storage"), path.parent, name),
        seed=seed,
        objectives=_objectives(where, section_table(where, raw, "objectives")),
        sampler=_sampler(where, section_table(where, raw, "sampler")),
        budget=build_section(where, "budget", BudgetSpec, section_table(where, raw, "budget")),
        space=_space(where, section_table(where, raw, "space"), path.parent),
        task=_task(where, section_table(where, raw, "task"), path.parent),
        hardware=build_section(where, "hardware", HardwareSpec, section_table(where, raw, "hardware")),
        executor=build_section(where, "executor", ExecutorSpec, section_table(where, raw, "executor")),
        engine=build_section(where, "engine", EngineSpec, section_table(where, raw, "engine")),
        fidelity=build_section(where, "fidelity", FidelitySpec, section_table(where, raw, "fidelity")),
        predictor=build_section(where, "predictor", PredictorSpec, section_table(where, raw, "predictor")),
        callbacks=tuple(callbacks),
        json_artifacts=typed(where, "study.json_artifacts", study.get("json_artifacts", False), bool),
    )


def _apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, str]:
    """Put flag values into the raw study; returns {key: "--flag VALUE"} so errors can blame the flag."""
    places = {"executor": ("executor", "kind", "--executor"), "address": ("executor", "address", "--address"),
              "n_trials": ("budget", "n_trials", "--n-trials"), "timeout_s": ("budget", "timeout_s", "--timeout")}
    flags = {}
    for name, value in overrides.items():
        if name not in places:
            raise TypeError(f"unknown override {name!r}; known: {sorted(places)}")
        if value is not None:
            section, key, flag = places[name]
            if not isinstance(raw.setdefault(section, {}), dict):
                continue  # the loader reports the section itself as not a table
            raw[section][key] = value
            flags[f"{section}.{key}"] = f"{flag} {value}"
    return flags


def _flag_fix(error: SpecError, given: str) -> str:
    """The fix of a flag's bad value, told as the flag: `--n-trials 0` was told "Fix: set n_trials = 12", a file's
    key that the command line had set."""
    flag = given.split(" ", 1)[0]
    example = re.search(rf"\b{re.escape(error.key.rsplit('.', 1)[-1])} = ([^\s,)]+)", error.fix or "")
    # A rule on another key's value keeps its fix for that key: `--address` where kind = "local" was told
    # "correct --address", an address that was right, where the fix is kind = "ray".
    other = re.match(r"set \w+ = [^,]+", error.fix or "")
    fix = f"e.g. {flag} {example.group(1)}" if example else other.group(0) if other else f"correct {flag}"
    return f"{fix}, or leave {flag} out (the file's value is used)"


def _objectives(where: str, table: dict[str, Any]) -> tuple[Objective, ...]:
    table = table or {"accuracy": "maximize", "throughput": "maximize"}
    out = []
    for name, direction in table.items():
        reject_unknown(where, "objectives.", {name: 0}, OBJECTIVES)
        require_spec(where, f"objectives.{name}", direction in ("maximize", "minimize"),
                     'must be "maximize" or "minimize"', direction,
                     f'write {name} = "{OBJECTIVES[name][1]}"')
        out.append(Objective(name, direction))
    return tuple(out)


def _storage_url(where: str, url: Any, base: Path, name: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if url is None:  # rendered by SQLAlchemy: a "?" or "%" in the folder's path stays part of it
        return make_url("sqlite://").set(database=str(base / (name + ".db"))).render_as_string(hide_password=False)
    typed(where, "study.storage", url, str)
    shown = masked_url(url)  # what an error may print: "dsnas never prints a password"
    fix = 'use e.g. "sqlite:///results.db" or "postgresql+psycopg://user@host/db"'
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise SpecError(where, "study.storage", "must be an SQLAlchemy database URL", shown, fix) from None
    except ValueError as e:  # e.g. a port that is not a number
        raise SpecError(where, "study.storage", f"must be an SQLAlchemy database URL ({e})", shown,
                        fix) from None
    require_spec(where, "study.storage", parsed.get_backend_name() in STORAGE_BACKENDS,
                 f"the database must be one of {list(STORAGE_BACKENDS)}", shown, fix)
    try:
        parsed.get_dialect().import_dbapi()
    except ArgumentError as e:  # a driver SQLAlchemy does not know, e.g. "postgresql+nosuchdriver://"
        raise SpecError(where, "study.storage", f"must name a known database driver ({e})", shown,
                        fix) from None
    except ImportError as e:
        raise SpecError(where, "study.storage", f"needs its database driver ({e})", shown,
                        f"pip install the driver for {parsed.drivername}") from None
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database or ""
        require_spec(where, "study.storage", db not in ("", ":memory:"),
                     "must name a database file (an in-memory database loses the study)", shown, fix)
        db_path = Path(db) if Path(db).is_absolute() else base / db
        require_spec(where, "study.storage", is_there(db_path.parent.is_dir), "the database's folder must exist",
                     shown, f"create {db_path.parent}")
        return parsed.set(database=str(db_path)).render_as_string(hide_password=False)
    return url


def _sampler(where: str, table: dict[str, Any]) -> SamplerSpec:
    """name and seed, and every other key as the sampler's own setting (checked when the study runs: that needs
    Optuna's classes, see check_sampler)."""
    own = {k: v for k, v in table.items() if k in ("name", "seed")}
    return dataclasses.replace(build_section(where, "sampler", SamplerSpec, own),
                               settings={k: v for k, v in table.items() if k not in own})


def check_sampler(spec: StudySpec) -> None:
    """The [sampler] settings against the Optuna sampler's signature: each a parameter it has, of its type, and a
    value it accepts (the sampler is built once with them); one line naming the key otherwise."""
    import inspect
    import warnings

    sampler = spec.sampler
    if not sampler.settings:
        return
    cls = sampler_class(sampler.name)
    params = {n: p for n, p in inspect.signature(cls).parameters.items() if n != "seed"
              and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)}
    for key, value in sampler.settings.items():
        if key not in params:
            close = difflib.get_close_matches(key, list(params), n=1)
            shown = key if key.isprintable() else repr(key)  # a quoted TOML key may hold a line break
            raise SpecError(spec.path, f"sampler.{shown}", f"is not a setting of {_owner(cls)}", None,
                            f"did you mean {close[0]!r}?" if close else f"its settings: {', '.join(params)}"
                            if params else f"it takes no setting but seed: remove sampler.{shown}")
        kinds = _toml_kinds(params[key].annotation)
        if not kinds:
            raise SpecError(spec.path, f"sampler.{key}", "cannot be set in a study file (it takes a Python object)",
                            value, f"remove {key}, or pass a sampler of your own through the Python API")
        if not isinstance(value, kinds) or isinstance(value, bool) != (bool in kinds):
            # "float", not "int or float": an int is a float's value written without a point
            wanted = " or ".join(k.__name__ for k in kinds if k is not int or float not in kinds)
            example = {bool: "true", int: "10", float: "0.5", str: '"text"'}[kinds[-1]]
            raise SpecError(spec.path, f"sampler.{key}", f"must be of type {wanted}, as {cls.__name__} takes it",
                            value, f"e.g. {key} = {example}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning for some settings: the run shows them
            cls(seed=0, **sampler.settings)
    except (ValueError, TypeError) as e:
        raise SpecError(spec.path, "sampler", f"{_owner(cls)} refuses these settings ({e})",
                        sampler.settings, "correct the value its message names") from None


def _owner(cls: type) -> str:
    return f"dsnas's {cls.__name__}" if cls.__module__.startswith("dsnas") else f"Optuna's {cls.__name__}"


def sampler_class(name: str) -> Any:
    """The class a [sampler] name stands for."""
    if name == "dsnas":
        from dsnas.sampler import DsnasSampler  # numpy and the model load on first use

        return DsnasSampler
    import optuna.samplers

    return getattr(optuna.samplers, SAMPLER_CLASSES[name])


def _toml_kinds(annotation: Any) -> tuple[type, ...]:
    """The Python types a TOML value may have for a parameter annotated so ("bool | None", "int", "float"); () for
    one that takes an object (a callable, a crossover, a list) that a study file cannot write."""
    words = set(re.findall(r"[A-Za-z_]+", annotation if isinstance(annotation, str) else
                           getattr(annotation, "__name__", str(annotation))))
    if words - {"bool", "int", "float", "str", "None", "Optional", "Union"}:
        return ()
    takes = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}  # TOML writes 2 for 2.0
    return tuple(dict.fromkeys(k for name, kinds in takes.items() if name in words for k in kinds))


def shipped(name: str) -> Path:
    """A file dsnas ships (the quickstart study, the default search space): inside the installed wheel, or at the
    top of a source checkout."""
    packaged = resources.files("dsnas") / "_examples" / name
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / name


def _space(where: str, table: dict[str, Any], base: Path) -> SpaceSpec:
    space = build_section(where, "space", SpaceSpec, table)
    if space.file is not None:
        path = base / space.file
        if not table and not is_there(path.is_file):  # the default, where no checkout's search_spaces/ is beside
            path = shipped("search_spaces/transformer_lm.toml")
        require_spec(where, "space.file", is_there(path.is_file), "the search-space file must exist", space.file,
                     f"check the path (relative to {base})")
        path = path.resolve()
        load_space_file(path)  # validates the space, raising SpecError that names the space file
        return SpaceSpec(file=str(path))
    return space


def _task(where: str, table: dict[str, Any], base: Path) -> TaskSpec:
    table = dict(table)
    name = typed(where, "task.name", table.pop("name", "charlm"), str)

    if name not in BUILTIN_TASKS:
        require_spec(where, "task.name", _is_import_path(name),
                     f'must be a built-in task ({", ".join(BUILTIN_TASKS)}) or "module:callable"', name,
                     'set name = "charlm", or name a factory of your own as "my_task:make"')
    return TaskSpec(name=name, params=table, base_dir=str(base))


def check_plugins(spec: StudySpec) -> None:
    """Import the user's space callable and task factory, and check the task's parameters (names, types, data
    files): what a run (or `dsnas profile`) needs and reading the results does not."""
    where, base = spec.path, spec.base_dir
    if spec.space.callable is not None:
        _import_callable(where, "space.callable", spec.space.callable, base)
    space = load_space_file(spec.space.file) if spec.space.file is not None else None
    name = space.family if space is not None else None
    if name is not None and is_user_family(name):  # the builder, imported as the workers will (study folder first)
        _import_callable(where, f"family (in {spec.space.file})", name, base)
    package = missing_package(name) if name is not None else ""
    if package:  # before any work: without it the search started (Ray too) and stored every trial as failed
        from dsnas.models import family  # the family's module: torch loads on first use

        raise SpecError(str(spec.space.file), "family", f"the {name} family needs the {package} package, which is "
                        "not installed", name, family(str(name)).INSTALL_HINT)
    if spec.task.name not in BUILTIN_TASKS:
        _import_callable(where, "task.name", spec.task.name, base)
    check_params(where, spec.task)
    if spec.task.name not in BUILTIN_TASKS:
        check_task(where, spec.task)
    if name is not None:
        _check_family_fits_task(where, spec, name)
    if space is not None and is_user_family(space.family):
        _check_choices_beside_task(spec, space)
    if space is not None and space.groups and not is_user_family(space.family):
        _check_group_patterns(space, spec.space.file)
    if space is not None and space.by_device and spec.task.name not in BUILTIN_TASKS and \
            runs_own_trials(make_task(spec.task)):
        # The probe times this device's kernels for models dsnas builds; a task that evaluates architectures itself
        # (a table of recorded results) runs none of them here, so the probe's offer would say nothing of its trials
        key = "precision" if space.by_device == ("precision",) else "engine"
        raise SpecError(spec.space.file, key, f'"auto" decides from a probe of this device\'s kernels, but the task '
                        f"{spec.task.name!r} evaluates architectures itself (evaluate_arch) and runs no model here",
                        AUTO, 'list the choices its trials take, e.g. precision = ["fp32", "bf16"]')
    study_callbacks(spec)


# Stand-ins for the task's keys of a built-in family's architecture: module names do not depend on them.
_ANY_TASK_KEYS = {"vocab_size": 256, "context": 16, "image_size": 32, "channels": 3, "n_classes": 2}


def _check_group_patterns(space: Any, where: str) -> None:
    """Each [engine.NAME] pattern of a built-in family's space matches a module of its largest candidate and of its
    smallest, before any work: a pattern that matches none failed every trial (docs once showed one), and one that
    names a stage only deep models have failed every shallower trial. The module names are found on the meta
    device, which allocates nothing."""
    from fnmatch import fnmatchcase

    import torch

    from dsnas.models import build  # torch loads on first use

    def names_of(pick: Any) -> list[str]:
        params = {name: pick(options) for name, options in space.parameters().items()}
        arch = {key: value for key, value in space.arch_of(params).items() if key != "engine"}
        with torch.device("meta"):
            return [n for n, _ in build({**_ANY_TASK_KEYS, **arch}).named_modules() if n]

    def numeric(options: tuple[Any, ...]) -> bool:
        return all(isinstance(o, (int, float)) and not isinstance(o, bool) for o in options)
    largest = names_of(lambda o: max(o) if numeric(o) else o[-1])
    smallest = names_of(lambda o: min(o) if numeric(o) else o[0])
    for group in space.groups:
        for pattern in group.modules:
            for names, which in ((largest, "largest"), (smallest, "smallest")):
                if not any(fnmatchcase(n, pattern) for n in names):
                    generic = list(dict.fromkeys(re.sub(r"\.\d+(?=\.|$)", ".*", n) for n in names))
                    raise SpecError(where, f"engine.{group.name}.modules", f"must match modules of every candidate; "
                                    f"{pattern!r} matches none of the {which} {space.family} candidate's "
                                    f"{len(names)}", pattern, f"name some of {', '.join(generic[:12])}"
                                    f"{', ...' if len(generic) > 12 else ''}")


def _check_family_fits_task(where: str, spec: StudySpec, name: str) -> None:
    """A built-in family (``name``, of the space file) takes some architecture keys from the task (a cnn its image
    size, channels and classes; a language model its vocabulary and context): a cnn space with charlm failed every
    trial, naming neither."""
    from dsnas.models import family  # the family's module: torch loads on first use

    if is_user_family(name) or (spec.task.name not in BUILTIN_TASKS and runs_own_trials(make_task(spec.task))):
        return  # a user's builder takes what it takes; a task evaluating architectures itself builds no model
    given = set(arch_keys(spec.task))
    missing = [key for key in family(name).TASK_KEYS if key not in given]
    pairs = "cnn with \"images\"; transformer_lm and hf_causal_lm with \"charlm\""
    require_spec(where, "task.name", not missing, f"the {name} family of {spec.space.file} needs {missing} from "
                 f"the task, which it does not give", spec.task.name,
                 f"pair {pairs}, or give a task whose arch_defaults() has them")


def _check_choices_beside_task(spec: StudySpec, space: Any) -> None:
    """A user family's choice named as a key the task fixes (its context, vocabulary, image size) was replaced by
    the task's value in every candidate: the choices collapsed without a word, and the search ran out of new ones."""
    fixed = [key for key in arch_keys(spec.task) if key in space.choices]
    if fixed:
        key = fixed[0]
        raise SpecError(spec.space.file or spec.path, f"choices.{key}", f"is fixed by the task {spec.task.name!r} "
                        "(the task's value goes into every architecture, whatever is chosen)", list(space.choices[key]),
                        f"remove [choices] {key} and set it in the study file's [task], or name the choice otherwise")


def study_callbacks(spec: StudySpec) -> list[Callable[..., Any]]:
    """The [study] callbacks, imported (the study's folder is importable); each must be callable."""
    found = []
    for target in spec.callbacks:
        callback = _import_callable(spec.path, "study.callbacks", target, spec.base_dir)
        require_spec(spec.path, "study.callbacks", callable(callback), "each must name a callable (study, trial)",
                     target, "name a function, or an object with __call__, e.g. optuna-integration's MLflowCallback")
        found.append(callback)
    return found


def _is_import_path(text: str) -> bool:
    module, _, attr = text.partition(":")
    return bool(module) and bool(attr) and all(p.isidentifier() for p in module.split(".") + attr.split("."))


def _import_callable(where: str, key: str, target: str, base: Path) -> Any:
    try:
        return import_callable(target, base)
    except ShadowedModule as e:
        raise SpecError(where, key, e.rule, target, e.fix) from None
    except (Exception, SystemExit) as e:  # whatever the user's module raises (or exits with) on import
        detail = " ".join(str(e).splitlines())  # the message stays one line
        raise SpecError(where, key, f"must name an importable callable ({type(e).__name__}: {detail})", target,
                        _import_fix(e, target, base)) from None


def _import_fix(error: BaseException, target: str, base: Path) -> str:
    """The fix for a "module:callable" that did not import, by what failed: placing the module helps only where it
    is the one missing (a module beside the study with a syntax error, one whose own import of an uninstalled
    package failed, or one without the callable named, were all told to put it beside the study file, where it was)."""
    import sys

    module = target.partition(":")[0]
    if isinstance(error, SyntaxError):
        return f"correct the syntax of {error.filename or module} at line {error.lineno}"
    if isinstance(error, ModuleNotFoundError):
        missing = error.name or module
        if module == missing or module.startswith(f"{missing}."):
            return f"put the module beside the study file ({base}) or on PYTHONPATH"
        return f"install {missing} (which {module} imports) where dsnas runs"
    loaded = sys.modules.get(module)  # a module whose own code raised is not kept
    if loaded is None:
        return f"run `python -c 'import {module}'` in {base} to see where importing it fails, and correct that"
    return f"name a function or class that {getattr(loaded, '__file__', None) or module} defines, after the ':'"


def check_machine(spec: StudySpec) -> None:
    """What running the study needs of this machine: a requested GPU (and one of fp8's generation when the space
    offers fp8), a reachable Ray cluster. `dsnas search` alone checks it."""
    where = spec.path
    _check_fp8(spec)
    if spec.hardware.threads is not None and spec.executor.address is None:  # its trials are measured here
        from dsnas.profiler.capabilities import usable_cpus  # reads /proc and the cgroup: the search's check only

        cpus = usable_cpus()
        # threads = 100000 ended in a MemoryError traceback from the driver; any count above the CPUs measures an
        # oversubscribed CPU (its ceilings cached as this machine's).
        require_spec(where, "hardware.threads", spec.hardware.threads <= cpus,
                     f"must be at most the {cpus} CPUs this process may use here", spec.hardware.threads,
                     f"e.g. threads = {cpus}, or remove it to use them all")
    if spec.hardware.device == "cuda" and spec.executor.address is None:
        import torch

        require_spec(where, "hardware.device", torch.cuda.is_available(), "cuda needs a visible NVIDIA GPU",
                     "cuda", 'set device = "auto" to use a GPU when there is one')
    if spec.executor.address:
        host, port = _ray_host_port(spec.executor.address)
        require_spec(where, "executor.address", host is not None, 'must be "host:port", "ray://host:port" or "auto"',
                     spec.executor.address, 'e.g. address = "127.0.0.1:6379", as `ray start --head` prints it')
        try:
            grpc = _speaks_grpc(host, port)
        except (OSError, UnicodeError) as e:  # UnicodeError: a host name IDNA cannot encode, e.g. "a..b"
            reason = getattr(e, "strerror", None) or e
            raise SpecError(where, "executor.address", f"no Ray cluster answers there ({reason})",
                            spec.executor.address, "start one with `ray start --head`, or remove address "
                            "to start a local Ray") from None
        require_spec(where, "executor.address", grpc, f"{host}:{port} answers, but not as a Ray head does (gRPC): "
                     "Ray would retry it for about 14 minutes", spec.executor.address,
                     "give the address `ray start --head` prints (the GCS port, 6379 by default), not its dashboard's")


def _speaks_grpc(host: str, port: int, timeout_s: float = 5.0) -> bool:
    """Whether ``host:port`` answers an HTTP/2 client preface with a SETTINGS frame, as a Ray head's gRPC server
    does at once. Another service on the port (a dashboard, a web server) was taken for a Ray head, and Ray then
    retried it 20 times, about 40 s each. A cluster with TLS (RAY_USE_TLS) is not asked."""
    with socket.create_connection((host, port), timeout=timeout_s) as conn:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return True
        conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        header = b""
        deadline = time.monotonic() + timeout_s
        while len(header) < 9 and time.monotonic() < deadline:
            try:
                chunk = conn.recv(9 - len(header))
            except TimeoutError:
                break
            if not chunk:
                break
            header += chunk
    return len(header) == 9 and header[3] == 0x04  # the frame type byte: 4 is SETTINGS


def _check_fp8(spec: StudySpec) -> None:
    """fp8 runs only on GPUs of compute capability 8.9+: refuse a space that offers it where trials run on the CPU
    here, rather than failing every trial that draws it."""
    if spec.space.file is None or spec.executor.address is not None:
        return  # a user callable's choices are unknown here; a remote cluster's devices too

    space = load_space_file(spec.space.file)
    keys = {"precision": space.choices.get("precision", ()) + space.per_layer.get("precision", ()),
            **{f"engine.{g.name}.precision": g.precision for g in space.groups}}
    offered = [key for key, options in keys.items() if "fp8" in options]
    if offered:
        require_spec(spec.space.file, offered[0], fp8_may_run(spec), "fp8 needs an NVIDIA GPU of compute "
                     "capability 8.9 or newer, and trials here run on the CPU", "fp8",
                     "remove \"fp8\" from the precision choices")


def fp8_may_run(spec: StudySpec) -> bool:
    """Whether the study's trials may run fp8: on "cuda", or on "auto" where this machine's GPU is 8.9+ (a
    remote cluster's devices are not known here, so yes)."""
    if spec.executor.address is not None or spec.hardware.device == "cuda":
        return True
    import torch

    return spec.hardware.device == "auto" and torch.cuda.is_available() and \
        torch.cuda.get_device_capability() >= (8, 9)


def _ray_host_port(address: str) -> tuple[str | None, int]:
    if address == "auto":  # as Ray resolves it: $RAY_ADDRESS, then the cluster `ray start` last recorded
        recorded = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        address = os.environ.get("RAY_ADDRESS") or (recorded.read_text(encoding="utf-8").strip()
                                                    if recorded.is_file() else "")
        address = address or "127.0.0.1:6379"
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:  # "\u00b2".isdigit() too
        return None, 0
    return host, int(port)

