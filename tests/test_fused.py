"""The optimizer step fused into backward (`--fused-step`, bsr.train.fused): the same weights and optimizer state as
the usual step (SGD and AdamW, lr schedule, weight-decay and layer-decay groups, single- and multi-task), never more
than one gradient held, checkpoints in the unfused layout, resume equal to an uninterrupted run, one-line refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bsr import BSRError
from bsr.train import build_optimizer, make_config, train
from bsr.train.checkpoint import read_checkpoint
from bsr.train.fused import FusedOptimizer

TASKS = ["digits-embedded", "sklearn-digits"]


def tiny(tmp_path, name, **overrides):
    """6 steps of the micro ViT on 16 px digits (64 images per split, batch 16), warm-up then cosine, no clipping."""
    values = dict(model="vit_micro_patch4_28", img_size=16, checkpoint="none", dataset="digits-embedded", limit=64,
                  batch_size=16, steps=6, eval_every=3, warmup_steps=2, warmup_epochs=0.0, log_every=1, threads=1,
                  clip_grad=None, weight_decay=0.05, out=str(tmp_path / name))
    values.update(overrides)
    return make_config(values)


def same_checkpoints(a, b, exact: bool) -> None:
    """Trained parameters and optimizer state equal (RNG states aside): bitwise, or within float tolerance (on CUDA
    the unfused optimizer runs torch's multi-tensor kernels, the fused one a tensor at a time)."""
    ta, ma = read_checkpoint(a)
    tb, mb = read_checkpoint(b)
    assert ma["step"] == mb["step"] and ma["optimizer"] == mb["optimizer"]  # param groups, options, scalar state
    keys = sorted(k for k in ta if not k.startswith("rng."))
    assert keys == sorted(k for k in tb if not k.startswith("rng.")) and any(k.startswith("optim.") for k in keys)
    for key in keys:
        if exact:
            assert torch.equal(ta[key], tb[key]), key
        else:
            torch.testing.assert_close(ta[key], tb[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("optimizer,method,extra", [
    ("sgd", "bsr", {}),
    ("adamw", "full", {"layer_decay": 0.75}),  # timm's layer-decay groups: lr_scale per group
    ("adamw", "lora", {"lora_rank": 2}),
])
def test_fused_step_learns_the_same_weights(tmp_path, optimizer, method, extra):
    common = dict(optimizer=optimizer, method=method, lr=1e-2 if optimizer == "sgd" else 1e-3, **extra)
    train(tiny(tmp_path, "plain", **common), progress=False)
    train(tiny(tmp_path, "fused", fused_step=True, **common), progress=False)
    same_checkpoints(tmp_path / "plain", tmp_path / "fused", exact=not torch.cuda.is_available())


def test_fused_step_on_the_moe_model_learns_the_same_weights(tmp_path):
    # two tasks: each step is one backward per task, and the other task's head and gates get no gradient
    common = dict(tasks=TASKS, moe_experts=4, moe_top_k=2, steps=4, eval_every=2, optimizer="adamw", lr=1e-3)
    train(tiny(tmp_path, "plain", **common), progress=False)
    train(tiny(tmp_path, "fused", fused_step=True, **common), progress=False)
    same_checkpoints(tmp_path / "plain", tmp_path / "fused", exact=not torch.cuda.is_available())


def test_resume_of_a_fused_run_equals_the_uninterrupted_run(tmp_path, killed_at_step):
    common = dict(fused_step=True, optimizer="adamw", lr=1e-3, steps=6, eval_every=3)
    train(tiny(tmp_path, "straight", **common), progress=False)
    with killed_at_step(4):
        train(tiny(tmp_path, "killed", **common), progress=False)
    assert read_checkpoint(tmp_path / "killed")[1]["step"] == 3
    train(tiny(tmp_path, "killed", **common), resume=tmp_path / "killed", progress=False)
    same_checkpoints(tmp_path / "straight", tmp_path / "killed", exact=True)


# ------------------------------------------------------------------------------------------------- bf16 state


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.05), ("adamw", 1e-3)])
def test_bf16_state_stays_within_1_percent_of_the_fp32_trajectory(tmp_path, optimizer, lr):
    """20 steps of full fine-tuning: the weights' distance from the fp32 run is under 1% of how far the fp32 run
    moved them (measured: 0.2% for both)."""
    common = dict(method="full", optimizer=optimizer, lr=lr, steps=20, eval_every=20)
    train(tiny(tmp_path, "fp32", **common), progress=False)
    train(tiny(tmp_path, "bf16", optimizer_state="bf16", **common), progress=False)
    fp32, bf16 = read_checkpoint(tmp_path / "fp32")[0], read_checkpoint(tmp_path / "bf16")[0]
    from bsr.train.build import setup_model

    init = dict(setup_model(tiny(tmp_path, "x", **common), torch.device("cpu")).named_parameters())
    keys = [k for k in fp32 if k.startswith("param.")]
    a, b = (torch.cat([t[k].flatten() for k in keys]) for t in (fp32, bf16))
    start = torch.cat([init[k[len("param."):]].detach().flatten() for k in keys])
    assert 0 < (a - b).norm() < 0.01 * (a - start).norm()
    low = "momentum_buffer" if optimizer == "sgd" else "exp_avg"
    for key, value in bf16.items():  # saved as held: bf16 momentum / first moment, fp32 second moment
        if key.startswith("optim.") and key.endswith(("momentum_buffer", "exp_avg", "exp_avg_sq")):
            assert value.dtype == (torch.bfloat16 if key.endswith(low) else torch.float32), key
            assert fp32[key].dtype == torch.float32


