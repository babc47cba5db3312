"""`bsr bench --inference` (issue 13): the unpatched and the BSR model in PyTorch and under onnxruntime, timed
round-robin, memory in a fresh process per variant, ratios against the unpatched model of the same run."""

from __future__ import annotations

import json

import pytest

from bsr.cli import EXIT_USER_ERROR, main
from bsr.measure.inference import VARIANTS, render_markdown

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (optional: pip install onnxruntime)")


def test_micro_model_runs_and_writes_records(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--inference", "--model", "vit_micro_patch4_28", "--img-size", "16", "--batch-size", "4",
            "--steps", "2", "--warmup", "0", "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "inference.json").read_text())
    records = {r["variant"]: r for r in result["records"]}
    assert list(records) == list(VARIANTS)
    for r in records.values():
        assert r["latency_b1_s"] > 0 and r["throughput_img_s"] > 0 and r["peak_bytes"] > 0
        assert len(r["latency_b1_times_s"]) == 2 * result["meta"]["b1_repeats"] and len(r["batch_times_s"]) == 2
        assert r["vs_timm"]["latency"] is not None and r["vs_timm_onnx"]["throughput"] is not None
    assert records["timm"]["vs_timm"]["latency"] == 1.0 and records["timm-onnx"]["vs_timm_onnx"]["throughput"] == 1.0
    # 16 px: 16 patches + CLS; dropping at blocks 3, 6, 9 halves the tokens each time, so fewer forward FLOPs
    assert records["bsr"]["tokens"][0] == [17, 17] and records["bsr"]["tokens"][-1][0] < 17
    assert records["bsr"]["vs_timm"]["flops"] > 1.2 and records["bsr-onnx"]["onnx_max_abs_diff"] < 1e-4
    assert "| **bsr-onnx** | onnxruntime |" in printed and (out / "inference.md").read_text() == render_markdown(result)
    assert result["meta"]["command"].startswith("bsr bench --model vit_micro_patch4_28 --img-size 16")


@pytest.mark.parametrize("extra, words", [(["--device", "cuda"], "--device cpu"), (["--moe"], "drop --moe")])
def test_what_inference_cannot_measure_is_one_line(extra, words, tmp_path, capsys):
    argv = ["bench", "--inference", "--model", "vit_micro_patch4_28", "--out", str(tmp_path / "b"), *extra]
    assert main(argv) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("bsr: error: ") and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "b").exists()
