"""`bsr train`: fine-tune a ViT; flags from `TrainConfig` and `BSRConfig`, then `bsr.train.train`."""

from __future__ import annotations

import argparse

from ..core.config import PRESETS, BSRConfig
from ..errors import BSRError
from .options import add_dataclass_flags, flags_to_values


def add(sub) -> None:
    """Register `bsr train` on the `bsr` subparsers."""
    from ..train import TrainConfig

    p = sub.add_parser("train", help="fine-tune a ViT (no arguments: the embedded default run)",
                       description="Fine-tune a timm ViT. Options layer as: defaults < --recipe < --config < flags. "
                                   "With no arguments: BSR fine-tuning of the embedded Fashion-MNIST ViT on digits.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", dest="config_file", default=None, metavar="YAML", help="YAML file of options")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run saved in RUN_DIR")
    p.add_argument("--no-progress", dest="no_progress", action="store_true", help="hide the progress bar")
    add_dataclass_flags(p.add_argument_group("training options"), TrainConfig, skip=("bsr",))
    group = p.add_argument_group("BSR options (--method bsr, tokendrop)")
    group.add_argument("--preset", dest="bsr.preset", default=argparse.SUPPRESS, choices=sorted(PRESETS),
                       help="named BSR configuration the other BSR options override: paper (the defaults) or lean "
                            "(bf16 frozen weights, recomputation, scores without autograd)")
    add_dataclass_flags(group, BSRConfig, prefix="bsr.")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..train import resolve_config, resume_config, summary_lines, train
    from ..train.distributed import is_main

    flags = flags_to_values(args, ignore=("command", "run", "config_file", "resume", "no_progress"))
    if args.resume is not None:
        if args.config_file:
            raise BSRError("--resume continues the saved config; drop --config")
        cfg = resume_config(args.resume, flags)
    else:
        cfg = resolve_config(flags, args.config_file)
    report = train(cfg, resume=args.resume, progress=not args.no_progress)
    if is_main():  # under torchrun, one summary (rank 0's) rather than one per process
        print("\n".join(summary_lines(report)))
    return 0
