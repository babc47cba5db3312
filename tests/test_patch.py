"""`bsr.reprogram` / `bsr.restore` on tiny timm ViTs: parity, freezing, dropping, host features, refusals."""

import copy

import pytest
import timm
import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

import bsr
from bsr import BSRConfig, BSRError
from bsr.core.ops import cls_attention_scores
from conftest import images_for, logits_and_grads

# (name, timm kwargs): the families the patch promises, shrunk to 4-6 blocks and 16-32 px.
MODELS = {
    "vit": dict(model_name="vit_tiny_patch16_224", img_size=32, patch_size=4, depth=4, num_heads=3),
    "deit3-layerscale": dict(model_name="deit3_small_patch16_224", img_size=32, patch_size=8, depth=4,
                             embed_dim=48, num_heads=3),
    "dinov2-like": dict(model_name="vit_small_patch14_dinov2", img_size=28, patch_size=7, depth=5, embed_dim=48,
                        num_heads=2),
    "qk-norm": dict(model_name="vit_tiny_patch16_224", img_size=24, patch_size=4, depth=4, qk_norm=True),
    "unfused-attn": dict(model_name="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4),
}
SMALL_CFG = dict(trainable_blocks="1,3", drop_blocks="1,2", keep_rate=0.5)


def make(case: str, num_classes: int = 5, **extra) -> VisionTransformer:
    kwargs = dict(MODELS[case], num_classes=num_classes, **extra)
    torch.manual_seed(0)
    model = timm.create_model(kwargs.pop("model_name"), **kwargs)
    if case == "unfused-attn":
        for blk in model.blocks:
            blk.attn.fused_attn = False
    return model


@pytest.mark.parametrize("case", list(MODELS))
def test_keep_rate_one_all_trainable_is_the_host(case):
    model = make(case)
    ref = copy.deepcopy(model)
    x = images_for(model)
    bsr.reprogram(model, BSRConfig(trainable_blocks="all", keep_rate=1.0))
    assert type(model) is type(ref) and all(type(b) is Block for b in model.blocks)  # host's exact path
    out, grads = logits_and_grads(model, x)
    ref_out, ref_grads = logits_and_grads(ref, x)
    assert torch.equal(out, ref_out)
    # Patch embedding, CLS token and position embedding stay frozen (SPEC section 1); all else matches the host.
    frozen = {n for n in ref_grads if n.startswith(("patch_embed.", "cls_token", "pos_embed", "reg_token"))}
    assert grads.keys() == ref_grads.keys() - frozen
    assert all(torch.equal(grads[n], ref_grads[n]) for n in grads)


@pytest.mark.parametrize("case", list(MODELS))
def test_restore_gives_back_the_original_model(case):
    model = make(case)
    ref = copy.deepcopy(model)
    x = images_for(model)
    keys = list(model.state_dict())
    bsr.reprogram(model, BSRConfig(**SMALL_CFG))
    assert list(model.state_dict()) == keys
    model(x).sum().backward()
    bsr.restore(model)
    assert type(model) is type(ref) and [type(b) for b in model.blocks] == [type(b) for b in ref.blocks]
    assert all(p.requires_grad for p in model.parameters())
    assert not any(k.startswith("_bsr") for b in model.blocks for k in vars(b))
    model.eval(), ref.eval()
    assert torch.equal(model(x), ref(x))


@pytest.mark.parametrize("case", list(MODELS))
def test_only_trainable_blocks_norm_and_head_get_gradients(case):
    model = bsr.reprogram(make(case), BSRConfig(**SMALL_CFG))
    model(images_for(model)).logsumexp(-1).sum().backward()
    trainable_prefixes = ("blocks.1.", "blocks.3.", "norm.", "fc_norm.", "head.")
    for name, p in model.named_parameters():
        if name.startswith(trainable_prefixes):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def _mlp_token_counts(model, x):
    seen = []
    hooks = [b.mlp.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1])) for b in model.blocks]
    model(x)
    for h in hooks:
        h.remove()
    return seen


def test_token_table_vit_b16_224():
    model = timm.create_model("vit_base_patch16_224", num_classes=10)
    bsr.reprogram(model, BSRConfig())
    table = bsr.summary(model).tokens
    assert table == [(197, 197)] * 3 + [(197, 100), (100, 100), (100, 100), (100, 52), (52, 52), (52, 52),
                                        (52, 28), (28, 28), (28, 28)]
    model.eval()
    with torch.no_grad():
        assert _mlp_token_counts(model, torch.randn(1, 3, 224, 224)) == [m for _, m in table]
    assert bsr.summary(model).trainable_params == 3 * 7_087_872 + 768 * 2 + 7_690


