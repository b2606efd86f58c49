"""dsnas: hardware-aware neural architecture search.

Importing dsnas starts nothing and touches no hardware: torch, Ray, NVML and CUDA are imported on use, and so is the
driver (dsnas.run) that :func:`search` calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from dsnas._version import __version__
from dsnas.errors import DsnasError, SpecError, TrialError

if TYPE_CHECKING:
    import torch

__all__ = ["DsnasError", "SpecError", "TrialError", "load", "search", "__version__"]


def search(study_file: str, callbacks: Sequence[Callable[[Any, Any], None]] = (), **overrides: Any) -> Any:
    """Run (or resume) the study described by ``study_file``; ``callbacks`` are Optuna-style ``(study, trial)``
    callables, called after each trial is stored (as Optuna's optimize() calls them). See
    :func:`dsnas.run.run_study`."""
    from dsnas.run import run_study
    from dsnas.spec import load_study

    return run_study(load_study(study_file, **overrides), callbacks=callbacks)


def load(bundle: str, device: str = "cpu") -> "torch.nn.Module":
    """Rebuild the trained model of an exported bundle; see :func:`dsnas.export.load_bundle`."""
    from dsnas.export import load_bundle

    return load_bundle(bundle, device=device)
