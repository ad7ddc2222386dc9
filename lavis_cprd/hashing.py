"""sha256 of files: what says two checkpoints are the same weights whatever their paths (a
teacher cache's teacher, the checkpoints a ``compare`` run loaded)."""
from __future__ import annotations

import hashlib
import os
import threading
from typing import Dict, Tuple

_lock = threading.Lock()  # compare prepares runs from several threads
_digests: Dict[Tuple[str, int, int], str] = {}


def sha256_of_file(path: str) -> str:
    """The sha256 of the file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str) -> str:
    """:func:`sha256_of_file`, computed once per process while the file's size and modification
    time stay the same (a BLIP checkpoint is 900 MB: hashed once, asked for by every run)."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    with _lock:
        if key not in _digests:
            _digests[key] = sha256_of_file(path)
        return _digests[key]
