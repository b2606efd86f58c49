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

__all__ = ["DsnasError", "SpecError", "TrialError", "load", "load_route", "measure", "search", "__version__"]

# The documented sub-modules, imported on first use: `import dsnas; dsnas.results.load(...)` was an AttributeError
# unless something had imported dsnas.results first (pandas loads with it, so not at `import dsnas`).
_ON_USE = ("export", "results", "run")


def __getattr__(name: str) -> Any:
    if name in _ON_USE:
        import importlib

        return importlib.import_module(f"dsnas.{name}")
    raise AttributeError(f"module 'dsnas' has no attribute {name!r}")


def search(study_file: str, callbacks: Sequence[Callable[[Any, Any], None]] = (), sampler: Any = None,
           **overrides: Any) -> Any:
    """Run (or resume) the study described by ``study_file``; ``callbacks`` are Optuna-style ``(study, trial)``
    callables, called after each trial is stored (as Optuna's optimize() calls them; one may call
    ``study.stop()``); ``sampler``: an Optuna sampler of one's own instead of [sampler]'s. See
    :func:`dsnas.run.run_study`."""
    from dsnas.run import run_study
    from dsnas.spec import load_study
    from dsnas.storage import optuna_quieted  # Optuna's own log lines: quiet for this call only

    with optuna_quieted():
        return run_study(load_study(study_file, **overrides), callbacks=callbacks, sampler=sampler)


def load(bundle: str, device: "str | torch.device" = "cpu", *, training_form: bool = False) -> "torch.nn.Module":
    """Rebuild the trained model of an exported bundle, in its inference form; see
    :func:`dsnas.export.load_bundle`."""
    from dsnas.export import load_bundle

    return load_bundle(bundle, device=device, training_form=training_form)


def measure(model: "torch.nn.Module", example_input: Any, device: "str | torch.device" = "auto",
            batch_sizes: Sequence[int] = (1, 32), items_per_example: int = 1, **protocol: Any) -> Any:
    """Measure any PyTorch model as dsnas measures a trial (no study needed): latency per batch size with its
    spread, throughput, FLOPs, bytes, peak memory and, on a GPU, the NVML window. Returns a
    :class:`dsnas.profile.ProfileReport`: ``.metrics`` (the flat figures a trial stores), ``.profile`` (the whole
    profile); printing it gives the `dsnas profile` table. See :func:`dsnas.profile.measure_model`."""
    from dsnas.profile import measure_model

    if not hasattr(batch_sizes, "__iter__"):  # batch_sizes=8 was a TypeError from tuple()
        raise DsnasError(f"dsnas.measure batch_sizes={batch_sizes!r}: must be a list of batch sizes. Fix: e.g. "
                         f"batch_sizes=[{batch_sizes}]")
    return measure_model(model, example_input, device, tuple(batch_sizes), items_per_example, **protocol)


def load_route(folder: str, device: "str | torch.device" = "cpu") -> Any:
    """The route bundle `dsnas route` wrote, as a callable that serves batches: the first model runs on the whole
    batch and only the rows it is unsure of go on. See :class:`dsnas.route.Route`."""
    from dsnas.route import load_route as load

    return load(folder, device=device)
