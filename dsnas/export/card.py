"""The model card: the README.md of a bundle, saying what the model is, what it scored, how, and how to load it."""

from __future__ import annotations

import json
from typing import Any

from dsnas.fidelity import over_limits
from dsnas.models import is_user_family
from dsnas.spec import StudySpec
from dsnas.tasks import throughput_unit

# Longest suffix first: "gb_s" is GB/s, not seconds.
UNITS = (("gflop_s", "GFLOP/s"), ("gb_s", "GB/s"), ("_tok_s", "THROUGHPUT"), ("_ms", "ms"), ("_mb", "MiB"),
         ("_util", ""), ("_s", "s"))


def _with_unit(name: str, value: float, throughput: str = "tokens/s") -> str:
    """A metric as the card shows it: the unit its name ends with (before any _bsN), counts with separators;
    ``throughput``: what the task's throughput counts (tokens/s, images/s, ...)."""
    base = name.split("_bs")[0]
    unit = next((u for suffix, u in UNITS if base.endswith(suffix)), "").replace("THROUGHPUT", throughput)
    text = f"{value:,.0f}" if float(value).is_integer() or abs(value) >= 1000 else f"{value:.4g}"
    return f"{text} {unit}".strip()


def measured_compiled(metrics: dict[str, Any]) -> bool:
    """Whether a bundle's trial (its metrics.json) was measured under torch.compile ([engine] compile = true):
    dsnas.load gives the eager model, so whatever times the bundle again compiles it first."""
    return bool((metrics.get("profile") or {}).get("signature", {}).get("compiled"))


def model_card(spec: StudySpec, frozen: Any, metrics: dict[str, Any], folder: str,
               preprocessing: dict[str, Any] | None = None) -> str:
    """README.md of a bundle: what the model is, what it scored, how that was measured, what its input must be
    (``preprocessing``, where the task says), and how to load it."""
    arch, numbers = frozen.user_attrs["arch"], metrics["metrics"]
    objectives = {o.metric: f"objective, {o.direction}" for o in spec.objectives}
    unit = throughput_unit(spec.task)
    scored = [f"| {k} | {_with_unit(k, v, unit)} | {objectives.get(k, '')} |" for k, v in sorted(numbers.items())
              if k != "feasible"]
    limits = ", ".join(f"{m} <= {v:g}" for m, v in spec.hardware.constraints.items()) or "none"
    # An infeasible trial (exported by number) says which limit it broke: "no" beside the limits left the reader
    # to find the figure in the table above, where a latency of 0.6009 over a limit of 0.6 reads as within it.
    broke = ", ".join(over_limits(numbers, spec.hardware.constraints))
    feasible = "yes" if numbers.get("feasible", 1.0) else f"no{': ' + broke if broke else ''}"
    return "\n".join([
        f"# {spec.name} trial {frozen.number}: {frozen.user_attrs.get('arch_short', '')}", "",
        f"A `{arch.get('family')}` model that dsnas's architecture search found in study `{spec.name}` (trial "
        f"{frozen.number}): {frozen.user_attrs.get('arch_short', '')}, {int(numbers.get('params', 0)):,} parameters, "
        f"trained by task `{spec.task.name}` with {json.dumps(spec.task.params, sort_keys=True, default=str)}. "
        "The weights are the trial's own: nothing was retrained for this bundle.", "",
        "## What it scored", "", "| figure | value | |", "|---|---|---|", *scored, "",
        f"Feasible: {feasible} (constraints: {limits}).", "",
        *_measured_section(spec, metrics), *_input_section(preprocessing, metrics["exports"].get("preprocessing")),
        *_files_section(metrics["exports"]),
        *_loading_section(folder, metrics["exports"], measured_compiled(metrics)),
        *_builder_note(str(arch.get("family", "")), spec)])


def _measured_section(spec: StudySpec, metrics: dict[str, Any]) -> list[str]:
    profile, fp = metrics["profile"], metrics["fingerprint"]
    hw = spec.hardware
    device = ", ".join(f"{k} {v}" for k, v in fp.items()) or "not recorded"
    rows = [f"| {bs} | {b['median_ms']:.4g} | {b['p10_ms']:.4g} | {b['p90_ms']:.4g} | {b['spread']:.2f} | "
            f"{b['repeats']} |" for bs, b in profile.get("batches", {}).items()]
    return ["## How it was measured", "", f"Device fingerprint: {device}.", "",
            f"Batch sizes {list(hw.batch_sizes)}, {profile.get('threads') or 'default'} CPU threads, "
            f"{profile.get('backend', 'eager')}; warm-up {hw.warmup_s} s, then timed single calls for at least "
            f"{hw.measure_s} s per batch size. Latency is the median; spread = (p90 - p10) / median.", "",
            "| batch | median ms | p10 ms | p90 ms | spread | calls |", "|---|---|---|---|---|---|", *rows, "",
            "Accuracy is the task's own `accuracy` on its validation split. "
            "Run `dsnas verify` on this folder to measure it all again here.", ""]


def _rounded(value: Any) -> Any:
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return round(value, 6) if isinstance(value, float) else value


