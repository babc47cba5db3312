"""LoRA and BitFit on the multi-task MoE model: per-expert LoRA adapters on the stacked expert weights
(`MoEMlp.add_lora`, merged exactly by `merge_lora`), peft's LoRA injected into the backbone's Linear layers, the
experts' stacked biases under BitFit, task gates trained in full; training, resume and the merged export."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from bsr.core.moe import MoEMlp, moe_layers
from bsr.core.multitask import build_multitask
from bsr.train import export_weights, make_config, setup_model, train
from bsr.train.checkpoint import read_checkpoint
from bsr.train.runs import load_run

TASKS = ["digits-embedded", "sklearn-digits"]


def tiny(tmp_path, name="run", **overrides):
    """Two digit tasks at 16 px, 64 images per split, batch 16, 4 experts top-2 at blocks 3, 7, 11."""
    values = dict(model="vit_micro_patch4_28", tasks=TASKS, img_size=16, checkpoint="none", limit=64, batch_size=16,
                  steps=4, eval_every=2, warmup_steps=1, warmup_epochs=0.0, out=str(tmp_path / name), log_every=1,
                  moe_experts=4, moe_top_k=2, threads=1, lora_rank=2)
    values.update(overrides)
    return make_config(values)


def _layer(seed=0) -> MoEMlp:
    torch.manual_seed(seed)
    layer = MoEMlp(12, 20, num_experts=4, top_k=2, num_tasks=1, router_noise=0.0)
    with torch.no_grad():
        layer.gates[0].weight.normal_()  # a real routing, not the zero gate's
    return layer


def test_expert_lora_starts_as_the_identity_and_merges_exactly():
    layer, x = _layer(), torch.randn(2, 5, 12)
    before = layer(x)
    layer.add_lora(rank=3, alpha=6)
    assert layer.lora_a1.shape == (4, 3, 12) and layer.lora_b1.shape == (4, 20, 3)
    assert layer.lora_a2.shape == (4, 3, 20) and layer.lora_b2.shape == (4, 12, 3)
    torch.testing.assert_close(layer(x), before)  # B starts at zero
    with torch.no_grad():
        layer.lora_b1.normal_()
        layer.lora_b2.normal_()
    adapted = layer(x)
    assert not torch.allclose(adapted, before)
    layer.merge_lora()
    assert not hasattr(layer, "lora_a1") and layer.lora_scale is None
    torch.testing.assert_close(layer(x), adapted, rtol=1e-5, atol=1e-5)


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_lora_on_the_moe_model_trains_adapters_gates_heads_and_final_norm(tmp_path):
    model = setup_model(tiny(tmp_path, method="lora"), torch.device("cpu"))
    trained = _trainable(model)
    for name in ("backbone.blocks.3.mlp.lora_a1", "backbone.blocks.11.mlp.lora_b2",
                 "backbone.blocks.7.mlp.gates.1.weight", "backbone.blocks.0.attn.qkv.lora_A.default.weight", "backbone.blocks.4.mlp.fc1.lora_B.default.weight",
                 "heads.1.weight", "backbone.norm.weight"):
        assert name in trained, name
    assert not any(n.endswith(("mlp.w1", "mlp.w2", "mlp.b1", ".base_layer.weight", "patch_embed.proj.weight"))
                   for n in trained)
    assert type(model.backbone).__name__ == "VisionTransformer"  # adapters inside, no peft wrapper
    assert sum(p.numel() for n, p in model.named_parameters() if n in trained) < sum(
        p.numel() for p in model.parameters()) / 10


def test_bitfit_on_the_moe_model_trains_the_experts_biases(tmp_path):
    model = setup_model(tiny(tmp_path, method="bitfit"), torch.device("cpu"))
    trained = _trainable(model)
    for name in ("backbone.blocks.3.mlp.b1", "backbone.blocks.3.mlp.b2", "backbone.blocks.0.attn.qkv.bias",
                 "backbone.blocks.7.mlp.gates.0.weight", "heads.0.weight"):
        assert name in trained, name
    assert "backbone.blocks.3.mlp.w1" not in trained and "backbone.blocks.0.attn.qkv.weight" not in trained


@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_training_resume_and_merged_export(tmp_path, killed_at_step, method):
    common = dict(method=method, steps=4, eval_every=2, optimizer="adamw", lr=1e-2, clip_grad=None)
    train(tiny(tmp_path, "straight", **common), progress=False)
    with killed_at_step(3):
        train(tiny(tmp_path, "killed", **common), progress=False)
    train(tiny(tmp_path, "killed", **common), resume=tmp_path / "killed", progress=False)
    straight, resumed = read_checkpoint(tmp_path / "straight")[0], read_checkpoint(tmp_path / "killed")[0]
    for key in (k for k in straight if not k.startswith("rng.")):
        assert torch.equal(straight[key], resumed[key]), key
    if method == "lora":
        assert any(k.endswith("mlp.lora_b1") and straight[k].abs().sum() > 0 for k in straight)  # the experts learn

    # the timm-format export merges every adapter: a plain MoE multi-task model with its weights gives the same logits
    cfg, trained = load_run(tmp_path / "straight", torch.device("cpu"))
    out = export_weights(tmp_path / "straight", tmp_path / "mt.safetensors")
    state = load_file(out["path"])
    assert not any("lora" in k or "base_layer" in k for k in state)
    plain = build_multitask("vit_micro_patch4_28", [10, 10], num_experts=4, top_k=2, img_size=16)
    plain.load_state_dict(state)
    plain.eval()
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        for task in (0, 1):
            torch.testing.assert_close(plain(images, task), trained(images, task), rtol=1e-4, atol=1e-4)
    assert len(moe_layers(plain.backbone)) == 3


def test_bench_measures_lora_and_bitfit_on_the_moe_model():
    from bsr.measure.bench import run_bench
    from bsr.measure.bench_spec import BenchSpec

    spec = BenchSpec(model="vit_micro_patch4_28", img_size=16, batch_size=4, moe=True, num_tasks=2, moe_experts=4,
                     moe_top_k=2, methods=["moe-full", "moe-lora", "moe-bitfit"], steps=1, warmup=1, threads=1,
                     matmul_size=128, lora_rank=2)
    assert BenchSpec(moe=True).methods == ["moe-full", "moe-bsr", "moe-bsr-lean", "dense-full"]  # the default four
    r = {x["method"]: x for x in run_bench(spec, isolate=False).records}
    full, lora, bitfit = r["moe-full"], r["moe-lora"], r["moe-bitfit"]
    assert lora["total_params"] > full["total_params"] > lora["trainable_params"] > bitfit["trainable_params"]
    assert lora["saved_activation_bytes"] < full["saved_activation_bytes"]
    assert lora["multitask"]["has_moe_layers"] and lora["ratio_vs_baseline"]["train_peak"] is not None
