"""The on-disk cache shared by the loaders and the harness: converted weights,
reference logits, measured machine peaks. `$INFERMATRIX_CACHE` or
`~/.cache/infermatrix`; every entry is keyed by content hashes, so a stale entry
is never read, only left unused."""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path


def cache_dir(kind: str) -> Path:
    root = Path(os.environ.get("INFERMATRIX_CACHE") or Path.home() / ".cache" / "infermatrix")
    path = root / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, remembered per (path, size, mtime) within a process."""
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
