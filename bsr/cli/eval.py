"""`bsr eval`: top-1 of a trained run (`bsr.train.evaluate_run`)."""

from __future__ import annotations

import argparse


def add(sub) -> None:
    """Register `bsr eval` on the `bsr` subparsers."""
    p = sub.add_parser("eval", help="top-1 accuracy of a trained run", description="Evaluate a run's checkpoint.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="directory written by bsr train --out")
    p.add_argument("--dataset", default=None, help="dataset (default: the run's)")
    p.add_argument("--data-dir", default=None, help="folder holding the dataset")
    p.add_argument("--limit", type=int, default=None, help="evaluate only this many test images")
    p.add_argument("--batch-size", type=int, default=None, help="evaluation batch size")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..train import evaluate_run

    r = evaluate_run(args.run_dir, dataset=args.dataset, data_dir=args.data_dir, limit=args.limit,
                     device=args.device, batch_size=args.batch_size)
    mean = " (mean over tasks)" if "tasks" in r else ""
    print(f"top-1 {r['top1']:.2f}%{mean} on {r['dataset']} test ({r['images']} images, method {r['method']})")
    for name, acc in r.get("tasks", {}).items():
        print(f"  {name:<16} {acc:.2f}%")
    for name, (acc, images) in r.get("classes", {}).items():
        print(f"  {name:<16} {'-' if acc is None else f'{acc:.2f}%':>8} ({images} images)")
    return 0
