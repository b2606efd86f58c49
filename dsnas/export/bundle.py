"""A bundle: one trained trial written as a self-contained folder (JSON, safetensors, model files, card), and
read back, checked and rebuilt without pickle."""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dsnas._version import __version__
from dsnas.errors import DsnasError, Invalid, TrialError
from dsnas.export.card import measured_compiled, model_card
from dsnas.export.formats import _one_line, onnx_check, write_model_files
from dsnas.models import build, family, is_user_family, missing_package
from dsnas.profiler.measure import PROTOCOL_KEYS
from dsnas.spec import HardwareSpec, StudySpec, TaskSpec
from dsnas.storage import artifact_dir, process_tag, tag_gone
from dsnas.worker import PROBE_MODE

log = logging.getLogger(__name__)

BUNDLE_TYPE, BUNDLE_VERSION = "dsnas.bundle", 2
READABLE_VERSIONS = (1, 2)  # version 1 bundles lack the task and hardware sections: they load, verify less
METRICS_TYPE, METRICS_VERSION = "dsnas.metrics", 2
REEXPORT = "re-export the trial with `dsnas export`"


# ---- writing a bundle ------------------------------------------------------------------------------------------

def export_trial(spec: StudySpec, study: Any, frozen: Any, out: str | Path | None = None) -> Path:
    """Write the bundle of one trial from what the search stored (nothing is retrained); returns its folder.

    The bundle carries the task and timing protocol its study was searched with, even where the study file was
    edited since (dsnas.study.as_searched). It is built in a folder beside ``out`` and put in place whole: a
    failure leaves an earlier bundle at ``out`` as it was, never a mix of two trials' files."""
    from dsnas.study import as_searched  # SQLAlchemy loads on first use: dsnas.load reads a bundle without it

    spec = as_searched(spec, study)
    out = Path(out) if out else spec.base_dir / "exports" / f"{spec.name}-trial{frozen.number}"
    check_replaceable(out, "bundle", BUNDLE_FILES)
    evaluated = "arch" in frozen.user_attrs and frozen.user_attrs.get("profile", {}).get("backend") == "recorded"
    missing = [k for k in ("weights_artifact", "probe_artifact", "arch") if k not in frozen.user_attrs]
    if missing and not evaluated:
        raise DsnasError(f"trial {frozen.number} of {spec.name!r} has no stored {missing}: it cannot be exported. "
                         "Fix: export another trial")
    with built_beside(out, "bundle") as work:
        if evaluated:
            _export_evaluated(spec, frozen, work)
        else:
            _write_bundle(spec, frozen, work, out.name)
    return out


