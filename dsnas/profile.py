"""`dsnas profile`: measure one architecture outside a search (from a study's trial, an export bundle or an
architecture file) with the study's protocol, and print the whole profile."""

from __future__ import annotations

import json
import numbers
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from dsnas.allocator import POLICY
from dsnas.errors import DsnasError, Invalid
from dsnas.export.bundle import (
    _read_json,
    as_measured,
    load_bundle,
    read_bundle,
    recorded_hardware,
    recorded_task_spec,
)
from dsnas.export.card import measured_compiled
from dsnas.models import FAMILIES, build, is_user_family, validate
from dsnas.profiler.device import device_key, fingerprint_id, named_device
from dsnas.profiler.gate import MeasureGate
from dsnas.profiler.measure import eval_mode, measure
from dsnas.spec import HardwareSpec, TaskSpec, check_plugins, read_study
from dsnas.tasks import make_task, throughput_unit


def load_target(target: str, trial: int | None, device: Any = "cpu") -> tuple[Any, Any, Any, str]:
    """(model, TaskSpec, HardwareSpec, what it is) for a bundle folder, a study file with --trial, or an
    architecture JSON file (``{"family": ...}`` or ``{"arch": {...}}``, measured with the default task). The model
    is converted on ``device``: its inference form (fp8, the INT8 backend, a sparse kernel) depends on it."""
    from dsnas.kernels.convert import untrained_inference_form  # torch loads on first use

    path = Path(target)
    if path.is_dir() and (path / "route.json").is_file() and not (path / "arch.json").exists():
        raise DsnasError(f"{path}: a route bundle (`dsnas route`), not a model's: it was said to lack arch.json. Fix: "
                         f"profile one of its models, e.g. {path / 'members'}/trialN, or `dsnas verify {path}` to "
                         "time the route")
    if path.suffix != ".toml" and trial is not None:  # a bundle's (or a JSON file's) model was timed, --trial unread
        raise DsnasError(f"--trial {trial}: names a trial of a study file, and {path} is "
                         f"{'a bundle folder' if path.is_dir() else 'an architecture file'}: its own model is "
                         "measured. Fix: leave out --trial, or give the study file")
    if path.is_dir():
        return _bundle(path, device)
    if path.suffix == ".toml":
        return _trial(path, trial, device)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DsnasError(f"{path}: no such file. Fix: give a bundle folder, a study file with --trial N, "
                         "or an architecture JSON file") from None
    except (OSError, json.JSONDecodeError) as e:
        raise DsnasError(f"{path}: not an architecture JSON file ({e}). Fix: write {{\"family\": ...}}") from None
    arch = data.get("arch", data) if isinstance(data, dict) else None
    if not isinstance(arch, dict):
        raise DsnasError(f"{path}: must hold an architecture object. Fix: write {{\"family\": ...}}")
    # A CNN once crashed on token ids; a user's model took them and was timed at 100x its rate on its own input.
    if (arch.get("family") in FAMILIES or is_user_family(str(arch.get("family")))) and \
            arch["family"] not in TEXT_FAMILIES:
        whose = "a user family's model takes its own task's input" if is_user_family(arch["family"]) else \
            f"a {arch['family']!r} model does not take them"
        raise DsnasError(f"{path}: an architecture file is measured on the default text task (token ids): {whose}. "
                         "Fix: profile a bundle folder (`dsnas export`) or a study file with --trial N, which bring "
                         "their own task")
    task = TaskSpec("charlm", {k: arch[k] for k in ("context",) if k in arch}, str(path.parent))
    try:
        validate(arch)
        model = untrained_inference_form(build(arch).to(device))
    except Exception as e:
        raise DsnasError(f"{path}: not a buildable architecture ({type(e).__name__}: {e}). Fix: correct it, "
                         "or export a trial with `dsnas export`") from None
    return model, task, HardwareSpec(), f"{path} (untrained weights)"


