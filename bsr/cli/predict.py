"""`bsr predict`: top-k classes of image files by a run or an exported file (`bsr.train.deploy.predict`)."""

from __future__ import annotations

import argparse


def add(sub) -> None:
    """Register `bsr predict` on the `bsr` subparsers."""
    p = sub.add_parser("predict", help="top-k classes of image files by a run or an exported model",
                       description="Classify image files with TARGET: a run directory (its checkpoint in PyTorch), "
                                   "or a file written by bsr export (.safetensors bsr model file, or .onnx under "
                                   "onnxruntime). Images are preprocessed as in the run's evaluation (resized to the "
                                   "model's image size, its mean/std); tokens are dropped as trained.")
    p.add_argument("target", metavar="TARGET", help="run directory, or an exported .safetensors / .onnx file")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files (PNG, JPEG, ...)")
    p.add_argument("--top-k", type=int, default=5, help="classes shown per image [default: 5]")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (PyTorch targets) [default: cpu]")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..deploy.predict import format_predictions
    from ..train.deploy import predict

    predictor, results = predict(args.target, args.images, k=args.top_k, device=args.device)
    print(f"{args.target} ({predictor.source}, {predictor.img_size} px)")
    print("\n".join(format_predictions(results)))
    return 0
