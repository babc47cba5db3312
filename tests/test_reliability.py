"""Nothing lost, nothing silent (issue 31): stale temporary files of a killed write are removed when the run is
resumed, broken symbolic links in a folder dataset are named among the skipped images, and SIGTERM ends a run like
Ctrl-C (checkpoint intact, one line saying how to continue)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from bsr.cli import main
from bsr.data import build_dataset

TINY = ["--model", "vit_micro_patch4_28", "--img-size", "16", "--checkpoint", "none", "--limit", "32",
        "--batch-size", "16", "--threads", "1", "--no-progress"]


def test_a_resumed_run_removes_the_temporary_files_a_kill_left(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "2", "--eval-every", "2", "--out", str(run)]) == 0
    stale = [run / ".checkpoint.safetensors.k7Xq_2ab.tmp", run / ".metrics.jsonl.AAAAAAAA.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    keep = run / "notes.tmp"  # not a name of bsr's atomic writes: left alone
    keep.write_text("mine")
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert not any(p.exists() for p in stale) and keep.read_text() == "mine"


def test_broken_symlinks_are_named_among_the_skipped_images(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(4):
            pixels = (rng.random((16, 16, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{i}.png")
    (tmp_path / "data" / "a" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "data" / "b" / "loop.png").symlink_to(tmp_path / "data" / "b" / "loop.png")
    skipped = {}
    for split in ("train", "test"):  # the held-out split may hold either link
        skipped.update(build_dataset(f"folder:{tmp_path / 'data'}", split, img_size=16, train=False).skipped)
    assert {os.path.basename(p) for p in skipped} == {"gone.png", "loop.png"}
    assert all("broken symbolic link" in reason for reason in skipped.values())


def test_sigterm_ends_a_run_like_ctrl_c(tmp_path):
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "bsr", "train", *TINY, "--steps", "400", "--eval-every", "2", "--out", str(run)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "checkpoint.safetensors").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert "terminated" in last and "--resume" in last and "Traceback" not in err
    assert main(["eval", str(run)]) == 0  # the checkpoint is whole
    assert not list(run.glob(".*.tmp"))


def test_identical_runs_and_a_killed_resumed_run_write_the_same_checkpoint_bytes(tmp_path, killed_at_step,
                                                                                   monkeypatch):
    import bsr.files as files_mod

    argv = ["train", *TINY, "--steps", "6", "--eval-every", "2"]
    for name in ("a", "b"):
        assert main([*argv, "--out", str(tmp_path / name)]) == 0
    whole = (tmp_path / "a" / "checkpoint.safetensors").read_bytes()
    assert (tmp_path / "b" / "checkpoint.safetensors").read_bytes() == whole

    from bsr.train import resolve_config, train

    cfg = resolve_config({"model": "vit_micro_patch4_28", "img_size": 16, "checkpoint": "none", "limit": 32,
                          "batch_size": 16, "threads": 1, "steps": 6, "eval_every": 2, "out": str(tmp_path / "c")})
    with killed_at_step(3):  # killed between two steps
        train(cfg, progress=False)
    assert main(["train", "--resume", str(tmp_path / "c"), "--no-progress"]) == 0
    assert (tmp_path / "c" / "checkpoint.safetensors").read_bytes() == whole

    real, calls = files_mod.os.replace, []  # killed inside the checkpoint write of step 4, before its rename

    def second_write_killed(src, dst):
        if str(dst).endswith("checkpoint.safetensors"):
            calls.append(dst)
            if len(calls) == 2:
                raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(files_mod.os, "replace", second_write_killed)
    assert main([*argv, "--out", str(tmp_path / "e")]) == 130
    monkeypatch.setattr(files_mod.os, "replace", real)
    assert not list((tmp_path / "e").glob(".*.tmp"))  # the interrupted write rolled back
    assert main(["train", "--resume", str(tmp_path / "e"), "--no-progress"]) == 0
    assert (tmp_path / "e" / "checkpoint.safetensors").read_bytes() == whole
