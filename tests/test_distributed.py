"""Data-parallel training: 2 CPU processes (gloo, loopback only) against one process over the same global batch.

Processes are started with `torch.multiprocessing.spawn` (which lets a test stop both ranks right after a checkpoint,
like a kill) and with the real `torchrun -m bsr train` command for the resume. Every address is 127.0.0.1 and gloo is
bound to the loopback interface, so nothing leaves the machine.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bsr.train.loop as loop_mod
from bsr.train.checkpoint import read_checkpoint
from bsr.train.distributed import Group, gradient_bytes, launched, wrap
from bsr.errors import BSRError
from bsr.train.methods import METHODS
from bsr.train import make_config, setup_model, train, train_in_group
from bsr.train.batches import EpochBatches

LOOPBACK = {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}


def tiny(out: Path, **overrides) -> dict:
    """Config values of a run of a few seconds: 16 px digits, 64 images per split, global batch 8, 6 steps.

    SGD, not AdamW: Adam divides by the gradient's running RMS, so on parameters whose true gradient is zero (the key
    part of qkv.bias: softmax ignores it) it turns float rounding noise, which differs between 1 and 2 processes, into
    full-size steps.
    """
    values = dict(model="vit_micro_patch4_28", img_size=16, checkpoint="none", dataset="digits-embedded",
                  limit=64, batch_size=8, steps=6,
                  eval_every=3, warmup_steps=2, warmup_epochs=0.0, out=str(out), log_every=1, threads=1,
                  optimizer="sgd", lr=0.05, weight_decay=0.0)
    return {**values, **overrides}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Killed(Exception):
    """Stands in for a kill of the whole group: both ranks stop between two steps, after a checkpoint."""


def _rank_main(rank: int, world_size: int, port: int, values: dict, kill_at: int | None, record: str) -> None:
    """One torchrun-like rank: the launcher's environment, then plain `train`; records what it opened for writing."""
    os.environ.update(LOOPBACK, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    out = str(Path(values["out"]).resolve())
    written: list[str] = []

    def audit(event: str, args: tuple) -> None:  # every open for writing and every rename under the run dir
        if event == "open" and isinstance(args[0], (str, Path)) and str(args[0]).startswith(out):
            mode, flags = args[1], args[2]
            if (mode and any(c in mode for c in "wax+")) or (mode is None and flags & (os.O_WRONLY | os.O_RDWR)):
                written.append(str(args[0]))
        elif event == "os.rename" and str(args[1]).startswith(out):
            written.append(str(args[1]))

    sys.addaudithook(audit)
    if kill_at is not None:
        real_lr_at = loop_mod.lr_at

        def lr_at_then_kill(step, **kw):
            if step == kill_at:
                raise Killed
            return real_lr_at(step, **kw)

        loop_mod.lr_at = lr_at_then_kill
    try:
        train(make_config(values), progress=False)
    finally:
        Path(record, f"rank{rank}.json").write_text(json.dumps(written))


def spawn_run(values: dict, record: Path, kill_at: int | None = None) -> list[list[str]]:
    """Train `values` in 2 processes; returns the paths each rank wrote."""
    record.mkdir(parents=True, exist_ok=True)
    mp.spawn(_rank_main, args=(2, free_port(), values, kill_at, str(record)), nprocs=2, join=True)
    return [json.loads((record / f"rank{r}.json").read_text()) for r in range(2)]


def trained(run: Path) -> dict[str, torch.Tensor]:
    tensors, _ = read_checkpoint(run)
    return {k: v for k, v in tensors.items() if k.startswith(("param.", "optim."))}


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(ln).items() if k != "step_time"}
            for ln in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Each method once in one process and once in two (the two-process bsr run is the resume test's reference)."""
    root = tmp_path_factory.mktemp("dp")
    result = {}
    for method in ("bsr", "full"):
        train(make_config(tiny(root / f"{method}-1", method=method)), progress=False)
        writes = spawn_run(tiny(root / f"{method}-2", method=method), root / f"{method}-writes")
        result[method] = (root / f"{method}-1", root / f"{method}-2", writes)
    return result


# ------------------------------------------------------------------------------------------------- two vs one


@pytest.mark.parametrize("method", ["bsr", "full"])
def test_two_processes_train_like_one_over_the_same_global_batch(runs, method):
    one, two, _ = runs[method]
    a, b = trained(one), trained(two)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    m1, m2 = metrics(one), metrics(two)
    assert [m["step"] for m in m1] == [m["step"] for m in m2]
    for x, y in zip(m1, m2):
        if "test_acc" in x:  # the whole test set, each image once: same counts, same accuracy
            assert (x["test_acc"], x["best_acc"]) == (y["test_acc"], y["best_acc"])
        else:  # loss and accuracy logged over the global batch
            assert y["loss"] == pytest.approx(x["loss"], rel=1e-5) and y["train_acc"] == pytest.approx(x["train_acc"])


def test_report_records_world_backend_and_allreduce_bytes(runs):
    reports = {m: json.loads((runs[m][1] / "report.json").read_text())["data_parallel"] for m in ("bsr", "full")}
    for dp in reports.values():
        assert dp["world_size"] == 2 and dp["backend"] == "gloo"
        assert dp["allreduce_bytes_per_step"] == dp["gradient_bytes"] > 0
    assert reports["bsr"]["allreduce_bytes_per_step"] < reports["full"]["allreduce_bytes_per_step"] / 3
    single = json.loads((runs["bsr"][0] / "report.json").read_text())["data_parallel"]
    assert single == {"world_size": 1, "backend": None, "gradient_bytes": reports["bsr"]["gradient_bytes"],
                      "allreduce_bytes_per_step": 0}


def test_only_rank_0_writes_files(runs):
    for method in ("bsr", "full"):
        _, two, (rank0, rank1) = runs[method]
        assert rank1 == []
        names = {Path(p).name for p in rank0}
        assert {"config.yaml", "checkpoint.safetensors", "metrics.jsonl", "report.json"} <= names
    assert sorted(p.name for p in two.iterdir()) == ["checkpoint.safetensors", "config.yaml", "metrics.jsonl",
                                                     "report.json"]


# ------------------------------------------------------------------------------------------------- resume


def test_killed_group_resumes_with_torchrun_to_the_same_weights(runs, tmp_path):
    run = tmp_path / "killed"
    with pytest.raises(Exception, match="Killed"):
        spawn_run(tiny(run, method="bsr"), tmp_path / "writes", kill_at=4)
    assert read_checkpoint(run)[1]["step"] == 3

    torchrun = Path(sys.executable).with_name("torchrun")
    argv = [str(torchrun), "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
            str(free_port()), "-m", "bsr", "train", "--resume", str(run), "--no-progress", "--threads", "1"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**os.environ, **LOOPBACK})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("method bsr on digits-embedded") == 1  # one summary, rank 0's
    assert "data parallel  2 processes (gloo)" in done.stdout

    reference = runs["bsr"][1]  # the uninterrupted two-process run
    a, b = trained(reference), trained(run)
    assert read_checkpoint(run)[1]["step"] == 6
    for key in a:
        assert torch.equal(a[key], b[key]), key  # same world size: the same sums in the same order, bitwise
    assert metrics(reference) == metrics(run)


