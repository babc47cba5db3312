"""`bsr train`: fine-tune a ViT; flags from `TrainConfig` and `BSRConfig`, then `bsr.train.train`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

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
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="fit the run into this much memory (e.g. 1.5GiB): take the first configuration bsr plan "
                        "lists for it (lean preset, fewer trainable blocks, a lower keep rate, smaller micro-batches "
                        "with --accumulate), checked with a real measured step first; says what it chose")
    p.add_argument("--planned", default=None, help=argparse.SUPPRESS)  # --memory-budget's fresh processes
    p.add_argument("--planned-option", type=int, default=0, help=argparse.SUPPRESS)
    add_dataclass_flags(p.add_argument_group("training options"), TrainConfig, skip=("bsr",))
    group = p.add_argument_group("BSR options (--method bsr, tokendrop)")
    group.add_argument("--preset", dest="bsr.preset", default=argparse.SUPPRESS, choices=sorted(PRESETS),
                       help="named BSR configuration the other BSR options override: paper (the defaults) or lean "
                            "(bf16 frozen weights, recomputation, scores without autograd)")
    add_dataclass_flags(group, BSRConfig, prefix="bsr.")
    p.set_defaults(run=run)


def _restart(argv: list[str]) -> None:
    """Replace this process with `bsr ARGV` (a fresh process: its memory is what the plan predicted)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "bsr", *argv])


def _planned_argv(path: Path, index: int, args: argparse.Namespace) -> list[str]:
    return ["train", "--planned", str(path), "--planned-option", str(index)] + \
        (["--no-progress"] if args.no_progress else [])


def _log(line: str) -> None:
    print(f"bsr: {line}", flush=True)


def _plan_budget(cfg, args: argparse.Namespace) -> None:
    """--memory-budget: plan (bsr.measure.plan.write_plan into the run directory's plan.json), then check and train
    the first option in a fresh process."""
    from ..measure.plan import parse_size, write_plan
    from ..train.config import with_values
    from ..train.distributed import launched
    from ..train.runs import RunFiles, default_out

    budget = parse_size(args.memory_budget)
    if cfg.tasks or launched():
        raise BSRError("--memory-budget plans single-task runs in one process; drop --tasks / torchrun or "
                       "--memory-budget")
    cfg = with_values(cfg, out=cfg.out or default_out(cfg))
    out = Path(cfg.out)
    RunFiles(out).check(resuming=False)  # before plan.json goes there
    out.mkdir(parents=True, exist_ok=True)
    write_plan(cfg, budget, out / "plan.json", _log)
    _restart(_planned_argv(out / "plan.json", 0, args))


def _from_plan(args: argparse.Namespace):
    """--planned FILE --planned-option I: check option I with a real step here; its config if it fits, else the
    next option in a fresh process."""
    from ..measure.plan import check_planned

    path = Path(args.planned)
    cfg = check_planned(path, args.planned_option, _log)
    if cfg is None:
        _restart(_planned_argv(path, args.planned_option + 1, args))
    return cfg


def run(args: argparse.Namespace) -> int:
    from ..train import resolve_config, resume_config, summary_lines, train
    from ..train.distributed import is_main

    flags = flags_to_values(args, ignore=("command", "run", "config_file", "resume", "no_progress", "memory_budget",
                                          "planned", "planned_option"))
    if args.planned is not None:
        cfg = _from_plan(args)
        if cfg is None:
            return 0  # only where _restart returns (tests)
        report = train(cfg, progress=not args.no_progress)
        print("\n".join(summary_lines(report)))
        from ..measure.plan import record_trained_peak
        record_trained_peak(Path(args.planned), int(report["peak_memory_mib"] * 2 ** 20), _log)
        return 0
    if args.resume is not None:
        if args.config_file or args.memory_budget:
            raise BSRError(f"--resume continues the saved config; drop "
                           f"{'--config' if args.config_file else '--memory-budget'}")
        cfg = resume_config(args.resume, flags)
    else:
        cfg = resolve_config(flags, args.config_file)
    if args.memory_budget is not None:
        _plan_budget(cfg, args)
        return 0  # only where _restart returns (tests)
    report = train(cfg, resume=args.resume, progress=not args.no_progress)
    if is_main():  # under torchrun, one summary (rank 0's) rather than one per process
        print("\n".join(summary_lines(report)))
    return 0
