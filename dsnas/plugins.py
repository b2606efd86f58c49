"""User code named in a study as "module:callable" (a search space, a task), imported the same way everywhere."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

# When each module this process imported from a study's folder was written (its file's mtime_ns), by file.
_IMPORTED_AT: dict[Path, int] = {}


def import_callable(target: str, base_dir: str | Path | None = None) -> Any:
    """Import ``module:attr``; the study file's folder is importable, as a script's folder is for Python."""
    module_name, _, attr = target.partition(":")
    if base_dir is not None:
        _use_folder(Path(base_dir))
    obj: Any = importlib.import_module(module_name)
    if base_dir is not None:
        _note_imported(Path(base_dir))
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{target} is not callable")
    return obj


def _use_folder(base_dir: Path) -> None:
    """The study's folder first on sys.path, and every module of a name this folder has a module of dropped where
    it was imported from elsewhere (another study's folder, the notebook's own) or from this folder before its file
    was edited: Python would return the one it holds, and a second study in a notebook ran the first one's task (or
    its own with the first one's helpers, or as it was before the edit), with the other data and fingerprint."""
    own = _own_modules(base_dir)
    stale = []
    for name, path in own.items():
        file = getattr(sys.modules.get(name), "__file__", None)
        if file is not None and (Path(file).resolve() != path or _IMPORTED_AT.get(path) not in (None, _mtime(path))):
            stale.append(name)
    if stale:  # and the folder's other modules with them: they hold what they imported from the stale ones
        for held in [n for n in sys.modules if n.split(".")[0] in own]:
            del sys.modules[held]
    if sys.path[:1] != [str(base_dir)]:
        if str(base_dir) in sys.path:
            sys.path.remove(str(base_dir))
        sys.path.insert(0, str(base_dir))


def _own_modules(base_dir: Path) -> dict[str, Path]:
    """The top-level modules of a study's folder, by name: NAME.py and NAME/__init__.py (resolved). Left out: a
    name the standard library has, dsnas itself (a study folder holding a copy of dsnas), and a name whose loaded
    module is an installed package's: dropping those would break every module that imports them."""
    found = {p.stem: p for p in base_dir.glob("*.py")}
    found.update({p.parent.name: p for p in base_dir.glob("*/__init__.py")})
    return {name: path.resolve() for name, path in found.items()
            if name not in sys.stdlib_module_names and name != __name__.split(".")[0] and not _installed(name)}


def _installed(name: str) -> bool:
    file = getattr(sys.modules.get(name), "__file__", None)
    return file is not None and any(part in ("site-packages", "dist-packages") for part in Path(file).parts)


def _note_imported(base_dir: Path) -> None:
    """When the study folder's modules now loaded were written (_use_folder dropped any older one first)."""
    for name, own in _own_modules(base_dir).items():
        loaded = sys.modules.get(name)
        if getattr(loaded, "__file__", None) and Path(loaded.__file__).resolve() == own:
            _IMPORTED_AT[own] = _mtime(own)


def _mtime(path: Path) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None