def _bundle(path: Path, device: Any) -> tuple[Any, Any, Any, str]:
    doc = read_bundle(path)
    model = load_bundle(path, device=str(device))
    if "task" not in doc:
        raise DsnasError(f"{path}/arch.json: a version-1 bundle records no task to measure with. "
                         "Fix: re-export the trial with `dsnas export`")
    metrics = _read_json(path / "metrics.json")
    compiled = ", under torch.compile as its trial was measured" if measured_compiled(metrics) else ""
    return as_measured(model, metrics), recorded_task_spec(doc), recorded_hardware(doc, path / "arch.json"), \
        f"bundle {path} (trained weights{compiled})"


def _trial(path: Path, trial: int | None, device: Any) -> tuple[Any, Any, Any, str]:
    from dsnas.kernels.convert import untrained_inference_form  # torch loads on first use
    from dsnas.study import as_searched, open_study  # SQLAlchemy loads on first use

    spec = read_study(path)  # measured on the device --device names, not the study's: its Ray or GPU is not needed
    check_plugins(spec)
    if trial is None:
        raise DsnasError(f"{path}: a study file needs --trial N: which trial's architecture to measure")
    study = open_study(spec, create=False)
    # Measured as the trial was: the task and timing protocol the study was searched with, where the file was
    # edited since (an edited context fed the trial's model positions it has no embedding for: a traceback; edited
    # batch sizes timed others than the trial's, whose figures report and verify compare with these).
    spec = as_searched(spec, study)
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}  # read once: a study of thousands
    found = by_number.get(trial)
    if found is None or "arch" not in found.user_attrs:
        raise DsnasError(f"--trial {trial}: study {spec.name!r} has no trial {trial} with an architecture. "
                         f"Fix: pick one of {[t.number for t in by_number.values() if 'arch' in t.user_attrs]}")
    # Timings do not depend on the weights' values, so the trial's architecture is built fresh, in the inference
    # form its layers chose (INT8 kernels, 2:4 masks).
    model = build(found.user_attrs["arch"], spec.base_dir).to(device)
    # A reused repeat measured nothing: its original's profile records the form (its own has none, and an "auto"
    # layer its original kept dense was timed 2:4).
    source = by_number.get(found.user_attrs.get("reused_from"), found)
    measured = {"profile": source.user_attrs.get("profile") or {}}  # as a bundle's metrics.json holds it
    recorded = _trial_form(model, measured["profile"])
    model = untrained_inference_form(model, int8_backend=spec.engine.int8_backend, recorded=recorded)
    # Compiled where the trial was measured compiled ([engine] compile = true), as a bundle of it is: timed eager,
    # it read 0.12 ms where the trial had 0.087 ms and its bundle 0.060 ms.
    compiled = ", under torch.compile as the trial was measured" if measured_compiled(measured) else ""
    return as_measured(model, measured), spec.task, spec.hardware, \
        f"study {spec.name!r} trial {trial} (untrained weights{compiled})"


def _trial_form(model: Any, profile: dict[str, Any]) -> dict[str, str]:
    """The form the trial measured, where its choices were made then: each INT8 layer's backend (returned, for
    convert) and the "auto" sparsity layers its Hessian left dense (made dense here, in place). Built with the
    defaults instead, a torch-dynamic trial was timed in int8-static (its bytes 1.6x the trial's) and every "auto"
    layer of a trial was timed 2:4, under the trial's number."""
    from dsnas.kernels.convert import int8_backends  # torch loads on first use
    from dsnas.kernels.linear import engine_layers  # likewise

    signature = (profile.get("signature") or {}).get("layers") or {}
    for name, layer in engine_layers(model).items():
        if getattr(layer, "sparsity", None) == "auto" and str(signature.get(name, "")).split(" ")[1:2] == ["dense"]:
            layer.sparsity = "dense"
    return int8_backends((profile.get("engine") or {}).get("layers") or {})