@contextmanager
def built_beside(out: Path, what: str) -> Iterator[Path]:
    """A work folder beside ``out`` for a bundle (``what``: "bundle" or "route") to be written into; once the block
    ends without an error it becomes ``out`` whole (put_in_place), and the work folder is removed either way."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(out)
        # Made with mkdir, not mkdtemp: the folder becomes the bundle, and mkdtemp's mode 0700 left it unreadable
        # to anyone else (a serving account) whatever the umask. Named after its process, so that a later run
        # knows it abandoned when that process is gone.
        work = out.parent / f".{out.name}.{process_tag()}"
        work.mkdir()
    except OSError as e:
        raise DsnasError(f"{out}: the {what} cannot be written there ({e.strerror or e}). Fix: name a folder you "
                         "can write to with --out") from None
    try:
        yield work
        put_in_place(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _remove_abandoned(out: Path) -> None:
    """The work folders beside ``out`` of a process of this host that is gone (an export or route killed with
    kill -9 left them for good, each as large as a bundle); another host's, a live process's and an older dsnas's
    (not named so) are left alone. An earlier bundle moved aside (``.NAME.old.TAG``) by a process killed before the
    new one took its place is put back where it was."""
    for folder in out.parent.glob(f".{glob.escape(out.name)}.*"):
        tag = folder.name[len(out.name) + 2:]
        aside = tag.startswith("old.")
        if not folder.is_dir() or not tag_gone(tag.removeprefix("old.")):
            continue
        if aside and not out.exists():
            folder.rename(out)
        else:
            shutil.rmtree(folder, ignore_errors=True)


# What a bundle folder holds, every file a dsnas version wrote: a folder of only these is a bundle (a damaged one
# too: its loader says to export it again), and may be replaced.
BUNDLE_FILES = frozenset({"arch.json", "weights.safetensors", "probe.safetensors", "metrics.json", "README.md",
                          "model.pt2", "model.onnx", "hf"})


def check_replaceable(out: Path, what: str, ours: frozenset[str]) -> None:
    """Writing a bundle (``what``: "bundle" or "route") replaces ``out`` whole, so only a folder of what such a
    bundle holds (``ours``: its entries' names), an empty one or a new one may be there. A folder of other files was
    deleted (`--out mymodels`), a file moved aside under a hidden name, and `--out .` failed with a traceback after
    all the work."""
    if out.exists() and not out.is_dir():
        raise DsnasError(f"{out}: a {what} is a folder, and this is a file. Fix: name a folder with --out")
    if not out.is_dir():
        return
    if Path.cwd().resolve().is_relative_to(out.resolve()):
        raise DsnasError(f"{out}: the {what}'s folder holds the current folder, which cannot be replaced. Fix: run it "
                         "from another folder, or name another --out")
    others = sorted(p.name for p in out.iterdir() if p.name not in ours)
    if others:
        raise DsnasError(f"{out}: this folder holds files that are not a dsnas {what}'s ({', '.join(others[:3])}"
                         f"{', ...' if len(others) > 3 else ''}); writing a {what} replaces the folder whole, which "
                         f"would delete them. Fix: name a new folder, or an earlier {what}, with --out")


def put_in_place(work: Path, out: Path) -> None:
    """``work`` becomes ``out``; an earlier bundle there is moved aside first and removed once the new one is in."""
    if not out.exists():
        work.rename(out)
        return
    old = out.parent / f".{out.name}.old.{process_tag()}"  # named so: a later run puts it back (_remove_abandoned)
    out.rename(old)
    try:
        work.rename(out)
    except BaseException:  # Ctrl-C too: it deleted the earlier bundle with the work folder
        if not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_bundle(spec: StudySpec, frozen: Any, out: Path, name: str) -> None:
    from dsnas.kernels.convert import inference_signature  # torch loads on first use

    _copy_artifacts(spec, frozen, out)
    doc = _arch_doc(spec, frozen)
    preprocessing, unknown = _preprocessing(spec, frozen)
    if preprocessing:
        doc["task"]["preprocessing"] = preprocessing
    _write_json(out / "arch.json", doc)
    model, probe = _rebuilt(spec, frozen, out, name)
    exports: dict[str, Any] = dict(write_model_files(model, probe["input"].to(_device_of(model)), out))
    if exports.get("onnx") == "model.onnx":
        half = any(form.split()[0] in ("fp16", "bf16") for form in inference_signature(model)["layers"].values())
        exports["onnx_check"] = onnx_check(out / "model.onnx", probe, spec.hardware.batch_sizes,
                                           frozen.user_attrs.get("profile", {}).get("threads"), frozen.user_attrs,
                                           low_precision="int8" in exports or half)
    if frozen.user_attrs["arch"].get("family") == "hf_causal_lm":
        exports["transformers"] = _save_pretrained(model, out / "hf")
    if unknown:
        exports["preprocessing"] = unknown
    profile = frozen.user_attrs.get("profile", {})
    metrics = {"_type": METRICS_TYPE, "_version": METRICS_VERSION,
               "metrics": {k: v for k, v in frozen.user_attrs.items() if isinstance(v, (int, float))},
               "objectives": dict(zip([o.name for o in spec.objectives], frozen.values)),
               "profile": profile, "fingerprint": profile.get("fingerprint", {}), "exports": exports}
    _write_json(out / "metrics.json", metrics)
    (out / "README.md").write_text(model_card(spec, frozen, metrics, name, preprocessing), encoding="utf-8")


def _preprocessing(spec: StudySpec, frozen: Any) -> tuple[dict[str, Any] | None, str | None]:
    """What the task did to an input before the model saw it, where it says (the images task: scaling, size,
    per-channel mean and std, class names), for the bundle and its card: as the trial recorded it. A trial of an
    older dsnas recorded none: the task is built again (a task without preprocessing, charlm, is not), and its
    answer kept only where its data is the data the trial trained on. Returns (it, why it is missing)."""
    profile = frozen.user_attrs.get("profile", {})
    if "preprocessing" in profile:
        return profile["preprocessing"], None
    if spec.task.name == "charlm":
        return None, None
    from dsnas.tasks import data_differs, make_task, preprocessing_of  # the task's data loads on first use

    unknown = f"unknown: trial {frozen.number} did not record it (an older dsnas), and"
    try:
        task = make_task(spec.task)
        if not isinstance(profile.get("task"), dict) or data_differs(profile["task"], task.fingerprint()):
            return None, f"{unknown} the task's data is no longer what it trained on"
        return preprocessing_of(task), None
    except (DsnasError, OSError, ValueError) as e:
        return None, f"{unknown} the task cannot say it now ({_one_line(e)})"


def _save_pretrained(model: Any, folder: Path) -> str:
    """The Hugging Face layout beside the bundle (``from_pretrained(folder)`` loads it), or why it is missing."""
    from dsnas.kernels.linear import engine_layers  # torch loads on first use
    from dsnas.models import hf_causal_lm  # transformers loads on first use

    layers = engine_layers(model)
    changed = sorted(name for name, layer in layers.items() if layer.precision != "fp32" or layer.pattern == "2:4")
    if changed:  # an engine group that left every layer fp32 dense changes nothing transformers would build
        return (f"unavailable: engine layers ({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}) run at "
                "another precision or sparsity, and transformers' from_pretrained would build plain ones; load the "
                "bundle with dsnas.load")
    try:
        with _as_plain_linears(model, layers):
            hf_causal_lm.save_pretrained(model, folder)
    except Exception as e:  # a transformers version that cannot save it: the dsnas bundle still stands
        # Without what it wrote before failing: a config.json with no weights beside it shipped as hf/, which
        # from_pretrained refused ("no file named model.safetensors") where metrics.json said hf/ is unavailable.
        shutil.rmtree(folder, ignore_errors=True)
        return f"unavailable: save_pretrained failed ({_one_line(e)})"
    return folder.name + "/"


@contextmanager
def _as_plain_linears(model: Any, layers: dict[str, Any]) -> Iterator[None]:
    """While open, each (fp32 dense) engine layer of ``model`` is an nn.Linear holding its weight and bias, so
    that the saved state holds exactly what transformers' own layers load (no mask or calibration buffers)."""
    from torch import nn

    swapped = []
    for name, layer in layers.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight, plain.bias = layer.weight, layer.bias
        setattr(parent, attr, plain)
        swapped.append((parent, attr, layer))
    try:
        yield
    finally:
        for parent, attr, layer in swapped:
            setattr(parent, attr, layer)


def _export_evaluated(spec: StudySpec, frozen: Any, out: Path) -> None:
    """A trial the task's own evaluation function answered has no model: its bundle holds the architecture and the
    metrics (``"model": false`` in arch.json), which is all there is to deploy or to cite."""
    doc = {"_type": BUNDLE_TYPE, "_version": BUNDLE_VERSION, "arch": frozen.user_attrs["arch"], "model": False,
           "study": spec.name, "trial": frozen.number, "dsnas_version": __version__,
           "why": NO_MODEL, "task": {"name": spec.task.name, "params": spec.task.params,
                                      "base_dir": spec.task.base_dir}}
    _write_json(out / "arch.json", doc)
    profile = frozen.user_attrs.get("profile", {})
    _write_json(out / "metrics.json", {
        "_type": METRICS_TYPE, "_version": METRICS_VERSION,
        "metrics": {k: v for k, v in frozen.user_attrs.items() if isinstance(v, (int, float))},
        "objectives": dict(zip([o.name for o in spec.objectives], frozen.values)), "profile": profile,
        "fingerprint": profile.get("fingerprint", {}), "exports": {}})


NO_MODEL = "the task's own evaluation function (evaluate_arch) answered this trial: dsnas built no model of it"


def _copy_artifacts(spec: StudySpec, frozen: Any, out: Path) -> None:
    from optuna.artifacts import FileSystemArtifactStore, download_artifact
    from optuna.artifacts.exceptions import ArtifactNotFound

    folder = artifact_dir(spec)
    store = FileSystemArtifactStore(str(folder))
    for name in ("weights", "probe"):
        artifact = frozen.user_attrs[f"{name}_artifact"]
        try:
            download_artifact(artifact_store=store, file_path=str(out / f"{name}.safetensors"), artifact_id=artifact)
        except (ArtifactNotFound, FileNotFoundError):
            host = (frozen.user_attrs.get("driver") or {}).get("host")
            if host and host != socket.gethostname():  # drivers on several machines share a database, not files
                raise DsnasError(f"{folder}: trial {frozen.number}'s {name} ({artifact}) is not there: its driver "
                                 f"ran on {host} and stored it beside the study file there. Fix: export it on "
                                 f"{host}, or copy {host}'s {folder.name} folder here") from None
            raise DsnasError(f"{folder}: trial {frozen.number}'s {name} ({artifact}) is not there. Fix: keep the "
                             f"{folder.name} folder beside the study file when copying or moving the study, "
                             "or export another trial") from None
        _check_stored(folder / artifact, frozen.number, name)


def _check_stored(path: Path, number: int, name: str) -> None:
    """A stored safetensors file that its header says is cut short (a copy of the study interrupted, a disk that
    filled) is named as the study's, where its bundle's copy was named with "re-export the trial", a fix that
    met the same file again."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):  # reads the header, and checks it against the file's size
            pass
    except (SafetensorError, OSError) as e:
        raise DsnasError(f"{path}: trial {number}'s {name}, as the search stored it, is not a readable safetensors "
                         f"file ({_one_line(e)}): it was cut short or changed since. Fix: restore the study's "
                         f"{path.parent.name} folder from a whole copy, or export another trial") from None


def _arch_doc(spec: StudySpec, frozen: Any) -> dict[str, Any]:
    from dsnas.kernels.convert import int8_backends  # torch loads on first use

    hw = spec.hardware
    layers = frozen.user_attrs.get("profile", {}).get("engine", {}).get("layers", {})
    return {"_type": BUNDLE_TYPE, "_version": BUNDLE_VERSION, "arch": frozen.user_attrs["arch"],
            "study": spec.name, "trial": frozen.number, "dsnas_version": __version__,
            # What verify needs to rebuild the task and measure again; base_dir resolves relative paths in params.
            "task": {"name": spec.task.name, "params": spec.task.params, "base_dir": spec.task.base_dir},
            # The whole timing protocol (PROTOCOL_KEYS), so that verify times the bundle as the search did.
            "hardware": {"batch_sizes": list(hw.batch_sizes), "threads": hw.threads,
                         **{key: getattr(hw, key) for key in PROTOCOL_KEYS}},
            # The INT8 code each layer ran when measured, so load() runs the same code where it can.
            "engine": {"int8_backends": int8_backends(layers)}}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


# ---- reading a bundle ------------------------------------------------------------------------------------------

def read_bundle(bundle: str | Path) -> dict[str, Any]:
    """The checked arch.json of a bundle."""
    folder = Path(bundle)
    if folder.is_file():  # a study file given where a bundle belongs read "no such bundle folder"
        raise DsnasError(f"{folder}: a file, not a bundle folder. Fix: give the folder `dsnas export` wrote"
                         + (f" (`dsnas export {folder} --pick knee` writes one)" if folder.suffix == ".toml" else ""))
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
        data = json.loads(path.read_text(encoding="utf-8"))
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


# A bundle's probe made at export from the rebuilt model (the trial's, of an older dsnas, said no mode and differed).
REMADE_PROBE = {"logits_from": "the exported model (the trial's probe, of an older dsnas, said no mode)"}


def eval_mode_probe(path: Path) -> bool:
    """Whether the probe says its logits are the model's in eval mode (dsnas.worker.probe_bytes)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).items() >= PROBE_MODE.items()


def _rebuilt(spec: StudySpec, frozen: Any, work: Path, name: str) -> tuple[Any, dict[str, Any]]:
    """The trial's model as the bundle being written (``work``, to be ``name``) rebuilds it, and its probe: checked
    against the logits the trial's model gave on the probe's input, where the trial ran on a CPU as this. A user
    family's builder edited since the trial trained (tanh for relu) was exported without a word, its ONNX file said
    to disagree with the measured model, and `dsnas.load` gave other logits."""
    import torch

    family_name = str(frozen.user_attrs["arch"].get("family", ""))
    try:
        # With its training form: the ONNX file's INT8 layers are quantized from the fp32 masters.
        model = load_bundle(work, _rebuild_device(frozen.user_attrs["arch"]), training_form=True)
    except DsnasError as e:  # named as the bundle will be, not as the work folder that is removed
        # Told by the error's kind, not its words: any error names the bundle's path, and an --out or a folder
        # named "fp8" turned a builder edited since (the weights did not fit) into "its fp8 layers need a GPU".
        if isinstance(e, NoKernelHere) and e.fp8:
            raise DsnasError(f"trial {frozen.number}: its fp8 layers run only on a CUDA GPU of compute capability 8.9 "
                             "or more, and export rebuilds its model to check it and write its files. Fix: export "
                             "it on such a machine (with the study's database and artifacts folder)") from None
        raise DsnasError(f"trial {frozen.number}: {str(e).replace(str(work), str(work.parent / name))}") from None
    probe = read_probe(work)
    ran_on = frozen.user_attrs.get("profile", {}).get("fingerprint", {}).get("device")
    if ran_on not in (None, "cpu"):  # other kernels (a GPU's: verify on such a device compares them)
        return model, probe
    with torch.inference_mode():
        now = model(probe["input"].to(_device_of(model))).float().cpu()
    then = probe["logits"].float()
    # Loose: a CPU of other instructions sums otherwise (verify's own check is the strict one); an edited model is
    # off by a share of the logits' size, not by rounding.
    diff = (now - then).abs().max().item() if now.shape == then.shape else float("inf")
    if diff <= 1e-2 * max(1.0, then.abs().max().item()):
        return model, probe
    if not eval_mode_probe(work / "probe.safetensors") and _mode_matters(model, probe["input"], now):
        # A probe an older dsnas may have taken in training mode (dropout's random logits), of a model whose
        # training mode gives other logits: no evidence against the builder, and no reference for the bundle
        # either (verify failed it, the ONNX check and the card said the ONNX file disagreed). The bundle's probe
        # becomes the rebuilt model's, and says so. (Where the mode changes nothing, the difference is the code's.)
        from safetensors.torch import save

        # Copied out of the file first, then the file replaced whole: the tensors read are mapped from it, and
        # writing over it gave the ONNX check an input of other bytes (token ids of 2e18).
        probe = {"input": probe["input"].clone(), "logits": now.cpu().contiguous()}
        staged = work / ".probe.safetensors.new"
        staged.write_bytes(save(probe, metadata={**PROBE_MODE, **REMADE_PROBE}))
        os.replace(staged, work / "probe.safetensors")
        log.warning("trial %d: its probe, taken by an older dsnas in no recorded mode, differs from the rebuilt "
                    "model's eval-mode logits by %.2g (as a training-mode forward's dropout would): the bundle's "
                    "probe holds the rebuilt model's logits", frozen.number, diff)
        return model, probe
    if is_user_family(family_name):
        why, fix = (f"the code of {family_name!r} (from {spec.base_dir}) builds another model than the trial trained",
                    "restore the builder's code as it was when the trial trained (its weights and probe are stored), "
                    "then export again")
    else:
        why, fix = (f"dsnas {__version__} builds {family_name!r} models otherwise than the dsnas that trained it",
                    "export with the dsnas version that searched the study")
    raise DsnasError(f"trial {frozen.number}: the model rebuilt from its stored weights gives other logits on its "
                     f"probe input than the trial's model did (max |difference| {diff:.2g}): {why}. Fix: {fix}")


def _mode_matters(model: Any, batch: Any, eval_logits: Any) -> bool:
    """Whether ``model`` in training mode gives other logits on ``batch`` than ``eval_logits`` (dropout, batch norm's
    batch statistics): run on a copy, whose batch norm may update its statistics. A model that cannot be copied is
    given the benefit of the doubt."""
    import copy

    import torch

    try:
        twin = copy.deepcopy(model).train()
        with torch.no_grad():
            trained = twin(batch.to(_device_of(twin))).float().cpu()
    except Exception:
        return True
    if trained.shape != eval_logits.shape:
        return True
    return (trained - eval_logits).abs().max().item() > 1e-6 * max(1.0, eval_logits.abs().max().item())


def _rebuild_device(arch: dict[str, Any]) -> str:
    """Where export rebuilds a trial's model to check it and write its files: the CPU, but a CUDA GPU for fp8 layers,
    which have no CPU kernel (every fp8 trial failed to export, also on the GPU that trained it)."""
    from dsnas.kernels.quant import fp8_supported  # torch loads on first use

    def asks_fp8(value: Any) -> bool:
        if isinstance(value, dict):
            return value.get("precision") == "fp8" or any(asks_fp8(v) for v in value.values())
        return isinstance(value, list) and any(asks_fp8(v) for v in value)

    return "cuda" if asks_fp8(arch) and fp8_supported("cuda")[0] else "cpu"


def _device_of(model: Any) -> Any:
    import torch

    first = next(iter([*model.parameters(), *model.buffers()]), None)
    return torch.device("cpu") if first is None else first.device


class NoKernelHere(DsnasError):
    """A bundle's layer has no kernel on the device it is loaded on; ``fp8``: an fp8 layer's."""

    def __init__(self, message: str, fp8: bool) -> None:
        super().__init__(message)
        self.fp8 = fp8


def load_bundle(bundle: str | Path, device: Any = "cpu", *, training_form: bool = False) -> Any:
    """The bundle's trained model, in eval mode, on ``device``, its layers in the inference form they were
    measured in (INT8, FP8, sparse), holding the weights that form reads and no more (the memory its measurement
    counted). ``training_form``: keep the fp32 master weights and masks beside it too (weights.safetensors holds
    them; export derives the ONNX file's INT8 weights from them)."""
    from dsnas.kernels.convert import convert, unique_state  # torch loads on first use
    from dsnas.profiler.device import named_device  # likewise

    # "auto" raised torch's own error, "cuda" without a GPU a bare AssertionError
    device = named_device(device, "device=")

    path = Path(bundle) / "arch.json"
    doc = read_bundle(bundle)
    if doc.get("model") is False:
        raise DsnasError(f"{path}: this bundle holds an architecture and its metrics, no model: {NO_MODEL}. Fix: "
                         "build the model from arch.json yourself, or search with a task dsnas trains")
    arch = doc["arch"]
    engine = doc.get("engine")
    recorded = engine.get("int8_backends") if isinstance(engine, dict) else None
    name = str(arch.get("family", ""))
    study_dir = doc.get("task", {}).get("base_dir") if isinstance(doc.get("task"), dict) else None
    fix = REEXPORT
    package = missing_package(name)
    if package:  # the bundle is sound: "not a buildable architecture. Fix: re-export" failed the same
        raise DsnasError(f"{path}: the {name} family needs the {package} package, which is not installed. "
                         f"Fix: {family(name).INSTALL_HINT}")
    if is_user_family(name):
        _import_builder(path, name, study_dir)
        fix = f"if the code of {name!r} changed since the trial trained, restore it; else {REEXPORT}"
    try:
        model = build(arch, study_dir)
    except Exception as e:  # the family's own checks, or a torch error on absurd sizes: either way a bad arch.json
        raise DsnasError(f"{path}: [arch] is not a buildable architecture ({_one_line(e)}). Fix: {fix}") from None
    weights_path = Path(bundle) / "weights.safetensors"
    weights = _read_tensors(weights_path)
    aliases = set(model.state_dict()) - set(unique_state(model))  # tied names, filled through their first name
    try:
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        raise DsnasError(f"{weights_path}: the weights do not fit the architecture in {path} ({_one_line(e)}). "
                         f"Fix: {fix}") from None
    missing = sorted(set(result.missing_keys) - aliases)
    if missing or result.unexpected_keys:
        raise DsnasError(f"{weights_path}: the weights do not fit the architecture in {path} (missing {missing}, "
                         f"unexpected {result.unexpected_keys}). Fix: {fix}")
    model = model.to(device)
    try:
        convert(model, recorded=recorded if isinstance(recorded, dict) else None)
    except TrialError as e:  # a layer with no kernel on this device (fp8 on a CPU or an A100)
        fp8 = "fp8" in str(e)  # the kernel's own words, which name no path
        where = "a CUDA GPU of compute capability 8.9 or more (device='cuda')" if fp8 else \
            "the kind of device its trial ran on"
        raise NoKernelHere(f"{path}: the model cannot run on {device}: {e}. Fix: load it on {where}", fp8) from None
    if not training_form:
        _shed(model, Path(bundle), device)
    return model


def _shed(model: Any, bundle: Path, device: Any) -> None:
    """Free the masters the loaded model's inference form does not read (convert.shed_training_form), checked on
    the bundle's probe: a user's model whose own forward reads a layer's weight (or passes its bias on, where None
    is taken too) keeps them, and says so."""
    import torch
    from torch.utils._pytree import tree_leaves

    from dsnas.kernels.convert import shed_training_form  # torch loads on first use

    def outputs() -> list[Any]:
        return [t.clone() for t in tree_leaves(model(example)) if isinstance(t, torch.Tensor)]

    try:
        example = read_probe(bundle)["input"].to(device)  # the input export ran the model on
        with torch.inference_mode():
            before = outputs()
    except Exception:  # a damaged probe (verify names it), or a model that fails on it: nothing to check against
        shed_training_form(model)
        return

    def same_outputs() -> None:
        after = outputs()
        if len(after) != len(before) or not all(a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-6,
                                                                                     equal_nan=True)
                                                for a, b in zip(after, before)):
            raise ValueError("its output on the probe changed")

    kept = shed_training_form(model, same_outputs)
    if kept:
        log.warning("%s: the model keeps its fp32 master weights beside its inference form (more memory than its "
                    "measurement counted): without them, %s", bundle, kept)


