"""Write a safetensors file one tensor at a time, atomically.

`safetensors.torch.save` builds the whole file in memory: a bytes copy of every tensor plus the joined result, and
callers that must first give every tensor its own contiguous CPU storage hold a third copy. Writing a checkpoint at
the end of a training step then needs about three times the trainable state on top of the step's memory, which on
CPU makes it the run's peak (`bsr.measure.trace`). Here the header is computed from shapes and dtypes alone and each
tensor's bytes go to the file straight from its storage (a CPU copy of one tensor at a time when it lives on a GPU or
is not contiguous), so writing adds about the largest single tensor. The file is the safetensors format (8-byte
little-endian header length, JSON header with dtype, shape and data offsets and `__metadata__`, then the data) and is
read back by `safetensors` itself (`tests/test_tensorfile.py`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import BinaryIO, Optional

import torch

from .errors import BSRError
from .files import atomic_write

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def header_bytes(tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> bytes:
    """The length prefix and JSON header of a safetensors file of `tensors` (in their order), padded to 8 bytes."""
    doc: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in DTYPES:
            raise BSRError(f"tensor {name} has dtype {t.dtype}, which safetensors cannot store; convert it first")
        size = t.numel() * t.element_size()
        doc[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(doc, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def write_tensors(f: BinaryIO, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    """Write the safetensors file of `tensors` to the open binary file `f`."""
    f.write(header_bytes(tensors, metadata))
    for t in tensors.values():
        t = t.detach().to("cpu").contiguous()
        if t.numel():
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    """Write `tensors` (and string `metadata`) to the safetensors file `path` atomically (`bsr.files.atomic_write`):
    a kill or a full disk leaves the previous file intact and raises a one-line `BSRError`."""
    atomic_write(path, lambda f: write_tensors(f, tensors, metadata))
