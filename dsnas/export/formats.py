"""The model files of a bundle that other runtimes load: model.pt2 (torch.export) and model.onnx."""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def write_model_files(model: Any, example: Any, out: Path) -> dict[str, str]:
    """model.pt2 (torch.export) and model.onnx, each when the model supports it, with a dynamic batch
    dimension; returns {format: file name, or "unavailable: reason"} so that no omission is silent."""
    import torch

    for name in ("model.pt2", "model.onnx"):
        (out / name).unlink(missing_ok=True)  # a file from an earlier export must not outlive a failure now
    status = {}
    try:
        # Batch 2, not 1: torch.export specializes a dimension whose example size is 1.
        program = torch.export.export(model, (example[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, out / "model.pt2")
        status["pt2"] = "model.pt2"
    except Exception as e:  # any failure of tracing or saving means: this model has no .pt2
        program, status["pt2"] = None, f"unavailable: torch.export failed ({_one_line(e)})"
    status["onnx"] = _write_onnx(program, out / "model.onnx")
    return status


def _write_onnx(program: Any, path: Path) -> str:
    import torch

    if program is None:
        return "unavailable: the ONNX exporter needs torch.export, which failed (see pt2)"
    missing = onnx_missing()
    if missing:
        return f"unavailable: {' and '.join(missing)} not installed. Fix: pip install 'dsnas[onnx]'"
    try:
        with _quiet():
            torch.onnx.export(program, (), str(path), input_names=["input"], output_names=["logits"],
                              dynamic_shapes=({0: "batch"},), external_data=False, verbose=False)
    except Exception as e:  # an operator without an ONNX translation, for instance
        path.unlink(missing_ok=True)
        return f"unavailable: torch.onnx.export failed ({_one_line(e)})"
    return path.name


def onnx_missing() -> list[str]:
    """The packages torch's ONNX exporter needs that are not installed."""
    return [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]


@contextmanager
def _quiet() -> Iterator[None]:
    """The exporter logs and warns about things that do not concern a dsnas user (torchvision ops, deprecations)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]
