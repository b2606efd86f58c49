"""User code named in a study as "module:callable" (a search space, a task), imported the same way everywhere."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

# The study folders this process put on sys.path (resolved), in the order it first did.
_STUDY_FOLDERS: list[Path] = []


def import_callable(target: str, base_dir: str | Path | None = None) -> Any:
    """Import ``module:attr``; the study file's folder is importable, as a script's folder is for Python."""
    module_name, _, attr = target.partition(":")
    if base_dir is not None:
        _use_folder(Path(base_dir))
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{target} is not callable")
    return obj


def _use_folder(base_dir: Path) -> None:
    """The study's folder first on sys.path, and every module imported from another study's folder under a name
    this folder has a module of dropped: Python would return it, and a second study in a notebook ran the first
    one's task (or its own task with the first one's helpers), with the first one's data and fingerprint."""
    here = base_dir.resolve()
    if here not in _STUDY_FOLDERS:
        _STUDY_FOLDERS.append(here)
    others = [folder for folder in _STUDY_FOLDERS if folder != here]
    if others:
        names = {p.stem for p in here.glob("*.py")} | {p.parent.name for p in here.glob("*/__init__.py")}
        for name, module in list(sys.modules.items()):
            file = getattr(module, "__file__", None)
            if name.split(".")[0] in names and file is not None and _under(file, others) and not _under(file, [here]):
                del sys.modules[name]
    if sys.path[:1] != [str(base_dir)]:
        if str(base_dir) in sys.path:
            sys.path.remove(str(base_dir))
        sys.path.insert(0, str(base_dir))


def _under(file: str, folders: list[Path]) -> bool:
    path = Path(file).resolve()
    return any(path.is_relative_to(folder) for folder in folders)
