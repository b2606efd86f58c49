"""Model families: each builds a PyTorch model from a plain, JSON-able architecture dict. A family is built in
(``transformer_lm``, ``cnn``, ``hf_causal_lm``) or the user's: ``"module:callable"``, a builder
``build(arch) -> nn.Module`` with, optionally, ``describe(arch) -> str`` and ``validate(arch)`` beside it in its
module (see :class:`UserFamily`)."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from dsnas.errors import Invalid, TrialError
from dsnas.plugins import import_callable

FAMILIES = ("transformer_lm", "cnn", "hf_causal_lm")
# The arch keys dsnas itself writes: the family's name and the engine groups a user family's space chose.
DSNAS_KEYS = ("family", "engine")


def is_user_family(name: str) -> bool:
    return ":" in name


def family(name: str, base_dir: str | Path | None = None) -> Any:
    """The module of a built-in family (ARCH_KEYS, LAYER_KEYS, TASK_KEYS, check_choices, validate, describe, build),
    or a :class:`UserFamily` with the same names; ``base_dir``: the study's folder, importable for a user family."""
    if is_user_family(name):
        return _user_family(name, str(base_dir) if base_dir is not None else None)
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r}; known: {list(FAMILIES)} or a builder \"module:callable\"")
    return _builtin(name)


def _builtin(name: str) -> ModuleType:
    return importlib.import_module(f"dsnas.models.{name}")


def missing_package(name: str) -> str:
    """The package a built-in family (``name``) builds with where this environment lacks it (hf_causal_lm's
    transformers; its module's INSTALL_HINT says how to install it), else ''. A user's family: '' (importing its
    builder says what it lacks)."""
    if is_user_family(name) or name not in FAMILIES:
        return ""
    package = getattr(_builtin(name), "REQUIRES", None)
    if package is None or importlib.util.find_spec(package) is not None:  # looked up, not imported: seconds saved
        return ""
    return str(package)


class UserFamily:
    """A family of the user's. The builder gets the architecture without dsnas's own keys (``family``, ``engine``):
    the sampled choices and the task's keys. ``validate`` raises on an architecture it cannot build (the trial fails
    with its message); ``describe`` gives the short form progress lines and tables show."""

    ARCH_KEYS: tuple[str, ...] = ()
    LAYER_KEYS: tuple[str, ...] = ()
    TASK_KEYS: tuple[str, ...] = ()

    def __init__(self, target: str, base_dir: str | None) -> None:
        self.target = target
        self.builder = import_callable(target, base_dir)
        module = sys.modules[target.partition(":")[0]]
        self._describe = getattr(module, "describe", None)
        self._validate = getattr(module, "validate", None)

    def check_choices(self, options: dict[str, tuple[Any, ...]]) -> None:
        """Nothing to check before sampling: the builder's ``validate`` sees each architecture."""

    def validate(self, arch: dict[str, Any]) -> None:
        if self._validate is not None:
            self._validate(user_arch(arch))

    def describe(self, arch: dict[str, Any], fixed: tuple[str, ...] = ()) -> str:
        if self._describe is not None:  # the user's words for the model, then the engine's choices
            return f"{self._describe(user_arch(arch))} {describe_groups(arch)}".strip()
        return describe_choices(arch, fixed)

    def build(self, arch: dict[str, Any]) -> Any:
        from torch import nn  # torch loads on first use

        model = self.builder(user_arch(arch))
        if not isinstance(model, nn.Module):
            raise TrialError(f"the model builder {self.target} returned a {type(model).__name__}, not a "
                             "torch.nn.Module")
        return model


@functools.lru_cache(maxsize=8)
def _user_family(target: str, base_dir: str | None) -> UserFamily:
    return UserFamily(target, base_dir)


def forget_families() -> None:
    """Import each user family's builder again at its next use (a run's start: it may have been edited since)."""
    _user_family.cache_clear()


