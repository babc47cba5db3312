"""`bsr bench`: the command-line face of `bsr.measure.bench` (it only parses flags and calls the library).

Flags are generated from the `BenchSpec` and `BSRConfig` fields and their help strings, like `bsr train`'s.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import fields
from pathlib import Path
from typing import Sequence

from ..core.config import BSRConfig
from ..measure.bench import run_bench
from ..measure.bench_spec import BenchSpec
from .options import add_dataclass_flags, flags_to_values

_OWN_FLAGS = ("command", "run", "out", "compare_analytic", "in_process")


def add(sub) -> None:
    """Register `bsr bench` on the `bsr` subparsers."""
    p = sub.add_parser("bench", help="memory, FLOPs and time of every method side by side",
                       description="Benchmark fine-tuning methods on one model: memory per method in a fresh "
                                   "process, time round-robin in one process; writes bench.json, bench.md and "
                                   "bench.png into --out. bsr-lean is bsr with the lean preset. --moe benchmarks "
                                   "the multi-task Mixture-of-Experts ViT instead (ratios against moe-full). "
                                   "--inference measures the deployed model instead: the unpatched and the BSR "
                                   "model in PyTorch and as ONNX under onnxruntime; writes inference.json and "
                                   "inference.md.")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: runs/bench-<model>)")
    p.add_argument("--compare-analytic", action="store_true",
                   help="print (and add to bench.md) the authors' formula against the measured figures, and why")
    p.add_argument("--in-process", action="store_true",
                   help="measure memory in this process instead of a fresh one per method (debugging only: "
                        "peaks are then not comparable)")
    options = p.add_argument_group("benchmark options")
    add_dataclass_flags(options, BenchSpec, skip=("bsr",))
    options.add_argument("--no-release-memory", dest="mmap_threshold", action="store_const", const=None,
                         default=argparse.SUPPRESS, help="leave glibc's mmap threshold dynamic (same as "
                                                         "--mmap-threshold none)")
    add_dataclass_flags(p.add_argument_group("BSR options (bsr, bsr-lean, tokendrop)"), BSRConfig, prefix="bsr.")
    p.set_defaults(run=run)


def command_line(spec: BenchSpec, out: Path, compare: bool, only: Sequence[str] = ()) -> str:
    """The `bsr bench` command that repeats this run, with every option spelled out (`only`: just these)."""
    words = ["bsr", "bench"]
    for f in fields(spec):
        value = getattr(spec, f.name)
        if f.name == "bsr" or (only and f.name not in only):
            continue
        if value is None:
            words += ["--no-release-memory"] if f.name == "mmap_threshold" else []
            continue
        if isinstance(value, bool):  # a --flag/--no-flag switch
            words.append("--" + ("" if value else "no-") + f.name.replace("_", "-"))
            continue
        words += ["--" + f.name.replace("_", "-"), ",".join(value) if isinstance(value, list) else str(value)]
    for key, value in spec.bsr.items():
        text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        words += ["--" + key.replace("_", "-"), text] if not isinstance(value, bool) else \
            ["--" + ("" if value else "no-") + key.replace("_", "-")]
    words += ["--out", str(out)] + (["--compare-analytic"] if compare else [])
    return shlex.join(words)


def _log(message: str) -> None:
    print(f"bsr bench: {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from ..measure.report import compare_analytic, write_outputs

    spec = BenchSpec.from_dict(flags_to_values(args, ignore=_OWN_FLAGS))
    spec.check()
    if spec.inference:
        return _inference(spec, args)
    out = Path(args.out or f"runs/bench-{spec.model}{'-moe' if spec.moe else ''}")
    command = command_line(spec, out, args.compare_analytic)
    result = run_bench(spec, command=command, isolate=not args.in_process, log=_log)
    paths = write_outputs(result, out, compare=args.compare_analytic)
    if args.compare_analytic:
        print("\n".join(compare_analytic(result.records)))
    print(paths["md"].read_text())
    print(f"records: {paths['json']}, plot: {paths['png']}")
    return 0


def _inference(spec: BenchSpec, args: argparse.Namespace) -> int:
    """`bsr bench --inference`: `bsr.measure.inference` (latency, throughput, memory of the deployed model)."""
    from ..measure.inference import check, run_inference_bench, write_outputs

    check(spec)
    out = Path(args.out or f"runs/bench-inference-{spec.model}")
    only = ("model", "img_size", "batch_size", "steps", "warmup", "num_classes", "threads", "seed", "mmap_threshold",
            "inference")
    result = run_inference_bench(spec, command=command_line(spec, out, False, only), isolate=not args.in_process,
                                 log=_log)
    paths = write_outputs(result, out)
    print(paths["md"].read_text())
    print(f"records: {paths['json']}")
    return 0
