"""Training on the device (issue 28): BSR exported as ONNX Runtime on-device training artifacts trains as PyTorch
does (AdamW and SGD with momentum, clipping, weight decay), only the trained tensors get gradients, the token dropping
is in the graph, the .ort copies train the same, the torch-free trainer runs with `import torch` impossible, resumes
its trajectory, writes an inference ONNX that `bsr predict` takes, and its run comes home for `bsr eval`; bad input
is one line."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
import torch.nn.functional as F

import bsr
from bsr.cli import main
from bsr.deploy.ort_optim import OptimizerSpec
from bsr.deploy.ort_training import export_ort_training
from bsr.train import make_config
from bsr.train.device import device_problem, export_device, import_device_run
from bsr.train.optim import build_optimizer
from bsr_device import trainer
from bsr_device.artifacts import METADATA
from bsr_device.runtime import import_onnxruntime
from bsr_device.session import DeviceSession

import_onnxruntime()
if importlib.util.find_spec("onnxruntime.training") is None:
    pytest.skip("onnxruntime has no training API here (pip install 'bsr[device]')", allow_module_level=True)

CFG = dict(model="vit_micro_patch4_28", img_size=16, checkpoint="none", batch_size=4, steps=6, eval_every=3,
           log_every=2, threads=1, warmup_epochs=0.0)
CLASSES = ("ant", "bee", "cat")


def tiny_model(seed: int = 0, **bsr_kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("vit_micro_patch4_28", img_size=16, num_classes=3)
    bsr.reprogram(model, bsr.BSRConfig(**bsr_kw))
    return model


def make_folder(root: Path, per_class: int = 6) -> Path:
    """`root/<class>/<i>.png`: small images of 3 classes (each a brightness), some of another size."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            side = 20 if i % 2 else 16
            Image.fromarray((rng.random((side, side, 3)) * 60 + 80 * c).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def torch_steps(model, cfg, batches, lrs):
    """`bsr train`'s step: cross-entropy, backward, clipping, the optimizer of `cfg`; the losses."""
    optimizer = build_optimizer(cfg, model)
    trained = [p for p in model.parameters() if p.requires_grad]
    model.train()
    losses = []
    for (x, y), lr in zip(batches, lrs):
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad()
        loss = F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y), label_smoothing=cfg.label_smoothing)
        loss.backward()
        if cfg.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(trained, cfg.clip_grad)
        optimizer.step()
        losses.append(loss.item())
    return losses


def batches(n: int, size: int = 16, batch: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((batch + i % 2, 3, size, size)).astype(np.float32),  # batches of 4 and 5
             rng.integers(0, 3, batch + i % 2)) for i in range(n)]


@pytest.mark.parametrize("optimizer, extra", [
    ("adamw", dict(weight_decay=0.05, clip_grad=1.0, lr=1e-3)),
    ("sgd", dict(weight_decay=0.0, clip_grad=None, lr=1e-2, momentum=0.9)),
    ("sgd", dict(weight_decay=1e-2, clip_grad=0.5, lr=1e-2, momentum=0.8, label_smoothing=0.1)),
])
def test_the_artifacts_train_like_pytorch(tmp_path, optimizer, extra):
    """Same start, same batches (dynamic batch 4 and 5), same lrs: the ORT losses and parameters follow PyTorch's
    with `bsr train`'s optimizer, whose weight decay skips 1-D tensors."""
    cfg = make_config({**CFG, "optimizer": optimizer, **extra})
    model = tiny_model()
    reference = copy.deepcopy(model)
    from bsr.train.device import optimizer_spec

    export_ort_training(model, tmp_path / "art", optimizer=optimizer_spec(cfg, model), metadata={"recipe": {}},
                        label_smoothing=cfg.label_smoothing, ort_format=False)
    session = DeviceSession(tmp_path / "art")
    data, lrs = batches(8), [cfg.lr * (1 - i / 10) for i in range(8)]
    ort_losses = [session.train_step(x, y, lr)[0] for (x, y), lr in zip(data, lrs)]
    torch_losses = torch_steps(reference, cfg, data, lrs)
    assert max(abs(a - b) for a, b in zip(ort_losses, torch_losses)) < 2e-5
    trained = session.parameters()
    for name, p in reference.named_parameters():
        np.testing.assert_allclose(trained[name], p.detach().numpy(), atol=2e-4, rtol=0, err_msg=name)
    if cfg.weight_decay:  # the decay happened: without it PyTorch lands farther from ORT
        undecayed = copy.deepcopy(model)
        torch_steps(undecayed, make_config({**CFG, "optimizer": optimizer, **extra, "weight_decay": 0.0}), data, lrs)
        far = max(float(np.abs(trained[n] - p.detach().numpy()).max()) for n, p in undecayed.named_parameters())
        near = max(float(np.abs(trained[n] - p.detach().numpy()).max()) for n, p in reference.named_parameters())
        assert near < far


