"""Content-addressed cache keys and the one place that decides where caches live.

Everything expensive and deterministic (pretrained MiniCLIP weights, backbone
features, confusion banks) is stored under ``<cache_dir>/<kind>/<key>``, where the key
is a hash of every input that determines the content. Changing any input changes the
key, so a stale entry is never reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

CACHE_ENV_VAR = "CAPT_CACHE_DIR"
DEFAULT_CACHE_DIR = Path("runs") / "cache"


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the cache root: the argument, else ``$CAPT_CACHE_DIR``, else ``./runs/cache``."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR])
    return DEFAULT_CACHE_DIR


def _to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _to_jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    raise TypeError(f"cannot build a cache key from a value of type {type(value).__name__}: {value!r}")


def content_key(inputs: Any, length: int = 16) -> str:
    """Hash ``inputs`` (dicts, dataclasses, lists, scalars) into a short hex key.

    The hash is taken over canonical JSON (sorted keys), so the key does not depend on
    dict insertion order.
    """
    canonical = json.dumps(_to_jsonable(inputs), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:length]


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()