def test_token_table_small_image_model():
    model = bsr.reprogram(timm.create_model("vit_micro_patch4_28"), BSRConfig())
    table = bsr.summary(model).tokens  # 7 x 7 patches + CLS = 50 tokens
    assert table == [(50, 50)] * 3 + [(50, 27), (27, 27), (27, 27), (27, 15), (15, 15), (15, 15), (15, 9),
                                      (9, 9), (9, 9)]
    assert _mlp_token_counts(model, torch.randn(2, 3, 28, 28)) == [m for _, m in table]
    assert "trainable params" in str(bsr.summary(model))


def test_depth_other_than_twelve_and_last_k_spec():
    model = make("vit")  # depth 4
    bsr.reprogram(model, BSRConfig(trainable_blocks="last:2", drop_blocks="0,2", keep_rate=0.25))
    assert bsr.bsr_state(model).trainable_blocks == [2, 3]
    assert [m for _, m in bsr.summary(model).tokens] == [1 + 16 + 1, 18, 1 + 5 + 1, 7]


def _host_cls_scores(block, x):
    """Brute force: the block's full attention matrix via the explicit path, CLS row, mean over heads."""
    attn = block.attn
    B, N, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    full = ((attn.q_norm(q) @ attn.k_norm(k).transpose(-2, -1)) * attn.scale).softmax(-1)  # (B, H, N, N)
    return full.mean(1)[:, 0, 1:]


@pytest.mark.parametrize("case", ["vit", "qk-norm", "unfused-attn"])
def test_dropped_tokens_are_the_lowest_scoring(case):
    model = bsr.reprogram(make(case), BSRConfig(trainable_blocks="all", drop_blocks="1", keep_rate=0.4))
    x = images_for(model)
    block_inputs = []
    model.blocks[1].register_forward_pre_hook(lambda m, a: block_inputs.append(a[0]))
    with bsr.record_kept_tokens(model) as kept:
        model(x)
    scores = _host_cls_scores(model.blocks[1], block_inputs[0])
    keep = kept[1][0]
    for b in range(x.shape[0]):
        dropped = [i for i in range(scores.shape[1]) if i not in keep[b].tolist()]
        assert scores[b, keep[b]].min() >= scores[b, dropped].max()


def test_kept_patch_indices_follow_successive_drops():
    model = bsr.reprogram(make("vit"), BSRConfig(trainable_blocks="all", drop_blocks="0,1,2", keep_rate=0.5))
    with bsr.record_kept_tokens(model) as kept:
        model(images_for(model, batch=2))
    patches = bsr.kept_patch_indices([kept[i][0] for i in (0, 1, 2)], num_patches=64)
    assert [p.shape[1] for p in patches] == [32, 17, 9]
    for earlier, later in zip(patches, patches[1:]):  # a kept patch was kept by every earlier drop block
        for b in range(2):
            assert set(later[b].tolist()) - {-1} <= set(earlier[b].tolist())
    for p in patches:
        assert ((p >= -1) & (p < 64)).all()
    assert (patches[0] >= 0).all()  # no fused token exists before the first drop block


def test_block_output_matches_manual_reference():
    """A drop block's output equals the host block's ops with the reference drop applied in between."""
    model = bsr.reprogram(make("deit3-layerscale"), BSRConfig(trainable_blocks="all", drop_blocks="2",
                                                              keep_rate=0.5))
    model.eval()
    blk, x = model.blocks[2], torch.randn(2, 17, 48)
    y = x + blk.ls1(Attention.forward(blk.attn, blk.norm1(x)))
    scores = _host_cls_scores(blk, x)
    keep = torch.argsort(scores, dim=1, descending=True)[:, :8].sort(dim=1).values
    drop = torch.stack([torch.tensor([i for i in range(16) if i not in row]) for row in keep.tolist()])
    rows = torch.arange(2)[:, None]
    fused = (scores[rows, drop].unsqueeze(-1) * y[rows, drop + 1]).sum(1, keepdim=True)
    z = torch.cat([y[:, :1], y[rows, keep + 1], fused], 1)
    ref = z + blk.ls2(blk.mlp(blk.norm2(z)))
    with torch.no_grad():
        torch.testing.assert_close(blk(x), ref)


def test_drop_in_eval_switch():
    model = make("vit")
    ref = copy.deepcopy(model).eval()
    bsr.reprogram(model, BSRConfig(**SMALL_CFG, drop_in_eval=False))
    x = images_for(model)
    model.eval()
    assert torch.equal(model(x), ref(x))
    assert _mlp_token_counts(model, x)[2] == 65
    model.train()
    assert _mlp_token_counts(model, x)[2] < 65


