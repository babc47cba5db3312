"""Training options of issue 12: the allocator fixed by default (`release_memory`) and gradient accumulation."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from bsr.cli.bench import command_line
from bsr.measure.bench_spec import BenchSpec
from bsr.train import make_config, train


def tiny(tmp_path, name="run", **overrides):
    values = dict(model="vit_micro_patch4_28", img_size=16, checkpoint="none", dataset="digits-embedded", limit=64,
                  batch_size=16, steps=2, eval_every=2, warmup_steps=0, warmup_epochs=0.0, out=str(tmp_path / name),
                  log_every=1, threads=1)
    values.update(overrides)
    return make_config(values)


def test_train_fixes_the_mmap_threshold_by_default_and_says_so(tmp_path):
    report = train(tiny(tmp_path), progress=False)
    assert report["allocator"] == {"release_memory": True, "applied": True, "mmap_threshold": 1 << 20}
    report = train(tiny(tmp_path, "default", release_memory=False), progress=False)
    assert report["allocator"]["release_memory"] is False and report["allocator"]["mmap_threshold"] is None
    saved = json.loads((tmp_path / "default" / "report.json").read_text())
    assert saved["allocator"] == report["allocator"]


def test_bench_fixes_it_by_default_and_repeats_no_release_memory():
    assert BenchSpec().mmap_threshold == 1 << 20
    words = shlex.split(command_line(BenchSpec(mmap_threshold=None), Path("out"), False))
    assert "--no-release-memory" in words and "--mmap-threshold" not in words
    assert "--mmap-threshold" in shlex.split(command_line(BenchSpec(), Path("out"), False))
