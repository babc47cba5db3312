"""Tests of the `bsr bench` harness on a tiny ViT: records complete and sane, ratios from the same run, files written,
the fresh-process path, and one-line errors. No timed assertions; the analytic reference values are pinned in
tests/test_analytic.py."""

from __future__ import annotations

import json
import shlex
from dataclasses import replace
from pathlib import Path

import pytest

from bsr import BSRError
from bsr.measure.bench import memory_record_isolated, run_bench
from bsr.measure.bench_spec import BenchSpec
from bsr.measure.report import compare_analytic, load_result, render_markdown, write_outputs
from bsr.cli import build_parser, main
from bsr.cli.options import flags_to_values

# 12 blocks (the default BSR blocks exist), 16 px / patch 4: 16 patches + CLS; one thread, since tiny steps on a
# shared 2-core machine are fastest that way.
TINY = BenchSpec(model="vit_micro_patch4_28", img_size=16, batch_size=2, methods=["full", "bsr"], steps=2, warmup=1,
                 threads=1, matmul_size=128)

RECORD_FIELDS = {
    "method": str, "model": str, "batch_size": int, "optimizer": str, "img_size": int,
    "saved_activation_bytes": int, "saved_by_block": dict, "param_bytes": int, "grad_bytes": int,
    "optimizer_bytes": int, "trainable_params": int, "total_params": int, "train_peak_bytes": int,
    "train_resident_bytes": int, "infer_peak_bytes": int, "peak_resettable": bool, "train_flops_per_step": int,
    "fwd_gmacs_per_image": float, "step_time_median_s": float, "step_times_s": list, "achieved_gflops": float,
    "matmul_gflops": float, "tokens": list, "analytic_memory_bytes": int, "analytic": dict,
    "ratio_vs_baseline": dict, "baseline": str, "train_over_infer_peak": float, "versions": dict, "machine": dict,
    "moe_params": int,
}


@pytest.fixture(scope="module")
def result():
    return run_bench(TINY, command="bsr bench (test)")  # memory in fresh worker processes


@pytest.fixture(scope="module")
def records(result):
    return {r["method"]: r for r in result.records}


def test_every_field_present_with_its_type(records):
    for r in records.values():
        for key, tp in RECORD_FIELDS.items():
            assert isinstance(r[key], tp), f"{r['method']}.{key} = {r[key]!r}"


def test_sizes_are_exact_and_figures_sane(records):
    full, bsr = records["full"], records["bsr"]
    assert full["param_bytes"] == 4 * full["total_params"] == 4 * full["trainable_params"]
    for r in (full, bsr):
        assert r["grad_bytes"] == 4 * r["trainable_params"]
        assert r["optimizer_bytes"] == r["grad_bytes"]  # one SGD momentum buffer per trainable parameter
        assert r["train_peak_bytes"] > 0 and r["infer_peak_bytes"] > 0
        assert sum(r["saved_by_block"].values()) == r["saved_activation_bytes"] > 0
        assert len(r["step_times_s"]) == TINY.steps and all(t > 0 for t in r["step_times_s"])
        assert r["versions"]["torch"] and r["machine"]["cores"] >= 1 and r["machine"]["torch_threads"] == 1
    assert bsr["trainable_params"] < full["trainable_params"]
    assert bsr["saved_activation_bytes"] < full["saved_activation_bytes"]
    assert bsr["train_flops_per_step"] < full["train_flops_per_step"]
    assert bsr["fwd_gmacs_per_image"] < full["fwd_gmacs_per_image"]
    assert full["tokens"] == [[17, 17]] * 12
    assert bsr["tokens"][3] == [17, 10] and bsr["tokens"][-1] == [5, 5]  # CLS + kept + fused: 17 -> 10 -> 7 -> 5
    assert "blocks.0" not in bsr["saved_by_block"] or bsr["saved_by_block"]["blocks.0"] == 0  # frozen prefix
    assert bsr["bsr_config"]["trainable_blocks"] == [3, 7, 11] and full["bsr_config"] is None
    assert bsr["bsr_config"]["recompute"] == "none"  # the default "auto", as resolved for a dense model


def test_ratios_come_from_the_same_run(result, records):
    full, bsr = records["full"], records["bsr"]
    assert full["ratio_vs_baseline"] == {"train_peak": 1.0, "saved_activation": 1.0, "step_time": 1.0, "flops": 1.0}
    ratio = bsr["ratio_vs_baseline"]
    assert ratio["step_time"] == full["step_time_median_s"] / bsr["step_time_median_s"]
    assert ratio["train_peak"] == full["train_peak_bytes"] / bsr["train_peak_bytes"]
    assert ratio["flops"] == full["train_flops_per_step"] / bsr["train_flops_per_step"]
    assert full["matmul_gflops"] == bsr["matmul_gflops"] == result.meta["matmul_gflops"]
    assert len(result.meta["matmul_gflops_per_round"]) == TINY.steps
    assert bsr["achieved_gflops"] == pytest.approx(bsr["train_flops_per_step"] / bsr["step_time_median_s"] / 1e9)


