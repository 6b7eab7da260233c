"""Files on disk: atomic writes (readers and resumed runs never see half a file, a crash leaves no stray temp
file), and cheap identities of files for fingerprints (what changed, without reading the data)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def _default_mode() -> int:
    """What `open()` would give a new file under the current umask (safetensors and mkstemp give 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: str | Path, write: Callable[[str], None]) -> None:
    """Calls `write(tmp)` on a temporary file beside `path`, then renames it to `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_identity(path: str | Path) -> list:
    """Path, size and modification time of a file, or of every file under a folder: changes when the data does."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def digest(described: dict) -> str:
    """A stable hash of a JSON-able description."""
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