def profile_target(target: str, trial: int | None = None, device: str = "auto", **overrides: Any) -> ProfileReport:
    """Measure ``target``; ``str()`` of the result is the table `dsnas profile` prints. ``overrides``: HardwareSpec
    fields (batch_sizes, kernels, ...)."""
    dev = named_device(device)
    model, task_spec, hardware, what = load_target(target, trial, dev)
    given = {k: v for k, v in overrides.items() if v is not None}
    if "measure_s" in given and "max_measure_s" not in given:  # a longer minimum lifts the cap it must stay below
        given["max_measure_s"] = max(hardware.max_measure_s, given["measure_s"])
    hardware = _protocol(lambda: replace(hardware, **given), "--")
    task = make_task(task_spec)
    with MeasureGate(device_key(dev), announce="dsnas profile").exclusive():
        metrics, profile = measure(model.to(dev), task, dev, hardware)
    return ProfileReport(what, metrics, _with_engine(profile, model), throughput_unit(task_spec))


def _with_engine(profile: dict[str, Any], model: Any) -> dict[str, Any]:
    """The profile with its engine layers' report (what ran per layer and why), as a trial stores it: the whole
    profile said which backends ran, never which layer ran which, nor why a faster one did not."""
    from dsnas.kernels.linear import layer_report  # torch loads on first use

    layers = layer_report(getattr(model, "_orig_mod", model))
    return {**profile, "engine": {"layers": layers}} if layers else profile


def measure_model(model: Any, example_input: Any, device: str = "auto", batch_sizes: tuple[int, ...] = (1, 32),
                  items_per_example: int = 1, **protocol: Any) -> ProfileReport:
    """Measure any model with the protocol a trial's is measured with: timings per batch size (median, spread,
    until the median is known to ``ci_tolerance``), FLOP and byte counts, peak memory and, on a GPU, the NVML/GPM
    window. ``example_input``: one batch (its first dimension is the batch; rows are repeated to each batch size) or
    a function ``batch_size -> input``; a tuple or dict of them for a model of several inputs (passed as positional or
    keyword arguments); ``items_per_example`` is what throughput counts per example (e.g. the
    tokens of a sequence). ``protocol``: HardwareSpec's other fields (threads, measure_s, kernels, ...). The model
    moves to the device; it is measured in eval mode and handed back in the mode it came in (a model measured in the
    middle of training carried on with dropout and batch norm in eval mode)."""
    dev = named_device(device, "device=")
    hardware = _protocol(lambda: HardwareSpec(batch_sizes=tuple(batch_sizes), **_typed(protocol)), "dsnas.measure ")
    task = _ExampleInputs(example_input, items_per_example)
    if not callable(getattr(model, "modules", None)):
        raise DsnasError(f"dsnas.measure model: must be a torch.nn.Module, got {type(model).__name__}. Fix: wrap a "
                         "function in an nn.Module whose forward calls it")
    # Each module's own mode, handed back as it came: model.train(flag) set every submodule to the root's (a frozen
    # batch norm backbone came back updating its statistics, a dropout kept on for MC dropout came back off).
    # A frozen TorchScript module (torch.jit.freeze) has no mode at all: its reading was an AttributeError traceback.
    modes = {module: module.training for module in model.modules() if hasattr(module, "training")}
    model = model.to(dev)
    name = type(getattr(model, "_orig_mod", model)).__name__  # a compiled model's own class, not OptimizedModule
    given = model
    if isinstance(task.example_batch(1, dev), (tuple, list, dict)):  # forward(x, mask) or forward(**inputs)
        model = _unpacking(model)
    try:
        with MeasureGate(device_key(dev), announce="dsnas.measure").exclusive():  # no computing outside it
            _runs_on_batches(model, task, dev, min(hardware.batch_sizes))
            metrics, profile = measure(model, task, dev, hardware)
    finally:
        for module, training in modes.items():
            module.training = training
    # The parameters as the model runs (an engine layer's fp32 master and bf16 copy count once), as metrics says.
    what = f"{name} ({int(metrics['params'])} parameters)"
    return ProfileReport(what, metrics, _with_engine(profile, given), "items/s")  # items_per_example: what an item is


TEXT_FAMILIES = ("transformer_lm", "hf_causal_lm")  # the built-in families that take token ids


