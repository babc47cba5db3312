"""Files that survive a kill or a full disk: atomic writes and content hashes (the lowest layer, used by all).

A file is written through a temporary file in the same directory, fsynced, then moved over the target with one
`os.replace`, so a reader sees the old file or the new one, never a mix, and a failed write leaves the old one intact.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from .errors import BSRError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same directory, fsync, then `os.replace`.

    On any OSError (disk full, read-only dir...) the temp file is removed, the old `path` is left untouched, and a
    one-line `BSRError` is raised.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)  # make the rename itself durable
    except OSError as e:
        raise BSRError(f"cannot write {path}: {e.strerror or e}; the previous file, if any, is intact") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported everywhere (e.g. Windows); the data itself is already synced
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