def test_outputs_written_and_reloadable(result, tmp_path):
    paths = write_outputs(result, tmp_path / "out", compare=True)
    assert load_result(paths["json"]).to_dict() == json.loads(json.dumps(result.to_dict()))
    markdown = paths["md"].read_text()
    for needle in ("| full |", "| **bsr** |", "bsr bench (test)", "timm", "blocks.3", "Analytic formula"):
        assert needle in markdown
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_analytic_says_why_and_skips_methods_without_a_formula(records):
    lora_like = {**records["bsr"], "method": "lora", "analytic": None, "analytic_memory_bytes": None}
    lines = compare_analytic([records["full"], records["bsr"], lora_like])
    text = "\n".join(lines)
    assert "full: analytic" in text and "bsr: analytic" in text and "lora: no analytic counterpart" in text
    assert "8 bit" in text and "optimizer state" in text and "attention matrices" in text
    assert records["bsr"]["analytic"]["softmax_bytes"] == 3 * (17 ** 2 + 3 * 10 ** 2 + 3 * 7 ** 2 + 2 * 5 ** 2) \
        * 4 * TINY.batch_size  # blocks 3-11 see 17, 10, 10, 10, 7, 7, 7, 5, 5 tokens; 3 heads


def test_worker_errors_come_back_as_one_line():
    with pytest.raises(BSRError, match="memory worker for nope failed.*nope"):
        memory_record_isolated(replace(TINY, methods=["nope"]), "nope")  # check() skipped on purpose


