"""User code named in a study as "module:callable" (a search space, a task), imported the same way everywhere."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

# A run's number (new_run), and the run each study folder's modules were last imported afresh in.
_RUN = [0]
_REFRESHED: dict[Path, int] = {}


class ShadowedModule(ImportError):
    """A study folder's module of a standard-library module's name; ``rule`` and ``fix`` say so in words."""

    def __init__(self, path: Path, name: str) -> None:
        self.rule = (f"names {path.name} of the study's folder, which has the name of Python's standard-library "
                     f"module {name!r}: Python imports whichever was loaded first, and a Ray worker, IPython or pdb "
                     "loaded the standard one")
        self.fix = f"rename {path.name} (e.g. to study_{path.name}) and name it so in the study"
        super().__init__(f"{self.rule}. Fix: {self.fix}")


def import_callable(target: str, base_dir: str | Path | None = None) -> Any:
    """Import ``module:attr``; the study file's folder is importable, as a script's folder is for Python."""
    module_name, _, attr = target.partition(":")
    if base_dir is not None:
        top = module_name.split(".")[0]
        # code.py beside the study ran locally and failed every Ray trial ("module 'code' has no attribute 'build'").
        shadowing = [p for p in (Path(base_dir) / f"{top}.py", Path(base_dir) / top) if p.exists()]
        if top in sys.stdlib_module_names and shadowing:
            raise ShadowedModule(shadowing[0], top)
        _use_folder(Path(base_dir))
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{target} is not callable")
    return obj


def new_run() -> None:
    """A run starts: each study folder's modules are imported afresh at their next use, as their files are now."""
    _RUN[0] += 1


def _use_folder(base_dir: Path) -> None:
    """The study's folder first on sys.path; and, at a run's first use of the folder, every loaded module of a name
    the folder has a module of dropped (later in the run, one imported from elsewhere): Python would return the one
    it holds, and a second study in a notebook ran the first one's task (or its own with the first one's helpers,
    or as it was before an edit), with the other data and fingerprint."""
    here = base_dir.resolve()
    own = _own_modules(here)
    fresh = _REFRESHED.get(here) != _RUN[0]
    _REFRESHED[here] = _RUN[0]
    stale = fresh or any(  # (a namespace package has no file to compare)
        (file := getattr(sys.modules.get(name), "__file__", None)) is not None and Path(file).resolve() != path
        for name, path in own.items() if path.is_file())
    if stale:  # the folder's modules together: each holds what it imported from the others
        for held in [n for n in sys.modules if n.split(".")[0] in own]:
            del sys.modules[held]
    if sys.path[:1] != [str(base_dir)]:
        if str(base_dir) in sys.path:
            sys.path.remove(str(base_dir))
        sys.path.insert(0, str(base_dir))


def _own_modules(base_dir: Path) -> dict[str, Path]:
    """The top-level modules of a study's folder, by name: NAME.py, NAME/__init__.py and a folder NAME of modules
    (resolved). Left out: a name the standard library has, a dunder one (__main__: the running program), dsnas
    itself (a study folder holding a copy of dsnas), and a name whose loaded module is an installed package's:
    dropping those would break every module that imports them."""
    # As Python finds them: a package before NAME.py, NAME.py before a folder of modules without __init__.py (a
    # namespace package; a data/ folder of scripts beside data.py had data.py imported again at every use).
    found: dict[str, Path] = {p.parent.name: p.parent for p in base_dir.glob("*/*.py") if p.parent.name.isidentifier()}
    found.update({p.stem: p for p in base_dir.glob("*.py")})
    found.update({p.parent.name: p for p in base_dir.glob("*/__init__.py")})
    return {name: path.resolve() for name, path in found.items()
            if name not in sys.stdlib_module_names and not name.startswith("__")
            and name != __name__.split(".")[0] and not _installed(name)}


def _installed(name: str) -> bool:
    file = getattr(sys.modules.get(name), "__file__", None)
    return file is not None and any(part in ("site-packages", "dist-packages") for part in Path(file).parts)
