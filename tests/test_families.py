"""BSR on today's ViT families, each shrunk to a few blocks: register tokens, heads without a class token (average
and attention pooling, SigLIP), and timm's `Eva` (EVA-02, Perception Encoder: rotary embedding, SwiGLU). Every
family gets ViT's checks: host parity at keep rate 1, `restore`, which parameters train, tokens per block, a drop
block against a reference built from the host's own modules, and the ONNX export."""

import copy

import pytest
import timm
import torch

import bsr
from bsr import BSRConfig, BSRError
from bsr.core.drop import follow_positions
from conftest import images_for, logits_and_grads

# name -> (timm model, kwargs, resolved token score, prefix tokens)
FAMILIES = {
    "dinov2-reg4": ("vit_small_patch14_reg4_dinov2", dict(img_size=28, patch_size=7, embed_dim=48, num_heads=2),
                    "cls", 5),
    "siglip-map": ("vit_base_patch16_siglip_224", dict(img_size=32, patch_size=8, embed_dim=48, num_heads=3),
                   "mean", 0),
    "reg4-gap": ("vit_base_patch16_reg4_gap_256", dict(img_size=32, patch_size=8, embed_dim=48, num_heads=3),
                 "mean", 4),
    "eva02": ("eva02_small_patch14_224", dict(img_size=28, patch_size=7, embed_dim=48, num_heads=3), "mean", 1),
    "pe-core": ("vit_pe_core_base_patch16_224", dict(img_size=32, patch_size=8, embed_dim=48, num_heads=3),
                "mean", 1),
    "eva02-unfused": ("eva02_small_patch14_224", dict(img_size=28, patch_size=7, embed_dim=48, num_heads=3),
                      "mean", 1),
}
CFG = dict(trainable_blocks="1,3", drop_blocks="1,2", keep_rate=0.5)


def make(family: str):
    name, kwargs, _, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, depth=4, num_classes=5, **kwargs)
    with torch.no_grad():  # timm zero-inits some parameters (PE's attention-pool latent, biases): make all count
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    if family.endswith("unfused"):
        for blk in model.blocks:
            blk.attn.fused_attn = False
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_keep_rate_one_is_the_host(family):
    model = make(family)
    ref = copy.deepcopy(model)
    x = images_for(model)
    bsr.reprogram(model, BSRConfig(trainable_blocks="all", keep_rate=1.0))
    out, grads = logits_and_grads(model, x)
    ref_out, ref_grads = logits_and_grads(ref, x)
    assert torch.equal(out, ref_out)
    embedding = ("patch_embed.", "norm_pre.", "cls_token", "pos_embed", "reg_token")  # frozen by default
    frozen = {n for n in ref_grads if n.startswith(embedding)}
    assert grads.keys() == ref_grads.keys() - frozen and all(torch.equal(grads[n], ref_grads[n]) for n in grads)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_restore_is_exact(family):
    model = make(family)
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    bsr.reprogram(model, BSRConfig(**CFG))
    assert list(model.state_dict()) == keys
    model(images_for(model)).sum().backward()
    bsr.restore(model)
    assert type(model) is type(ref) and [type(b) for b in model.blocks] == [type(b) for b in ref.blocks]
    assert not any(k.startswith("_bsr") for b in model.blocks for k in vars(b))
    model.eval(), ref.eval()
    assert torch.equal(model(images_for(model)), ref(images_for(ref)))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_only_trained_blocks_norms_pool_and_head_get_gradients(family):
    model = bsr.reprogram(make(family), BSRConfig(**CFG))
    model(images_for(model)).logsumexp(-1).sum().backward()
    trained = ("blocks.1.", "blocks.3.", "norm.", "fc_norm.", "attn_pool.", "head.")
    for name, p in model.named_parameters():
        if name.startswith(trained):
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tokens_per_block_keep_the_prefix(family):
    _, _, score, prefix = FAMILIES[family]
    model = bsr.reprogram(make(family), BSRConfig(**CFG))
    patches = model.patch_embed.num_patches  # 16
    summary = bsr.summary(model)
    after_1 = prefix + 8 + 1  # half the 16 patches, the fused token
    after_2 = prefix + 5 + 1  # ceil(0.5 * 9) of the 8 kept + fused
    assert summary.tokens == [(prefix + patches,) * 2, (prefix + patches, after_1), (after_1, after_2),
                              (after_2, after_2)]
    assert bsr.bsr_state(model).token_score == score and "prefix tokens (never dropped)" in str(summary)
    seen = []
    for blk in model.blocks:
        blk.mlp.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    captured = []
    model.blocks[3].register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    x = images_for(model)
    model(x)
    assert seen == [m for _, m in summary.tokens]
    host = copy.deepcopy(model)
    bsr.restore(host)
    prefix_in = host._pos_embed(host.patch_embed(x))
    prefix_in = prefix_in[0] if isinstance(prefix_in, tuple) else prefix_in
    if prefix:  # the prefix tokens ran through every block at their own positions: never dropped or moved
        assert captured[0].shape[1] == after_2
        assert not torch.equal(captured[0][:, :prefix], prefix_in[:, :prefix])  # they did change (sanity)