def _protocol(make: Callable[[], HardwareSpec], where: str) -> HardwareSpec:
    """The HardwareSpec ``make`` builds, its rule broken as one line naming the option (a flag, or an argument)."""
    try:
        return make()
    except TypeError as e:  # a keyword HardwareSpec has not (a typo in dsnas.measure's protocol)
        if "unexpected keyword" not in str(e):
            raise
        known = ", ".join(f.name for f in fields(HardwareSpec) if f.name not in ("batch_sizes", "constraints",
                                                                                     "device"))
        raise DsnasError(f"{where.strip()} takes no keyword {str(e).split()[-1]}. Fix: use the [hardware] keys "
                         f"{known}") from None
    except Invalid as e:
        option = f"--{e.key.replace('_', '-')}" if where == "--" else f"{where}{e.key}"
        raise DsnasError(f"{option}: {e.rule}, but got {e.got!r}. Fix: {e.fix}") from None


# The Python types each protocol keyword takes (a study file's loader checks its TOML values against the same
# fields' annotations, dsnas.config.typed), with an example of each.
# numbers' classes: a numpy integer is a count too.
_KINDS = {int: (numbers.Integral, "2"), float: (numbers.Real, "0.3"), bool: (bool, "True")}


def _typed(protocol: dict[str, Any]) -> dict[str, Any]:
    """``protocol``, each keyword of HardwareSpec checked against its field's type: threads="2" was
    TypeError's "'>=' not supported", threads=2.0 torch's "set_num_threads expects an int", both tracebacks, and
    kernels="no" was taken as true."""
    hints = typing.get_type_hints(HardwareSpec)
    checked = dict(protocol)
    for key, value in protocol.items():
        hint = hints.get(key)
        kind = next((t for t in typing.get_args(hint) or (hint,) if t in _KINDS), None)
        if kind is None or value is None and type(None) in typing.get_args(hint):
            continue  # an unknown keyword: HardwareSpec names it
        allowed, example = _KINDS[kind]
        if not isinstance(value, allowed) or isinstance(value, bool) != (kind is bool):
            raise Invalid(key, f"must be of type {kind.__name__}", value, f"e.g. {key}={example}")
        checked[key] = kind(value)  # np.int64(2) as 2: torch.set_num_threads takes a Python int
    return checked


def _runs_on_batches(model: Any, task: _ExampleInputs, dev: Any, batch_size: int) -> None:
    """One call at a batch size before measuring: a single example given without its batch dimension (a (64,)
    tensor for nn.Linear(64, 10), which the model itself takes) was cut into rows of one number, and the measurement
    ended in torch's traceback."""
    import torch

    batch = task.example_batch(batch_size, dev)
    eval_mode(model)
    with torch.inference_mode():
        try:
            model(batch)
            return
        except Exception as e:
            failed = e
        example = task.example
        try:  # the example whole: where the model takes it, its first dimension was not a batch
            if not isinstance(example, torch.Tensor):
                raise failed
            model(example.to(dev))
        except Exception:
            raise failed from None  # another error of the model's own: as it is, with its traceback
        # Rows of it at a third batch size, neither this one nor the example's: a model that takes them fails at this
        # size only (squeeze() at 1); one fixed to the example's rows (torch.export's module) fails there too.
        other = next(n for n in range(2, 5) if n not in (batch_size, example.shape[0]))
        try:
            model(task.example_batch(other, dev))
        except Exception:
            pass
        else:  # its first dimension is a batch: the advice to add one was wrong, the model's own error is the one
            raise failed
    first = str(failed).strip().splitlines()[0] if str(failed).strip() else ""
    rows = example.shape[0] if example.dim() > 1 else 1  # a vector is one example, not rows of numbers
    # An example of several rows taken whole: as likely a model fixed to that many (torch.export's module without a
    # dynamic batch dimension: "Guard failed: input.size()[0] == 2"), which had only the advice for one example.
    fixed = "" if rows == 1 else f", or the model takes batches of {rows} rows only"
    also = "" if rows == 1 else (f", or batch_sizes=[{rows}] (torch.export: export with a dynamic batch dimension, "
                                 "dynamic_shapes)")
    raise DsnasError(f"dsnas.measure: the model failed on a batch of {batch_size} rows of example_input "
                     f"({tuple(batch.shape)}: {type(failed).__name__}: {first}), and takes the example "
                     f"{tuple(example.shape)} whole: its first dimension is not a batch{fixed}. Fix: give one batch "
                     f"(x.unsqueeze(0) for a single example), or a function batch_size -> input{also}")


