"""Training config layering, the lr schedule, the loop's outputs, resume after a kill, and NaN handling."""

import json
import math
import statistics
import sys

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from bsr.errors import BSRError
from bsr.train import TrainConfig, build_optimizer, lr_at, make_config, resolve_config, setup_model, train
from bsr.train.checkpoint import read_checkpoint


def tiny(tmp_path, name="run", **overrides) -> TrainConfig:
    """A run that takes a few seconds: 16 px digits, 64 images per split, batch 16 (4 steps per epoch)."""
    values = dict(model="vit_micro_patch4_28", img_size=16, checkpoint="none", dataset="digits-embedded",
                  limit=64, batch_size=16, steps=6,
                  eval_every=3, warmup_steps=2, warmup_epochs=0.0, out=str(tmp_path / name), log_every=1)
    values.update(overrides)
    return make_config(values)


# ------------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("step,expected", [
    (0, 0.25), (1, 0.5), (3, 1.0),                 # linear warm-up over 4 steps, reaching lr at the last one
    (4, 1.0), (9, 0.55), (14, 0.1), (20, 0.1),     # cosine from 1.0 at step 4 to min_lr 0.1 at step 14
])
def test_lr_schedule_is_a_pure_function_of_the_step(step, expected):
    assert lr_at(step, lr=1.0, total_steps=14, warmup_steps=4, min_lr=0.1) == pytest.approx(expected)


def test_lr_constant_schedule_and_no_warmup():
    assert lr_at(0, lr=0.3, total_steps=10, warmup_steps=0, schedule="constant") == 0.3
    assert lr_at(5, lr=1.0, total_steps=10, warmup_steps=0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))


# ------------------------------------------------------------------------------------------------- config layering


def test_defaults_are_the_dataclass_defaults():
    assert resolve_config() == TrainConfig()


def test_recipes_set_the_papers_values():
    sgd = resolve_config({"recipe": "vit-sgd"})
    assert (sgd.optimizer, sgd.lr, sgd.momentum, sgd.weight_decay, sgd.batch_size, sgd.warmup_steps, sgd.clip_grad,
            sgd.rrc_scale, sgd.mean, sgd.min_lr, sgd.steps) == \
        ("sgd", 1e-3, 0.9, 0.0, 128, 500, 1.0, [0.05, 1.0], [0.5] * 3, 0.0, 20_000)
    assert resolve_config({"recipe": "vit-sgd", "dataset": "flowers102"}).lr == 3e-2
    assert resolve_config({"recipe": "vit-sgd", "dataset": "food101"}).steps == 30_000
    deit = resolve_config({"recipe": "deit-adamw"})
    assert (deit.optimizer, deit.lr, deit.layer_decay, deit.weight_decay, deit.warmup_epochs, deit.min_lr,
            deit.epochs, deit.label_smoothing, deit.hflip, deit.amp) == \
        ("adamw", 5e-4, 0.75, 0.05, 5.0, 1e-6, 50, 0.1, True, "bf16")
    assert deit.mean == pytest.approx([0.485, 0.456, 0.406])


def test_layering_defaults_recipe_yaml_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"recipe": "vit-sgd", "lr": 0.5, "batch_size": 32, "bsr": {"keep_rate": 0.7}}))
    cfg = resolve_config({"lr": 0.25, "bsr": {"trainable_blocks": "last:2"}}, path)
    assert cfg.optimizer == "sgd"             # recipe over defaults
    assert cfg.batch_size == 32               # YAML over recipe
    assert cfg.lr == 0.25                     # flags over YAML
    assert cfg.bsr.keep_rate == 0.7 and cfg.bsr.trainable_blocks == "last:2" and cfg.bsr.drop_blocks == [3, 6, 9]
    assert cfg.epochs == TrainConfig().epochs  # untouched: default
    # a flag picks the recipe even when the YAML names another
    assert resolve_config({"recipe": "deit-adamw"}, path).optimizer == "adamw"


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = resolve_config({"recipe": "deit-adamw", "limit": 10, "bsr": {"drop_blocks": "2,4"}})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert resolve_config(config_file=path) == cfg