def _probs_of(blk, x, rope):
    """The host attention's full probability matrix (B, H, N, N), read from its unfused path."""
    attn = copy.deepcopy(blk.attn)
    attn.fused_attn = False
    got = []
    attn.attn_drop.register_forward_hook(lambda m, i, o: got.append(i[0]))
    attn(blk.norm1(x)) if rope is None and not hasattr(attn, "num_prefix_tokens") else attn(blk.norm1(x), rope=rope)
    return got[0]


def _reference(host, x, drops, score, prefix, keep_rate):
    """Logits of `host` (unpatched) with BSR's drop done by hand between the host modules: scores from the full
    attention matrix, top-k, the fused token, and for Eva the rotary rows of the kept tokens."""
    eva = hasattr(host, "rope")
    x = host.patch_embed(x)
    x, rope = host._pos_embed(x) if eva else (host.norm_pre(host._pos_embed(x)), None)
    if eva:
        x = host.norm_pre(x)
    for i, blk in enumerate(host.blocks):
        if i not in drops:
            x = blk(x, rope=rope) if eva else blk(x)
            continue
        probs = _probs_of(blk, x, rope).mean(1)  # (B, N, N)
        scores = probs[:, 0, prefix:] if score == "cls" else probs.mean(1)[:, prefix:]
        a = blk.attn(blk.norm1(x), rope=rope) if eva else blk.attn(blk.norm1(x))
        y = x + (blk.gamma_1 * a if eva and blk.gamma_1 is not None else a if eva else blk.ls1(a))
        n = scores.shape[1]
        k = -(-n * keep_rate // 1)
        k = int(k)
        order = torch.argsort(scores, dim=1, descending=True, stable=True)
        keep, drop = order[:, :k].sort(1).values, order[:, k:].sort(1).values
        rows = torch.arange(x.shape[0])[:, None]
        fused = (scores[rows, drop].unsqueeze(-1) * y[rows, drop + prefix]).sum(1, keepdim=True)
        y = torch.cat([y[:, :prefix], y[rows, keep + prefix], fused], 1)
        if eva and rope is not None:
            rope = follow_positions(rope, keep, fused=True)
        m = blk.mlp(blk.norm2(y))
        x = y + (blk.gamma_2 * m if eva and blk.gamma_2 is not None else m if eva else blk.ls2(m))
    return host.forward_head(host.norm(x))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_drop_blocks_match_a_reference_from_host_modules(family):
    _, _, score, prefix = FAMILIES[family]
    model = make(family).eval()
    host = copy.deepcopy(model)
    bsr.reprogram(model, BSRConfig(trainable_blocks="all", drop_blocks="1,2", keep_rate=0.4))
    x = images_for(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference(host, x, {1, 2}, score, prefix, 0.4), atol=1e-5, rtol=1e-5)


def test_rotary_rows_follow_the_kept_tokens():
    table = torch.arange(12.0).reshape(3, 4)  # 3 patches, sin | cos halves of width 2
    out = follow_positions(table, torch.tensor([[0, 2], [1, 2]]), fused=True)
    assert out.shape == (2, 1, 3, 4)
    assert out[0, 0, :2].tolist() == [table[0].tolist(), table[2].tolist()]
    assert out[1, 0, :2].tolist() == [table[1].tolist(), table[2].tolist()]
    assert out[:, 0, 2].tolist() == [[0.0, 0.0, 1.0, 1.0]] * 2  # the fused token: the identity rotation
    again = follow_positions(out, torch.tensor([[2], [0]]), fused=False)  # batched table, second drop
    assert again[:, 0, 0].tolist() == [[0.0, 0.0, 1.0, 1.0], table[1].tolist()]


def test_cls_rule_on_a_mean_pooled_model_and_mean_rule_on_dinov2_both_run():
    model = bsr.reprogram(make("eva02"), BSRConfig(**CFG, token_score="cls"))
    assert bsr.bsr_state(model).token_score == "cls"
    model(images_for(model)).sum().backward()
    model = bsr.reprogram(make("dinov2-reg4"), BSRConfig(**CFG, token_score="mean"))
    assert bsr.bsr_state(model).token_score == "mean"
    model(images_for(model)).sum().backward()


@pytest.mark.parametrize("family", ["dinov2-reg4", "siglip-map", "eva02", "pe-core"])
def test_recompute_and_frozen_prefix_give_the_same_logits_and_grads(family):
    model = bsr.reprogram(make(family), BSRConfig(**CFG))
    x = images_for(model)
    out, grads = logits_and_grads(model, x)
    ref = bsr.reprogram(bsr.restore(copy.deepcopy(model)), BSRConfig(**CFG, recompute="all"))
    out_r, grads_r = logits_and_grads(ref, x)
    torch.testing.assert_close(out_r, out)
    assert grads_r.keys() == grads.keys() and all(torch.allclose(grads_r[n], grads[n], atol=1e-6) for n in grads)


@pytest.mark.parametrize("family", ["dinov2-reg4", "siglip-map", "eva02"])  # registers, no class token, RoPE
def test_onnx_export_matches_pytorch(tmp_path, family):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (optional: pip install onnxruntime)")
    from bsr.deploy import export_onnx, onnx_token_counts, verify_onnx

    model = bsr.reprogram(make(family), BSRConfig(**CFG)).eval()
    record = export_onnx(model, tmp_path / "m.onnx", kept_tokens=True)
    for batch in (1, 3):
        result = verify_onnx(model, tmp_path / "m.onnx", images_for(model, batch))
        assert result["max_abs_diff"] < 1e-4 and result["kept_agreement"] == 1.0, result
    assert record["tokens"] == bsr.summary(model).tokens == onnx_token_counts(tmp_path / "m.onnx", images_for(model, 2))


@pytest.mark.parametrize("build,match", [
    (lambda: timm.create_model("eva02_small_patch14_224", img_size=28, patch_size=7, embed_dim=48, num_heads=3,
                               depth=4, use_post_norm=True), "EvaBlockPostNorm"),
    (lambda: timm.create_model("vit_base_patch16_rope_mixed_224", img_size=32, patch_size=8, embed_dim=48,
                               num_heads=3, depth=4), "rope_type='mixed'"),
    (lambda: timm.create_model("eva02_small_patch14_224", img_size=28, patch_size=7, embed_dim=48, num_heads=3,
                               depth=4, global_pool="avgmax"), "global_pool='avgmax'"),
    (lambda: timm.create_model("convnext_atto"), "needs a timm VisionTransformer .* or Eva"),
])
def test_families_that_cannot_drop_tokens_are_refused_in_one_line(build, match):
    with pytest.raises(BSRError, match=match) as info:
        bsr.reprogram(build(), BSRConfig(**CFG))
    assert "\n" not in str(info.value)
