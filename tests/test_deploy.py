"""bsr.deploy: model files that keep BSR's token dropping (safetensors full/delta) and the ONNX export.

A 4-block, 32 px ViT (8 x 8 patches + CLS = 65 tokens), trainable blocks 2-3, drop blocks 1-2 at keep rate 0.5:
tokens (attention, MLP) per block are 65/65, 65/34, 34/19, 19/19. Its trainable weights are perturbed to mimic
training, so an export that silently fell back to the base weights would fail.
"""

from __future__ import annotations

import json
import warnings

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bsr.core import BSRConfig, bsr_state, record_kept_tokens, reprogram
from bsr.deploy import (DELTA_FORMAT, FORMAT, apply_delta, export_onnx, load, read_metadata, save_delta, save_model,
                        state_sha256)
from bsr.errors import BSRError

NAME = "vit_tiny_patch16_224"
KW = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=5)
CFG = dict(trainable_blocks=[2, 3], drop_blocks=[1, 2], keep_rate=0.5)
TOKENS = [(65, 65), (65, 34), (34, 19), (19, 19)]
CLASSES = ["a", "b", "c", "d", "e"]


def _base(seed: int = 0):
    torch.manual_seed(seed)
    model = timm.create_model(NAME, pretrained=False, **KW)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def _trained(preset: str = "paper"):
    """A reprogrammed tiny ViT whose trainable weights moved, and the base state dict it started from."""
    model, base_state = _base()
    reprogram(model, BSRConfig.preset(preset, **CFG))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval(), base_state


def _lora():
    """The tiny ViT with peft LoRA adapters on two layers, the adapters moved away from zero."""
    peft = pytest.importorskip("peft", reason="peft is not installed")
    model, base_state = _base()
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=[
        "blocks.0.attn.qkv", "blocks.1.mlp.fc1"]))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return wrapped.eval(), base_state


def _images(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))


def _forward(model, images):
    with torch.no_grad():
        if bsr_state(model) is None:
            return model(images), {}
        with record_kept_tokens(model) as kept:
            return model(images), {i: [t.clone() for t in v] for i, v in kept.items()}


def _one_line_error(fn, *words):
    with pytest.raises(BSRError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message
    return message


# --- full model file --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["paper", "lean"])
def test_round_trip_gives_the_same_logits_and_kept_tokens(tmp_path, preset):
    model, _ = _trained(preset)
    path = tmp_path / "model.safetensors"
    record = save_model(model, path, class_names=CLASSES, mean=[0.5] * 3, std=[0.25] * 3, extra={"run": "r1"})
    loaded = load(path)

    images = _images()
    logits, kept = _forward(model, images)
    logits2, kept2 = _forward(loaded, images)
    assert torch.equal(logits, logits2)
    assert kept.keys() == kept2.keys() == {1, 2}
    assert all(torch.equal(a, b) for i in kept for a, b in zip(kept[i], kept2[i]))
    assert bsr_state(loaded) == bsr_state(model) and not loaded.training

    meta = read_metadata(path)
    assert meta["format"] == FORMAT and meta["model_name"] == NAME and meta["model_kwargs"] == KW
    assert meta["bsr"]["frozen_dtype"] == ("bfloat16" if preset == "lean" else "float32")
    assert meta["class_names"] == CLASSES and meta["extra"] == {"run": "r1"} and meta["versions"]["timm"]
    assert loaded.pretrained_cfg["label_names"] == CLASSES and loaded.pretrained_cfg["std"] == (0.25,) * 3
    with safe_open(str(path), framework="pt") as f:  # bf16 frozen Linears come back to float32 in the file
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32} and record["tensors"] == len(f.keys())


def test_plain_model_built_without_timm_name(tmp_path):
    """A ViT built by its class needs a timm name that rebuilds it; wrong kwargs are refused at save."""
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(**KW).eval()
    path = tmp_path / "plain.safetensors"
    _one_line_error(lambda: save_model(model, path), "model_name")
    _one_line_error(lambda: save_model(model, path, model_name=NAME, model_kwargs={**KW, "embed_dim": 64}),
                    "does not rebuild", "model_kwargs")
    _one_line_error(lambda: save_model(model, path, model_name=NAME, model_kwargs={**KW, "global_pool": "avg"}),
                    "does not rebuild")
    assert not path.exists()
    save_model(model, path, model_name=NAME)  # the usual kwargs are read from the model
    assert read_metadata(path)["model_kwargs"] == KW
    assert torch.equal(_forward(model, _images())[0], _forward(load(path), _images())[0])


