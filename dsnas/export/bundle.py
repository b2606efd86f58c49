"""A bundle: one trained trial written as a self-contained folder (JSON, safetensors, model files, card), and
read back, checked and rebuilt without pickle."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from dsnas._version import __version__
from dsnas.errors import DsnasError, Invalid
from dsnas.export.card import model_card
from dsnas.export.formats import _one_line, write_model_files
from dsnas.models import build
from dsnas.spec import HardwareSpec, StudySpec, TaskSpec
from dsnas.storage import artifact_dir

BUNDLE_TYPE, BUNDLE_VERSION = "dsnas.bundle", 2
READABLE_VERSIONS = (1, 2)  # version 1 bundles lack the task and hardware sections: they load, verify less
METRICS_TYPE, METRICS_VERSION = "dsnas.metrics", 2
REEXPORT = "re-export the trial with `dsnas export`"


# ---- writing a bundle ------------------------------------------------------------------------------------------

def export_trial(spec: StudySpec, study: Any, frozen: Any, out: str | Path | None = None) -> Path:
    """Write the bundle of one trial from what the search stored (nothing is retrained); returns its folder."""
    out = Path(out) if out else spec.base_dir / "exports" / f"{spec.name}-trial{frozen.number}"
    missing = [k for k in ("weights_artifact", "probe_artifact", "arch") if k not in frozen.user_attrs]
    if missing:
        raise DsnasError(f"trial {frozen.number} of {spec.name!r} has no stored {missing}: it cannot be exported. "
                         "Fix: export another trial")
    out.mkdir(parents=True, exist_ok=True)
    _copy_artifacts(spec, frozen, out)
    _write_json(out / "arch.json", _arch_doc(spec, frozen))
    exports = write_model_files(load_bundle(out), read_probe(out)["input"], out)
    profile = frozen.user_attrs.get("profile", {})
    metrics = {"_type": METRICS_TYPE, "_version": METRICS_VERSION,
               "metrics": {k: v for k, v in frozen.user_attrs.items() if isinstance(v, (int, float))},
               "objectives": dict(zip([o.name for o in spec.objectives], frozen.values)),
               "profile": profile, "fingerprint": profile.get("fingerprint", {}), "exports": exports}
    _write_json(out / "metrics.json", metrics)
    (out / "README.md").write_text(model_card(spec, frozen, metrics, out.name))
    return out


def _copy_artifacts(spec: StudySpec, frozen: Any, out: Path) -> None:
    from optuna.artifacts import FileSystemArtifactStore, download_artifact


    store = FileSystemArtifactStore(str(artifact_dir(spec)))
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        for name in ("weights", "probe"):
            part = Path(tmp) / f"{name}.safetensors"
            download_artifact(artifact_store=store, file_path=str(part),
                              artifact_id=frozen.user_attrs[f"{name}_artifact"])
            part.replace(out / part.name)


def _arch_doc(spec: StudySpec, frozen: Any) -> dict[str, Any]:
    from dsnas.kernels.convert import int8_backends  # torch loads on first use

    hw = spec.hardware
    layers = frozen.user_attrs.get("profile", {}).get("engine", {}).get("layers", {})
    return {"_type": BUNDLE_TYPE, "_version": BUNDLE_VERSION, "arch": frozen.user_attrs["arch"],
            "study": spec.name, "trial": frozen.number, "dsnas_version": __version__,
            # What verify needs to rebuild the task and measure again; base_dir resolves relative paths in params.
            "task": {"name": spec.task.name, "params": spec.task.params, "base_dir": spec.task.base_dir},
            "hardware": {"batch_sizes": list(hw.batch_sizes), "threads": hw.threads, "warmup_s": hw.warmup_s,
                         "measure_s": hw.measure_s},
            # The INT8 code each layer ran when measured, so load() runs the same code where it can.
            "engine": {"int8_backends": int8_backends(layers)}}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


# ---- reading a bundle ------------------------------------------------------------------------------------------

def read_bundle(bundle: str | Path) -> dict[str, Any]:
    """The checked arch.json of a bundle."""
    folder = Path(bundle)
    if not folder.is_dir():
        raise DsnasError(f"{folder}: no such bundle folder. Fix: give the folder `dsnas export` wrote")
    path = folder / "arch.json"
    data = _read_json(path)
    if data.get("_type") != BUNDLE_TYPE or data.get("_version") not in READABLE_VERSIONS:
        raise DsnasError(f"{path}: expected _type {BUNDLE_TYPE!r} version {' or '.join(map(str, READABLE_VERSIONS))}"
                         f", got {data.get('_type')!r} version {data.get('_version')!r}. Fix: {REEXPORT}, "
                         "or upgrade dsnas if it was written by a newer one")
    if not isinstance(data.get("arch"), dict):
        raise DsnasError(f"{path}: [arch] must be an architecture object, got {data.get('arch')!r}. Fix: {REEXPORT}")
    return data


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DsnasError(f"{path}: missing, so {path.parent} is not a complete dsnas bundle. Fix: {REEXPORT}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DsnasError(f"{path}: cannot be read ({_one_line(e)}). Fix: {REEXPORT}") from None
    except json.JSONDecodeError as e:
        raise DsnasError(f"{path}: not valid JSON ({e}). Fix: {REEXPORT}") from None
    if not isinstance(data, dict):
        raise DsnasError(f"{path}: must hold a JSON object, got {type(data).__name__}. Fix: {REEXPORT}")
    return data


def read_arch(bundle: str | Path) -> dict[str, Any]:
    return read_bundle(bundle)["arch"]


def _read_tensors(path: Path) -> dict[str, Any]:
    """A safetensors file (never pickle), or an error that names it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise DsnasError(f"{path}: missing, so {path.parent} is not a complete dsnas bundle. Fix: {REEXPORT}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise DsnasError(f"{path}: not a readable safetensors file ({_one_line(e)}); it may be truncated. "
                         f"Fix: {REEXPORT}") from None


