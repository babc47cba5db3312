"""bsr.tensorfile: safetensors files written tensor by tensor, read back by safetensors itself."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from bsr.errors import BSRError
from bsr.tensorfile import save_tensors


def tensors():
    torch.manual_seed(0)
    base = torch.randn(4, 6)
    return {"w": base, "row": base[1], "t": torch.randn(3, 5).t(), "bf16": torch.randn(7).bfloat16(),
            "half": torch.randn(2, 2).half(), "i64": torch.arange(5), "u8": torch.randint(0, 255, (9,), dtype=torch.uint8),
            "flag": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}


def test_written_file_reads_back_with_safetensors(tmp_path):
    """Shared, strided, 0-d, empty and every common dtype come back equal, with the metadata."""
    path, given = tmp_path / "t.safetensors", tensors()
    save_tensors(path, given, metadata={"bsr": "{}", "k": "v"})
    back = load_file(path)
    for name, t in given.items():
        if name == "row":
            continue
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    assert torch.equal(back["row"], back["w"][1])
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"bsr": "{}", "k": "v"}
    assert os.listdir(tmp_path) == ["t.safetensors"]


def test_unsupported_dtype_is_one_line(tmp_path):
    with pytest.raises(BSRError, match="complex64, which safetensors cannot store"):
        save_tensors(tmp_path / "x.safetensors", {"c": torch.zeros(2, dtype=torch.complex64)})


def test_a_write_that_fails_halfway_keeps_the_previous_file(tmp_path):
    """A real failing write (RLIMIT_FSIZE in a child process, like a disk filling up mid-file): one line, the old
    file intact, no temp file left."""
    path = tmp_path / "t.safetensors"
    save_tensors(path, {"a": torch.ones(3)})
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import resource, signal, torch
        from bsr.tensorfile import save_tensors
        from bsr.errors import BSRError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            save_tensors({str(path)!r}, {{"a": torch.ones(10), "b": torch.ones(1_000_000)}})
        except BSRError as e:
            print(e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith(f"cannot write {path}") and "previous file, if any, is intact" in out.stdout, out
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["t.safetensors"]
