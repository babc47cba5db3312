"""`bsr.measure.memory` and `bsr.measure.flops`: saved-for-backward bytes against hand counts, FLOPs against
formulas, size helpers."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import flop_counter as torch_flop_counter

from bsr.measure import flops, memory
from bsr.measure.flops import count_flops
from bsr.measure.memory import OUTSIDE, ROOT, SavedBytes, saved_tensor_bytes

B, N, C, HIDDEN = 2, 5, 8, 32
F32 = 4


def tiny_vit(**kwargs) -> nn.Module:
    """4 blocks, 32 px, patch 8: 16 patches + CLS = 17 tokens, width 192, 3 heads."""
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=4,
                             num_classes=10, **kwargs)


def frozen(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module


# ---------------------------------------------------------------------------------------------------- saved bytes

def _saved(run, *modules: nn.Module) -> int:
    params = [p for m in modules for p in m.parameters()]
    return saved_tensor_bytes(run, params).total


def test_frozen_linear_saves_nothing():
    # grad of the input only needs the weight, which is a parameter and excluded
    lin, x = frozen(nn.Linear(C, HIDDEN)), torch.randn(B, N, C, requires_grad=True)
    assert _saved(lambda: lin(x), lin) == 0


def test_trainable_linear_saves_its_input():
    lin, x = nn.Linear(C, HIDDEN), torch.randn(B, N, C)
    assert _saved(lambda: lin(x), lin) == B * N * C * F32


def test_gelu_saves_its_input():
    x = torch.randn(B, N, HIDDEN, requires_grad=True)
    assert _saved(lambda: F.gelu(x)) == B * N * HIDDEN * F32


def test_storage_saved_twice_counts_once():
    # h is saved by the GELU and again by the trainable second Linear: one storage
    fc1, fc2, x = nn.Linear(C, HIDDEN), nn.Linear(HIDDEN, C), torch.randn(B, N, C)

    def run():
        h = fc1(x)
        return fc2(F.gelu(h)) + fc2(h)

    g = (B * N * HIDDEN) * F32  # GELU output, saved by fc2's first call
    assert _saved(run, fc1, fc2) == B * N * C * F32 + B * N * HIDDEN * F32 + g


def test_views_of_one_storage_count_its_full_size():
    x = torch.randn(B, 3, N, C, requires_grad=True)
    q, k, v = x.exp().unbind(1)  # views of one (B, 3, N, C) storage, made before counting starts
    # mul saves q and k: one storage, counted once and whole (v's third included: it stays alive too)
    assert _saved(lambda: (q * k).sum() + v.sum()) == B * 3 * N * C * F32


def test_parameters_and_their_views_are_excluded():
    w, x = nn.Parameter(torch.randn(C)), torch.randn(B, C, requires_grad=True)
    assert _saved(lambda: (w.view(1, C) * x).sum(), nn.ParameterList([w])) == B * C * F32  # x only, never w


def test_excluded_defaults_to_model_parameters():
    lin, x = nn.Linear(C, HIDDEN), torch.randn(B, N, C)
    assert saved_tensor_bytes(lambda: lin(x), model=lin).total == B * N * C * F32


def test_counting_frees_the_graph_it_built():
    """The forward run for counting leaves nothing behind: a saved output (GELU's, softmax's) returned as itself by
    the pack hook held its own grad_fn, a cycle no collector frees, and every saved tensor stayed resident."""
    import gc
    import weakref

    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4), nn.Softmax(dim=-1))
    x = torch.randn(3, 8)
    outputs = []
    handles = [m.register_forward_hook(lambda m, a, out: outputs.append(weakref.ref(out))) for m in model]
    assert saved_tensor_bytes(lambda: model(x).sum(), model=model).total > 0
    for h in handles:
        h.remove()
    gc.collect()
    assert len(outputs) == 4 and all(ref() is None for ref in outputs)


def test_nothing_saved_without_grad():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert saved_tensor_bytes(lambda: model(x), model=model).total == 0


def test_per_module_attribution_in_a_vit():
    model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    tokens, width, hidden = 17, 192, 768
    saved = saved_tensor_bytes(lambda: F.cross_entropy(model(x), torch.tensor([1, 2])), model=model)
    assert isinstance(saved, SavedBytes)
    # GELU keeps the fc1 output (first seen there); fc2 then saves the GELU output
    for i in range(4):
        assert saved.by_module[f"blocks.{i}.mlp.act"] == 2 * tokens * hidden * F32
        assert saved.by_module[f"blocks.{i}.mlp.fc2"] == 2 * tokens * hidden * F32
        assert saved.by_module[f"blocks.{i}.attn.qkv"] == 2 * tokens * width * F32  # the norm1 output
    assert sum(saved.by_module.values()) == saved.total == sum(saved.by_block.values())
    assert set(saved.by_block) >= {f"blocks.{i}" for i in range(4)} | {"patch_embed", "norm", "head"}
    assert saved.by_block["blocks.2"] == sum(v for k, v in saved.by_module.items() if k.startswith("blocks.2."))
    assert OUTSIDE in saved.by_module  # the loss's softmax
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # hooks removed


def test_frozen_prefix_blocks_save_nothing():
    model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    model.requires_grad_(False)
    model.blocks[3].requires_grad_(True)
    model.head.requires_grad_(True)
    saved = saved_tensor_bytes(lambda: model(x), model=model)
    # nothing upstream needs a gradient, so blocks 0-2 are not even recorded
    assert {k for k in saved.by_block if k.startswith("blocks.")} == {"blocks.3"}


@pytest.mark.parametrize("name, expected", [
    ("blocks.3.attn.qkv", "blocks.3"), ("blocks.11", "blocks.11"), ("head", "head"), ("norm", "norm"),
    ("patch_embed.proj", "patch_embed"),
])
def test_rollup_name(name, expected):
    assert memory.rollup_name(name) == expected


def test_root_label_for_model_own_ops():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(C, C)

        def forward(self, x):
            return self.lin(x).exp()  # exp runs in the root's forward and saves its output

    net, x = Net(), torch.randn(B, C)
    saved = saved_tensor_bytes(lambda: net(x), model=net)
    assert saved.by_module == {"lin": B * C * F32, ROOT: B * C * F32}


# ---------------------------------------------------------------------------------------------------------- FLOPs

def _attention(fused: bool) -> nn.Module:
    torch.manual_seed(0)
    attn = timm.layers.Attention(dim=C * 4, num_heads=4, qkv_bias=True)
    attn.fused_attn = fused
    return attn


def _attention_flops(fused: bool, backward: bool) -> int:
    attn, x = _attention(fused), torch.randn(B, N, C * 4, requires_grad=True)

    def run():
        out = attn(x)
        if backward:
            out.sum().backward()

    return count_flops(run)


def test_fused_attention_forward_flops_match_explicit_and_formula():
    dim, heads = C * 4, 4
    linears = 2 * B * N * dim * 3 * dim + 2 * B * N * dim * dim  # qkv, proj
    matmuls = 2 * (2 * B * heads * N * N * (dim // heads))  # Q K^T and P V
    assert _attention_flops(fused=True, backward=False) == linears + matmuls
    assert _attention_flops(fused=False, backward=False) == linears + matmuls


def test_fused_attention_backward_flops_match_explicit_plus_recompute():
    # the fused backward recomputes Q K^T once; otherwise it does the explicit path's four gradient matmuls
    dim, heads = C * 4, 4
    recompute = 2 * B * heads * N * N * (dim // heads)
    assert (_attention_flops(fused=True, backward=True)
            == _attention_flops(fused=False, backward=True) + recompute)


def test_flop_formulas_stay_local():
    count_flops(lambda: _attention(True)(torch.randn(B, N, C * 4)))
    assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu not in torch_flop_counter.flop_registry
    assert count_flops(lambda: _attention(True)(torch.randn(B, N, C * 4))) > 0  # and repeatable


def test_fwd_gmacs_per_image_matches_hand_count():
    model = tiny_vit()
    tokens, width, hidden, patches = 17, 192, 768, 16
    macs = patches * (3 * 8 * 8) * width  # patch embedding
    macs += 4 * (tokens * width * (3 * width + width + 2 * hidden) + 2 * tokens * tokens * width)  # blocks
    macs += width * 10  # head
    assert flops.fwd_gmacs_per_image(model) == pytest.approx(macs / 1e9, rel=1e-12)
    assert flops.fwd_gmacs_per_image(model, img_size=32) == pytest.approx(macs / 1e9, rel=1e-12)


# ------------------------------------------------------------------------------------------------ memory, speed

def test_peak_and_current_bytes_cpu():
    with memory.track_peak("cpu") as window:
        block = torch.ones(16 * 2 ** 20)  # 64 MiB, pages touched
    assert memory.current_bytes("cpu") > 0 and memory.current_rss_bytes() > 0
    assert window.peak >= window.start
    if window.resettable:
        assert window.increase >= 48 * 2 ** 20
    del block


def test_matmul_gflops_is_positive():
    assert flops.matmul_gflops("cpu", size=128, repeats=2) > 0


# ----------------------------------------------------------------------------------------- parameters and state

def test_param_grad_and_optimizer_bytes():
    model = nn.Sequential(nn.Linear(C, HIDDEN), nn.Linear(HIDDEN, 2))
    model[0].requires_grad_(False)
    trainable, total = HIDDEN * 2 + 2, C * HIDDEN + HIDDEN + HIDDEN * 2 + 2
    assert memory.trainable_params(model) == (trainable, total)
    assert memory.param_bytes(model) == total * F32
    assert memory.param_bytes(model, trainable_only=True) == memory.grad_bytes(model) == trainable * F32

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    assert memory.optimizer_state_bytes(opt) == 0  # state is created lazily
    model(torch.randn(B, C)).sum().backward()
    opt.step()
    steps = sum(s["step"].numel() * s["step"].element_size() for s in opt.state.values())
    assert memory.optimizer_state_bytes(opt) == 2 * trainable * F32 + steps  # exp_avg, exp_avg_sq, step


# ------------------------------------------------------------------------------------------ on a reprogrammed ViT

def _micro_bsr() -> nn.Module:
    import bsr
    from bsr.core.patch import reprogram

    torch.manual_seed(0)
    model = timm.create_model("vit_micro_patch4_28", pretrained=False)  # 12 blocks, 50 tokens, width 96
    return reprogram(model, bsr.BSRConfig())


def test_reprogrammed_frozen_prefix_saves_nothing():
    model, x = _micro_bsr(), torch.randn(2, 3, 28, 28)
    saved = saved_tensor_bytes(lambda: model(x).sum(), model=model)
    assert saved.total > 0
    assert not any(k in saved.by_block for k in ("patch_embed", "blocks.0", "blocks.1", "blocks.2"))


def test_reprogrammed_forward_macs_follow_the_token_table():
    from bsr.core.ops import token_counts

    model = _micro_bsr()
    width, hidden = 96, 384
    macs = 49 * 3 * 4 * 4 * width + width * 10  # patch embedding, head
    for n_attn, n_mlp in token_counts(50, 12, [3, 6, 9], 0.5, True):
        macs += n_attn * width * 4 * width + 2 * n_attn * n_attn * width  # qkv, proj, Q K^T, P V
        macs += n_mlp * 2 * width * hidden  # fc1, fc2
    # the CLS-row scores and the fused token add well under 1%
    assert flops.fwd_gmacs_per_image(model) == pytest.approx(macs / 1e9, rel=0.01)
