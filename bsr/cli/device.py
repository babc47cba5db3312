"""`bsr device-import`: a device-trained run (bsr-device train) brought home as a bsr run directory
(`bsr.train.device.import_device_run`)."""

from __future__ import annotations

import argparse
import sys


def add(sub) -> None:
    """Register `bsr device-import` on the `bsr` subparsers."""
    p = sub.add_parser("device-import", help="bring a device-trained run (bsr-device train) home as a bsr run",
                       description="Read the checkpoint of DEVICE_RUN (written by bsr-device train from artifacts of "
                                   "bsr export --format ort-training) into the model the artifacts were exported "
                                   "from, and write it as the run directory OUT_RUN: bsr eval, bsr export and bsr "
                                   "predict then take it.")
    p.add_argument("device_run", metavar="DEVICE_RUN")
    p.add_argument("out", metavar="OUT_RUN")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..train.device import import_device_run

    r = import_device_run(args.device_run, args.out,
                          log=lambda m: print(f"bsr device-import: {m}", file=sys.stderr, flush=True))
    rep = r["report"]
    print(f"wrote run {r['path']}: {rep['steps']} device steps on {rep['dataset']}, test top-1 there "
          f"{rep['final_top1']:.2f}% (best {rep['best_top1']:.2f}%); try bsr eval {r['path']}")
    return 0
