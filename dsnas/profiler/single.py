"""`dsnas profile`: measure one architecture outside a search (from a study's trial, an export bundle or an
architecture file) with the study's protocol, and print the whole profile."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from dsnas.errors import DsnasError


def load_target(target: str, trial: int | None, device: Any = "cpu") -> tuple[Any, Any, Any, str]:
    """(model, TaskSpec, HardwareSpec, what it is) for a bundle folder, a study file with --trial, or an
    architecture JSON file (``{"family": ...}`` or ``{"arch": {...}}``, measured with the default task). The model
    is converted on ``device``: its inference form (fp8, the INT8 backend, a sparse kernel) depends on it."""
    from dsnas.kernels.convert import untrained_inference_form
    from dsnas.models import build, validate
    from dsnas.spec import HardwareSpec, TaskSpec

    path = Path(target)
    if path.is_dir():
        return _bundle(path, device)
    if path.suffix == ".toml":
        return _trial(path, trial, device)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DsnasError(f"{path}: no such file. Fix: give a bundle folder, a study file with --trial N, "
                         "or an architecture JSON file") from None
    except (OSError, json.JSONDecodeError) as e:
        raise DsnasError(f"{path}: not an architecture JSON file ({e}). Fix: write {{\"family\": ...}}") from None
    arch = data.get("arch", data) if isinstance(data, dict) else None
    if not isinstance(arch, dict):
        raise DsnasError(f"{path}: must hold an architecture object. Fix: write {{\"family\": ...}}")
    task = TaskSpec("charlm", {k: arch[k] for k in ("context",) if k in arch}, str(path.parent))
    try:
        validate(arch)
        model = untrained_inference_form(build(arch).to(device))
    except Exception as e:
        raise DsnasError(f"{path}: not a buildable architecture ({type(e).__name__}: {e}). Fix: correct it, "
                         "or export a trial with `dsnas export`") from None
    return model, task, HardwareSpec(), f"{path} (untrained weights)"


def _bundle(path: Path, device: Any) -> tuple[Any, Any, Any, str]:
    from dsnas.export.bundle import load_bundle, read_bundle, recorded_hardware, recorded_task_spec

    doc = read_bundle(path)
    model = load_bundle(path, device=str(device))
    if "task" not in doc:
        raise DsnasError(f"{path}/arch.json: a version-1 bundle records no task to measure with. "
                         "Fix: re-export the trial with `dsnas export`")
    return model, recorded_task_spec(doc), recorded_hardware(doc, path / "arch.json"), \
        f"bundle {path} (trained weights)"


def _trial(path: Path, trial: int | None, device: Any) -> tuple[Any, Any, Any, str]:
    from dsnas.kernels.convert import untrained_inference_form
    from dsnas.models import build
    from dsnas.search import open_study
    from dsnas.spec import load_study

    spec = load_study(path)
    if trial is None:
        raise DsnasError(f"{path}: a study file needs --trial N: which trial's architecture to measure")
    study = open_study(spec, create=False)
    found = [t for t in study.trials if t.number == trial and "arch" in t.user_attrs]
    if not found:
        raise DsnasError(f"--trial {trial}: study {spec.name!r} has no trial {trial} with an architecture. "
                         f"Fix: pick one of {[t.number for t in study.trials if 'arch' in t.user_attrs]}")
    # Timings do not depend on the weights' values, so the trial's architecture is built fresh, in the inference
    # form its layers chose (INT8 kernels, 2:4 masks).
    return untrained_inference_form(build(found[0].user_attrs["arch"]).to(device)), spec.task, spec.hardware, \
        f"study {spec.name!r} trial {trial} (untrained weights)"


def profile_target(target: str, trial: int | None = None, device: str = "auto", **overrides: Any) -> str:
    """Measure and return the printed profile. ``overrides``: HardwareSpec fields (batch_sizes, kernels, ...)."""
    from dsnas.profiler.device import device_key, resolve_device
    from dsnas.profiler.gate import MeasureGate
    from dsnas.profiler.measure import measure
    from dsnas.tasks import make_task

    dev = resolve_device(device)
    model, task_spec, hardware, what = load_target(target, trial, dev)
    hardware = replace(hardware, **{k: v for k, v in overrides.items() if v is not None})
    task = make_task(task_spec)
    with MeasureGate(device_key(dev)).exclusive():
        metrics, profile = measure(model.to(dev), task, dev, hardware)
    return format_profile(what, metrics, profile)


def format_profile(what: str, metrics: dict[str, float], profile: dict[str, Any]) -> str:
    fp = profile["fingerprint"]
    lines = [f"profile of {what}", "device: " + ", ".join(f"{k}={v}" for k, v in fp.items()),
             f"backend {profile.get('backend')}, dtype {profile.get('dtype')}, threads {profile.get('threads')}"]
    ceilings = profile.get("ceilings") or {}
    if ceilings:
        lines.append("ceilings: " + ", ".join(f"{k}={_fmt(v)}" for k, v in ceilings.items()))
    head = ("batch", "median ms", "p25", "p75", "p90", "CI ±", "calls", "tokens/s", "GFLOP/s", "GB/s", "flop util",
            "peak MB")
    rows = [head]
    for bs, b in profile["batches"].items():
        rows.append((bs, _fmt(b["median_ms"]), _fmt(b.get("p25_ms")), _fmt(b.get("p75_ms")), _fmt(b["p90_ms"]),
                     f"{b['ci_rel']:.1%}" if b.get("ci_rel") is not None else "-",
                     f"{b['repeats']}{'' if b.get('converged', True) else '*'}",
                     _fmt(metrics.get(f"throughput_tok_s_bs{bs}")), _fmt(b.get("gflop_s")), _fmt(b.get("gb_s")),
                     f"{b['flop_util']:.1%}" if b.get("flop_util") is not None else "-", _fmt(b.get("peak_memory_mb"))))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    lines += ["  ".join(str(c).rjust(w) for c, w in zip(r, widths)) for r in rows]
    if any(not b.get("converged", True) for b in profile["batches"].values()):
        lines.append("* the median's confidence interval did not reach the tolerance before max_measure_s")
    lines += _extras(metrics, profile)
    return "\n".join(lines)


def _extras(metrics: dict[str, float], profile: dict[str, Any]) -> list[str]:
    lines = []
    window = {k: v for k, v in metrics.items() if k in ("energy_per_call_j", "power_w", "gpu_util", "sm_util",
                                                        "sm_occupancy", "tensor_util", "dram_bw_util")}
    if window:
        lines.append("steady window: " + ", ".join(f"{k}={_fmt(v)}" for k, v in window.items()))
    for name, reason in (profile.get("unavailable") or {}).items():
        lines.append(f"unavailable: {name}: {reason}")
    for bs, kernels in (profile.get("kernels") or {}).items():
        if "top" not in kernels:
            lines.append(f"kernels at batch {bs}: unavailable: {kernels.get('unavailable')}")
            continue
        lines.append(f"top {kernels['kind']} at batch {bs} ({kernels['count']} distinct):")
        lines += [f"  {k['self_us']:>10.0f} us  {k['calls']:>5}x  {k['name']}" for k in kernels["top"]]
    if profile.get("disturbed"):
        shares = {bs: b.get("disturbance", {}).get("others_cpu_share") for bs, b in profile["batches"].items()}
        lines.append("disturbed: other processes took the CPUs while timing, after every retry (others' share per "
                     "batch size: " + ", ".join(f"{bs}: {v:.0%}" for bs, v in shares.items() if v is not None)
                     + "); measure again on a quiet machine")
    if profile.get("cache", {}).get("hit"):
        lines.append(f"reused from the measurement cache: {profile['cache']['from']}")
    return lines


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)