def test_bf16_state_fused_or_not_and_resumed_gives_the_same_run(tmp_path, killed_at_step):
    common = dict(optimizer="sgd", lr=0.05, optimizer_state="bf16", steps=6, eval_every=3)
    train(tiny(tmp_path, "straight", **common), progress=False)
    with killed_at_step(4):
        train(tiny(tmp_path, "killed", fused_step=True, **common), progress=False)
    train(tiny(tmp_path, "killed", fused_step=True, **common), resume=tmp_path / "killed", progress=False)
    same_checkpoints(tmp_path / "straight", tmp_path / "killed", exact=not torch.cuda.is_available())


# ------------------------------------------------------------------------------------------------- the optimizer


def _model_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 3))
    return model, torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])


def _groups(model):
    decay = [p for p in model.parameters() if p.ndim > 1]
    return [{"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0},
            {"params": decay, "weight_decay": 0.1, "lr_scale": 0.5}]


@pytest.mark.parametrize("make", [lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9),
                                  lambda g: torch.optim.AdamW(g, lr=0.01)], ids=["sgd", "adamw"])
def test_the_same_steps_and_state_dict_as_the_unfused_optimizer(make):
    plain_model, x, y = _model_and_batch()
    fused_model, _, _ = _model_and_batch()
    plain, fused = make(_groups(plain_model)), FusedOptimizer(_groups(fused_model), make)
    held = []  # gradients held whenever one arrives (hooks registered after the fused ones run after its step)
    for p in fused_model.parameters():
        p.register_post_accumulate_grad_hook(lambda _: held.append(sum(q.grad is not None
                                                                       for q in fused_model.parameters())))
    for step in range(4):
        for opt in (plain, fused):  # a schedule: the loop writes every group's lr before each step
            for group in opt.param_groups:
                group["lr"] = 0.1 / (step + 1) * group.get("lr_scale", 1.0)
        for model, opt in ((plain_model, plain), (fused_model, fused)):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert held and max(held) == 0  # each gradient was freed right after its update
    assert all(p.grad is None for p in fused_model.parameters())
    for a, b in zip(plain_model.parameters(), fused_model.parameters()):
        assert torch.equal(a, b)  # bitwise on the CPU
    sd_plain, sd_fused = plain.state_dict(), fused.state_dict()
    assert sd_plain["param_groups"] == sd_fused["param_groups"]
    assert sd_plain["state"].keys() == sd_fused["state"].keys()
    for i, state in sd_plain["state"].items():
        for key, value in state.items():
            assert torch.equal(value, sd_fused["state"][i][key]), (i, key)

    # the layouts are the same: an unfused optimizer's state loads into a fused one and back
    other_model, _, _ = _model_and_batch()
    other = FusedOptimizer(_groups(other_model), make)
    other.load_state_dict(sd_plain)
    assert all(torch.equal(other.state[q][k], plain.state[p][k]) for p, q in zip(plain_model.parameters(),
                                                                                  other_model.parameters())
               for k in plain.state[p])
    with pytest.raises(ValueError):
        other.load_state_dict({**sd_plain, "param_groups": sd_plain["param_groups"][:1]})
    fused.remove()
    nn.functional.cross_entropy(fused_model(x), y).backward()
    assert all(p.grad is not None for p in fused_model.parameters())  # hooks gone: no step, gradients kept


def test_build_optimizer_keeps_the_weight_decay_groups(tmp_path):
    from bsr.train.build import setup_model

    cfg = tiny(tmp_path, "x", fused_step=True, method="full")
    fused = build_optimizer(cfg, setup_model(cfg, torch.device("cpu")))
    plain = build_optimizer(make_config({**cfg.to_dict(), "fused_step": False}),
                            setup_model(cfg, torch.device("cpu")))
    assert isinstance(fused, FusedOptimizer) and not isinstance(plain, FusedOptimizer)
    assert ([len(g["params"]) for g in fused.state_dict()["param_groups"]]
            == [len(g["params"]) for g in plain.param_groups])
    assert {g["weight_decay"] for g in fused.param_groups} == {0.0, 0.05}