def _saved_storages(fn):
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


def test_frozen_prefix_records_no_autograd_state():
    model = bsr.reprogram(make("vit"), BSRConfig(trainable_blocks="2,3", drop_blocks="1", keep_rate=0.5))
    outputs = {}
    for i, blk in enumerate(model.blocks):
        blk.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o))
    saved, _ = _saved_storages(lambda: model(images_for(model)))
    assert outputs[1].grad_fn is None and not outputs[1].requires_grad  # blocks 0-1 ran without autograd
    assert outputs[2].requires_grad


def test_frozen_block_after_trainable_saves_only_what_input_grad_needs():
    model = bsr.reprogram(make("vit"), BSRConfig(trainable_blocks="1,3", drop_blocks="none", keep_rate=1.0))
    frozen = model.blocks[2]
    captured = {}
    frozen.norm1.register_forward_hook(lambda m, a, o: captured.__setitem__("norm1_out", o))
    frozen.mlp.fc1.register_forward_pre_hook(lambda m, a: captured.__setitem__("fc1_in", a[0]))
    frozen.mlp.fc2.register_forward_pre_hook(lambda m, a: captured.__setitem__("fc2_in", a[0]))
    saved, out = _saved_storages(lambda: model(images_for(model)))
    for name, t in captured.items():  # inputs of frozen Linears are only needed for weight gradients
        assert t.untyped_storage().data_ptr() not in saved, name
    out.sum().backward()
    assert model.blocks[1].attn.qkv.weight.grad is not None


def test_gradient_checkpointing_gives_the_same_logits_and_grads():
    model = bsr.reprogram(make("vit"), BSRConfig(**SMALL_CFG))
    x = images_for(model)
    out, grads = logits_and_grads(model, x)
    model.set_grad_checkpointing(True)
    out_ckpt, grads_ckpt = logits_and_grads(model, x)
    torch.testing.assert_close(out_ckpt, out)
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(dtype):
    model = bsr.reprogram(make("vit"), BSRConfig(**SMALL_CFG))
    x = images_for(model)
    ref = model(x)
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
    out.float().sum().backward()
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=0.2, rtol=0.1)
    assert model.blocks[1].attn.qkv.weight.grad is not None


def test_torch_compile_runs_forward_and_backward():
    model = bsr.reprogram(make("vit"), BSRConfig(**SMALL_CFG))
    x = images_for(model)
    ref = model(x)
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    assert model.blocks[3].mlp.fc2.weight.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model = bsr.reprogram(make("vit"), BSRConfig(**SMALL_CFG)).eval()
    x = images_for(model)
    torch.testing.assert_close(model.cuda()(x.cuda()).cpu(), model.cpu()(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("config,match", [
    (dict(trainable_blocks="3,9"), "trainable_blocks has block index 9"),
    (dict(trainable_blocks="1", drop_blocks="4"), "drop_blocks has block index 4"),
    (dict(trainable_blocks="last:7"), "asks for 7 blocks"),
])
def test_out_of_range_blocks_are_refused(config, match):
    with pytest.raises(BSRError, match=match):
        bsr.reprogram(make("vit"), BSRConfig(**config))


@pytest.mark.parametrize("keep_rate", [0.0, -0.5, 1.5, float("nan"), "half"])
def test_keep_rate_outside_range_is_refused(keep_rate):
    with pytest.raises(BSRError, match="keep_rate"):
        BSRConfig(keep_rate=keep_rate)


@pytest.mark.parametrize("spec", ["3;7", "last:x", "middle:2", "a,b"])
def test_malformed_block_spec_is_refused(spec):
    with pytest.raises(BSRError, match="not a block spec"):
        BSRConfig(trainable_blocks=spec)


@pytest.mark.parametrize("build,match", [
    (lambda: torch.nn.Linear(2, 2), "needs a timm VisionTransformer"),
    (lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, global_pool="max"),
     "global_pool='max'"),
    (lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, global_pool=""),
     "global_pool=''"),
    (lambda: timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=8, depth=4, reg_tokens=4),
     "1 patch token"),
    (lambda: timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4,
                               block_fn=timm.models.vision_transformer.ResPostBlock), "ResPostBlock"),
])
def test_unsupported_hosts_are_refused(build, match):
    with pytest.raises(BSRError, match=match):
        bsr.reprogram(build(), BSRConfig(trainable_blocks="1", drop_blocks="2"))