# ------------------------------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("method", METHODS)
def test_ddp_registers_only_trainable_parameters_and_needs_no_unused_search(tmp_path, method):
    """With find_unused_parameters=False, DDP raises on the next step if a trainable parameter got no gradient."""
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = setup_model(make_config(tiny(tmp_path, method=method, lora_rank=2)), torch.device("cpu"), 10)
        ddp = wrap(model, Group(device=torch.device("cpu"), backend="gloo"))
        for _ in range(2):
            ddp(torch.randn(2, 3, 16, 16)).logsumexp(-1).mean().backward()
        assert ddp._get_ddp_logging_data()["total_parameter_size_bytes"] == gradient_bytes(model)
    finally:
        dist.destroy_process_group()


def test_rank_slices_of_each_batch_join_into_the_single_process_batch():
    for skip in (0, 2):
        whole = list(EpochBatches(50, 12, seed=3, epoch=1, skip=skip))
        for world in (2, 3, 4):
            parts = [list(EpochBatches(50, 12, seed=3, epoch=1, skip=skip, rank=r, world_size=world))
                     for r in range(world)]
            assert all(len(p) == len(whole) == 4 - skip for p in parts)
            assert [sum((p[s] for p in parts), []) for s in range(len(whole))] == whole


def test_test_set_shards_cover_every_image_once():
    for n in (0, 1, 7, 64):
        shards = [Group(torch.device("cpu"), rank=r, world_size=3, backend="gloo").shard(n) for r in range(3)]
        assert [i for s in shards for i in s] == list(range(n))


def test_batch_not_divisible_by_world_size_fails_before_writing(tmp_path):
    group = Group(device=torch.device("cpu"), rank=0, world_size=3)  # the check needs no process group
    with pytest.raises(BSRError, match="batch_size=8 is not divisible by the 3 processes"):
        train_in_group(make_config(tiny(tmp_path / "run")), group)
    assert not (tmp_path / "run").exists()


def test_partial_launcher_environment_is_an_error(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert not launched()
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(BSRError, match="RANK set but WORLD_SIZE, LOCAL_RANK not"):
        launched()