@pytest.mark.parametrize("values,match", [
    ({"clip_grad": 1.0}, "no global norm exists to clip by .*--clip-grad none"),
    ({"amp": "fp16"}, "fp16's loss scaling"),
    ({"optimizer_state": "fp16"}, "optimizer_state='fp16' is not valid"),
])
def test_what_needs_every_gradient_is_refused_in_one_line(tmp_path, values, match):
    with pytest.raises(BSRError, match=match) as e:
        tiny(tmp_path, "x", fused_step=True, **values)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------- bsr bench


def test_bench_measures_each_method_with_and_without_the_fused_step(tmp_path):
    import shlex
    from pathlib import Path

    from bsr.cli import build_parser
    from bsr.cli.bench import command_line
    from bsr.cli.options import flags_to_values
    from bsr.measure.bench import run_bench
    from bsr.measure.bench_spec import BenchSpec
    from bsr.measure.report import write_outputs

    spec = BenchSpec(model="vit_micro_patch4_28", img_size=16, batch_size=4, moe=True, num_tasks=2, moe_experts=4,
                     moe_top_k=2, methods=["moe-full", "moe-bsr"], fused_step=True, steps=1, warmup=1, threads=1,
                     matmul_size=128)
    assert spec.methods == ["moe-full", "moe-bsr", "moe-full+fused", "moe-bsr+fused"]
    assert BenchSpec.from_dict(spec.to_dict()).methods == spec.methods  # a saved spec loads to the same list
    result = run_bench(spec, command="bsr bench --fused-step (test)", isolate=False)
    r = {x["method"]: x for x in result.records}
    for name in ("moe-full", "moe-bsr"):
        plain, fused = r[name], r[name + "+fused"]
        assert not plain["fused_step"] and fused["fused_step"]
        assert fused["trainable_params"] == plain["trainable_params"]
        assert fused["optimizer_bytes"] == plain["optimizer_bytes"]  # the same momentum, held per parameter
        assert fused["grad_bytes"] < plain["grad_bytes"] == 4 * plain["trainable_params"]  # the largest gradient
        assert fused["train_flops_per_step"] == plain["train_flops_per_step"]
        assert plain["ratio_vs_same_option"] == plain["ratio_vs_baseline"]
    bsr_fused, full_fused = r["moe-bsr+fused"], r["moe-full+fused"]
    assert bsr_fused["ratio_vs_same_option"]["train_peak"] == (full_fused["train_peak_bytes"]
                                                               / bsr_fused["train_peak_bytes"])
    assert bsr_fused["ratio_vs_baseline"]["train_peak"] == r["moe-full"]["train_peak_bytes"] / bsr_fused[
        "train_peak_bytes"]
    markdown = write_outputs(result, tmp_path / "b")["md"].read_text()
    assert "moe-full(same option)/x" in markdown and "| **moe-bsr+fused** |" in markdown

    words = shlex.split(command_line(spec, Path("out"), False))  # the saved command repeats the run
    again = BenchSpec.from_dict(flags_to_values(build_parser().parse_args(words[1:]),
                                                ignore=("command", "run", "out", "compare_analytic", "in_process")))
    assert again.to_dict() == spec.to_dict()


def test_bench_bf16_state_halves_the_momentum_and_unknown_options_are_refused():
    from bsr.measure.bench import run_bench
    from bsr.measure.bench_spec import BenchSpec

    spec = BenchSpec(model="vit_micro_patch4_28", img_size=16, batch_size=4, moe=True, num_tasks=2, moe_experts=4,
                     moe_top_k=2, methods=["moe-full", "moe-full+bf16", "moe-bsr+fused+bf16", "moe-full+fused+bf16"],
                     steps=1, warmup=1, threads=1, matmul_size=128)
    r = {x["method"]: x for x in run_bench(spec, isolate=False).records}
    full, half = r["moe-full"], r["moe-full+bf16"]
    assert half["bf16_state"] and not half["fused_step"] and half["grad_bytes"] == full["grad_bytes"]
    assert half["optimizer_bytes"] == full["optimizer_bytes"] / 2  # bf16 momentum
    bsr = r["moe-bsr+fused+bf16"]
    assert bsr["ratio_vs_same_option"]["flops"] == r["moe-full+fused+bf16"]["train_flops_per_step"] / bsr[
        "train_flops_per_step"]
    with pytest.raises(BSRError, match="unknown method option '\\+fp8'"):
        BenchSpec(moe=True, methods=["moe-bsr+fp8"]).check()
