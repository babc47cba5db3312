"""Files: atomic writes that survive a kill or a full disk, content hashes, the one reader of text, YAML and JSON
files, and the lock that keeps a second process out of a directory being written (the lowest layer, used by all).

A file is written through a temporary file in the same directory, fsynced, then moved over the target with one
`os.replace`, so a reader sees the old file or the new one, never a mix, and a failed write leaves the old one intact.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Optional, Sequence

from .errors import BSRError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call `write(f)` on a temp file in the same directory, fsync, then `os.replace` it over `path`.

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
            write(f)
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


_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # `atomic_write`'s temporary names: .NAME.XXXXXXXX.tmp


def remove_stale_temps(directory: Path) -> list[str]:
    """Remove the temporary files that an interrupted `atomic_write` left in `directory` (a kill -9 during a write);
    call it only while no other process writes there (the directory lock). Returns the names removed."""
    removed = []
    for path in Path(directory).iterdir() if Path(directory).is_dir() else []:
        if _TEMP.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def _same(a: Path, b: Path) -> bool:
    """Whether `a` and `b` name one file or folder, however spelled: relative or absolute, through symlinks, or as
    two hard links (same device and inode)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist: compare where they would be
        return os.path.realpath(a) == os.path.realpath(b)


def refuse_writing_inputs(outputs: Sequence[Path], inputs: Sequence[Path], option: str = "OUT") -> None:
    """One line, before anything is written, if an output file (or folder) is one of the command's inputs (or an
    input's folder): a command never writes over what it reads, however the paths are spelled."""
    for out in outputs:
        for source in inputs:
            if _same(out, source):
                raise BSRError(f"{option} {out} is the command's own input {source}; writing it would destroy the "
                               f"input: pick another path")


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


@contextlib.contextmanager
def exclusive_dir(directory: Path, what: str = "directory") -> Iterator[None]:
    """Hold an exclusive OS lock on `directory` for the `with` block; a one-line `BSRError` if another open handle
    (another process) holds it. The OS drops the lock when the handle is closed or its process ends, however it ends:
    a killed run leaves no stale lock behind. POSIX locks the directory itself (no file is added to it); Windows,
    which cannot lock a directory, a `.bsr.lock` file in it. Where the file system has no locks (some network
    mounts), the block runs unlocked."""
    try:
        handle = _lock(directory)
    except BlockingIOError:
        raise BSRError(f"{what} {directory} is in use by another bsr process; wait for it to end or stop it, "
                       "then run again") from None
    try:
        yield
    finally:
        if handle is not None:
            os.close(handle)


def _lock(directory: Path) -> Optional[int]:
    """An open handle on `directory` (Windows: on its `.bsr.lock`) holding a lock taken without waiting;
    `BlockingIOError` if another handle holds it, None if this file system cannot lock."""
    try:
        if os.name == "nt":
            import msvcrt

            fd = os.open(directory / ".bsr.lock", os.O_RDWR | os.O_CREAT)
            lock = lambda: msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # noqa: E731
        else:
            import fcntl

            fd = os.open(directory, os.O_RDONLY)
            lock = lambda: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # noqa: E731
    except OSError:
        return None  # cannot open it for locking: nothing to hold
    try:
        lock()
    except OSError as e:
        os.close(fd)
        if isinstance(e, BlockingIOError) or (os.name == "nt" and e.errno in (errno.EACCES, errno.EDEADLK)):
            raise BlockingIOError from None
        return None  # ENOLCK, EOPNOTSUPP...: the file system has no locks
    return fd


# ------------------------------------------------------------------------------------------------- reading
# The one reader of the text files a user hands to `bsr` or edits in a run directory (YAML configs and study files,
# report.json, measurement files, metrics.jsonl): any failure is a one-line `BSRError` naming the file.


USER_FIX = "pass the right file"  # the fix for a file the user named; files of a run or study folder: OUTPUT_FIX
OUTPUT_FIX = "restore it or delete it"


def read_text(path: str | Path, what: str = "file", fix: str = USER_FIX) -> str:
    """The UTF-8 text of `path`; a binary file or an unreadable path is a one-line `BSRError` naming `what` and it,
    ending in `fix`."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BSRError(f"{what} {path} is not a text file (byte {e.start} is not UTF-8); {fix}") from None
    except OSError as e:
        raise BSRError(f"cannot read {what} {path}: {e.strerror or e}") from None


def read_yaml(path: str | Path, what: str = "YAML file", fix: str = USER_FIX) -> dict:
    """The mapping a YAML file holds (an empty file: {}); anything else is a one-line `BSRError`."""
    import yaml

    text = read_text(path, what, fix)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise BSRError(f"{what} {path} is not valid YAML{where}; {fix}") from None
    return {} if data is None else _top_level(data, dict, f"{what} {path}", fix)


def read_json(path: str | Path, what: str = "JSON file", kind: type = dict, fix: str = OUTPUT_FIX) -> Any:
    """The JSON value of `path`, which must be a `kind` (dict: an object); else a one-line `BSRError`."""
    try:
        data = json.loads(read_text(path, what, fix))
    except json.JSONDecodeError as e:
        raise BSRError(f"{what} {path} is not valid JSON (line {e.lineno}: {e.msg}); {fix}") from None
    return _top_level(data, kind, f"{what} {path}", fix)


def read_json_lines(path: str | Path, what: str = "JSON-lines file", fix: str = OUTPUT_FIX) -> list[dict]:
    """The objects of a JSON-lines file, one a line; a last line cut short (a write killed mid-line) is dropped,
    any other line that is not a JSON object is a one-line `BSRError`."""
    lines = read_text(path, what, fix).splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise BSRError(f"{what} {path}: line {number} is not valid JSON; {fix}") from None
        records.append(_top_level(record, dict, f"{what} {path}: line {number}", fix))
    return records


_JSON_NAMES = {dict: "a mapping", list: "a list", str: "a string", int: "a number", float: "a number",
               bool: "true/false", type(None): "null"}


def _top_level(data: Any, kind: type, where: str, fix: str) -> Any:
    if isinstance(data, kind):
        return data
    have = _JSON_NAMES.get(type(data), type(data).__name__)
    raise BSRError(f"{where} must hold {_JSON_NAMES.get(kind, kind.__name__)}, not {have}; {fix}")