def _input_section(preprocessing: dict[str, Any] | None, unknown: str | None = None) -> list[str]:
    """The input the model needs (arch.json's task.preprocessing): the probe and every figure above used it."""
    if unknown:
        return ["## Its input", "", f"The task's preprocessing is {unknown}; probe.safetensors holds an input as "
                "the model saw it.", ""]
    if not preprocessing:
        return []
    numbers = ", ".join(f"{k} {_rounded(preprocessing[k])}" for k in ("mean", "std") if k in preprocessing)
    classes = preprocessing.get("classes", [])
    classes = classes if isinstance(classes, list) else []  # a trial's record from before its form was checked
    lines = ["## Its input", "", f"{preprocessing.get('input', '')}" + (f" ({numbers})." if numbers else "."), ""]
    if classes:
        lines += [f"Output index i is class {', '.join(f'{i}: `{c}`' for i, c in enumerate(classes[:20]))}"
                  f"{', ...' if len(classes) > 20 else ''} (all in arch.json, task.preprocessing.classes).", ""]
    return lines


def _written(exports: dict[str, Any], fmt: str) -> bool:
    return fmt in exports and not str(exports[fmt]).startswith("unavailable")


def _files_section(exports: dict[str, Any]) -> list[str]:
    """The files that are there, and for a model format that is not, why."""
    int8 = f" {exports['int8']}." if "int8" in exports else ""
    check = exports.get("onnx_check") or {}
    agreed = (f" onnxruntime's logits agree with the trial's (top-1 {check['top1_agreement']:.1%}, max difference "
              f"{check['max_abs_diff']:.2g})." if check.get("ok") else "")
    if check.get("ok") is False:  # the card listed the file as if it were the model; it is not that model
        agreed = (f" **Its logits disagree with the trial's** (onnxruntime: top-1 agreement "
                  f"{check['top1_agreement']:.1%}, max difference {check['max_abs_diff']:.2g}; rule: {check['rule']})"
                  + (": its INT8 inputs are quantized at the calibrated range, where the measured backend quantized "
                     "them at run time, and `model.pt2` computes the same." if "int8" in exports else ".")
                  + " The measured model is the one `dsnas.load` rebuilds.")
    if "ok" in check and check["ok"] is None:  # not checked: onnxruntime missing, or it could not run the file
        agreed = f" **Its logits were not checked**: {check.get('why', 'no reason recorded')}."
    files = ["- `arch.json` — the architecture, the study and trial, the task and hardware settings (JSON)",
             "- `weights.safetensors` — the trained weights (tied weights stored once; 2:4 layers with their mask)",
             "- `probe.safetensors` — a fixed input and the trained model's logits on it",
             "- `metrics.json` — every measured number, the device fingerprint, the timing of each batch size"]
    if _written(exports, "onnx"):
        files.append(f"- `model.onnx` — ONNX, dynamic batch dimension.{int8}{agreed}")
    if _written(exports, "pt2"):
        files.append("- `model.pt2` — a `torch.export` program, dynamic batch dimension")
    if _written(exports, "transformers"):
        files.append(f"- `{exports['transformers']}` — the Hugging Face layout "
                     "(`AutoModelForCausalLM.from_pretrained`)")
    missing = [f"- not written: `model.{ext}` — {exports[key]}" for key, ext in (("onnx", "onnx"), ("pt2", "pt2"))
               if key in exports and not _written(exports, key)]
    return ["## Files", "", *files, "- `README.md` — this card", *missing, ""]


def _builder_note(family: str, spec: StudySpec) -> list[str]:
    """A user family's model is built by the user's code, which the bundle does not hold: `dsnas.load` of a copied
    bundle failed in a fresh process, and the card had not said why."""
    if not is_user_family(family):
        return []
    module = family.partition(":")[0]
    return [f"`dsnas.load` builds the model with `{family}`, the study's own code, which this bundle does not hold: "
            f"the module `{module}` must be importable where it loads (from the study's folder, {spec.base_dir}, "
            "or a folder on PYTHONPATH), with the code the trial trained with. `model.onnx` and `model.pt2` do not "
            "need it.", ""]


def _loading_section(folder: str, exports: dict[str, Any], compiled: bool) -> list[str]:
    lines = ["## How to load it", "", "```python", "import dsnas", "",
             f'model = dsnas.load("{folder}")  # a torch.nn.Module in eval mode; JSON and safetensors only', "```", ""]
    if compiled:
        lines.insert(-2, "model = torch.compile(model)  # its speed above was measured so ([engine] compile = true)")
        lines.insert(3, "import torch")
    check = exports.get("onnx_check") or {}
    if _written(exports, "onnx") and check.get("ok", False) is None and "cannot run" in check.get("why", ""):
        lines += ["`model.onnx` did not run on onnxruntime's CPU provider here (see Files): a CPU session of it "
                  "fails; use `dsnas.load`, or a provider with kernels for its precision.", ""]
    elif _written(exports, "onnx"):
        lines += ["With ONNX Runtime (the input as `probe.safetensors` holds it, with any batch size):", "",
                  "```python", "import onnxruntime as ort", "",
                  f'session = ort.InferenceSession("{folder}/model.onnx")',
                  'logits = session.run(None, {"input": batch})[0]', "```", ""]
    if _written(exports, "pt2"):
        lines += ["`model.pt2` loads with `torch.export.load`, which is torch's own serialization and runs pickle "
                  "inside: load it only from a source you trust. `dsnas.load` never unpickles anything.", ""]
        if "int8" in exports:  # without the import, torch.export.load fails in a fresh process
            lines[-1:-1] = ["Its INT8 layers use torch's quantize/dequantize ops, which a fresh process must register "
                            "first: `import torch.ao.quantization.fx._decomposed` before `torch.export.load`."]
    return lines
