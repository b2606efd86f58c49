"""Export: which trials to export, a trained trial written as a self-contained bundle (JSON, safetensors, ONNX,
model card), loading one back without pickle, and verifying one here.

Nothing heavy loads on import: torch, optuna and safetensors are imported by the functions that need them."""

from dsnas.export.bundle import BUNDLE_TYPE, BUNDLE_VERSION, export_trial, load_bundle, read_bundle, read_probe
from dsnas.export.formats import write_model_files
from dsnas.export.pick import Limits, knee, pareto_front, pick_trials
from dsnas.export.verify import Check, VerifyReport, verify_bundle

__all__ = ["BUNDLE_TYPE", "BUNDLE_VERSION", "Check", "Limits", "VerifyReport", "export_trial", "knee", "load_bundle",
           "pareto_front", "pick_trials", "read_bundle", "read_probe", "verify_bundle", "write_model_files"]