def test_lora_is_merged(tmp_path):
    wrapped, base_state = _lora()
    save_model(wrapped, tmp_path / "lora.safetensors", model_name=NAME, model_kwargs=KW)
    assert any("lora_A" in k for k in wrapped.state_dict())  # the caller's model keeps its adapters
    loaded = load(tmp_path / "lora.safetensors")
    assert bsr_state(loaded) is None and not any("lora" in k for k in loaded.state_dict())
    torch.testing.assert_close(_forward(loaded, _images())[0], _forward(wrapped, _images())[0], atol=1e-5, rtol=0)

    record = save_delta(wrapped, tmp_path / "lora.delta", base_state=base_state, model_name=NAME, model_kwargs=KW)
    with safe_open(record["path"], framework="pt") as f:
        assert set(f.keys()) == {"blocks.0.attn.qkv.weight", "blocks.1.mlp.fc1.weight"}  # merged layers only
    rebuilt = apply_delta(record["path"], base_state)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in rebuilt.state_dict().items())


# --- delta ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["paper", "lean"])
def test_delta_onto_base_equals_full_export(tmp_path, preset):
    model, base_state = _trained(preset)
    save_model(model, tmp_path / "full.safetensors")
    record = save_delta(model, tmp_path / "delta.safetensors", base_state=base_state,
                        base_id=state_sha256(base_state))
    full, rebuilt = load(tmp_path / "full.safetensors"), apply_delta(record["path"], base_state)

    with safe_open(record["path"], framework="pt") as f:  # only what training changed: blocks 2-3, norm, head
        keys = set(f.keys())
    assert keys and all(k.split(".")[0] in ("norm", "head") or k.startswith(("blocks.2.", "blocks.3.")) for k in keys)
    assert record["bytes"] < (tmp_path / "full.safetensors").stat().st_size
    assert read_metadata(record["path"])["format"] == DELTA_FORMAT
    assert rebuilt.blocks[0].norm1.weight.data_ptr() != base_state["blocks.0.norm1.weight"].data_ptr()
    assert full.state_dict().keys() == rebuilt.state_dict().keys()
    assert all(torch.equal(v, rebuilt.state_dict()[k]) for k, v in full.state_dict().items())
    logits, kept = _forward(full, _images())
    logits2, kept2 = _forward(rebuilt, _images())
    assert torch.equal(logits, logits2) and torch.equal(logits, _forward(model, _images())[0])
    assert all(torch.equal(a, b) for i in kept for a, b in zip(kept[i], kept2[i]))


def test_state_sha256_is_deterministic_and_sensitive():
    _, state = _base()
    assert state_sha256(state) == state_sha256(dict(reversed(list(state.items()))))
    assert state_sha256(state) == state_sha256({k: v.to(torch.float64) for k, v in state.items()})
    changed = dict(state, pos_embed=state["pos_embed"].clone().index_fill_(2, torch.tensor([0]), 1.0))
    assert state_sha256(changed) != state_sha256(state)


def test_wrong_base_is_refused_in_one_line(tmp_path):
    model, base_state = _trained()
    path = save_delta(model, tmp_path / "delta.safetensors", base_state=base_state)["path"]
    other = {k: v.clone() for k, v in base_state.items()}
    other["blocks.0.mlp.fc1.weight"][0, 0] += 1e-3  # a frozen weight the delta does not hold
    _one_line_error(lambda: apply_delta(path, other), "base", "sha256")
    _one_line_error(lambda: save_delta(model, tmp_path / "d2", base_state=base_state, base_id="0" * 64), "base_id")
    _one_line_error(lambda: load(path), "apply_delta")


# --- refusals ---------------------------------------------------------------------------------------------------------

def _rewrite(path, out, **doc_changes):
    """Copy a bsr file with its metadata document edited (tensors and their hash unchanged)."""
    with safe_open(str(path), framework="pt") as f:
        tensors, raw = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    doc = {**json.loads(raw["bsr"]), **doc_changes}
    save_file(tensors, str(out), metadata={**raw, "bsr": json.dumps(doc)})
    return out


def _truncate(path, out):
    out.write_bytes(path.read_bytes()[:-100])
    return out


def _flip_last_byte(path, out):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    out.write_bytes(bytes(data))
    return out