class _ExampleInputs:
    """The part of a task measuring reads: an input batch per batch size."""

    def __init__(self, example: Any, items_per_example: int) -> None:
        if isinstance(items_per_example, bool) or not isinstance(items_per_example, (int, float)) or \
                not items_per_example >= 1:  # "4" was TypeError's "'<' not supported"
            raise DsnasError(f"dsnas.measure items_per_example: must be a number >= 1, but got {items_per_example!r}. "
                             "Fix: e.g. items_per_example=128 (the tokens of a sequence), or leave it out (1)")
        self.example, self.tokens_per_example = example, items_per_example

    def example_batch(self, batch_size: int, device: Any) -> Any:
        if callable(self.example):
            return self.example(batch_size)
        import torch

        parts = (self.example.values() if isinstance(self.example, dict) else self.example
                 if isinstance(self.example, (tuple, list)) else [self.example])
        tensors = [t for t in parts if isinstance(t, torch.Tensor)]
        if not tensors or any(t.dim() == 0 or t.shape[0] == 0 for t in tensors):
            raise DsnasError("example_input must be a tensor whose first dimension is the batch, of one row or more "
                             "(or a tuple or dict of such tensors, for a model of several inputs), or a function "
                             f"batch_size -> input; got {type(self.example).__name__}")

        def repeated(t: Any) -> Any:  # the example's rows, repeated to the batch size; other values as they are
            if not isinstance(t, torch.Tensor):
                return t
            return t[(torch.arange(batch_size) % t.shape[0]).to(t.device)].to(device)

        if isinstance(self.example, dict):
            return {k: repeated(v) for k, v in self.example.items()}
        if isinstance(self.example, (tuple, list)):
            return type(self.example)(repeated(v) for v in self.example)
        return repeated(self.example)


