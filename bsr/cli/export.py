"""`bsr export`: a run's model as a deployable file (`bsr.train.deploy.export_run`)."""

from __future__ import annotations

import argparse
import sys


def add(sub) -> None:
    """Register `bsr export` on the `bsr` subparsers."""
    p = sub.add_parser("export", help="write a run's model as a deployable file (bsr safetensors, ONNX, timm)",
                       description="Write the trained model of RUN_DIR. safetensors (default): a bsr model file that "
                                   "keeps the BSR config, class names, mean/std and image size; bsr.load(OUT) or "
                                   "bsr predict OUT rebuilds the model with its token dropping. --delta: only what "
                                   "training changed, for bsr.deploy.apply_delta onto the base weights the run "
                                   "started from (checked by sha256). onnx: token dropping inside the graph, "
                                   "checked against PyTorch on test images right after export. timm: a plain timm "
                                   "state dict, BSR patch undone, LoRA merged (load it back with --checkpoint OUT).")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("out", metavar="OUT", help="output file (.safetensors or .onnx)")
    p.add_argument("--format", default="safetensors", choices=("safetensors", "onnx", "timm"),
                   help="file format [default: safetensors]")
    p.add_argument("--delta", action="store_true", help="with safetensors: write only what training changed")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                   help="stored precision of safetensors/timm files (bsr files load back to float32) [default: fp32]")
    p.set_defaults(run=run)


def _log(message: str) -> None:
    print(f"bsr export: {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from ..train.deploy import export_run

    r = export_run(args.run_dir, args.out, fmt=args.format, delta=args.delta, dtype=args.dtype, log=_log)
    what = {"safetensors": "bsr model file", "delta": "bsr delta file", "onnx": f"ONNX opset {r.get('opset')}",
            "timm": "plain timm state dict"}[r["format"]]
    count = f"{r['tensors']} tensors, " if "tensors" in r else ""
    print(f"wrote {r['path']} ({what}, {count}{r['bytes'] / 2**20:.2f} MiB, {args.dtype})")
    if r["format"] == "delta":
        print(f"  base weights sha256 {r['base_id']}: rebuild the model with "
              f"bsr.deploy.apply_delta(OUT, bsr.train.deploy.base_state(RUN_DIR))")
    if "verify" in r:
        v = r["verify"]
        print(f"  onnxruntime vs PyTorch on {v['images']}: max abs logit diff {v['max_abs_diff']:.2e}, "
              f"top-1 agreement {100 * v['top1_agreement']:.0f}%")
    return 0
