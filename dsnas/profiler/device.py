"""Which device a trial runs on, and the fingerprint that says what that device is."""

from __future__ import annotations

import os
import platform
import socket
from typing import Any

from dsnas._version import __version__
from dsnas.errors import DsnasError
from dsnas.profiler.capabilities import cpu_model, fingerprint_fields


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_device(requested: str) -> Any:
    """``auto`` -> the first visible CUDA device if any, else the CPU."""
    import torch

    if requested == "auto":
        requested = "cuda" if has_cuda() else "cpu"
    return torch.device("cuda", torch.cuda.current_device()) if requested == "cuda" else torch.device("cpu")


def named_device(requested: str, option: str = "--device") -> Any:
    """The device a user named (a flag, or an argument: ``option``): auto, cpu, cuda or cuda:N (or a torch.device of
    them, as torch's own calls take), refused in one line when it is none of them or names a GPU this machine lacks
    (it fell back to the CPU, or crashed)."""
    import torch

    if isinstance(requested, torch.device):  # dsnas.measure(model, x, device=torch.device("cpu")) was refused
        requested = str(requested)
    def given(value: Any) -> str:  # "--device cuda" for a flag, "device='cuda'" for an argument
        return f"{option}{value!r}" if option.endswith("=") else f"{option} {value}"

    if not isinstance(requested, str) or not (requested in ("auto", "cpu", "cuda") or (
            requested.startswith("cuda:") and requested[5:].isdigit())):
        raise DsnasError(f"{given(requested)}: must be auto, cpu, cuda or cuda:N. Fix: e.g. {given('auto')}")
    if requested.startswith("cuda") and not has_cuda():
        raise DsnasError(f"{given(requested)}: this machine has no visible NVIDIA GPU. Fix: use {given('cpu')}")
    if requested.startswith("cuda:"):
        index = int(requested[5:])
        if index >= torch.cuda.device_count():
            raise DsnasError(f"{given(requested)}: this machine has {torch.cuda.device_count()} visible GPU(s), "
                             f"numbered from 0. Fix: e.g. {given('cuda:0')}")
        return torch.device("cuda", index)
    return resolve_device(requested)


def device_key(device: Any) -> str:
    """A name for the physical device, the same in every process on the node (CUDA indices are not)."""
    import torch

    if device.type == "cuda":
        return f"cuda-{torch.cuda.get_device_properties(device).uuid}"
    return "cpu"


def fingerprint(device: Any) -> dict[str, Any]:
    """What measured a number: enough to tell whether two measurements are comparable."""
    import torch

    out: dict[str, Any] = {
        "host": socket.gethostname(),
        "device": device.type,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "dsnas": __version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(gpu=props.name, gpu_uuid=str(props.uuid), cuda=torch.version.cuda,
                   gpu_capability=f"{props.major}.{props.minor}")
    # The CPU's kernel features, and for a GPU its driver and maximum clocks: measurements that differ in
    # these are not comparable.
    out.update(fingerprint_fields(device))
    return out


def short_hash(data: dict[str, Any]) -> str:
    """A short stable id of a JSON-able dict (key order does not matter)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint_id(data: dict[str, Any]) -> str:
    """A short stable id of a fingerprint: measurements with the same id are comparable."""
    return short_hash(data)
