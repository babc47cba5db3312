"""`bsr study`, `bsr study-combine` and `bsr show-tokens`: they only parse and call `bsr.study`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import BSRError


def add(sub) -> None:
    """Register `bsr study`, `bsr study-combine` and `bsr show-tokens` on the `bsr` subparsers."""
    _add_study(sub)
    _add_combine(sub)
    _add_show_tokens(sub)


def _add_study(sub) -> None:
    p = sub.add_parser("study", help="run a grid of fine-tuning runs from a YAML file, with table and plot",
                       description="Run every run of STUDY.yaml (each exactly as `bsr train` would), measure the "
                                   "training memory and FLOPs of every configuration, and write study.json, study.md, "
                                   "accuracy_vs_memory.png and tokens-<dataset>.png into --out. Finished runs are "
                                   "skipped, killed ones resumed: run the same command again to continue.")
    p.add_argument("study", metavar="STUDY.yaml", help="study file (see bsr/study/grid.py and studies/*.yaml)")
    p.add_argument("--quick", action="store_true", help="apply the file's quick: section (fewer epochs/seeds/points)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel, each a fresh process (use threads: 1)")
    p.add_argument("--out", default=None, help="output directory (default: runs/study-<name>[-quick])")
    p.add_argument("--no-tokens", dest="tokens", action="store_false", help="skip the tokens-<dataset>.png pictures")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: write the table and plots from the runs finished so far")
    p.set_defaults(run=_run_study)


def _run_study(args: argparse.Namespace) -> int:
    from ..study import load_study, run_study

    study = load_study(args.study, quick=args.quick)
    out = args.out or str(Path("runs") / f"study-{study.name}{'-quick' if args.quick else ''}")
    run_study(study, out, jobs=args.jobs, tokens=args.tokens, execute_jobs=not args.report_only)
    return 0


def _add_combine(sub) -> None:
    p = sub.add_parser("study-combine", help="pool the seeds of several studies of the same points into one",
                       description="Pool the finished runs of several `bsr study` outputs that ran the same points "
                                   "(trained with the same options) with different seeds, e.g. a study split "
                                   "over sessions, and write study.json, study.md and accuracy_vs_memory.png into "
                                   "--out with mean ± std over all their seeds. Trains and measures nothing.")
    p.add_argument("studies", nargs="+", metavar="STUDY.json", help="study.json files (or their directories)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--name", default=None, help="name of the combined study (default: the --out directory's name)")
    p.set_defaults(run=_run_combine)


def _run_combine(args: argparse.Namespace) -> int:
    from ..study import write_combined

    data = write_combined(args.studies, args.out, args.name)
    print(f"wrote {Path(args.out) / 'study.md'}, study.json, accuracy_vs_memory.png: {len(data['runs'])} runs "
          f"from {len(args.studies)} studies")
    return 0


def _add_show_tokens(sub) -> None:
    p = sub.add_parser("show-tokens", help="draw which patches a BSR run keeps after each drop block",
                       description="For each image (one row): the image, then the patches kept after each drop "
                                   "block of the trained model of RUN_DIR, dropped patches greyed out.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="directory written by bsr train (a bsr or tokendrop run)")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    p.add_argument("--dataset-images", type=int, default=0, metavar="N",
                   help="also take N test images of the run's dataset")
    p.add_argument("--out", default="tokens.png", metavar="PNG", help="picture to write")
    p.set_defaults(run=_run_show_tokens)


def _run_show_tokens(args: argparse.Namespace) -> int:
    from ..study import show_tokens

    if args.dataset_images < 0:
        raise BSRError(f"--dataset-images {args.dataset_images} must not be negative")
    path = show_tokens(args.run_dir, args.images, args.dataset_images, args.out)
    print(f"wrote {path}")
    return 0
