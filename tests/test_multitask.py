"""Multi-task training (`bsr train --tasks`): one batch, backward and optimizer step per task and step; per-task
evaluation; the MoE / dense models of each method; checkpoints, resume, eval and export of multi-task runs."""

import json

import pytest
import torch
from safetensors import safe_open

from bsr.train.checkpoint import read_checkpoint, unflatten_optimizer
from bsr.errors import BSRError
from bsr.core.moe import MoEMlp
from bsr.core.multitask import MultiTaskViT
from bsr.train import build_optimizer, evaluate_run, export_weights, make_config, setup_model, train

TASKS = ["digits-embedded", "sklearn-digits"]


def tiny(tmp_path, name="run", **overrides):
    """Two digit tasks at 16 px, 64 images per split, batch 16 (4 steps per epoch), 4 experts top-2."""
    values = dict(model="vit_micro_patch4_28", tasks=TASKS, img_size=16, checkpoint="none", limit=64, batch_size=16, steps=4, eval_every=2,
                  warmup_steps=1, warmup_epochs=0.0, out=str(tmp_path / name), log_every=1, moe_experts=4,
                  moe_top_k=2, threads=1)
    values.update(overrides)
    return make_config(values)


def test_run_reports_each_task_and_their_mean(tmp_path):
    report = train(tiny(tmp_path), progress=False)
    acc = report["accuracy"]
    assert list(acc["tasks"]) == TASKS
    assert acc["final"] == pytest.approx(sum(t["final"] for t in acc["tasks"].values()) / 2)
    assert all(t["best"] >= t["final"] for t in acc["tasks"].values())
    assert [t["name"] for t in report["dataset"]["tasks"]] == TASKS
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [ln for ln in lines if "test_acc" in ln]
    assert [ln["step"] for ln in evals] == [2, 4] and set(evals[-1]["tasks"]) == set(TASKS)
    assert set(lines[0]["tasks"]) == set(TASKS)
    tensors, _ = read_checkpoint(tmp_path / "run")
    saved = {k[len("param."):] for k in tensors if k.startswith("param.")}
    assert {"heads.0.weight", "heads.1.weight", "backbone.blocks.3.mlp.w1.0", "backbone.blocks.3.mlp.gates.1.weight",
            "backbone.blocks.11.mlp.w2.3"} <= saved
    assert not any(k.startswith(("backbone.blocks.0.", "backbone.patch_embed")) for k in saved)  # frozen by BSR


def test_every_step_is_one_optimizer_step_per_task(tmp_path):
    cfg = tiny(tmp_path, steps=3, eval_every=3)
    train(cfg, progress=False)
    tensors, meta = read_checkpoint(tmp_path / "run")
    model = setup_model(cfg, torch.device("cpu"))
    optimizer = build_optimizer(cfg, model)
    optimizer.load_state_dict(unflatten_optimizer(tensors, meta["optimizer"]))
    names = {id(p): n for n, p in model.named_parameters()}
    steps = {names[id(p)]: int(optimizer.state[p]["step"]) for g in optimizer.param_groups for p in g["params"]}
    assert steps["heads.0.weight"] == steps["heads.1.weight"] == 3  # a head steps only on its own task's batch
    assert steps["backbone.blocks.3.attn.qkv.weight"] == 6  # shared blocks step on every task's batch
    assert steps["backbone.blocks.3.mlp.gates.0.weight"] == 3  # a gate only routes (and steps) for its task


@pytest.mark.parametrize("method,moe,trains_all", [("bsr", True, False), ("full", True, True),
                                                   ("full", False, True), ("head", True, False)])
def test_methods_build_the_multitask_models(tmp_path, method, moe, trains_all):
    model = setup_model(tiny(tmp_path, method=method, moe=moe), torch.device("cpu"))
    assert isinstance(model, MultiTaskViT) and model.num_tasks == 2
    layers = [i for i, b in enumerate(model.backbone.blocks) if isinstance(b.mlp, MoEMlp)]
    assert layers == ([3, 7, 11] if moe else [])
    flags = [p.requires_grad for p in model.parameters()]
    assert all(flags) == trains_all and any(flags)
    assert all(p.requires_grad for p in model.heads.parameters())


def test_moe_blocks_and_weight_decay(tmp_path):
    cfg = tiny(tmp_path, method="full", moe_blocks="5,6", weight_decay=0.1)
    model = setup_model(cfg, torch.device("cpu"))
    assert [i for i, b in enumerate(model.backbone.blocks) if isinstance(b.mlp, MoEMlp)] == [5, 6]
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)]: g["weight_decay"] for g in build_optimizer(cfg, model).param_groups for p in g["params"]}
    assert decay["backbone.blocks.5.mlp.w1.3"] == 0.1 and decay["heads.1.weight"] == 0.1
    for name in ("backbone.blocks.5.mlp.b1", "backbone.pos_embed", "backbone.cls_token", "heads.0.bias"):
        assert decay[name] == 0.0, name


def test_resume_after_a_kill_reaches_the_same_weights(tmp_path, killed_at_step):
    common = dict(steps=6, eval_every=2)
    train(tiny(tmp_path, "straight", **common), progress=False)
    with killed_at_step(3):
        train(tiny(tmp_path, "killed", **common), progress=False)
    report = train(tiny(tmp_path, "killed", **common), resume=tmp_path / "killed", progress=False)
    straight, _ = read_checkpoint(tmp_path / "straight")
    resumed, meta = read_checkpoint(tmp_path / "killed")
    assert meta["step"] == 6 and set(report["accuracy"]["tasks"]) == set(TASKS)
    for key in (k for k in straight if not k.startswith("rng.")):
        assert torch.equal(straight[key], resumed[key]), key  # noisy routing included: bitwise


def test_eval_and_export_of_a_multitask_run(tmp_path):
    train(tiny(tmp_path), progress=False)
    result = evaluate_run(tmp_path / "run", device="cpu")
    assert set(result["tasks"]) == set(TASKS)
    assert result["top1"] == pytest.approx(sum(result["tasks"].values()) / 2)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert result["tasks"] == {k: v["final"] for k, v in report["accuracy"]["tasks"].items()}
    with pytest.raises(BSRError, match="drop --dataset"):
        evaluate_run(tmp_path / "run", dataset="mnist", device="cpu")
    out = export_weights(tmp_path / "run", tmp_path / "mt.safetensors")
    with safe_open(out["path"], framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert {"heads.1.weight", "backbone.blocks.7.mlp.w1", "backbone.blocks.0.mlp.fc1.weight"} <= keys
    assert meta["tasks"] == ",".join(TASKS)


@pytest.mark.parametrize("values,match", [
    (dict(num_classes=5), "num_classes does not apply"),
    (dict(layer_decay=0.7), "layer_decay does not apply"),
    (dict(tasks=["mnist", "mnist"]), "names a dataset twice"),
    (dict(tasks=[]), "tasks is empty"),
    (dict(moe_top_k=5), "moe_top_k=5 is more than moe_experts=4"),
    (dict(moe_experts=0), "moe_experts=0 must be positive"),
])
def test_bad_multitask_configs_are_one_line_errors(tmp_path, values, match):
    with pytest.raises(BSRError, match=match):
        tiny(tmp_path, **values)


def test_unknown_task_dataset_fails_before_writing(tmp_path):
    with pytest.raises(BSRError, match="nosuch"):
        train(tiny(tmp_path, tasks=["digits-embedded", "nosuch"]), progress=False)
    assert not (tmp_path / "run").exists()
