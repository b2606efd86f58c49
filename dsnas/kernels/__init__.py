"""The engine candidates are built from: per-layer mixed precision with fp32 fallback (precision), N:M structured
sparsity chosen by saliency (sparsity), INT8 QAT with KL calibration and FP8 (calibrate, quant), the inference forms
(convert), and the worker's sparsify -> fine-tune -> QAT -> convert steps (pipeline).

Modules load torch on first use; importing this package starts nothing."""

from typing import Any

_EXPORTS = {"EngineLinear": "linear", "PRECISIONS": "linear", "SPARSITIES": "linear", "engine_layers": "linear",
            "layer_report": "linear", "TrainStep": "precision", "convert": "convert"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"dsnas.kernels.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'dsnas.kernels' has no attribute {name!r}")