@pytest.mark.parametrize("values,match", [
    ({"lrr": 0.1}, "unknown config key 'lrr'"),
    ({"keep_rate": 0.5}, "unknown config key 'keep_rate' \\(BSR options go under 'bsr:'\\)"),
    ({"bsr": {"keep": 0.5}}, "unknown config key 'bsr.keep'"),
    ({"lr": "fast"}, "lr='fast' has the wrong type; expected float"),
    ({"epochs": 1.5}, "epochs=1.5 has the wrong type; expected int"),
    ({"hflip": "yes"}, "hflip='yes' has the wrong type; expected bool"),
    ({"limit": True}, "limit=True has the wrong type"),
    ({"rrc_scale": [0.5, "a"]}, "rrc_scale=\\[0.5, 'a'\\] has the wrong type"),
    ({"bsr": {"keep_rate": 1.5}}, "keep_rate=1.5 is outside"),
    ({"bsr": {"keep_rate": 0}}, "keep_rate=0"),
    ({"bsr": {"fuse_token": "no"}}, "fuse_token"),
    ({"method": "magic"}, "method='magic' is not valid"),
    ({"recipe": "sota"}, "recipe='sota' is unknown"),
    ({"batch_size": 0}, "batch_size=0 must be positive"),
    ({"rrc_scale": [0.9, 0.1]}, "rrc_scale"),
])
def test_bad_values_are_errors_naming_the_key(values, match):
    with pytest.raises(BSRError, match=match):
        resolve_config(values)


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    with pytest.raises(BSRError, match="not valid YAML"):
        resolve_config(config_file=bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(BSRError, match="must hold a mapping"):
        resolve_config(config_file=bad)
    with pytest.raises(BSRError, match="cannot read config file"):
        resolve_config(config_file=tmp_path / "missing.yaml")


# ------------------------------------------------------------------------------------------------- optimizer


def test_no_weight_decay_on_1d_pos_embed_cls_token_and_layer_decay_scales(tmp_path):
    cfg = tiny(tmp_path, method="full", weight_decay=0.05, layer_decay=0.5)
    model = setup_model(cfg, torch.device("cpu"), 10)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = build_optimizer(cfg, model).param_groups
    for g in groups:
        for p in g["params"]:
            no_decay = p.ndim <= 1 or names[id(p)] in ("pos_embed", "cls_token")
            assert g["weight_decay"] == (0.0 if no_decay else 0.05), names[id(p)]
    scale = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert scale["head.weight"] == 1.0 and scale["blocks.11.mlp.fc1.weight"] == 0.5
    assert scale["blocks.0.attn.qkv.weight"] == pytest.approx(0.5 ** 12) and scale["pos_embed"] == 0.5 ** 13


# ------------------------------------------------------------------------------------------------- the loop


def test_training_writes_config_metrics_report_and_checkpoint(tmp_path):
    cfg = tiny(tmp_path)
    report = train(cfg, progress=False)
    out = tmp_path / "run"
    assert resolve_config(config_file=out / "config.yaml") == cfg
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines if "loss" in ln] == [1, 2, 3, 4, 5, 6]
    assert [ln["step"] for ln in lines if "test_acc" in ln] == [3, 6]
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert report["accuracy"]["best"] >= report["accuracy"]["final"] >= 0
    assert report["params"]["trainable"] < report["params"]["total"]
    assert [(t["attn"], t["mlp"]) for t in report["tokens_per_block"]][3] == (17, 10)  # BSR drops at block 3
    assert report["median_step_time_s"] > 0 and report["peak_memory_mib"] > 0
    assert {"torch", "timm", "bsr"} <= set(report["versions"])
    tensors, meta = read_checkpoint(out)
    assert meta["step"] == 6 and meta["config"] == {**cfg.to_dict(), "out": None}  # out: not in the bytes
    trained = {k for k in tensors if k.startswith("param.")}
    assert "param.blocks.3.attn.qkv.weight" in trained and "param.blocks.0.attn.qkv.weight" not in trained
    assert "param.patch_embed.proj.weight" not in trained  # frozen: comes back from the base weights