def _unpacking(model: Any) -> Any:
    """A model of several inputs, called with one: a tuple's parts as positional arguments, a dict's as keyword
    ones (``forward(input_ids, attention_mask)``), as the measurement calls every model with its batch."""
    from torch import nn  # torch loads on first use

    class Unpacking(nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.model = inner

        @property
        def _orig_mod(self) -> Any:
            # A torch.compile'd model seen through this wrapper: its eager self, unpacked too, so that measuring
            # labels it compiled and counts its eager algorithm (it was labelled eager: the wrapper hid _orig_mod).
            eager = self.model._orig_mod  # AttributeError where the model is not compiled: no _orig_mod here either
            return Unpacking(eager)

        def forward(self, batch: Any) -> Any:
            if isinstance(batch, dict):
                return self.model(**batch)
            return self.model(*batch) if isinstance(batch, (tuple, list)) else self.model(batch)

    return Unpacking(model)


@dataclass(frozen=True)
class ProfileReport:
    """One measured architecture: ``what`` was measured, its flat trial ``metrics`` (``latency_ms_bs1``, ...) and
    the whole ``profile`` (as a trial stores it in user_attrs["profile"]). ``str()`` is :meth:`table`."""

    what: str
    metrics: dict[str, float]
    profile: dict[str, Any]
    unit: str = "tokens/s"  # what throughput counts (images/s for an image task: dsnas.tasks.throughput_unit)

    def table(self) -> str:
        """What was measured, a row per batch size with units, then what is unavailable and why."""
        lines = [f"profile of {self.what}", *_header(self.profile), *_batch_table(self.profile, self.unit)]
        return "\n".join(lines + _extras(self.metrics, self.profile))

    def __str__(self) -> str:
        return self.table()


def _allocator(state: dict[str, Any] | None) -> str:
    if not state:
        return "allocator not recorded"
    return "freed memory held" if state["policy"] == POLICY else f"freed memory not held: {state.get('why')}"


def _header(profile: dict[str, Any]) -> list[str]:
    fp = profile["fingerprint"]
    on = f"{fp.get('gpu')} (CUDA {fp.get('cuda')})" if fp.get("device") == "cuda" else \
        f"{fp.get('cpu')} ({fp.get('cpu_count')} CPUs)"
    lines = [f"device {fp.get('device')}: {on}, torch {fp.get('torch')}; fingerprint {fingerprint_id(fp)} "
             "(dsnas doctor lists its fields)",
             f"backend {profile.get('backend')}, dtype {profile.get('dtype')}, threads {_fmt(profile.get('threads'))}, "
             + _allocator(profile.get("allocator"))]
    if ceilings := _ceilings(profile.get("ceilings") or {}):
        lines.append("ceilings: " + ", ".join(ceilings))
    return lines


_CEILING_UNITS = (("_gflop_s", "GFLOP/s"), ("_gb_s", "GB/s"))


def _ceilings(ceilings: dict[str, Any]) -> list[str]:
    """The device's peaks with their units: a CPU's GEMM and copy measured here, a GPU's from its datasheet."""
    found = []
    for key, value in ceilings.items():
        if key == "tensor_gflop_s" and isinstance(value, dict):  # a GPU's tensor-core peak per precision
            found += [f"{name} tensor {_fmt(peak)} GFLOP/s" for name, peak in value.items()]
        for suffix, unit in _CEILING_UNITS:
            if key.endswith(suffix) and isinstance(value, (int, float)):
                found.append(f"{key.removesuffix(suffix).replace('_', ' ')} {_fmt(value)} {unit}")
    if found and isinstance(ceilings.get("threads"), int):
        found[-1] += f" (measured with {ceilings['threads']} threads)"
    return found


# The table's columns: heading (with the unit) and the cell of one batch size's profile entry. An optional
# column shows only when some batch size has its figure (device time and graph replays: GPU only).
_COLUMNS: list[tuple[str, Callable[[dict[str, Any]], str], bool]] = [
    ("median ms", lambda b: _fmt(b.get("median_ms")), False),
    ("p10-p90 ms", lambda b: f"{_fmt(b.get('p10_ms'))}-{_fmt(b.get('p90_ms'))}", False),
    ("CI ±", lambda b: _pct(b.get("ci_rel")), False),
    ("calls", lambda b: f"{b.get('repeats')}{'' if b.get('converged', True) else '*'}", False),
    ("device ms", lambda b: _fmt(b.get("device_latency_ms")), True),
    ("graph ms", lambda b: _fmt(b.get("graph_latency_ms")), True),
    ("tokens/s", lambda b: _fmt(b.get("throughput_tok_s")), False),
    ("GFLOP/s", lambda b: _fmt(b.get("gflop_s")), False),
    ("GB/s", lambda b: _fmt(b.get("gb_s")), False),
    ("flop util", lambda b: _pct(b.get("flop_util")), True),
    ("bw util", lambda b: _pct(b.get("bw_util")), True),
    ("peak MiB", lambda b: _fmt(b.get("peak_memory_mb")), False),
    ("disturbed", lambda b: _yes_no((b.get("disturbance") or {}).get("disturbed")), False),
]


def _batch_table(profile: dict[str, Any], unit: str = "tokens/s") -> list[str]:
    batches = profile["batches"]
    columns = [(unit if head == "tokens/s" else head, cell) for head, cell, optional in _COLUMNS
               if not optional or any(cell(b) != "-" for b in batches.values())]
    rows = [["batch", *(head for head, _ in columns)]]
    rows += [[bs, *(cell(b) for _, cell in columns)] for bs, b in batches.items()]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(r, widths)) for r in rows]
    if any(not b.get("converged", True) for b in batches.values()):
        lines.append("* the median's confidence interval did not reach the tolerance before max_measure_s")
    method = _MEMORY_METHODS.get(profile.get("memory_method", ""), profile.get("memory_method"))
    if method:
        lines.append(f"peak MiB: {method}")
    return lines