def test_class_token_rule_needs_a_class_token():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, class_token=False,
                              global_pool="avg")
    with pytest.raises(BSRError, match="token_score='cls' needs a class token"):
        bsr.reprogram(model, BSRConfig(trainable_blocks="1", drop_blocks="2", token_score="cls"))


def test_registers_and_avg_pool_are_fine_without_dropping():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, reg_tokens=2,
                              global_pool="avg")
    bsr.reprogram(model, BSRConfig(trainable_blocks="2,3", keep_rate=1.0))
    model(torch.randn(2, 3, 32, 32)).sum().backward()


def test_attention_masks_and_double_patching_are_refused():
    model = bsr.reprogram(make("vit"), BSRConfig(**SMALL_CFG))
    with pytest.raises(BSRError, match="attention masks"):
        model(images_for(model), attn_mask=torch.zeros(65, 65, dtype=torch.bool))
    with pytest.raises(BSRError, match="already reprogrammed"):
        bsr.reprogram(model, BSRConfig())
    bsr.restore(model)
    with pytest.raises(BSRError, match="not reprogrammed"):
        bsr.restore(model)


def test_score_grad_off_detaches_scores():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 5, 4, requires_grad=True), torch.randn(1, 2, 5, 4, requires_grad=True)
    assert cls_attention_scores(q, k, 0.5).requires_grad
    model = bsr.reprogram(make("vit"), BSRConfig(**SMALL_CFG, score_grad=False))
    model(images_for(model)).sum().backward()
    assert model.blocks[1].attn.qkv.weight.grad is not None


@pytest.mark.parametrize("recompute", ["first", "all"])
def test_recompute_gives_the_same_logits_and_grads(recompute):
    model = bsr.reprogram(make("vit"), BSRConfig(**SMALL_CFG))
    x = images_for(model)
    out, grads = logits_and_grads(model, x)
    bsr.restore(model)
    bsr.reprogram(model, BSRConfig(**SMALL_CFG, recompute=recompute))
    out_r, grads_r = logits_and_grads(model, x)
    torch.testing.assert_close(out_r, out)
    assert grads_r.keys() == grads.keys()
    for n in grads:
        torch.testing.assert_close(grads_r[n], grads[n])


def test_recompute_all_keeps_only_block_inputs():
    model = bsr.reprogram(make("vit"), BSRConfig(**SMALL_CFG))
    plain, _ = _saved_storages(lambda: model(images_for(model)))
    bsr.restore(model)
    bsr.reprogram(model, BSRConfig(**SMALL_CFG, recompute="all"))
    lean, _ = _saved_storages(lambda: model(images_for(model)))
    nbytes = lambda saved: sum(t.untyped_storage().nbytes() for t in saved.values()  # noqa: E731
                               if not isinstance(t, torch.nn.Parameter))
    assert nbytes(lean) < nbytes(plain) / 3


def test_low_precision_frozen_weights():
    model = make("vit")
    ref = copy.deepcopy(model)
    bsr.reprogram(model, BSRConfig(**SMALL_CFG, frozen_dtype="bfloat16"))
    assert model.blocks[0].mlp.fc1.weight.dtype == torch.bfloat16  # frozen block
    assert model.blocks[2].attn.qkv.weight.dtype == torch.bfloat16
    assert model.blocks[1].attn.qkv.weight.dtype == torch.float32  # trainable block
    x = images_for(model)
    bsr.reprogram(ref, BSRConfig(**SMALL_CFG))
    out, grads = logits_and_grads(model, x)
    ref_out, ref_grads = logits_and_grads(ref, x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, atol=0.05, rtol=0.05)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        cos = torch.nn.functional.cosine_similarity(grads[n].flatten(), ref_grads[n].flatten(), dim=0)
        assert cos > 0.99, n
    # backward keeps the bf16 parameter, never an fp32 copy of a frozen weight
    saved, _ = _saved_storages(lambda: model(x))
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    numel = model.blocks[2].mlp.fc1.weight.numel()
    assert not [ptr for ptr, t in saved.items() if t.numel() == numel and ptr not in param_storages]
    bsr.restore(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert type(model.blocks[0].mlp.fc1) is torch.nn.Linear


def test_lean_preset_trains_under_autocast():
    model = bsr.reprogram(make("vit"), BSRConfig.preset("lean", **SMALL_CFG))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images_for(model))
    out.float().sum().backward()
    assert model.blocks[1].attn.qkv.weight.grad is not None
    with pytest.raises(BSRError, match="unknown BSR preset"):
        BSRConfig.preset("tiny")
    with pytest.raises(BSRError, match="frozen_dtype"):
        BSRConfig(frozen_dtype="int4")
