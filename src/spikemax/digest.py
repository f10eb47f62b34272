"""One content digest (sha256) for checkpoints and data: a changed input must never reuse old results."""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterable
from pathlib import Path


def digest_bytes(*parts: bytes | str) -> str:
    """sha256 hex digest of the parts in order (str parts as UTF-8)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
    return h.hexdigest()


def digest_files(paths: Iterable[str | os.PathLike[str]]) -> str:
    """sha256 hex digest of the files' contents in order (a missing file contributes nothing)."""
    h = hashlib.sha256()
    for path in paths:
        p = Path(path)
        if p.is_file():
            with p.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of one file's content, memoized per (path, size, mtime) so a rewritten file is re-read."""
    p = Path(path).resolve()
    st = p.stat()
    return _file_digest(str(p), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    return digest_files([path])