@pytest.mark.parametrize("method", ["bsr", "lora"])
def test_resume_after_a_kill_reaches_the_same_weights(tmp_path, killed_at_step, method):
    # 4 steps per epoch, checkpoints at steps 3, 6, 9; the kill lands at step 7 (mid-epoch, after a checkpoint)
    common = dict(method=method, steps=9, eval_every=3, lora_rank=2)
    train(tiny(tmp_path, "straight", **common), progress=False)
    with killed_at_step(7):
        train(tiny(tmp_path, "killed", **common), progress=False)
    assert read_checkpoint(tmp_path / "killed")[1]["step"] == 6
    train(tiny(tmp_path, "killed", **common), resume=tmp_path / "killed", progress=False)

    straight, meta_a = read_checkpoint(tmp_path / "straight")
    resumed, meta_b = read_checkpoint(tmp_path / "killed")
    assert meta_b["step"] == 9 and meta_a["best_acc"] == meta_b["best_acc"]
    for key in (k for k in straight if not k.startswith("rng.")):
        assert torch.equal(straight[key], resumed[key]), key  # parameters and optimizer state, bitwise
    metrics = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("straight", "killed")]
    strip = [[{k: v for k, v in json.loads(ln).items() if k != "step_time"} for ln in m] for m in metrics]
    assert strip[0] == strip[1]  # lines the killed run wrote after its checkpoint were dropped, then rewritten


def test_nan_loss_stops_with_a_message_and_keeps_the_last_checkpoint(tmp_path):
    # An SGD lr of 1e30 blows the weights up in one step: step 1 is finite, step 2 is not.
    cfg = tiny(tmp_path, method="head", optimizer="sgd", lr=1e30, clip_grad=None, warmup_steps=0, eval_every=1,
               momentum=0.0)
    with pytest.raises(BSRError, match=r"loss is (nan|inf) at step \d+; stopped \(last good checkpoint: .*"
                                       r"checkpoint.safetensors\)"):
        train(cfg, progress=False)
    assert read_checkpoint(tmp_path / "run")[1]["step"] >= 1


def test_nan_in_base_weights_stops_before_any_checkpoint(tmp_path):
    model = timm.create_model("vit_micro_patch4_28", img_size=16)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["blocks.5.mlp.fc2.bias"] = torch.full_like(state["blocks.5.mlp.fc2.bias"], float("nan"))
    save_file(state, tmp_path / "nan.safetensors")
    with pytest.raises(BSRError, match="loss is nan at step 0; stopped \\(no checkpoint was written yet\\)"):
        train(tiny(tmp_path, checkpoint=str(tmp_path / "nan.safetensors")), progress=False)


