"""User code named in a study as "module:callable" (a search space, a task), imported the same way everywhere."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any


def import_callable(target: str, base_dir: str | Path | None = None) -> Any:
    """Import ``module:attr``; the study file's folder is importable, as a script's folder is for Python."""
    if base_dir is not None and str(base_dir) not in sys.path:
        sys.path.insert(0, str(base_dir))
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{target} is not callable")
    return obj
