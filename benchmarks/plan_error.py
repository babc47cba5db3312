"""The memory model's error against `bsr bench`'s measured training peaks, per method.

    python benchmarks/plan_error.py --model vit_micro_patch4_28 --batch-sizes 8,32
    python benchmarks/plan_error.py --model vit_base_patch16_224 --batch-sizes 8,32 --out runs/plan-error/vitb.jsonl
    python benchmarks/plan_error.py --table runs/plan-error/micro.jsonl runs/plan-error/vitb.jsonl   # table only

For every method of `bsr bench` and batch size: the measured peak is `bsr bench`'s own (its memory worker in a fresh
process: one warm-up step, then the peak of one step above the memory in use before the model was built, glibc's
mmap threshold fixed at 1 MiB as by default); the prediction is what `bsr plan` adds up for the same step: the step
traced on fake tensors (`bsr.measure.trace`) plus this machine's overhead (`bsr.measure.overhead`: the weight of
heap-served tensors and a constant per kernel kind, measured once on the micro model and cached). The traced
saved-for-backward bytes and FLOPs are compared with the measured ones too (they are exact). Records go to --out as
they come (JSON lines), the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bsr.errors import BSRError
from bsr.measure.bench import memory_record_isolated
from bsr.measure.bench_spec import BENCH_METHODS, BenchSpec, bench_config
from bsr.measure.overhead import overhead
from bsr.measure.trace import trace_config
from bsr.train.config import with_values

MiB = 2 ** 20


def predicted(spec: BenchSpec, method: str) -> dict:
    """The memory model's figures for bench method `method`: the bench's step (its optimizer, no weight decay, no
    clipping) traced, plus the step overhead of its kernel kind."""
    cfg = with_values(bench_config(spec, method), batch_size=spec.batch_size, optimizer=spec.optimizer,
                      momentum=spec.momentum, weight_decay=0.0, clip_grad=None, lr=spec.lr)
    over = overhead(torch.device("cpu"), spec.mmap_threshold is not None, lambda m: print(m, file=sys.stderr))
    start = time.perf_counter()
    trace = trace_config(cfg, spec.num_classes, torch.device("cpu"), heap_factor=over.heap_factor,
                         small_below=over.small_below)
    return {"predicted_bytes": trace.step_peak_bytes + over.step_for(cfg), "traced_bytes": trace.step_peak_bytes,
            "traced_saved_bytes": trace.saved_bytes, "traced_flops": trace.train_flops,
            "trace_seconds": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_micro_patch4_28")
    p.add_argument("--batch-sizes", default="8,32")
    p.add_argument("--methods", default=",".join(BENCH_METHODS))
    p.add_argument("--out", default=None, help="JSON-lines file of the records (appended)")
    p.add_argument("--table", nargs="+", metavar="JSONL", help="only print the table of these records files")
    args = p.parse_args()
    if args.table:
        print_table([json.loads(line) for path in args.table for line in Path(path).read_text().splitlines() if line])
        return
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        spec = BenchSpec(model=args.model, batch_size=batch, threads=1, warmup=1, memory_steps=1)
        for method in args.methods.split(","):
            start = time.perf_counter()
            record = {"model": args.model, "batch_size": batch, "method": method, **predicted(spec, method)}
            try:
                measured = memory_record_isolated(spec, method)
            except BSRError as e:  # e.g. the worker OOM-killed: the configuration does not fit this machine
                record.update(measured_bytes=None, error=None, failure=str(e),
                              measure_seconds=time.perf_counter() - start)
                print(f"{args.model} b{batch} {method}: predicted {record['predicted_bytes'] / MiB:,.1f} MiB, "
                      f"not measured: {e}", file=sys.stderr, flush=True)
            else:
                record.update(measured_bytes=measured["train_peak_bytes"],
                              measured_saved_bytes=measured["saved_activation_bytes"],
                              measured_flops=measured["train_flops_per_step"],
                              measure_seconds=time.perf_counter() - start)
                record["error"] = record["predicted_bytes"] / record["measured_bytes"] - 1
                print(f"{args.model} b{batch} {method}: predicted {record['predicted_bytes'] / MiB:,.1f} MiB, "
                      f"measured {record['measured_bytes'] / MiB:,.1f} MiB ({100 * record['error']:+.1f}%)",
                      file=sys.stderr, flush=True)
            rows.append(record)
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(record) + "\n")
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    """The records as a Markdown table, with the largest error per model."""
    print("| model | batch | method | measured peak MiB | predicted MiB | error | saved MiB (traced = measured) | "
          "GFLOP/step (traced = measured) |")
    print("|---|---:|---|---:|---:|---:|---|---|")
    for r in rows:
        same = lambda a, b: "yes" if a == b else f"no ({a / MiB:,.1f})"  # noqa: E731
        if r["measured_bytes"] is None:
            print(f"| {r['model']} | {r['batch_size']} | {r['method']} | not measured | "
                  f"{r['predicted_bytes'] / MiB:,.1f} | - | - | - |")
            continue
        print(f"| {r['model']} | {r['batch_size']} | {r['method']} | {r['measured_bytes'] / MiB:,.1f} | "
              f"{r['predicted_bytes'] / MiB:,.1f} | {100 * r['error']:+.1f}% | "
              f"{r['measured_saved_bytes'] / MiB:,.1f} ({same(r['traced_saved_bytes'], r['measured_saved_bytes'])}) | "
              f"{r['measured_flops'] / 1e9:,.1f} ({'yes' if r['traced_flops'] == r['measured_flops'] else 'no'}) |")
    print()
    for model in dict.fromkeys(r["model"] for r in rows):
        errors = [r["error"] for r in rows if r["model"] == model and r["error"] is not None]
        if errors:
            print(f"- {model}: {len(errors)} configurations measured, largest error "
                  f"{100 * max(errors, key=abs):+.1f}%, median |error| {100 * statistics.median(map(abs, errors)):.1f}%")
    for r in rows:
        if r["measured_bytes"] is None:
            print(f"- not measured: {r['model']} batch {r['batch_size']} {r['method']}: {r['failure']}")


if __name__ == "__main__":
    main()
