"""User code named in a study as "module:callable" (a search space, a task), imported the same way everywhere."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any


def import_callable(target: str, base_dir: str | Path | None = None) -> Any:
    """Import ``module:attr``; the study file's folder is importable, as a script's folder is for Python."""
    module_name, _, attr = target.partition(":")
    if base_dir is not None:
        if str(base_dir) not in sys.path:
            sys.path.insert(0, str(base_dir))
        _forget_another_folders(module_name, Path(base_dir))
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{target} is not callable")
    return obj


def _forget_another_folders(module_name: str, base_dir: Path) -> None:
    """Where the study's folder has the module, drop one of that name imported from elsewhere (another study's
    plug-in, earlier in this process): Python would return it, and a second study in a notebook ran the first
    one's task, with its data and fingerprint."""
    top = module_name.split(".")[0]
    own = [base_dir / f"{top}.py", base_dir / top / "__init__.py"]
    own = [p.resolve() for p in own if p.is_file()]
    loaded = sys.modules.get(top)
    if not own or loaded is None:
        return
    file = getattr(loaded, "__file__", None)
    if file is not None and Path(file).resolve() in own:
        return
    for name in [n for n in sys.modules if n == top or n.startswith(f"{top}.")]:
        del sys.modules[name]
    # The study's folder first: another study's folder inserted since would otherwise give its module again.
    sys.path.remove(str(base_dir))
    sys.path.insert(0, str(base_dir))