def _import_builder(path: Path, name: str, study_dir: str | None) -> None:
    """A user family's builder, importable from where it was searched (the study's folder) or from sys.path."""
    try:
        family(name, study_dir if study_dir and Path(study_dir).is_dir() else None)
    except Exception as e:
        module = name.partition(":")[0]
        raise DsnasError(f"{path}: the model builder {name!r} cannot be imported ({type(e).__name__}: "
                         f"{_one_line(e)}). Fix: make the module {module!r} importable (run from its folder, or "
                         "add that folder to PYTHONPATH)") from None


def read_probe(bundle: str | Path) -> dict[str, Any]:
    """The fixed input and the logits the trial's model gave on it (to check a loaded model)."""
    path = Path(bundle) / "probe.safetensors"
    probe = _read_tensors(path)
    if set(probe) != {"input", "logits"}:
        raise DsnasError(f"{path}: must hold the tensors 'input' and 'logits', got {sorted(probe)}. Fix: {REEXPORT}")
    return probe


def as_measured(model: Any, metrics: dict[str, Any]) -> Any:
    """``model`` in the form its bundle's figures (``metrics``, its metrics.json) were measured in: compiled when
    they were."""
    if not measured_compiled(metrics):
        return model
    import torch

    return torch.compile(model)


def recorded_task_spec(doc: dict[str, Any]) -> Any:
    """The TaskSpec a version-2 bundle's trial trained with."""
    recorded = doc["task"]
    return TaskSpec(recorded["name"], recorded.get("params", {}), recorded.get("base_dir", "."))


def recorded_hardware(doc: dict[str, Any], path: Path) -> Any:
    """The HardwareSpec a version-2 bundle's trial was measured with (``path``: its arch.json, for errors)."""
    hw = doc["hardware"]
    try:
        # Bundles before 2026-12-06 recorded warmup_s and measure_s only: the rest of the protocol is the default.
        protocol = {"warmup_s": hw["warmup_s"], "measure_s": hw["measure_s"],
                    **{key: hw[key] for key in PROTOCOL_KEYS if key in hw}}
        return HardwareSpec(batch_sizes=tuple(hw["batch_sizes"]), threads=hw.get("threads"), **protocol)
    except Invalid as e:
        raise DsnasError(f"{path}: [hardware.{e.key}] {e.rule}, got {e.got!r}. Fix: {REEXPORT}") from None
    except (KeyError, TypeError) as e:
        raise DsnasError(f"{path}: [hardware] is incomplete ({_one_line(e)}). Fix: {REEXPORT}") from None
