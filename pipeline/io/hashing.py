"""File hashing: the one SHA-256 of a file's bytes (model files, LoRA exports, the lock file)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of the file at ``path``, read in ``chunk``-byte pieces (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


_HASHES: dict[tuple[str, int, int], str] = {}


def cached_file_sha256(path: Path) -> str:
    """:func:`file_sha256`, remembered per (resolved path, size, mtime) so a long-running process
    (the daemon) hashes an unchanged file (a LoRA) once."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(path)
    return _HASHES[key]
