"""The `bsr` command: bad inputs give one line on stderr and exit 2, touching nothing; eval and export work."""

import os
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file

import bsr  # noqa: F401
from bsr.train.checkpoint import CHECKPOINT_NAME
from bsr.cli import EXIT_USER_ERROR, main

TINY = ["--model", "vit_micro_patch4_28", "--img-size", "16", "--checkpoint", "none", "--limit", "32", "--batch-size", "16", "--steps", "2",
        "--eval-every", "2", "--no-progress"]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny full fine-tuning run, trained once for the tests that need one."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY, "--method", "full", "--out", str(out)]) == 0
    return out


# name -> (argv with {tmp}/{run} placeholders, expected start of the message)
BAD_INPUTS = {
    "unknown model": (["train", "--model", "vit_gigantic_nope"], "unknown model 'vit_gigantic_nope'"),
    "block out of range": (["train", "--trainable-blocks", "3,12"], "trainable_blocks has block index 12"),
    "keep rate 0": (["train", "--keep-rate", "0"], "keep_rate=0.0 is outside (0, 1]"),
    "keep rate 1.5": (["train", "--keep-rate", "1.5"], "keep_rate=1.5 is outside (0, 1]"),
    "bad block spec": (["train", "--drop-blocks", "middle"], "drop_blocks='middle' is not a block spec"),
    "missing dataset dir": (["train", "--dataset", "fashion-mnist", "--data-dir", "{tmp}/nowhere"], ""),
    "unknown dataset": (["train", "--dataset", "imagenet-22k"], "unknown dataset 'imagenet-22k'"),
    "missing weights": (["train", "--checkpoint", "{tmp}/nope.safetensors"], "checkpoint="),
    "corrupt weights": (["train", "--checkpoint", "{tmp}/corrupt.safetensors"], "cannot read weights"),
    "corrupt checkpoint": (["eval", "{tmp}/corrupt_run"], "checkpoint"),
    "unwritable out dir": (["train", "--out", "{tmp}/a_file/run"], "out="),
    "out holds a run": (["train", "--out", "{run}"], "out="),
    "unknown yaml key": (["train", "--config", "{tmp}/unknown.yaml"], "unknown config key 'learning_rate'"),
    "wrong yaml type": (["train", "--config", "{tmp}/wrongtype.yaml"], "epochs='ten' has the wrong type"),
    "resume with other flags": (["train", "--resume", "{run}", "--lr", "0.1"], "--resume continues the saved"),
    "eval on other classes": (["eval", "{run}", "--dataset", "cifar100"], "dataset 'cifar100' has 100 classes"),
}


def snapshot(directory) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, tmp_path, finished_run, capsys):
    argv, expected = BAD_INPUTS[case]
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / "corrupt_run").mkdir()
    (tmp_path / "corrupt_run" / CHECKPOINT_NAME).write_bytes(b"garbage" * 10)
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "unknown.yaml").write_text("learning_rate: 0.1\n")
    (tmp_path / "wrongtype.yaml").write_text("epochs: ten\n")
    argv = [a.format(tmp=tmp_path, run=finished_run) for a in argv]
    if argv[0] == "train" and "--out" not in argv and "--resume" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    if argv[0] == "train" and "--model" not in argv and "--resume" not in argv:
        argv += ["--model", "vit_micro_patch4_28"]  # the tests' model: the default one converts its weights first
    before, run_before = snapshot(tmp_path), snapshot(finished_run)
    code, out, err = run_cli(capsys, *argv)
    assert code == EXIT_USER_ERROR
    assert err.startswith("bsr: error: " + expected) and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before and snapshot(finished_run) == run_before


def test_console_entry_point_exit_status_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bsr", "train", "--keep-rate", "1.5", "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == EXIT_USER_ERROR
    assert result.stderr.strip().splitlines() == ["bsr: error: keep_rate=1.5 is outside (0, 1]; use e.g. 0.5 "
                                                  "(1 disables dropping)"]
    assert not (tmp_path / "o").exists()


def test_train_prints_summary_and_eval_prints_top1(finished_run, capsys):
    code, out, _ = run_cli(capsys, "eval", str(finished_run))
    assert code == 0 and out.startswith("top-1 ") and "on digits-embedded test (32 images, method full)" in out


def test_resume_of_a_finished_run_changes_nothing_and_summarises(finished_run, capsys):
    before = load_file(finished_run / CHECKPOINT_NAME)
    code, out, _ = run_cli(capsys, "train", "--resume", str(finished_run), "--no-progress")
    assert code == 0 and "test top-1" in out and "tokens/block   0-11: 17/17" in out
    after = load_file(finished_run / CHECKPOINT_NAME)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("param."))


def test_export_gives_plain_timm_weights(finished_run, tmp_path, capsys):
    code, out, _ = run_cli(capsys, "export", str(finished_run), str(tmp_path / "w.safetensors"), "--format", "timm")
    assert code == 0 and out.startswith("wrote ")
    model = timm.create_model("vit_micro_patch4_28", img_size=16)
    model.load_state_dict(load_file(tmp_path / "w.safetensors"))  # strict: exactly timm's keys
    trained = load_file(finished_run / CHECKPOINT_NAME)
    assert torch.equal(model.head.weight, trained["param.head.weight"])


def test_exported_bsr_run_loads_back_as_base_weights(tmp_path, capsys):
    """Export undoes the BSR patch; the file then serves as --checkpoint for a new run."""
    run = tmp_path / "bsr"
    assert main(["train", *TINY, "--out", str(run)]) == 0
    assert main(["export", str(run), str(tmp_path / "w.safetensors"), "--format", "timm", "--dtype", "fp16"]) == 0
    capsys.readouterr()
    code, out, _ = run_cli(capsys, "train", *TINY, "--checkpoint", str(tmp_path / "w.safetensors"),
                           "--method", "head", "--out", str(tmp_path / "again"))
    assert code == 0 and "method head" in out
    assert os.path.exists(tmp_path / "again" / "report.json")
