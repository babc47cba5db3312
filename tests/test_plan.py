"""The memory model and the planner (issue 12): the traced step counts what a real step saves and computes, plans are
ordered by expected accuracy at the largest micro-batch that fits, and `bsr train --memory-budget` trains the first
option that passes its real measured step."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import bsr.cli.train as cli_train
import bsr.measure.plan as plan_mod
from bsr.cli import EXIT_USER_ERROR, main
from bsr.errors import BSRError
from bsr.measure import count_flops, saved_tensor_bytes
from bsr.measure.overhead import Overhead, fit_overhead
from bsr.measure.plan import Planner, families, flags_text, micro_batches, parse_size
from bsr.measure.trace import trace_config, training_step
from bsr.train import build_optimizer, make_config, setup_model
from bsr.train.build import backbone

MICRO = dict(model="vit_micro_patch4_28", checkpoint="none", threads=1, optimizer="sgd", weight_decay=0.0,
             clip_grad=None)
NO_OVERHEAD = Overhead("test", 0, {"fp32": 0, "bf16": 0}, "now", [])


@pytest.mark.parametrize("bsr", [None, {"preset": "lean"}])
@pytest.mark.parametrize("method", ["full", "bsr", "lora"])
def test_the_trace_counts_saved_bytes_and_flops_as_a_real_step_does(method, bsr):
    if bsr and method != "bsr":
        pytest.skip("presets are BSR's")
    cfg = make_config({**MICRO, "method": method, "batch_size": 8, **({"bsr": bsr} if bsr else {})})
    traced = trace_config(cfg, 10)
    model = setup_model(cfg, torch.device("cpu"), 10).train()
    images, labels = torch.randn(8, 3, 28, 28), torch.randint(0, 10, (8,))
    saved = saved_tensor_bytes(lambda: nn.functional.cross_entropy(model(images), labels), model=backbone(model))
    assert traced.saved_bytes == saved.total
    assert traced.saved_by_block == {k: v for k, v in saved.by_block.items() if v}
    optimizer = build_optimizer(cfg, model)
    flops = count_flops(lambda: training_step(model, optimizer, nn.CrossEntropyLoss(), images, labels, cfg))
    assert traced.train_flops == flops
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert traced.param_bytes == params and traced.step_peak_bytes > params + traced.saved_bytes


def test_accumulation_lowers_the_traced_peak_and_keeps_the_flops():
    big = trace_config(make_config({**MICRO, "batch_size": 32}), 10)
    small = trace_config(make_config({**MICRO, "batch_size": 8, "accumulate": 4}), 10)
    assert small.step_peak_bytes < big.step_peak_bytes
    assert small.saved_bytes * 4 == pytest.approx(big.saved_bytes, abs=4096)  # per image; the loss saves a few bytes
    assert small.train_flops == big.train_flops


@pytest.mark.parametrize("text,size", [("1.5GiB", 3 << 29), ("800MiB", 800 << 20), ("2G", 2 << 30),
                                       ("1GB", 10 ** 9), ("4096", 4096), (" 512 kib ", 512 << 10)])
def test_budget_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-1G", "1.5 parsecs", "0MiB"])
def test_bad_budget_sizes_are_refused(text):
    with pytest.raises(BSRError, match="not a size"):
        parse_size(text)


def test_families_follow_the_studys_evidence():
    cfg = make_config({**MICRO})
    names = [(tier, label) for tier, label, _ in families(cfg, 12)]
    assert [t for t, _ in names] == [0, 0, 1, 1, 2, 3, 4]
    assert names[1][1].startswith("recomputation (the same updates)")
    assert names[2][1].startswith("lean preset") and "int8" in names[3][1] and "keep rate 0.3" in names[4][1]
    assert "7,11 (not 3)" in names[5][1] and "block 11 only" in names[6][1]
    changes = [c for _, _, c in families(cfg, 12)]
    assert changes[1]["bsr"]["recompute"] == "all" and changes[1]["bsr"]["score_grad"]  # exact: nothing else changes
    assert changes[3]["bsr"]["frozen_dtype"] == "int8"
    assert [t for t, _, _ in families(make_config({**MICRO, "method": "full"}), 12)] == [0]
    assert micro_batches(32) == [32, 16, 8, 4, 2, 1] and micro_batches(24) == [24, 12, 6, 3, 1]


def synthetic(monkeypatch, per_image: dict[str, int]) -> None:
    """Planners whose predicted peak is 100 MiB + per_image[kind] MiB per micro-batch image, kind "paper", "lean" or
    "cut" (fewer trainable blocks, lower keep rate), with no machine overhead."""
    monkeypatch.setattr(plan_mod, "overhead", lambda *a, **k: NO_OVERHEAD)
    trace = trace_config(make_config({**MICRO, "batch_size": 1}), 10, flops=False, eval_batch=1)

    def predict(self, cfg, flops=False):
        kind = "lean" if cfg.bsr.recompute not in ("none", "auto") else "paper"
        if cfg.bsr.keep_rate != 0.5 or list(cfg.bsr.trainable_blocks) != [3, 7, 11]:
            kind = "cut"
        return trace, (100 + per_image[kind] * cfg.batch_size) << 20

    monkeypatch.setattr(Planner, "predict", predict)


def test_the_plan_takes_the_largest_micro_batch_that_fits_in_the_order_of_expected_accuracy(monkeypatch):
    synthetic(monkeypatch, {"paper": 10, "lean": 4, "cut": 3})
    planner = Planner(make_config({**MICRO, "batch_size": 32}))
    # with the plan's margin (x1.05 + 24 MiB) paper fits 16 images in 300 MiB, recomputation and lean 40, the cuts 54
    options = planner.plan(parse_size("300MiB"))
    assert [(o.label.split(" (")[0], o.cfg.batch_size, o.cfg.accumulate) for o in options] == [
        ("recomputation", 32, 1), ("as given", 16, 2), ("lean preset", 32, 1), ("lean with int8 frozen weights", 32, 1),
        ("lean, keep rate 0.3", 32, 1), ("lean, trainable blocks 7,11", 32, 1), ("lean, trainable block 11 only", 32, 1)]
    assert all(o.fits and o.cfg.effective_batch == 32 and o.cfg.eval_batch_size == o.cfg.batch_size for o in options)
    assert flags_text(options[1].changes(planner.base)) == "--batch-size 16 --accumulate 2 --eval-batch-size 16"
    assert not any(o.fits for o in planner.plan(parse_size("100MiB")))


def test_memory_budget_trains_the_first_option_whose_real_step_fits(tmp_path, monkeypatch, capsys):
    synthetic(monkeypatch, {"paper": 10, "lean": 4, "cut": 3})
    # option 1 (lean at 32) fails its real step, option 2 (16 x 2) passes: 260 MiB plus the check's margin (6% and
    # 16 MiB: 292 MiB) is within 300 MiB, while 290 MiB would be under the budget but not under it with the margin
    measured = iter([290, 260])
    monkeypatch.setattr(plan_mod, "measure_step", lambda *a, **k: {"process_peak_bytes": next(measured) << 20})
    monkeypatch.setattr(cli_train, "_restart", lambda argv: main(argv))
    out = tmp_path / "run"
    argv = ["train", "--model", "vit_micro_patch4_28", "--checkpoint", "none", "--limit", "64", "--batch-size", "32",
            "--steps", "2", "--threads", "1", "--no-progress", "--memory-budget", "300MiB", "--out", str(out)]
    assert main(argv) == 0
    shown = capsys.readouterr().out
    assert "does not fit 300 MiB" in shown and "training option 2: as given" in shown
    record = json.loads((out / "plan.json").read_text())
    assert record["chosen"] == 1 and record["options"][0]["measured_bytes"] >= 290 << 20
    # the trained run's whole-process peak is recorded against the budget, and said in one line either way
    assert record["budget_kept"] == (record["trained_peak_bytes"] <= 300 << 20)
    assert ("trained within the budget" in shown) == record["budget_kept"]
    assert ("exceeded the 300 MiB budget" in shown) != record["budget_kept"]
    report = json.loads((out / "report.json").read_text())
    assert (report["config"]["batch_size"], report["config"]["accumulate"]) == (16, 2)


def test_plan_margins_are_one_sided_towards_safety(monkeypatch):
    """An option fits only with the prediction's margin: 100 + 10 MiB per image fits 20 images in 300 MiB without it,
    16 with it (1.05 x 216 + 24 = 251 MiB; 1.05 x 300 + 24 > 300)."""
    synthetic(monkeypatch, {"paper": 10, "lean": 10, "cut": 10})
    planner = Planner(make_config({**MICRO, "method": "full", "batch_size": 20}))
    (option,) = planner.plan(parse_size("300MiB"))
    assert option.cfg.batch_size == 10 and option.predicted == 200 << 20  # micro-batches of 20: 20, 10, 5, 1
    assert plan_mod.with_margin(300 << 20, plan_mod.PREDICTION_MARGIN) > 300 << 20


def test_memory_budget_refusals_are_one_line(tmp_path, monkeypatch, capsys):
    synthetic(monkeypatch, {"paper": 10, "lean": 4, "cut": 3})
    base = ["train", "--model", "vit_micro_patch4_28", "--checkpoint", "none", "--out", str(tmp_path / "r")]
    for extra, words in ((["--memory-budget", "lots"], "not a size"), (["--memory-budget", "100MiB"], "fits 100 MiB"),
                         (["--memory-budget", "1G", "--tasks", "sklearn-digits,digits-embedded"], "single-task")):
        assert main(base + extra) == EXIT_USER_ERROR
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err


def test_bsr_plan_prints_the_table(monkeypatch, capsys):
    monkeypatch.setattr(plan_mod, "overhead", lambda *a, **k: NO_OVERHEAD)
    assert main(["plan", "--budget", "80MiB", "--model", "vit_micro_patch4_28", "--checkpoint", "none",
                 "--batch-size", "8"]) == 0
    table = capsys.readouterr().out
    assert "| 1 | as given | 8 x 1 |" in table and "lean preset" in table and "GFLOP/step" in table


def test_the_overhead_fit_recovers_the_heap_factor_and_the_constants():
    # measured = large + 1.5 * small + 8 MiB (fp32) or + 40 MiB (bf16), at the timeline's worst moment
    steps = []
    for kind, constant in (("fp32", 8 << 20), ("bf16", 40 << 20)):
        for large, small in ((10 << 20, 30 << 20), (100 << 20, 20 << 20), (50 << 20, 60 << 20)):
            timeline = [(0, 0), (large, small), (large // 2, small // 2)]
            steps.append((kind, int(large + 1.5 * small) + constant, timeline))
    factor, constants = fit_overhead(steps, heap=True)
    assert factor == pytest.approx(1.5) and constants == {"fp32": 8 << 20, "bf16": 40 << 20}
    assert fit_overhead(steps, heap=False)[0] == 1.0  # CUDA: no heap


def test_overhead_is_measured_once_and_cached(tmp_path, monkeypatch):
    import bsr.measure.overhead as overhead_mod

    monkeypatch.setenv("BSR_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(overhead_mod, "calibrate", lambda device, released, log: calls.append(1) or Overhead(
        overhead_mod.machine_key(device, released), 700 << 20, {"fp32": 1, "bf16": 2}, "now", [], 1.4))
    first = overhead_mod.overhead(torch.device("cpu"), True, print)
    again = overhead_mod.overhead(torch.device("cpu"), True, print)
    assert calls == [1] and first == again and (tmp_path / "memory-overhead.json").is_file()
    overhead_mod.overhead(torch.device("cpu"), False, print)  # another allocator setting: measured apart
    assert calls == [1, 1]