def user_arch(arch: dict[str, Any]) -> dict[str, Any]:
    """What a user's builder sees: the architecture without dsnas's own keys."""
    return {k: v for k, v in arch.items() if k not in DSNAS_KEYS}


def describe_choices(arch: dict[str, Any], fixed: tuple[str, ...] = ()) -> str:
    """``key=value`` of each choice (the engine groups' too), without the keys in ``fixed`` (the task's)."""
    parts = [f"{k}={v}" for k, v in arch.items() if k not in DSNAS_KEYS and k not in fixed]
    return " ".join(parts + [describe_groups(arch)]).strip()


def describe_groups(arch: dict[str, Any]) -> str:
    """The engine groups' choices, e.g. ``head=bf16 mlp=fp32/2:4``; '' without groups."""
    return " ".join(f"{g['group']}={g['precision']}" + (f"/{g['sparsity']}" if g["sparsity"] != "dense" else "")
                    for g in arch.get("engine", ()))


def validate(arch: dict[str, Any], base_dir: str | Path | None = None) -> None:
    """Raise TrialError unless the family of ``arch`` can build it."""
    try:
        fam = family(arch.get("family", ""), base_dir)
    except KeyError as e:  # an unknown family is no missing key: it read "it has no key 'unknown model family..."
        raise TrialError(f"invalid architecture: [family] {e.args[0]}") from None
    except Exception as e:  # a user builder that does not import: its message is the reason
        raise TrialError(f"invalid architecture: {type(e).__name__}: {e}") from None
    try:
        fam.validate(arch)
    except KeyError as e:
        missing = e.args[0] if e.args and isinstance(e.args[0], str) else None
        # A key the architecture lacks; not a value of it that the builder looked up (act = "swish")
        if missing is not None and missing not in arch and missing not in map(str, arch.values()):
            raise TrialError(f"invalid architecture: it has no key {e.args[0]!r} (add it to the space's "
                             "[choices], or have the task's arch_defaults() give it)") from None
        raise TrialError(f"invalid architecture: KeyError: {e}") from None  # a lookup of a value, say
    except Invalid as e:
        raise TrialError(f"invalid architecture: [{e.key}] {e.rule} (got {e.got!r})") from None
    except TrialError:
        raise
    except Exception as e:  # the user's validate(): its message is the reason
        raise TrialError(f"invalid architecture: {type(e).__name__}: {e}") from None


def build(arch: dict[str, Any], base_dir: str | Path | None = None) -> Any:
    """Validate ``arch`` and build its model (on the CPU, in fp32; the caller moves it), with its engine groups
    applied. A user builder that raises fails the trial with its reason."""
    validate(arch, base_dir)
    fam = family(arch["family"], base_dir)
    try:
        model = fam.build(arch)
    except TrialError:
        raise
    except Exception as e:
        if not is_user_family(arch["family"]):
            raise
        raise TrialError(f"the model builder {arch['family']} raised {type(e).__name__}: {e}") from None
    if arch.get("engine"):
        from dsnas.kernels.groups import apply_groups  # torch loads on first use

        model.dsnas_left_alone = apply_groups(model, arch["engine"])
    return model


def describe(arch: dict[str, Any], fixed: tuple[str, ...] = (), base_dir: str | Path | None = None) -> str:
    """The short form of an architecture; the sampled choices as ``key=value`` for one without a family (a task's
    own evaluation function) or whose family cannot say."""
    name = arch.get("family", "")
    if not name:
        return describe_choices(arch, fixed)
    try:
        fam = family(name, base_dir)
        if is_user_family(name):
            return str(fam.describe(arch, fixed))
        # An [engine] group's choice too: hf_causal_lm has no other engine choice, and two models apart only in it
        # read the same on the front ("llama h64 L1 a4/kv2 i344" twice).
        return f"{fam.describe(arch)} {describe_groups(arch)}".strip()
    except Exception:  # a description is never worth failing a trial over
        return describe_choices(arch, fixed)
