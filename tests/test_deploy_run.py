"""Deploying a trained run (issue 13): `bsr export` formats, `bsr.load`, deltas against the run's base, the ONNX
export checked against PyTorch on the run's test images, and `bsr predict` on a run and on exported files.

One tiny BSR run of the micro model (28 px: 49 patches + CLS, drop blocks 3, 6, 9) is trained once per module.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import bsr
from bsr.cli import EXIT_USER_ERROR, main
from bsr.core import bsr_state, record_kept_tokens
from bsr.deploy import apply_delta, read_metadata
from bsr.errors import BSRError
from bsr.train import load_run
from bsr.train.config import TrainConfig
from bsr.train.deploy import _check_options, base_state, verify_images

TINY = ["--model", "vit_micro_patch4_28", "--limit", "32", "--batch-size", "16", "--steps", "2", "--eval-every", "2",
        "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """The run exported once as a full bsr file and as a delta."""
    d = tmp_path_factory.mktemp("exported")
    assert main(["export", str(run), str(d / "model.safetensors")]) == 0
    assert main(["export", str(run), str(d / "delta.safetensors"), "--delta"]) == 0
    return d


def _forward(model, images):
    with torch.no_grad(), record_kept_tokens(model) as kept:
        logits = model(images)
    return logits, {i: [t.clone() for t in v] for i, v in kept.items()}


def _run_model_and_images(run):
    cfg, model = load_run(run, torch.device("cpu"))
    return model, verify_images(cfg, 28)[0]


def test_export_and_reload_equals_the_runs_eval_logits_and_kept_tokens(run, exported, capsys):
    model, images = _run_model_and_images(run)
    loaded = bsr.load(exported / "model.safetensors")
    logits, kept = _forward(model, images)
    logits2, kept2 = _forward(loaded, images)
    assert torch.equal(logits, logits2)
    assert kept.keys() == kept2.keys() == {3, 6, 9}
    assert all(torch.equal(a, b) for i in kept for a, b in zip(kept[i], kept2[i]))
    assert bsr_state(loaded) == bsr_state(model) and not loaded.training

    meta = read_metadata(exported / "model.safetensors")
    cfg = loaded.pretrained_cfg
    assert meta["model_name"] == "vit_micro_patch4_28" and meta["extra"]["method"] == "bsr"
    assert cfg["label_names"] == [str(i) for i in range(10)] and cfg["input_size"] == (3, 28, 28)
    assert list(cfg["mean"]) == meta["mean"] and meta["bsr"]["drop_blocks"] == [3, 6, 9]


def test_half_precision_export_is_half_the_size_and_close(run, exported, tmp_path):
    assert main(["export", str(run), str(tmp_path / "half.safetensors"), "--dtype", "fp16"]) == 0
    full = (exported / "model.safetensors").stat().st_size
    assert (tmp_path / "half.safetensors").stat().st_size < 0.55 * full
    model, images = _run_model_and_images(run)
    torch.testing.assert_close(bsr.load(tmp_path / "half.safetensors")(images), model(images), atol=5e-2, rtol=0)


def test_delta_onto_base_equals_the_full_export(run, exported):
    delta = exported / "delta.safetensors"
    with safe_open(str(delta), framework="pt") as f:
        keys = set(f.keys())
    # only what training changed: the trainable blocks (3-11 by default), the final norm and the head
    assert keys and all(k.startswith(("norm.", "head.")) or int(k.split(".")[1]) >= 3 for k in keys)
    assert not any(k.startswith(("blocks.0.", "patch_embed.", "pos_embed", "cls_token")) for k in keys)
    assert delta.stat().st_size < (exported / "model.safetensors").stat().st_size
    full, rebuilt = bsr.load(exported / "model.safetensors"), apply_delta(delta, base_state(run))
    assert full.state_dict().keys() == rebuilt.state_dict().keys()
    assert all(torch.equal(v, rebuilt.state_dict()[k]) for k, v in full.state_dict().items())
    _, images = _run_model_and_images(run)
    assert torch.equal(_forward(full, images)[0], _forward(rebuilt, images)[0])


def test_a_wrong_base_is_refused_in_one_line(run, exported):
    other = base_state(run)
    other["blocks.0.attn.qkv.weight"][0, 0] += 1e-3  # a frozen weight the delta does not hold
    with pytest.raises(BSRError) as info:
        apply_delta(exported / "delta.safetensors", other)
    assert "\n" not in str(info.value) and "sha256" in str(info.value) and "base" in str(info.value)


def test_onnx_export_of_a_run_matches_pytorch(run, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (optional: pip install onnxruntime)")
    from bsr.deploy import onnx_token_counts, read_onnx_metadata, verify_onnx

    path = tmp_path / "model.onnx"
    assert main(["export", str(run), str(path)]) == 0  # the extension picks the format
    out = capsys.readouterr().out
    assert "on 8 test images of digits-embedded" in out and "top-1 agreement 100%" in out, out
    model, images = _run_model_and_images(run)
    result = verify_onnx(model, path, images)
    assert result["max_abs_diff"] < 1e-4 and result["top1_agreement"] == 1.0, result
    report = json.loads((run / "report.json").read_text())
    assert onnx_token_counts(path, images[:2]) == [(t["attn"], t["mlp"]) for t in report["tokens_per_block"]]
    meta = read_onnx_metadata(path)
    assert meta["img_size"] == [28, 28] and meta["class_names"][0] == "0" and meta["bsr"]["drop_blocks"] == [3, 6, 9]


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    from bsr.data.sources import _load_embedded

    d = tmp_path_factory.mktemp("pngs")
    images, labels = _load_embedded("test", None, False)
    paths = []
    for i in (0, 200, 400):
        paths.append(d / f"digit{i}_{labels[i]}.png")
        Image.fromarray(images[i]).save(paths[-1])
    return paths


def _top1(out: str) -> list[str]:
    """(class, probability) of the first line after each image line of `bsr predict`'s output."""
    lines = out.splitlines()[1:]
    return [tuple(lines[i + 1].split()) for i, ln in enumerate(lines) if ln.endswith(".png")]