REFUSALS = [  # (name, make the bad file from a good one, words the one-line message must hold)
    ("truncated", _truncate, ["corrupt or truncated"]),
    ("bit flip in the weights", _flip_last_byte, ["corrupt", "sha256"]),
    ("not safetensors", lambda p, o: (o.write_bytes(b"\x00" * 64), o)[1], ["not a readable safetensors"]),
    ("plain safetensors", lambda p, o: (save_file({"w": torch.zeros(2)}, str(o)), o)[1], ["not a bsr model file"]),
    ("unknown timm model", lambda p, o: _rewrite(p, o, model_name="vit_nonexistent_patch3"), ["no model named"]),
    ("mismatched keys", lambda p, o: _rewrite(p, o, model_kwargs={"depth": 3}), ["unexpected keys", "does not fit"]),
    ("bad kwargs", lambda p, o: _rewrite(p, o, model_kwargs={"bogus": 1}), ["cannot build"]),
    ("incomplete metadata", lambda p, o: _rewrite(p, o, model_kwargs=None), ["incomplete", "export it again"]),
    ("future format", lambda p, o: _rewrite(p, o, format="bsr-model-9"), ["upgrade bsr"]),
    ("missing", lambda p, o: o, ["does not exist"]),
]


@pytest.mark.parametrize("make_bad, words", [c[1:] for c in REFUSALS], ids=[c[0] for c in REFUSALS])
def test_bad_files_are_refused_in_one_line(tmp_path, make_bad, words):
    model, _ = _trained()
    good = tmp_path / "good.safetensors"
    save_model(model, good)
    bad = make_bad(good, tmp_path / "bad.safetensors")
    _one_line_error(lambda: load(bad), *words)


# --- ONNX -------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, kept_tokens", [("paper", True), ("paper", False), ("lora", False)])
def test_onnx_export_matches_pytorch_and_keeps_the_drop(tmp_path, kind, kept_tokens):
    onnx = pytest.importorskip("onnx", reason="onnx is not installed (optional: pip install onnx onnxruntime)")
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (optional: pip install onnxruntime)")
    from bsr.deploy import onnx_token_counts, verify_onnx

    model, _ = _lora() if kind == "lora" else _trained(kind)
    path = tmp_path / "model.onnx"
    record = export_onnx(model, path, kept_tokens=kept_tokens)
    assert record["outputs"] == (["logits", "kept_1", "kept_2"] if kept_tokens else ["logits"])
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    for batch in (1, 3):  # one file, dynamic batch
        result = verify_onnx(model, path, _images(batch))
        assert result["batch"] == batch and result["max_abs_diff"] < 1e-4 and result["top1_agreement"] == 1.0, result
        assert result.get("kept_agreement", 1.0) == 1.0, result
    expected = TOKENS if kind != "lora" else [(65, 65)] * 4
    assert record["tokens"] == expected and onnx_token_counts(path, _images(2)) == expected


def test_onnx_of_lean_model_runs_in_float32(tmp_path):
    """bf16 frozen Linears export as float32 Linears with bf16-rounded weights (no bf16 matmul in onnxruntime)."""
    pytest.importorskip("onnx", reason="onnx is not installed (optional: pip install onnx onnxruntime)")
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (optional: pip install onnxruntime)")
    from bsr.deploy import onnx_token_counts, verify_onnx

    model, _ = _trained("lean")
    export_onnx(model, tmp_path / "lean.onnx")
    result = verify_onnx(model, tmp_path / "lean.onnx", _images(3))
    assert result["max_abs_diff"] < 5e-2 and result["top1_agreement"] == 1.0, result
    assert onnx_token_counts(tmp_path / "lean.onnx", _images(1)) == TOKENS
    assert next(model.blocks[0].attn.qkv.parameters()).dtype == torch.bfloat16  # the caller's model is unchanged


def test_onnx_ranking_breaks_ties_like_the_stable_sort(tmp_path):
    """ONNX TopK ranks equal scores by lower index, as `torch.sort(stable=True)` in `bsr.core.ops` does."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (optional: pip install onnxruntime)")
    from bsr.core.ops import drop_tokens
    from bsr.deploy.onnx_export import _session

    class Drop(torch.nn.Module):
        def forward(self, x, scores):
            return drop_tokens(x, scores, 0.5, True, static=True)

    x = torch.randn(2, 9, 4)
    scores = torch.tensor([[0.1, 0.3, 0.3, 0.1, 0.3, 0.2, 0.1, 0.3], [0.2] * 8])  # ties everywhere
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice, the static-count TracerWarning
        torch.onnx.export(Drop(), (x, scores), str(tmp_path / "drop.onnx"), dynamo=False, opset_version=17,
                          input_names=["x", "scores"], output_names=["y", "keep"])
    y, keep = _session(tmp_path / "drop.onnx").run(None, {"x": x.numpy(), "scores": scores.numpy()})
    y_ref, keep_ref = drop_tokens(x, scores, 0.5, True)
    assert (keep == keep_ref.numpy()).all()
    torch.testing.assert_close(torch.from_numpy(y), y_ref, atol=1e-6, rtol=0)
