"""The on-device training artifacts' folder: ORT's file names and bsr's metadata file `bsr-device.json`.

`bsr export --format ort-training` writes the folder; the device trainer (`bsr_device.trainer`) and `bsr device-import`
read it through `read_metadata`, which checks that it is whole and was written by this bsr and this runtime.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import BSRError
from .version import __version__

FORMAT = "bsr-ort-training-1"
METADATA = "bsr-device.json"
TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL, CHECKPOINT = (
    "training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")
RUNTIME = "onnxruntime-training"
RUNTIME_VERSION = "1.19.2"  # the last release of ORT's training packages (PyPI, Maven, CocoaPods)
IR_VERSION = 10  # the newest ONNX IR that ORT 1.19 reads


def bsr_version() -> str:
    """This bsr's version."""
    return __version__


def write_json_atomic(path: Path, doc: Any) -> None:
    """Write `doc` as JSON to `path` through a fsynced temporary file in the same folder (old file kept on error)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise BSRError(f"cannot write {path} ({e.strerror or e}); free disk space or pick another folder") from None


def write_metadata(directory: Path, doc: dict) -> None:
    """Write `bsr-device.json` (format tag, versions and `doc`) into the artifacts folder `directory`."""
    write_json_atomic(Path(directory) / METADATA, {"format": FORMAT, "bsr_version": bsr_version(),
                                                    "runtime": RUNTIME, "runtime_version": RUNTIME_VERSION, **doc})


def read_json(path: Path, what: str, fix: str) -> dict:
    """The JSON object in `path`; a one-line error naming `what` and `fix` when missing or unreadable."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BSRError(f"{path} is missing: {what}; {fix}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BSRError(f"{path} is unreadable ({type(e).__name__}): {what}; {fix}") from None
    if not isinstance(doc, dict):
        raise BSRError(f"{path} is not a JSON object: {what}; {fix}")
    return doc


def read_metadata(directory: str | Path, runtime_version: str | None = None) -> dict:
    """The metadata of the artifacts folder `directory`, checked: bsr's format, this bsr's version, the runtime
    version `runtime_version` (the running onnxruntime's, when given) and every artifact file present."""
    directory = Path(directory)
    fix = "export the artifacts again with bsr export --format ort-training"
    if not directory.is_dir():
        raise BSRError(f"{directory} is not a folder of on-device training artifacts; {fix}")
    doc = read_json(directory / METADATA, "the artifacts' metadata", fix)
    if doc.get("format") != FORMAT:
        raise BSRError(f"{directory} holds artifacts of format {doc.get('format')!r}, not {FORMAT}; {fix}")
    if doc.get("bsr_version") != bsr_version():
        raise BSRError(f"{directory} was exported by bsr {doc.get('bsr_version')}, this is bsr {bsr_version()}; "
                       f"{fix} (or use bsr {doc.get('bsr_version')})")
    if runtime_version is not None and doc.get("runtime_version") != runtime_version:
        raise BSRError(f"{directory} was exported for {RUNTIME} {doc.get('runtime_version')}, this is "
                       f"{runtime_version}; install {RUNTIME}-cpu=={doc.get('runtime_version')}")
    for name in (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL, CHECKPOINT):
        if not (directory / name).exists():
            raise BSRError(f"{directory / name} is missing; {fix}")
    return doc