def test_cli_writes_the_files_and_its_command_repeats_the_spec(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["bench", "--model", "vit_micro_patch4_28", "--img-size", "16", "--batch-size", "2", "--methods",
            "full,bsr-lean", "--steps", "1", "--warmup", "0", "--threads", "1", "--matmul-size", "128",
            "--keep-rate", "0.25", "--mmap-threshold", "1048576", "--out", str(out), "--in-process"]
    assert main(argv) == 0
    data = json.loads((out / "bench.json").read_text())
    lean = data["records"][1]
    assert lean["method"] == "bsr-lean" and lean["bsr_config"]["keep_rate"] == 0.25
    assert lean["bsr_config"]["frozen_dtype"] != "float32" or lean["bsr_config"]["recompute"] != "none"
    assert "fixed at 1,048,576 bytes" in (out / "bench.md").read_text() and (out / "bench.png").exists()
    assert "bsr-lean" in capsys.readouterr().out

    # The recorded command parses back to the same spec.
    args = build_parser().parse_args(shlex.split(data["meta"]["command"])[1:])
    again = BenchSpec.from_dict(flags_to_values(args, ignore=("command", "run", "out", "compare_analytic",
                                                               "in_process")))
    assert again.to_dict() == data["meta"]["spec"]


@pytest.mark.parametrize("argv, message", [
    (["--methods", "full,nope"], "unknown method 'nope'"),
    (["--model", "no_such_vit"], "unknown model 'no_such_vit'"),
    (["--batch-size", "0"], "batch_size=0 must be at least 1"),
    (["--optimizer", "lamb"], "optimizer='lamb'"),
    (["--trainable-blocks", "3,40"], "block index 40"),
    (["--methods", "full,full"], "names a method twice"),
    (["--mmap-threshold", "0"], "mmap_threshold=0 must be at least 1"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    assert main(["bench", "--model", "vit_micro_patch4_28", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bsr: error:") and message in err and "\n" not in err


def test_markdown_renders_without_full(result):
    """A run without `full` has no ratios; the table shows '-' rather than failing."""
    only_bsr = type(result)(records=[dict(r, ratio_vs_baseline={k: None for k in r["ratio_vs_baseline"]})
                                     for r in result.records if r["method"] == "bsr"], meta=result.meta)
    assert "| **bsr** |" in render_markdown(only_bsr)


# ------------------------------------------------------------------------------------------------- --moe

# The multi-task MoE bench on the tiny ViT: 2 tasks, 4 experts top-2 at blocks 3, 7, 11. Memory in this process
# (the fresh-process path is the same code, tested above), so the four methods take a few seconds.
TINY_MOE = BenchSpec(model="vit_micro_patch4_28", img_size=16, batch_size=4, moe=True, num_tasks=2, moe_experts=4,
                     moe_top_k=2, steps=1, warmup=1, threads=1, matmul_size=128)
MOE_FIELDS = {**{k: v for k, v in RECORD_FIELDS.items() if k not in ("analytic_memory_bytes", "analytic")},
              "multitask": dict}


@pytest.fixture(scope="module")
def moe_result():
    return run_bench(TINY_MOE, command="bsr bench --moe (test)", isolate=False)


def test_moe_methods_are_the_default_and_baseline_is_moe_full():
    assert TINY_MOE.methods == ["moe-full", "moe-bsr", "moe-bsr-lean", "dense-full"]
    assert TINY_MOE.baseline == "moe-full" and TINY.baseline == "full"
    assert BenchSpec().methods[0] == "full"


def test_moe_records_have_every_field_and_ratios_vs_moe_full(moe_result):
    records = {r["method"]: r for r in moe_result.records}
    assert list(records) == TINY_MOE.methods and moe_result.meta["baseline"] == "moe-full"
    for r in records.values():
        for key, tp in MOE_FIELDS.items():
            assert isinstance(r[key], tp), f"{r['method']}.{key} = {r[key]!r}"
        assert r["analytic"] is None and r["baseline"] == "moe-full"
        assert r["multitask"]["tasks"] == 2 and r["multitask"]["experts"] == 4 and r["multitask"]["task"] == 0
    base, bsr, lean, dense = (records[m] for m in TINY_MOE.methods)
    assert base["ratio_vs_baseline"] == {"train_peak": 1.0, "saved_activation": 1.0, "step_time": 1.0, "flops": 1.0}
    for r in (bsr, lean, dense):
        ratio = r["ratio_vs_baseline"]
        assert ratio["train_peak"] == base["train_peak_bytes"] / r["train_peak_bytes"]
        assert ratio["flops"] == base["train_flops_per_step"] / r["train_flops_per_step"]
        assert ratio["step_time"] == base["step_time_median_s"] / r["step_time_median_s"]

    # Sizes: 3 MoE layers of 4 experts (w1, b1, w2, b2 of width 96, hidden 384) and 2 gates each; dense has none.
    expert = 96 * 384 * 2 + 384 + 96
    assert base["moe_params"] == bsr["moe_params"] == 3 * (4 * expert + 2 * (96 * 4 + 4)) and dense["moe_params"] == 0
    assert base["total_params"] - dense["total_params"] == 3 * (3 * expert + 2 * (96 * 4 + 4))
    assert base["trainable_params"] == base["total_params"] and dense["trainable_params"] == dense["total_params"]
    assert bsr["trainable_params"] == lean["trainable_params"] < base["trainable_params"]
    assert bsr["grad_bytes"] == 4 * bsr["trainable_params"]
    assert lean["param_bytes"] < bsr["param_bytes"] == base["param_bytes"]  # frozen Linears in bf16
    # BSR: dropping at 3, 6, 9 and far fewer FLOPs and saved bytes; lean recomputes, so it saves least.
    assert base["tokens"] == [[17, 17]] * 12 and bsr["tokens"][3] == [17, 10] and bsr["tokens"][-1] == [5, 5]
    assert bsr["train_flops_per_step"] < base["train_flops_per_step"]
    assert lean["saved_activation_bytes"] < bsr["saved_activation_bytes"] < base["saved_activation_bytes"]
    # top-2 of 4 experts: the MoE model does twice the MLP work of the dense one at the MoE blocks.
    assert dense["train_flops_per_step"] < base["train_flops_per_step"]
    assert bsr["bsr_config"]["trainable_blocks"] == [3, 7, 11] and lean["bsr_config"]["recompute"] != "none"
    assert bsr["bsr_config"]["recompute"] == "first"  # the default "auto", as resolved for a MoE model
    assert base["bsr_config"] is None and dense["multitask"]["has_moe_layers"] is False


def test_moe_report_names_the_baseline(moe_result, tmp_path):
    paths = write_outputs(moe_result, tmp_path / "moe")
    markdown = paths["md"].read_text()
    for needle in ("bsr bench --moe", "baseline **moe-full**", "moe-full/x", "| **moe-bsr-lean** |",
                   "| dense-full |", "2 tasks of 10 classes"):
        assert needle in markdown
    assert "full/x |" not in markdown.replace("moe-full/x |", "")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_moe_command_line_round_trips():
    from bsr.cli.bench import command_line

    words = shlex.split(command_line(TINY_MOE, Path("out"), False))
    assert "--moe" in words and words[words.index("--moe-top-k") + 1] == "2"
    args = build_parser().parse_args(words[1:])
    again = BenchSpec.from_dict(flags_to_values(args, ignore=("command", "run", "out", "compare_analytic",
                                                               "in_process")))
    assert again.to_dict() == TINY_MOE.to_dict()


@pytest.mark.parametrize("argv, message", [
    (["--moe", "--methods", "moe-full,bsr"], "unknown method 'bsr'"),
    (["--methods", "moe-bsr"], "or --moe for the multi-task methods"),
    (["--moe", "--num-tasks", "0"], "num_tasks=0 must be at least 1"),
    (["--moe", "--moe-experts", "4", "--moe-top-k", "5"], "moe_top_k=5 with 4 experts"),
    (["--moe", "--model", "test_vit"], "moe_blocks"),  # 6 blocks: no block 7 or 11 for the MoE layers
])
def test_bad_moe_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    assert main(["bench", "--model", "vit_micro_patch4_28", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
