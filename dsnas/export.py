"""Bundles: a trained candidate as a self-contained folder (architecture JSON, safetensors weights,
measured metrics, a probe of its outputs), and loading one back into a model."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from dsnas.errors import DsnasError
from dsnas.spec import StudySpec

BUNDLE_TYPE, BUNDLE_VERSION = "dsnas.bundle", 1


def pick_trial(study: Any, spec: StudySpec, trial: int | None = None, pick: str | None = None) -> Any:
    """A completed trial by number, or by ``max-METRIC`` / ``min-METRIC`` among the feasible completed ones."""
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if trial is not None:
        found = [t for t in done if t.number == trial]
        if not found:
            numbers = ", ".join(str(t.number) for t in done) or "none"
            raise DsnasError(f"--trial {trial}: no completed trial with that number in study {spec.name!r}. "
                             f"Fix: pick one of the completed trials ({numbers})")
        return found[0]
    how, _, metric = (pick or "").partition("-")
    metric = {o.name: o.metric for o in spec.objectives}.get(metric, metric)
    if how not in ("max", "min") or not metric:
        raise DsnasError(f"--pick {pick}: must be max-NAME or min-NAME. Fix: e.g. --pick max-accuracy")
    feasible = [t for t in done if t.user_attrs.get("feasible", 1.0) and metric in t.user_attrs]
    if not feasible:
        raise DsnasError(f"--pick {pick}: no feasible completed trial reports {metric!r} in study {spec.name!r}. "
                         "Fix: run `dsnas search` first, or pick another metric")
    return (max if how == "max" else min)(feasible, key=lambda t: t.user_attrs[metric])


def export_trial(spec: StudySpec, study: Any, frozen: Any, out: str | Path | None = None) -> Path:
    """Write the bundle of one trial; returns its folder."""
    from optuna.artifacts import FileSystemArtifactStore, download_artifact

    from dsnas.storage import artifact_dir

    out = Path(out) if out else spec.base_dir / "exports" / f"{spec.name}-trial{frozen.number}"
    missing = [k for k in ("weights_artifact", "probe_artifact") if k not in frozen.user_attrs]
    if missing:
        raise DsnasError(f"trial {frozen.number} of {spec.name!r} has no stored {missing}: it cannot be exported")
    out.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(str(artifact_dir(spec)))
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        for name in ("weights", "probe"):
            part = Path(tmp) / f"{name}.safetensors"
            download_artifact(artifact_store=store, file_path=str(part),
                              artifact_id=frozen.user_attrs[f"{name}_artifact"])
            part.replace(out / part.name)
    numeric = {k: v for k, v in frozen.user_attrs.items() if isinstance(v, (int, float))}
    _write_json(out / "arch.json", {"_type": BUNDLE_TYPE, "_version": BUNDLE_VERSION, "arch": frozen.user_attrs["arch"],
                                    "study": spec.name, "trial": frozen.number})
    _write_json(out / "metrics.json", {"_type": "dsnas.metrics", "_version": 1, "metrics": numeric,
                                       "objectives": dict(zip([o.name for o in spec.objectives], frozen.values)),
                                       "profile": frozen.user_attrs.get("profile", {})})
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_arch(bundle: str | Path) -> dict[str, Any]:
    path = Path(bundle) / "arch.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DsnasError(f"{path}: not a dsnas bundle ({e})") from None
    if data.get("_type") != BUNDLE_TYPE or data.get("_version") != BUNDLE_VERSION:
        raise DsnasError(f"{path}: expected _type {BUNDLE_TYPE!r} version {BUNDLE_VERSION}, got "
                         f"{data.get('_type')!r} version {data.get('_version')!r}")
    return data["arch"]


def load_bundle(bundle: str | Path, device: str = "cpu") -> Any:
    """The bundle's trained model, in eval mode, on ``device``."""
    from safetensors.torch import load_file

    from dsnas.evaluate import unique_state
    from dsnas.models import build

    model = build(read_arch(bundle))
    weights = load_file(str(Path(bundle) / "weights.safetensors"))
    aliases = set(model.state_dict()) - set(unique_state(model))  # tied names, filled through their first name
    result = model.load_state_dict(weights, strict=False)
    if set(result.missing_keys) - aliases or result.unexpected_keys:
        raise DsnasError(f"{bundle}: weights do not fit the architecture (missing "
                         f"{sorted(set(result.missing_keys) - aliases)}, unexpected {result.unexpected_keys})")
    return model.to(device).eval()


def read_probe(bundle: str | Path) -> dict[str, Any]:
    """The fixed input and the logits the trial's model gave on it (to check a loaded model)."""
    from safetensors.torch import load_file

    return load_file(str(Path(bundle) / "probe.safetensors"))
