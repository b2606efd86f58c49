"""Model families: each builds a PyTorch model from a plain, JSON-able architecture dict."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from dsnas.errors import Invalid, TrialError

FAMILIES = ("transformer_lm",)


def family(name: str) -> ModuleType:
    """The module of a model family (ARCH_KEYS, LAYER_KEYS, TASK_KEYS, check_choices, validate, describe, build)."""
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r}; known: {list(FAMILIES)}")
    return importlib.import_module(f"dsnas.models.{name}")


def validate(arch: dict[str, Any]) -> None:
    """Raise TrialError unless the family of ``arch`` can build it."""
    try:
        family(arch.get("family", "")).validate(arch)
    except KeyError as e:
        raise TrialError(f"invalid architecture: {e.args[0]}") from None
    except Invalid as e:
        raise TrialError(f"invalid architecture: [{e.key}] {e.rule} (got {e.got!r})") from None


def build(arch: dict[str, Any]) -> Any:
    """Validate ``arch`` and build its model (on the CPU, in fp32; the caller moves it)."""
    validate(arch)
    return family(arch["family"]).build(arch)


def describe(arch: dict[str, Any]) -> str:
    try:
        return family(arch.get("family", "")).describe(arch)
    except (KeyError, TypeError):
        return str(arch)
