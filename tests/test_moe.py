"""`bsr.core.moe`: top-k routing against a per-token loop, dense parity at init, task gates, BSR on a multi-task MoE
ViT."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block

import bsr
from bsr import BSRConfig, BSRError
from bsr.measure.flops import count_flops
from bsr.core.moe import (MoEMlp, balance_loss, moe_aux_loss, moe_layers, moe_task, moeify, route_top_k,
                          set_moe_task)
from bsr.core.multitask import MultiTaskViT, build_multitask, reprogram_multitask

TINY = dict(img_size=32, patch_size=8, depth=4)  # 16 patches + CLS, width 192
SMALL_BSR = dict(trainable_blocks="1,3", drop_blocks="1,2", keep_rate=0.5)


def tiny_vit(num_classes: int = 0):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, **TINY)


def images(batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, 3, 32, 32)


def random_moe(num_experts: int = 5, top_k: int = 2, num_tasks: int = 2, width: int = 8, hidden: int = 12):
    """A MoE with distinct experts and non-zero gates, in eval mode (no routing noise)."""
    torch.manual_seed(2)
    moe = MoEMlp(width, hidden, num_experts=num_experts, top_k=top_k, num_tasks=num_tasks)
    for gate in moe.gates:
        torch.nn.init.normal_(gate.weight)
        torch.nn.init.normal_(gate.bias)
    torch.nn.init.normal_(moe.b1)
    torch.nn.init.normal_(moe.b2)
    return moe.eval()


def loop_reference(moe: MoEMlp, x: torch.Tensor) -> torch.Tensor:
    """The MoE, one token and one expert at a time: top-k by explicit ranking, softmax over the chosen logits."""
    tokens = x.reshape(-1, x.shape[-1])
    gate = moe.current_gate()
    out = []
    for t in tokens:
        logits = gate(t)
        chosen = sorted(range(moe.num_experts), key=lambda e: (-logits[e].item(), e))[:moe.top_k]
        weights = logits[chosen].softmax(dim=0)
        y = sum(w * F.linear(F.gelu(F.linear(t, moe.w1[e], moe.b1[e])), moe.w2[e], moe.b2[e])
                for w, e in zip(weights, chosen))
        out.append(y)
    return torch.stack(out).reshape(*x.shape[:-1], -1)


# --------------------------------------------------------------------------------------------------------------------
# Routing and the batched experts
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_experts,top_k", [(5, 2), (4, 4), (6, 1)])
def test_route_top_k_picks_k_best_with_weights_summing_to_one(num_experts, top_k):
    torch.manual_seed(3)
    logits = torch.randn(10, num_experts)
    weights, experts = route_top_k(logits, top_k)
    assert experts.shape == weights.shape == (10, top_k)
    assert torch.allclose(weights.sum(dim=1), torch.ones(10))
    for row, chosen in zip(logits, experts):
        assert len(set(chosen.tolist())) == top_k
        assert set(chosen.tolist()) == set(row.topk(top_k).indices.tolist())


def test_ties_go_to_the_first_experts():
    weights, experts = route_top_k(torch.zeros(3, 16), 4)
    assert experts.tolist() == [[0, 1, 2, 3]] * 3
    assert torch.allclose(weights, torch.full((3, 4), 0.25))


@pytest.mark.parametrize("task", [0, 1])
def test_batched_experts_equal_the_per_token_loop(task):
    moe = random_moe()
    x = torch.randn(3, 7, 8)
    with moe_task(moe, task):
        assert torch.allclose(moe(x), loop_reference(moe, x), atol=1e-5)


def test_one_expert_top_1_equals_the_dense_mlp():
    torch.manual_seed(4)
    dense = Mlp(8, 12)
    moe = MoEMlp.from_mlp(dense, num_experts=1, top_k=1)
    x = torch.randn(2, 5, 8, requires_grad=True)
    out, ref = moe(x), dense(x)
    assert torch.equal(out, ref)  # same addmm kernels, weight exactly 1.0
    (g,) = torch.autograd.grad(out.square().sum(), x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    assert torch.allclose(g, g_ref, atol=1e-6)


def test_zero_gates_and_copied_experts_start_as_the_dense_block():
    torch.manual_seed(5)
    block = Block(16, 2)
    moe_block = copy.deepcopy(block)
    moe_block.mlp = MoEMlp.from_mlp(block.mlp, num_experts=16, top_k=4)
    x = torch.randn(2, 9, 16)
    assert torch.allclose(moe_block(x), block(x), atol=1e-5)
    moe_block.train()  # routing noise changes which copies run, not the result
    assert torch.allclose(moe_block(x), block.train()(x), atol=1e-5)


def test_any_token_count_and_autocast():
    moe = random_moe(num_tasks=1)
    assert moe(torch.randn(0, 8)).shape == (0, 8)
    x = torch.randn(4, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
    assert y.dtype == torch.bfloat16 and torch.allclose(y.float(), moe(x), atol=0.1, rtol=0.05)


def test_expert_matmuls_are_counted_as_flops():
    moe = random_moe(num_experts=4, top_k=2, num_tasks=1, width=8, hidden=12)
    x = torch.randn(10, 8)
    flops = count_flops(lambda: moe(x))
    # gate (T x C x E) + k experts per token through fc1 and fc2, 2 FLOPs per MAC
    assert flops == 2 * 10 * (8 * 4 + 2 * (8 * 12 + 12 * 8))


# --------------------------------------------------------------------------------------------------------------------
# Load balancing
# --------------------------------------------------------------------------------------------------------------------

def test_balance_loss_is_one_at_uniform_routing_and_more_when_skewed():
    _, experts = route_top_k(torch.zeros(6, 8), 2)
    assert balance_loss(torch.zeros(6, 8), experts, 8).item() == pytest.approx(1.0)
    skewed = torch.zeros(6, 8)
    skewed[:, :2] = 3.0  # router prefers the experts it already overloads
    _, experts = route_top_k(skewed, 2)
    assert balance_loss(skewed, experts, 8).item() > 1.0


def test_aux_loss_off_by_default_and_differentiable_when_on():
    moe = random_moe(num_tasks=1)
    moe(torch.randn(5, 8))
    assert moe_aux_loss(moe).item() == 0.0 and torch.isfinite(moe.last_balance_loss)
    moe.aux_loss_coef = 0.01
    moe(torch.randn(5, 8))
    aux = moe_aux_loss(moe)
    assert torch.isfinite(aux) and aux.item() == pytest.approx(0.01 * moe.last_balance_loss.item())
    aux.backward()
    assert moe.gates[0].weight.grad is not None and all(w.grad is None for w in moe.w1)


# --------------------------------------------------------------------------------------------------------------------
# moeify and tasks
# --------------------------------------------------------------------------------------------------------------------

def test_moeify_keeps_outputs_and_other_keys():
    model = tiny_vit(num_classes=3).eval()
    ref_out, ref_keys = model(images()), set(model.state_dict())
    moeify(model, blocks=[1, 3], num_experts=4, top_k=2, num_tasks=2)
    keys = set(model.state_dict())
    gone = {k for k in ref_keys if k.startswith(("blocks.1.mlp.", "blocks.3.mlp."))}
    assert ref_keys - keys == gone
    assert keys - ref_keys == {f"blocks.{i}.mlp.{n}" for i in (1, 3) for n in
                               ("w1", "b1", "w2", "b2", "gates.0.weight", "gates.0.bias", "gates.1.weight",
                                "gates.1.bias")}
    assert model.state_dict()["blocks.1.mlp.w1"].shape == (4, 768, 192)
    with moe_task(model, 1):
        assert torch.allclose(model(images()), ref_out, atol=1e-5)


def test_expert_weights_are_parameters_of_their_own_stacked_in_the_state_dict():
    source = moeify(tiny_vit(num_classes=3), blocks=[1], num_experts=4, top_k=2)
    names = [n for n, _ in source.named_parameters() if n.startswith("blocks.1.mlp.w")]
    assert names == [f"blocks.1.mlp.w{k}.{e}" for k in (1, 2) for e in range(4)]
    with torch.no_grad():
        for w in source.blocks[1].mlp.w2:
            w.normal_()
    target = moeify(tiny_vit(num_classes=3), blocks=[1], num_experts=4, top_k=2)
    state = source.state_dict()
    assert torch.equal(state["blocks.1.mlp.w2"][2], source.blocks[1].mlp.w2[2])
    target.load_state_dict(state, strict=True)  # stacked keys split into the experts again
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), source.parameters()))
    state["blocks.1.mlp.w1"] = state["blocks.1.mlp.w1"][:3]  # 3 experts for a 4-expert layer: refused, not split
    with pytest.raises(RuntimeError, match="blocks.1.mlp.w1"):
        target.load_state_dict(state, strict=True)


@pytest.mark.parametrize("blocks,match", [([4], "block index 4"), ([-1], "block index -1")])
def test_moeify_refuses_bad_block_index(blocks, match):
    with pytest.raises(BSRError, match=match):
        moeify(tiny_vit(), blocks=blocks)


def test_moeify_refuses_a_non_mlp():
    model = moeify(tiny_vit(), blocks=[1], num_experts=2, top_k=1)
    with pytest.raises(BSRError, match="not a timm Mlp"):
        moeify(model, blocks=[0, 1])
    assert type(model.blocks[0].mlp) is Mlp  # refused before changing anything


def test_unset_or_bad_task_is_an_error():
    model = moeify(tiny_vit(), blocks=[1], num_experts=2, top_k=1, num_tasks=2)
    with pytest.raises(BSRError, match="no task is set"):
        model(images())
    with pytest.raises(BSRError, match="out of range"):
        set_moe_task(model, 2)
    single = moeify(tiny_vit(), blocks=[1], num_experts=2, top_k=1)
    single(images())  # one task: its gate is used without setting it


def test_task_gates_stay_separate():
    mt = build_multitask(tiny_vit(), [3, 5], moe_blocks=[1, 3], num_experts=4, top_k=2)
    out = mt(images(), task=0)
    assert out.shape == (2, 3)
    out.square().sum().backward()
    for layer in moe_layers(mt):
        assert layer.gates[1].weight.grad is None and layer.gates[1].bias.grad is None
        assert layer.gates[0].weight.grad is not None
    assert mt.heads[1].weight.grad is None and mt.heads[0].weight.grad is not None


def test_gates_learn_from_noisy_routing():
    # Zero gates + identical experts: the task loss alone gives the gates no gradient; noisy routing in training
    # sends tokens to different experts, they diverge, and from the second step on the gates learn.
    mt = build_multitask(tiny_vit(), [3], moe_blocks=[1], num_experts=4, top_k=2)
    opt = torch.optim.SGD(mt.parameters(), lr=0.5)
    torch.manual_seed(6)
    for _ in range(2):
        opt.zero_grad()
        mt(images(), task=0).square().sum().backward()
        opt.step()
    assert mt.backbone.blocks[1].mlp.gates[0].weight.abs().sum() > 0


# --------------------------------------------------------------------------------------------------------------------
# BSR on the multi-task MoE model
# --------------------------------------------------------------------------------------------------------------------

def test_reprogram_multitask_trains_moe_blocks_norm_and_heads_only():
    mt = build_multitask(tiny_vit(), [3, 5], moe_blocks=[1, 3], num_experts=4, top_k=2)
    reprogram_multitask(mt, BSRConfig(**SMALL_BSR))
    trainable = {n for n, p in mt.named_parameters() if p.requires_grad}
    expected = ({n for n, _ in mt.named_parameters() if n.startswith(("backbone.blocks.1.", "backbone.blocks.3.",
                                                                       "backbone.norm.", "heads."))})
    assert trainable == expected
    mt(images(), task=1).square().sum().backward()
    got = {n for n, p in mt.named_parameters() if p.grad is not None}
    assert got <= trainable
    assert {"backbone.blocks.1.mlp.w1.0", "backbone.blocks.3.mlp.gates.1.weight", "heads.1.weight"} <= got


def test_experts_see_the_dropped_token_count():
    mt = build_multitask(tiny_vit(), [3], moe_blocks=[1, 3], num_experts=4, top_k=2)
    reprogram_multitask(mt, BSRConfig(**SMALL_BSR))
    seen = {}
    for i in (1, 3):
        mt.backbone.blocks[i].mlp.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(i, inp[0].shape))
    mt(images(), task=0)
    # 17 tokens; drop at block 1: CLS + 8 kept + fused = 10; drop at block 2: CLS + 5 + fused = 7
    assert seen == {1: (2, 10, 192), 3: (2, 7, 192)}
    counts = bsr.summary(mt.backbone).tokens
    assert [counts[1][1], counts[3][1]] == [10, 7]


def test_dense_multitask_and_refusals():
    mt = build_multitask("vit_tiny_patch16_224", [2, 4], moe=False, **TINY)
    assert not moe_layers(mt) and mt(images(), task=1).shape == (2, 4)
    with pytest.raises(BSRError, match="out of range"):
        mt(images(), task=2)
    with pytest.raises(BSRError, match="task gates"):
        MultiTaskViT(moeify(tiny_vit(), blocks=[1], num_experts=2, top_k=1, num_tasks=3), [2, 2])


def test_recompute_auto_recomputes_a_first_trained_mixture_only():
    mt = reprogram_multitask(build_multitask(tiny_vit(), [3], moe_blocks=[1, 3], num_experts=4, top_k=2),
                             BSRConfig(**SMALL_BSR))
    assert BSRConfig().recompute == "auto" and bsr.bsr_state(mt.backbone).recompute == "first"
    dense = bsr.reprogram(tiny_vit(), BSRConfig(**SMALL_BSR))
    assert bsr.bsr_state(dense).recompute == "none"
    later = reprogram_multitask(build_multitask(tiny_vit(), [3], moe_blocks=[3], num_experts=4, top_k=2),
                                BSRConfig(**SMALL_BSR))  # first trained block 1 is dense
    assert bsr.bsr_state(later.backbone).recompute == "none"


def test_recomputation_replays_the_same_noisy_routing():
    grads = []
    for recompute in ("none", "all"):
        mt = build_multitask(tiny_vit(), [3, 4], moe_blocks=[1, 3], num_experts=4, top_k=2, aux_loss_coef=0.01)
        reprogram_multitask(mt, BSRConfig(**SMALL_BSR, recompute=recompute))
        torch.manual_seed(7)
        (mt(images(), task=1).square().sum() + moe_aux_loss(mt)).backward()
        grads.append({n: p.grad for n, p in mt.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n]) for n in grads[0])


def test_checkpoints_with_stacked_expert_weights_still_load():
    from bsr.train.checkpoint import load_trainable, trainable_state

    source = build_multitask(tiny_vit(), [3], moe_blocks=[1], num_experts=4, top_k=2)
    with torch.no_grad():
        for w in source.backbone.blocks[1].mlp.w1:
            w.normal_()
    tensors = trainable_state(source)
    for kind in ("w1", "w2"):  # the layout of checkpoints written when the experts were one stacked parameter
        key = f"param.backbone.blocks.1.mlp.{kind}"
        tensors[key] = torch.stack([tensors.pop(f"{key}.{e}") for e in range(4)])
    target = build_multitask(tiny_vit(), [3], moe_blocks=[1], num_experts=4, top_k=2)
    load_trainable(target, tensors, "old.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(target.backbone.blocks[1].mlp.w1, source.backbone.blocks[1].mlp.w1))