def test_sigkilled_cli_run_resumes_to_the_same_weights(tmp_path):
    """A real `kill -9` of `bsr train` in the middle of a run, then `bsr train --resume`."""
    import signal
    import subprocess
    import sys
    import time

    argv = [sys.executable, "-m", "bsr", "train", "--img-size", "28", "--checkpoint", "none", "--limit", "96",
            "--batch-size", "16", "--steps", "14", "--eval-every", "2", "--no-progress", "--threads", "1"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(argv + ["--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if read_checkpoint(killed)[1]["step"] >= 4:
                break
        except BSRError:
            pass  # no checkpoint yet
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = read_checkpoint(killed)[1]["step"]
    assert proc.returncode == -signal.SIGKILL and step_at_kill < 14, "the run ended before it could be killed"

    resumed = subprocess.run(argv[:4] + ["--resume", str(killed), "--no-progress"], capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    straight = subprocess.run(argv + ["--out", str(tmp_path / "straight")], capture_output=True, text=True,
                              timeout=300)
    assert straight.returncode == 0, straight.stderr
    a, _ = read_checkpoint(tmp_path / "straight")
    b, meta = read_checkpoint(killed)
    assert meta["step"] == 14
    for key in (k for k in a if k.startswith(("param.", "optim."))):
        assert torch.equal(a[key], b[key]), key


def test_a_run_directory_in_use_is_refused_untouched(tmp_path):
    """A second process on a run directory that one is training (a study started twice, an orphaned worker, the same
    --resume in two terminals) stops with one line and writes nothing; once the holder is gone, resume works."""
    from bsr.files import exclusive_dir

    cfg = tiny(tmp_path, steps=3)
    train(cfg, progress=False)
    run = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    more = tiny(tmp_path, steps=6)
    with exclusive_dir(run, "run directory"):  # another open file: the OS lock conflicts as with another process
        with pytest.raises(BSRError, match="run directory .* is in use by another bsr process; wait"):
            train(more, resume=run, progress=False)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert train(more, resume=run, progress=False)["steps"] == 6


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX flock")
def test_directory_lock_is_exclusive_released_and_optional_without_os_locks(tmp_path, monkeypatch):
    import errno
    import fcntl

    from bsr.files import exclusive_dir

    with exclusive_dir(tmp_path):
        with pytest.raises(BSRError, match="in use by another bsr process"):
            with exclusive_dir(tmp_path):
                pass
    with exclusive_dir(tmp_path):  # released at the end of the block
        pass
    assert list(tmp_path.iterdir()) == []  # nothing added to the directory

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)  # a file system without locks (some network mounts): runs unlocked
    with exclusive_dir(tmp_path), exclusive_dir(tmp_path):
        pass


def test_bsr_preset_is_a_base_that_explicit_options_override(tmp_path):
    cfg = resolve_config({"bsr": {"preset": "lean", "keep_rate": 0.3}})
    assert cfg.bsr.frozen_dtype == "bfloat16" and cfg.bsr.recompute == "all" and cfg.bsr.keep_rate == 0.3
    (tmp_path / "c.yaml").write_text("bsr:\n  preset: lean\n  recompute: first\n")
    assert resolve_config({}, tmp_path / "c.yaml").bsr.recompute == "first"
    with pytest.raises(BSRError, match="unknown BSR preset"):
        resolve_config({"bsr": {"preset": "tiny"}})


def test_metrics_lines_are_means_over_the_log_window_and_survive_a_resume(tmp_path, killed_at_step):
    """Loss and top-1 stay on the device between log steps: a line is the mean over the steps since the last one, the
    weights do not depend on --log-every, and steps collected at a checkpoint between two lines travel in it."""
    common = dict(steps=8, eval_every=3)
    train(tiny(tmp_path, "every", log_every=1, **common), progress=False)
    train(tiny(tmp_path, "window", log_every=4, **common), progress=False)
    with killed_at_step(7):  # the checkpoint of step 6 holds steps 5 and 6, not yet logged
        train(tiny(tmp_path, "killed", log_every=4, **common), progress=False)
    train(tiny(tmp_path, "killed", log_every=4, **common), resume=tmp_path / "killed", progress=False)

    def lines(name):
        return [json.loads(ln) for ln in (tmp_path / name / "metrics.jsonl").read_text().splitlines() if "loss" in ln]

    every, window = lines("every"), lines("window")
    assert [ln["step"] for ln in window] == [4, 8]
    for line, part in zip(window, (every[:4], every[4:])):
        assert line["loss"] == statistics.fmean(ln["loss"] for ln in part)
        assert line["train_acc"] == statistics.fmean(ln["train_acc"] for ln in part)
    strip = [[{k: v for k, v in ln.items() if k != "step_time"} for ln in lines(n)] for n in ("window", "killed")]
    assert strip[0] == strip[1]
    a, b = read_checkpoint(tmp_path / "every")[0], read_checkpoint(tmp_path / "window")[0]
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng."))
