"""The on-disk cache shared by the loaders and the harness: converted weights,
reference logits, measured machine peaks. `$INFERMATRIX_CACHE` or
`~/.cache/infermatrix`; every entry is keyed by content hashes, so a stale entry
is never read, only left unused."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator


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


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """A temporary path beside `target` to write a file or folder to; renamed onto
    `target` when the block succeeds, so readers (and other processes writing the
    same entry) see all of it or nothing; removed when anything fails."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
