"""Checkpoints: atomic writes that keep the previous file on failure, exact round trips, one-line corrupt errors."""

import errno
import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

import bsr  # noqa: F401
from bsr.errors import BSRError
from bsr.files import atomic_write_bytes
from bsr.train.checkpoint import (CHECKPOINT_NAME, load_trainable, read_checkpoint, rng_state, save_checkpoint,
                                  set_rng_state, unflatten_optimizer)
from bsr.train.methods import apply_method


def trained_pair():
    """A head-only model after one AdamW step, and its optimizer."""
    torch.manual_seed(0)
    model = apply_method(timm.create_model("vit_micro_patch4_28", depth=2, img_size=16), "head")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    opt.step()
    return model, opt


def test_round_trip_restores_parameters_optimizer_and_metadata(tmp_path):
    model, opt = trained_pair()
    save_checkpoint(tmp_path, model, opt, {"step": 7, "config": {"lr": 0.1}})
    tensors, meta = read_checkpoint(tmp_path)
    assert meta["step"] == 7 and meta["config"] == {"lr": 0.1}
    assert {k for k in tensors if k.startswith("param.")} == {"param.norm.weight", "param.norm.bias",
                                                              "param.head.weight", "param.head.bias"}
    fresh, fresh_opt = trained_pair()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    load_trainable(fresh, tensors, tmp_path)
    fresh_opt.load_state_dict(unflatten_optimizer(tensors, meta["optimizer"]))
    assert torch.equal(fresh.head.weight, model.head.weight)
    assert torch.equal(fresh.blocks[0].attn.qkv.weight, torch.zeros_like(model.blocks[0].attn.qkv.weight))
    a, b = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])


def test_rng_states_round_trip():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    tensors, meta = rng_state()
    meta = json.loads(json.dumps(meta))  # as stored
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    set_rng_state(tensors, meta)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["f.bin"]


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"previous")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)  # the failure point of a full disk on many filesystems
    with pytest.raises(BSRError, match="cannot write .*f.bin: No space left on device; the previous file"):
        atomic_write_bytes(target, b"x" * 1000)
    assert target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["f.bin"]


def test_real_file_size_limit_keeps_the_previous_checkpoint(tmp_path):
    """A real failing write (RLIMIT_FSIZE in a child process, like a full disk): one line, old file intact."""
    model, opt = trained_pair()
    save_checkpoint(tmp_path, model, opt, {"step": 1})
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()
    script = textwrap.dedent(f"""
        import resource, signal, sys
        from bsr.files import atomic_write_bytes
        from bsr.errors import BSRError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
        try:
            atomic_write_bytes(__import__("pathlib").Path({str(tmp_path / CHECKPOINT_NAME)!r}), b"x" * 100_000)
        except BSRError as e:
            print(e)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "File too large; the previous file, if any, is intact" in result.stdout, result.stderr
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before
    assert os.listdir(tmp_path) == [CHECKPOINT_NAME]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign"])
def test_corrupt_checkpoint_is_a_one_line_error(tmp_path, damage):
    model, opt = trained_pair()
    path = save_checkpoint(tmp_path, model, opt, {"step": 1})
    if damage == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 10)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # a valid safetensors file that bsr did not write
        save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(BSRError, match="is corrupt or not a bsr checkpoint") as info:
        read_checkpoint(tmp_path)
    assert "\n" not in str(info.value)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(BSRError, match="no checkpoint at"):
        read_checkpoint(tmp_path)