def load_bundle(bundle: str | Path, device: str = "cpu") -> Any:
    """The bundle's trained model, in eval mode, on ``device``, its layers in the inference form they were
    measured in (INT8, FP8, sparse)."""
    from dsnas.kernels.convert import convert, unique_state  # torch loads on first use

    path = Path(bundle) / "arch.json"
    arch = read_arch(bundle)
    engine = read_bundle(bundle).get("engine")
    recorded = engine.get("int8_backends") if isinstance(engine, dict) else None
    try:
        model = build(arch)
    except Exception as e:  # the family's own checks, or a torch error on absurd sizes: either way a bad arch.json
        raise DsnasError(f"{path}: [arch] is not a buildable architecture ({_one_line(e)}). Fix: {REEXPORT}") from None
    weights_path = Path(bundle) / "weights.safetensors"
    weights = _read_tensors(weights_path)
    aliases = set(model.state_dict()) - set(unique_state(model))  # tied names, filled through their first name
    try:
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        raise DsnasError(f"{weights_path}: the weights do not fit the architecture in {path} ({_one_line(e)}). "
                         f"Fix: {REEXPORT}") from None
    missing = sorted(set(result.missing_keys) - aliases)
    if missing or result.unexpected_keys:
        raise DsnasError(f"{weights_path}: the weights do not fit the architecture in {path} (missing {missing}, "
                         f"unexpected {result.unexpected_keys}). Fix: {REEXPORT}")
    model = model.to(device)
    convert(model, recorded=recorded if isinstance(recorded, dict) else None)
    return model


def read_probe(bundle: str | Path) -> dict[str, Any]:
    """The fixed input and the logits the trial's model gave on it (to check a loaded model)."""
    path = Path(bundle) / "probe.safetensors"
    probe = _read_tensors(path)
    if set(probe) != {"input", "logits"}:
        raise DsnasError(f"{path}: must hold the tensors 'input' and 'logits', got {sorted(probe)}. Fix: {REEXPORT}")
    return probe


def recorded_task_spec(doc: dict[str, Any]) -> Any:
    """The TaskSpec a version-2 bundle's trial trained with."""
    recorded = doc["task"]
    return TaskSpec(recorded["name"], recorded.get("params", {}), recorded.get("base_dir", "."))


def recorded_hardware(doc: dict[str, Any], path: Path) -> Any:
    """The HardwareSpec a version-2 bundle's trial was measured with (``path``: its arch.json, for errors)."""
    hw = doc["hardware"]
    try:
        return HardwareSpec(batch_sizes=tuple(hw["batch_sizes"]), threads=hw.get("threads"),
                            warmup_s=hw["warmup_s"], measure_s=hw["measure_s"])
    except Invalid as e:
        raise DsnasError(f"{path}: [hardware.{e.key}] {e.rule}, got {e.got!r}. Fix: {REEXPORT}") from None
    except (KeyError, TypeError) as e:
        raise DsnasError(f"{path}: [hardware] is incomplete ({_one_line(e)}). Fix: {REEXPORT}") from None
