"""What writing a checkpoint adds to a training run's peak memory: bsr's writer against safetensors' in-memory save.

    python benchmarks/checkpoint_peak.py                    # ViT-B/16, bsr, AdamW, batch 8 (about 3 minutes)
    python benchmarks/checkpoint_peak.py --method full --batch-size 32

Three fresh processes, each building the model, running two training steps on a seeded random batch
(`bsr.measure.overhead.measure_step`, glibc's mmap threshold fixed as `bsr train` does) and reporting the process's
peak (VmHWM on CPU): `step` (no checkpoint), `bsr` (then `bsr.train.checkpoint.save_checkpoint`, which writes tensor
by tensor through `bsr.tensorfile`) and `in-memory` (then the same checkpoint built the way it was before
`bsr.tensorfile`: a contiguous CPU copy of every tensor, `safetensors.torch.save` into bytes, one atomic write).
Weights are random (`--checkpoint none`): memory does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

MiB = 2 ** 20
WRITERS = ("step", "bsr", "in-memory")
LABELS = {"step": "none (the step alone)", "bsr": "`bsr.tensorfile` (now)",
          "in-memory": "in memory through `safetensors.torch.save` (before)"}


def in_memory_save(directory: Path, model, optimizer, meta: dict) -> Path:
    """The checkpoint as `save_checkpoint` wrote it before `bsr.tensorfile` (for comparison only)."""
    from safetensors.torch import save

    from bsr.files import atomic_write_bytes
    from bsr.train import checkpoint as ck

    opt_tensors, opt_meta = ck.flatten_optimizer(optimizer.state_dict())
    rng_tensors, rng_meta = ck.rng_state()
    tensors = {**ck.trainable_state(model), **opt_tensors, **rng_tensors}
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    header = {"format": ck.FORMAT, **meta, "optimizer": opt_meta, "rng": rng_meta}
    path = Path(directory) / ck.CHECKPOINT_NAME
    atomic_write_bytes(path, save(tensors, metadata={"bsr": json.dumps(header)}))
    return path


def child(writer: str, options: dict) -> dict:
    """One measurement in this process (the `--child` entry point)."""
    from bsr.measure import overhead
    from bsr.train import pick_device
    from bsr.train.config import make_config

    if writer == "in-memory":
        overhead.save_checkpoint = in_memory_save
    cfg = make_config(options)
    result = overhead.measure_step(cfg, 10, pick_device(cfg.device), checkpoint=writer != "step")
    return {k: v for k, v in result.items() if k.endswith("_bytes")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--method", default="bsr")
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", choices=WRITERS, help=argparse.SUPPRESS)
    args = p.parse_args()
    options = {"model": args.model, "method": args.method, "optimizer": args.optimizer, "batch_size": args.batch_size,
               "checkpoint": "none", "threads": args.threads}
    if args.child:
        print(json.dumps(child(args.child, options)))
        return
    rows = {}
    for writer in WRITERS:
        out = subprocess.run([sys.executable, __file__, "--child", writer, "--model", args.model, "--method",
                              args.method, "--optimizer", args.optimizer, "--batch-size", str(args.batch_size),
                              "--threads", str(args.threads)], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{writer}: {out.stderr.strip().splitlines()[-1]}")
        rows[writer] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{args.model}, {args.method}, {args.optimizer}, batch {args.batch_size}: process peak (VmHWM) after two "
          f"training steps")
    print("| checkpoint write | process peak MiB | above the step's |")
    print("|---|---:|---:|")
    for writer, r in rows.items():
        above = (r["process_peak_bytes"] - rows["step"]["process_peak_bytes"]) / MiB
        print(f"| {LABELS[writer]} | {r['process_peak_bytes'] / MiB:,.0f} | {above:+,.0f} |")


if __name__ == "__main__":
    main()
