"""The one root exception of dsnas, and the user-input error that says where, what rule, and how to fix it."""

from __future__ import annotations

from typing import Any


class DsnasError(Exception):
    """Root of every error dsnas raises on purpose. The CLI prints it as one line and exits 2."""


class SpecError(DsnasError):
    """A problem with what the user wrote: a study file, a search space, a flag.

    The message is one line: ``FILE: [KEY] RULE, but got VALUE. Fix: FIX``.
    """

    def __init__(self, where: str, key: str, rule: str, got: object = None, fix: str = "") -> None:
        self.where, self.key, self.rule, self.got, self.fix = where, key, rule, got, fix
        text = f"{where}: [{key}] {rule}"
        if got is not None:
            text += f", but got {got!r}"
        if fix:
            text += f". Fix: {fix}"
        super().__init__(text)

    def __reduce__(self) -> tuple[Any, ...]:
        # Raised in a Ray worker, it crosses to the driver pickled: Exception's default rebuilds it from args
        # (the text alone) and failed, so the trial's reason was Ray's "Failed to deserialize exception".
        return type(self), (self.where, self.key, self.rule, self.got, self.fix)


class TrialError(DsnasError):
    """A candidate could not be evaluated (it is recorded as a FAIL trial with this reason)."""


class Invalid(Exception):
    """A rule a config value broke, raised inside dataclasses; the loader turns it into a SpecError
    that names the file and the section."""

    def __init__(self, key: str, rule: str, got: object = None, fix: str = "") -> None:
        super().__init__(rule)
        self.key, self.rule, self.got, self.fix = key, rule, got, fix

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.key, self.rule, self.got, self.fix)


def require(ok: bool, key: str, rule: str, got: object = None, fix: str = "") -> None:
    if not ok:
        raise Invalid(key, rule, got, fix)
