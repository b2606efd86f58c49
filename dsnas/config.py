"""TOML tables -> dataclasses: unknown keys, types and the dataclasses' own rules, each reported as one
SpecError line that names the file, the key, the rule and the fix."""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

from dsnas.errors import Invalid, SpecError


def masked_url(url: str) -> str:
    """A database URL as it may be printed: its password, in the user part or as a query parameter (libpq takes
    ``?password=``), replaced by ***; also a URL SQLAlchemy cannot parse (its error names the URL)."""
    url = re.sub(r"(://[^/@?#]*?:)[^@/?#]*@", r"\1***@", str(url))
    return re.sub(r"(?i)([?&](?:password|passwd|pwd)=)[^&#]*", r"\1***", url)


def require_spec(where: str, key: str, ok: bool, rule: str, got: object = None, fix: str = "") -> None:
    if not ok:
        raise SpecError(where, key, rule, got, fix)


def reject_unknown(where: str, prefix: str, table: dict[str, Any], known: typing.Iterable[str]) -> None:
    known = list(known)
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
            shown = key if key.isprintable() else repr(key)  # a quoted TOML key may hold a line break
            raise SpecError(where, prefix + shown, "is not a known key", None, hint)


def section_table(where: str, raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key, {})
    require_spec(where, key, isinstance(value, dict), "must be a table", value, f"write it as [{key}]")
    return value


_EXAMPLE = {int: "a whole number without quotes, e.g. 12", float: "a number without quotes, e.g. 0.5",
            str: 'a string in quotes, e.g. "text"', bool: "true or false"}


def typed(where: str, key: str, value: Any, hint: Any) -> Any:
    """Check a TOML value against a field's annotation (int, float, str, bool, X | None, tuple[X, ...], dict)."""
    if isinstance(hint, types.UnionType):
        inner = [t for t in typing.get_args(hint) if t is not type(None)]
        return typed(where, key, value, inner[0])
    origin = typing.get_origin(hint)
    leaf = key.rpartition(".")[2]
    if origin is tuple:
        require_spec(where, key, isinstance(value, list), "must be a list", value, f"write {leaf} = [1, 32]")
        item = typing.get_args(hint)[0]
        return tuple(typed(where, f"{key}[{i}]", v, item) for i, v in enumerate(value))
    if origin is dict or hint is dict:
        require_spec(where, key, isinstance(value, dict), "must be a table", value, f"write it as [{key}]")
        return dict(value)
    ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str), bool: lambda v: isinstance(v, bool)}[hint](value)
    require_spec(where, key, ok, f"must be of type {hint.__name__}", value, f"write {_EXAMPLE[hint]}")
    if hint is float:  # TOML integers have no size limit, floats do: float(10**400) overflows
        require_spec(where, key, isinstance(value, float) or abs(value) <= sys.float_info.max,
                     "must be a number a float can hold (magnitude up to 1.8e308)", value, f"write a smaller {leaf}")
        return float(value)
    return value


def build_section(where: str, name: str, cls: type, table: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    reject_unknown(where, f"{name}.", table, names)
    kwargs = {}
    for key, value in table.items():
        if dataclasses.is_dataclass(hints[key]):
            require_spec(where, f"{name}.{key}", isinstance(value, dict), "must be a table", value,
                         f"write it as [{name}.{key}]")
            kwargs[key] = build_section(where, f"{name}.{key}", hints[key], value)
        else:
            kwargs[key] = typed(where, f"{name}.{key}", value, hints[key])
    try:
        return cls(**kwargs)
    except Invalid as e:
        raise SpecError(where, f"{name}.{e.key}", e.rule, e.got, e.fix) from None


def is_there(check: Callable[[], bool]) -> bool:
    """``path.is_file`` or ``path.is_dir``, called; False where the OS rejects the name (too long, a NUL byte)
    rather than OSError or ValueError, as Python 3.12 answers."""
    try:
        return check()
    except (OSError, ValueError):
        return False