_MEMORY_METHODS = {"cuda_max_memory_allocated": "torch.cuda.max_memory_allocated over one call, all that the "
                                                "process held (an older measurement)",
                   "weights+cuda_peak_above_start": "the weights plus the CUDA allocator's peak in one call above "
                                                    "what was allocated before it",
                   "weights+profiler_cpu_allocation_peak": "the weights plus the peak of the CPU allocations torch's "
                                                          "profiler saw in one call"}


# The figures of the GPU's steady window (NVML, GPM) as the trial metrics name them: (what it is, unit).
_WINDOW = {"energy_per_call_j": ("energy per call", "J"), "power_w": ("power", "W"), "gpu_util": ("GPU busy", "%"),
           "sm_util": ("SMs busy", "%"), "sm_occupancy": ("SM occupancy", "%"), "tensor_util": ("tensor cores", "%"),
           "dram_bw_util": ("DRAM bandwidth", "%")}


def _extras(metrics: dict[str, float], profile: dict[str, Any]) -> list[str]:
    """The lines under the table: the GPU's steady window, what is unavailable and why, the kernels, whether other
    processes or a slowed host disturbed the timing, and whether the figures came from the measurement cache."""
    lines = []
    window = [f"{name} {_pct(metrics[key]) if unit == '%' else f'{_fmt(metrics[key])} {unit}'}"
              for key, (name, unit) in _WINDOW.items() if metrics.get(key) is not None]
    if window:
        lines.append("steady window: " + ", ".join(window))
    for name, reason in (profile.get("unavailable") or {}).items():
        lines.append(f"unavailable: {name}: {reason}")
    for bs, kernels in (profile.get("kernels") or {}).items():
        if "top" not in kernels:
            lines.append(f"kernels at batch {bs}: unavailable: {kernels.get('unavailable')}")
            continue
        lines.append(f"top {kernels['kind']} at batch {bs} ({kernels['count']} distinct):")
        lines += [f"  {k['self_us']:>10.0f} us  {k['calls']:>5}x  {_short(k['name'])}" for k in kernels["top"]]
    if profile.get("disturbed"):
        records = {bs: b.get("disturbance", {}) for bs, b in profile["batches"].items()}
        readings = [f"{bs}: others {_pct0(r.get('others_cpu_share'))}, host slowed "
                    + ("-" if r.get("host_slowdown") is None else f"{r['host_slowdown']:.2f}x")
                    + (f", others on the GPU {_pct0(r.get('others_gpu_share'))}" if "others_gpu_share" in r else "")
                    for bs, r in records.items() if r.get("disturbed")]
        lines.append("disturbed: other processes took the CPUs or the GPU, or the host ran slow while timing, after "
                     "every retry (per batch size " + "; ".join(readings) + "); measure again on a quiet machine")
    if profile.get("cache", {}).get("hit"):
        lines.append(f"reused from the measurement cache: {profile['cache']['from']}")
    return lines + _engine_lines((profile.get("engine") or {}).get("layers") or {})


def _engine_lines(layers: dict[str, dict[str, Any]]) -> list[str]:
    """The engine layers, those alike in one line: how many, their choices, the backend that ran and why."""
    alike: dict[tuple[str, ...], list[str]] = {}
    for name, row in layers.items():
        pattern = "2:4" if row.get("zero_share") else "dense"
        key = (str(row.get("precision")), pattern, str(row.get("backend")), str(row.get("reason", "")))
        alike.setdefault(key, []).append(name)
    lines = []
    for (precision, pattern, backend, reason), names in alike.items():
        shown = ", ".join(names[:3]) + (f", ... ({len(names)})" if len(names) > 3 else "")
        lines.append(f"engine: {precision} {pattern} ran as {backend}: {shown}" + (f"; {reason}" if reason else ""))
    return lines


def _short(name: str, width: int = 100) -> str:
    """A kernel's name cut to a line: a CUDA kernel's template arguments run to 800 characters, and its first 100
    name it (the whole name stays in the profile)."""
    return name if len(name) <= width else name[:width - 3] + "..."


def _yes_no(flag: bool | None) -> str:
    return "-" if flag is None else "yes" if flag else "no"


def _pct0(value: Any) -> str:
    return "-" if value is None else f"{value:.0%}"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:.1%}"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)
