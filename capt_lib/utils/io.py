"""Atomic writes, so that a killed run never leaves a half-written result behind."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], None]) -> Path:
    """Write a file through ``write_fn(tmp_path)`` and rename it into place.

    The temporary file lives in the target folder, so the final ``os.replace`` is an
    atomic rename on POSIX file systems: readers see either the old file or the new one.
    The file gets the permissions of a plain ``open(path, "w")``: 0o666 minus the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _create_temporary_file(path)
    try:
        write_fn(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def _create_temporary_file(path: Path) -> Path:
    """Create an empty file with a random name beside ``path`` and return its path.

    Unlike ``tempfile.mkstemp``, which always uses mode 0o600, the file is created with
    mode 0o666 and the process umask applies, as for a plain ``open(path, "w")``.
    O_EXCL makes a name collision (64 random bits) raise FileExistsError rather than
    reuse another writer's file.
    """
    temporary = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return temporary


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON (non-JSON values are stringified)."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    return atomic_write_text(path, text)


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
