"""`bsr export`: a run's model as plain timm weights (`bsr.train.export_weights`)."""

from __future__ import annotations

import argparse


def add(sub) -> None:
    """Register `bsr export` on the `bsr` subparsers."""
    p = sub.add_parser("export", help="write a run's model as plain timm weights (.safetensors)",
                       description="Write the trained model of RUN_DIR as a timm state dict: BSR patch undone, "
                                   "LoRA merged. Load it back with --checkpoint OUT.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("out", metavar="OUT.safetensors")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="stored precision")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..train import export_weights

    r = export_weights(args.run_dir, args.out, args.dtype)
    print(f"wrote {r['path']} ({r['tensors']} tensors, {r['bytes'] / 2**20:.2f} MiB, {args.dtype})")
    return 0