def test_predict_on_a_run_and_on_exported_files_gives_the_same_top1(run, exported, pngs, tmp_path, capsys):
    paths = [str(p) for p in pngs]
    assert main(["predict", str(run), *paths, "--top-k", "3"]) == 0
    on_run = capsys.readouterr().out
    assert on_run.count("%") == 9 and "(pytorch, 28 px)" in on_run
    assert main(["predict", str(exported / "model.safetensors"), *paths]) == 0
    on_file = capsys.readouterr().out
    assert _top1(on_run) == _top1(on_file) and len(_top1(on_run)) == 3
    if _has_onnxruntime():  # the ONNX export too (same class; probabilities equal to within float rounding)
        assert main(["export", str(run), str(tmp_path / "m.onnx"), "--format", "onnx"]) == 0
        capsys.readouterr()
        assert main(["predict", str(tmp_path / "m.onnx"), *paths]) == 0
        on_onnx = capsys.readouterr().out
        assert "(onnxruntime, 28 px)" in on_onnx
        assert [t[0] for t in _top1(on_onnx)] == [t[0] for t in _top1(on_run)]


def _has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("argv, words", [
    (["export", "{run}", "{tmp}/x.onnx", "--format", "onnx", "--delta"], ["--delta"]),
    (["export", "{run}", "{tmp}/x.onnx", "--format", "onnx", "--dtype", "bf16"], ["float32"]),
    (["export", "{run}", "{run}/report.json"], ["report.json"]),
    (["predict", "{exported}/delta.safetensors", "{png}"], ["delta"]),
    (["predict", "{run}", "{tmp}/missing.png"], ["missing.png"]),
    (["predict", "{run}", "{png}", "--top-k", "0"], ["top_k"]),
    (["predict", "{tmp}/nothing", "{png}"], ["does not exist"]),
])
def test_bad_deploy_input_is_one_line_exit_2(argv, words, run, exported, pngs, tmp_path, capsys):
    argv = [a.format(run=run, tmp=tmp_path, exported=exported, png=pngs[0]) for a in argv]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("bsr: error: ") and err.count("\n") == 1 and all(w in err for w in words), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_multitask_runs_export_only_as_timm():
    cfg = TrainConfig(model="vit_micro_patch4_28", tasks=["digits-embedded", "sklearn-digits"])
    for fmt in ("safetensors", "onnx"):
        with pytest.raises(BSRError, match="multi-task.*--format timm"):
            _check_options(cfg, "r", fmt, False, "fp32")
    _check_options(cfg, "r", "timm", False, "fp32")
