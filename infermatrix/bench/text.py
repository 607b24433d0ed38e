"""Evaluation text: real English with no download (the standard library's pydoc
topics), or any UTF-8 file the user passes."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from infermatrix.errors import UserError


def default_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def load_text(path: str | None = None) -> str:
    if path is None:
        return default_text()
    file = Path(path)
    if not file.is_file():
        raise UserError(f"eval text {path!r} is not a file; pass a UTF-8 text file or omit it for the default")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"eval text {path!r} is not UTF-8 ({exc.reason} at byte {exc.start})") from None


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str, min_words: int = 3) -> list[str]:
    """The text's sentences in order: whitespace collapsed, cut after '.', '!' or '?'
    followed by a space; pieces of fewer than `min_words` words (headings, code
    fragments) dropped."""
    flat = " ".join(text.split())
    return [s for s in _SENTENCE_END.split(flat) if len(s.split()) >= min_words]
