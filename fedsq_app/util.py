"""Small helpers every room of the package may use; imports nothing else of fedsq_app.

``ConfigError`` (a bad setting, reported before any work), ``cache_dir`` (where prepared data, backbones and
caches live), ``write_atomic`` (the one way files are written) and ``source_digest`` (a cache key's code part).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from types import ModuleType
from typing import Callable


class ConfigError(ValueError):
    """A run-config or node-config value is missing, of the wrong type, or out of range."""


def cache_dir() -> Path:
    """Where prepared data and pretrained backbones live (``$FEDSQ_CACHE_DIR``, else ~/.cache/fedsq)."""
    if os.environ.get("FEDSQ_CACHE_DIR"):
        return Path(os.environ["FEDSQ_CACHE_DIR"]).expanduser().resolve()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return (base / "fedsq").resolve()


def write_atomic(path: str | Path, content: bytes | str | Callable[[Path], None]) -> Path:
    """Write ``path`` so that a reader (or a crash) sees the old file or the whole new one, never a torn one.

    ``content``: bytes, text (UTF-8), or a function that writes a given temporary path (e.g. safetensors'
    ``save_file``). The temporary file is this process's own, next to ``path``; it is fsynced before
    ``os.replace`` makes it the file, so the rename never points at bytes still in flight. Two processes
    writing at once each write their own temporary file; the last rename wins.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if callable(content):
            content(tmp)
        else:
            tmp.write_bytes(content.encode() if isinstance(content, str) else content)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def source_digest(*modules: ModuleType) -> str:
    """SHA-256 (16 hex digits) of these modules' source, read through their import loader (wherever the
    files are): a cache keyed by it is rebuilt when that code changes."""
    digest = hashlib.sha256()
    for module in modules:
        spec = module.__spec__
        source = spec.loader.get_source(spec.name) if spec and spec.loader else None
        if source is None:
            raise ValueError(f"no source for module {module.__name__}: cannot key a cache by its code")
        digest.update(spec.name.encode() + b"\0" + source.encode())
    return digest.hexdigest()[:16]
