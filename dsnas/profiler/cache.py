"""Measurements cached per device fingerprint on this machine (the CPU ceilings, the engine probe): one JSON file
each under ``$DSNAS_CACHE_DIR``, else ``$XDG_CACHE_HOME/dsnas``, else ``~/.cache/dsnas``. A cache is only ever
a saving: one that is missing, unreadable, foreign or unwritable costs a measurement, never a failed run."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
VERSION = 1


def cache_dir() -> Path:
    if os.environ.get("DSNAS_CACHE_DIR"):
        return Path(os.environ["DSNAS_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "dsnas"
    try:
        return Path.home() / ".cache" / "dsnas"
    except RuntimeError:
        # No HOME and no passwd entry for this uid (a container, `env -i`): a folder of this account's own in the
        # temp folder still saves the measurements, where failing every trial would not.
        fallback = Path(tempfile.gettempdir()) / f"dsnas-cache-uid{os.getuid()}"
        if not _SAID_HOMELESS:
            _SAID_HOMELESS.append(fallback)
            log.warning("no home folder for this account: caching measurements in %s. Fix: set DSNAS_CACHE_DIR",
                        fallback)
        return fallback


_SAID_HOMELESS: list[Path] = []


def entry_key(**what: Any) -> str:
    """A short key for what an entry was measured under (the fingerprint, threads, shapes...)."""
    text = json.dumps(what, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_entries(path: Path, kind: str) -> dict[str, Any]:
    """The entries of a ``kind`` cache file; a missing, unreadable or foreign file reads as empty (and is rewritten
    on the next store)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        log.warning("ignoring unreadable cache %s (%s); it will be rewritten", path, err)
        return {}
    if not isinstance(data, dict) or data.get("_type") != kind or not isinstance(data.get("entries"), dict):
        log.warning("ignoring cache %s: not a %s file; it will be rewritten", path, kind)
        return {}
    return data["entries"] if data.get("_version") == VERSION else {}


def store_entry(path: Path, kind: str, key: str, entry: dict[str, Any]) -> None:
    """Add one entry. Read again just before writing (another process may have stored its own meanwhile), then
    temp file + os.replace, so that a reader never sees half a file."""
    entries = read_entries(path, kind)
    entries[key] = entry
    text = json.dumps({"_type": kind, "_version": VERSION, "entries": entries}, indent=1)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp",
                                         delete=False) as f:
            tmp = f.name
            f.write(text)
        os.replace(tmp, path)
    except OSError as err:
        log.warning("could not write cache %s: %s", path, err)
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