@pytest.mark.parametrize("score_grad", [True, False])
def test_the_graph_gradients_are_pytorchs(tmp_path, score_grad):
    """One plain SGD step of lr 1 moves each trained tensor by minus its gradient: ORT's equal PyTorch's, through the
    token dropping, with the CLS scores carrying their gradient (through the fused token) or not, as `score_grad`."""
    model = tiny_model(score_grad=score_grad)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    export_ort_training(model, tmp_path / "art", optimizer=OptimizerSpec("sgd", momentum=0.0), metadata={"recipe": {}},
                        ort_format=False)
    x, y = batches(1)[0]
    session = DeviceSession(tmp_path / "art")
    session.train_step(x, y, 1.0)
    after = session.parameters()
    model.train()
    F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    qkv = "blocks.3.attn.qkv.weight"  # the scores' gradient reaches the drop block's queries and keys
    for name, p in model.named_parameters():
        if p.requires_grad:
            np.testing.assert_allclose(before[name].numpy() - after[name], p.grad.numpy(), atol=2e-6, err_msg=name)
    other = tiny_model(score_grad=not score_grad)
    other.train()
    F.cross_entropy(other(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    assert not np.allclose(before[qkv].numpy() - after[qkv], dict(other.named_parameters())[qkv].grad.numpy(),
                           atol=2e-6)


def test_only_trained_tensors_get_gradients_and_dropping_is_in_the_graph(tmp_path):
    model = tiny_model(drop_blocks=[3, 6, 9], keep_rate=0.5)
    out = export_ort_training(model, tmp_path / "art", optimizer=OptimizerSpec("adamw"), metadata={"recipe": {}})
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    session = DeviceSession(tmp_path / "art")
    grads = sorted(name for name, p in session.state.parameters if p.requires_grad)
    assert grads == trained and out["trained"] == len(trained) == 40  # blocks 3, 7, 11 (12 each) + norm + head
    graph = onnx.load(str(tmp_path / "art" / "training_model.onnx")).graph
    grad_outputs = {o for node in graph.node for o in node.output if o.endswith("_grad")}
    assert not any(o.startswith(("patch_embed", "blocks.0.", "cls_token")) for o in grad_outputs)
    assert sum(node.op_type == "TopK" for node in graph.node) == 3 * 3  # rank, kept, dropped per drop block
    assert {p.name for p in (tmp_path / "art").iterdir()} >= {
        "training_model.ort", "eval_model.ort", "optimizer_model.ort", "required_operators.config", METADATA}
    x, y = batches(1)[0]
    ort = DeviceSession(tmp_path / "art", graph_format="ort")
    assert ort.train_step(x, y, 1e-3)[0] == pytest.approx(session.train_step(x, y, 1e-3)[0], abs=1e-6)


def test_refused_configurations_say_why():
    for values, words in [({"layer_decay": 0.75}, "--layer-decay none"), ({"amp": "bf16"}, "--amp off"),
                          ({"method": "lora"}, "no on-device export"), ({"accumulate": 2}, "--accumulate 1")]:
        assert words in device_problem(make_config({**CFG, **values}))
    assert device_problem(make_config(CFG)) is None


@pytest.fixture(scope="module")
def device_artifacts(tmp_path_factory):
    """Artifacts of the tiny model exported from a config for the 3-class folder (bsr export --format ort-training)."""
    root = tmp_path_factory.mktemp("device")
    data = make_folder(root / "data")
    cfg = make_config({**CFG, "dataset": f"folder:{data}", "num_classes": 3, "lr": 1e-3})
    export_device(cfg, root / "art")
    return root / "art", data


def test_the_trainer_resumes_exactly_and_its_run_comes_home(tmp_path, device_artifacts, monkeypatch, capsys):
    art, data = device_artifacts
    whole = trainer.train(art, f"folder:{data}", tmp_path / "whole", block_torch=False, log=lambda m: None)
    real_step = DeviceSession.train_step
    calls = []

    def killed(self, *args):
        calls.append(1)
        if len(calls) == 5:  # after the checkpoint of step 3
            raise KeyboardInterrupt
        return real_step(self, *args)

    monkeypatch.setattr(DeviceSession, "train_step", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(art, f"folder:{data}", tmp_path / "cut", block_torch=False, log=lambda m: None)
    monkeypatch.setattr(DeviceSession, "train_step", real_step)
    resumed = trainer.train(None, None, tmp_path / "cut", resume=True, block_torch=False, log=lambda m: None)
    assert resumed["steps"] == whole["steps"] == 6
    # ORT's CPU kernels are not bitwise repeatable from one session to the next (1e-6 after a few Adam steps, even
    # uninterrupted); the resumed run continues the same trajectory: optimizer state, step, batches and lrs
    a = DeviceSession(art, tmp_path / "whole" / "checkpoint").parameters()
    b = DeviceSession(art, tmp_path / "cut" / "checkpoint").parameters()
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) < 1e-4
    lines = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
             for run in ("whole", "cut")]
    assert [sorted(r) + [r["step"]] for r in lines[0]] == [sorted(r) + [r["step"]] for r in lines[1]]
    for x, y in zip(*lines):
        assert x.get("loss", 0) == pytest.approx(y.get("loss", 0), rel=1e-3) and x.get("lr") == y.get("lr")

    # bsr predict takes the device's inference ONNX; the run comes home and bsr eval agrees with the device
    assert main(["predict", str(tmp_path / "whole" / "model.onnx"), str(data / "bee" / "1.png")]) == 0
    shown = capsys.readouterr().out
    assert all(name in shown for name in CLASSES)
    import_device_run(tmp_path / "whole", tmp_path / "home")
    assert main(["eval", str(tmp_path / "home")]) == 0
    assert f"top-1 {whole['final_top1']:.2f}%" in capsys.readouterr().out  # PyTorch agrees with the device


def test_the_trainer_runs_with_torch_impossible(tmp_path, device_artifacts):
    art, data = device_artifacts
    code = ("import sys; sys.modules['torch'] = None\n"
            "from bsr_device.__main__ import main\n"
            f"rc = main(['train', {str(art)!r}, '--dataset', 'folder:{data}', '--out', {str(tmp_path / 'run')!r},"
            " '--steps', '2'])\n"
            "loaded = sorted(m for m, v in sys.modules.items() if v is not None and m.split('.')[0] in "
            "('torch', 'timm', 'torchvision', 'bsr'))\n"
            "print('LOADED', loaded); sys.exit(rc)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LOADED []" in result.stdout and (tmp_path / "run" / "model.onnx").is_file()


def _cli(capsys, *argv) -> tuple[int, str]:
    from bsr_device.__main__ import main as device_main

    code = device_main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_bad_input_is_one_line_and_keeps_the_checkpoint(tmp_path, device_artifacts, capsys, monkeypatch):
    import shutil

    art, data = device_artifacts
    monkeypatch.setattr("bsr_device.runtime.block_torch", lambda: None)  # torch is loaded in this test process
    other = tmp_path / "other"
    shutil.copytree(art, other)
    meta = json.loads((other / METADATA).read_text())
    (other / METADATA).write_text(json.dumps({**meta, "bsr_version": "0.0.1"}))
    wrong_classes = make_folder(tmp_path / "two", per_class=3)
    shutil.rmtree(wrong_classes / "cat")
    for argv, words in [
        (["train", str(other), "--dataset", f"folder:{data}", "--out", str(tmp_path / "a")], "exported by bsr 0.0.1"),
        (["train", str(tmp_path / "nowhere"), "--dataset", f"folder:{data}", "--out", str(tmp_path / "b")],
         "not a folder of on-device training artifacts"),
        (["train", str(art), "--dataset", f"folder:{wrong_classes}", "--out", str(tmp_path / "c")], "classes"),
        (["train", "--resume", str(tmp_path / "none")], "is missing"),
    ]:
        code, line = _cli(capsys, *argv)
        assert code == 2 and words in line and line.startswith("bsr-device: error: "), line
    (other / "optimizer_model.onnx").unlink()
    (other / METADATA).write_text(json.dumps(meta))
    code, line = _cli(capsys, "train", str(other), "--dataset", f"folder:{data}", "--out", str(tmp_path / "d"))
    assert code == 2 and "optimizer_model.onnx is missing" in line

    # a disk that fills during the second checkpoint: one line, the first checkpoint intact
    run = tmp_path / "run"
    states = DeviceSession(art).api.CheckpointState
    real, written = states.save_checkpoint, []

    def full_the_second_time(state, path, include_optimizer_state):
        if written:
            Path(path).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        real(state, path, include_optimizer_state)
        written.append(1)

    monkeypatch.setattr(states, "save_checkpoint", full_the_second_time)
    code, line = _cli(capsys, "train", str(art), "--dataset", f"folder:{data}", "--out", str(run))
    assert code == 2 and "cannot write the checkpoint" in line and "intact" in line
    first = DeviceSession(art, run / "checkpoint")
    assert first.properties()["step"] == 3 and not list(run.glob(".checkpoint*"))
    (run / "checkpoint").write_bytes(b"garbage")
    code, line = _cli(capsys, "eval", str(run))
    assert code == 2 and "corrupt" in line


def test_bsr_export_verify_from_a_config(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    argv = ["export", "--format", "ort-training", str(tmp_path / "art"), "--model", "vit_micro_patch4_28",
            "--img-size", "16", "--checkpoint", "none", "--dataset", f"folder:{data}", "--lr", "1e-4",
            "--verify", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "largest loss difference" in out and "on-device training artifacts" in out
    assert main(argv) == 2  # the folder exists now: never written over
    assert "not an empty folder" in capsys.readouterr().err


def test_a_run_exports_for_the_device_and_continues_there(tmp_path, capsys):
    """bsr export RUN OUT --format ort-training: the run's trained weights are the artifacts' start."""
    data = make_folder(tmp_path / "data")
    run = tmp_path / "run"
    assert main(["train", "--model", "vit_micro_patch4_28", "--img-size", "16", "--checkpoint", "none", "--dataset",
                 f"folder:{data}", "--batch-size", "4", "--steps", "2", "--eval-every", "2", "--threads", "1",
                 "--no-progress", "--out", str(run)]) == 0
    assert main(["export", str(run), str(tmp_path / "art"), "--format", "ort-training"]) == 0
    assert "on-device training artifacts" in capsys.readouterr().out
    from bsr.train.runs import load_run

    _, model = load_run(run, torch.device("cpu"))
    start = DeviceSession(tmp_path / "art").parameters()
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(start[name], p.detach().numpy(), err_msg=name)
    meta = json.loads((tmp_path / "art" / METADATA).read_text())
    assert meta["class_names"] == list(CLASSES) and meta["recipe"]["batch_size"] == 4 and meta["source"] == str(run)
    assert main(["export", str(run), str(tmp_path / "art2"), "--format", "ort-training", "--lr", "1"]) == 2
    assert "RUN_DIR carries its own config" in capsys.readouterr().err


def test_an_int8_model_trains_on_the_device_and_comes_home(tmp_path, capsys):
    """frozen_dtype int8: the frozen weights travel as int8 constants; the device run, its inference ONNX and the
    imported run agree."""
    data = make_folder(tmp_path / "data")
    cfg = make_config({**CFG, "dataset": f"folder:{data}", "num_classes": 3, "lr": 1e-3,
                       "bsr": {"frozen_dtype": "int8"}})
    export_device(cfg, tmp_path / "art")
    run = trainer.train(tmp_path / "art", f"folder:{data}", tmp_path / "dev", block_torch=False, log=lambda m: None)
    assert main(["predict", str(tmp_path / "dev" / "model.onnx"), str(data / "bee" / "1.png")]) == 0
    import_device_run(tmp_path / "dev", tmp_path / "home")
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "home")]) == 0
    assert f"top-1 {run['final_top1']:.2f}%" in capsys.readouterr().out
