"""`bsr plan`: configurations of a run that fit a memory budget, by expected accuracy (`bsr.measure.plan`)."""

from __future__ import annotations

import argparse
import sys

from ..core.config import PRESETS, BSRConfig
from .options import add_dataclass_flags, flags_to_values


def add(sub) -> None:
    """Register `bsr plan` on the `bsr` subparsers."""
    from ..train import TrainConfig

    p = sub.add_parser("plan", help="configurations of a run that fit a memory budget",
                       description="Predict the peak memory of a training run and of variants of it (BSR's lean "
                                   "preset, fewer trainable blocks, a lower keep rate, smaller micro-batches with "
                                   "--accumulate keeping the effective batch) and list those that fit --budget, by "
                                   "expected accuracy, with predicted peak and FLOPs per step. Peaks: the training "
                                   "step traced on fake tensors plus this machine's overhead, measured once and "
                                   "cached. bsr train --memory-budget takes the first.")
    p.add_argument("--budget", required=True, metavar="SIZE", help="memory budget, e.g. 1.5GiB, 800MiB, 2G (CPU: the "
                                                                   "process's peak resident memory; CUDA: tensors)")
    p.add_argument("--config", dest="config_file", default=None, metavar="YAML", help="YAML file of options")
    p.add_argument("--remeasure", action="store_true", help="measure this machine's overhead again")
    add_dataclass_flags(p.add_argument_group("training options (as bsr train)"), TrainConfig, skip=("bsr",))
    group = p.add_argument_group("BSR options")
    group.add_argument("--preset", dest="bsr.preset", default=argparse.SUPPRESS, choices=sorted(PRESETS),
                       help="named BSR configuration the other BSR options override")
    add_dataclass_flags(group, BSRConfig, prefix="bsr.")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..measure.plan import Planner, parse_size, plan_lines
    from ..train import resolve_config

    budget = parse_size(args.budget)
    flags = flags_to_values(args, ignore=("command", "run", "config_file", "budget", "remeasure"))
    cfg = resolve_config(flags, args.config_file)
    planner = Planner(cfg, log=lambda message: print(f"bsr plan: {message}", file=sys.stderr, flush=True),
                      refresh=args.remeasure)
    print("\n".join(plan_lines(planner, planner.plan(budget), budget)))
    return 0
