"""`python -m bsr_device` (or `bsr-device`): train on-device artifacts without PyTorch.

    bsr-device train ARTIFACTS --dataset folder:PATH --out DEVICE_RUN     # train, evaluate, checkpoint, model.onnx
    bsr-device train --resume DEVICE_RUN                                    # continue a killed run
    bsr-device eval DEVICE_RUN                                              # test top-1 of its checkpoint

Bad input is one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from .errors import BSRError


def _log(message: str) -> None:
    print(f"bsr-device: {message}", file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bsr-device", description="Train bsr's on-device training artifacts (bsr "
                                "export --format ort-training) with ONNX Runtime, without PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train artifacts on a folder/CSV dataset into a device run directory")
    t.add_argument("artifacts", nargs="?", metavar="ARTIFACTS", help="folder written by bsr export --format "
                   "ort-training (not with --resume)")
    t.add_argument("--dataset", help="folder:PATH (one sub-folder per class) or csv:FILE (path,label lines)")
    t.add_argument("--out", help="device run directory to create")
    t.add_argument("--resume", metavar="DEVICE_RUN", help="continue this device run from its checkpoint")
    t.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    t.add_argument("--epochs", type=int, help="training epochs when --steps is not set (default: the recipe's)")
    t.add_argument("--batch-size", type=int, help="images per step (default: the recipe's)")
    t.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    t.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: its own choice)")
    t.add_argument("--graph-format", default="onnx", choices=("onnx", "ort"), help="train the .onnx graphs or "
                   "their .ort copies (what minimal mobile builds load) [default: onnx]")
    t.add_argument("--no-arena", action="store_true", help="turn ORT's CPU memory arena off (less memory, ~10%% "
                   "slower)")
    e = sub.add_parser("eval", help="test top-1 of a device run's checkpoint")
    e.add_argument("run", metavar="DEVICE_RUN")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from . import trainer

        if args.command == "train":
            for flag in ("steps", "epochs", "batch_size", "threads"):
                value = getattr(args, flag)
                if value is not None and value < 1:
                    raise BSRError(f"--{flag.replace('_', '-')}={value} must be at least 1")
            if args.lr is not None and not args.lr > 0:
                raise BSRError(f"--lr={args.lr} must be above 0")
            if args.resume:
                if args.artifacts or args.dataset or args.out:
                    raise BSRError("--resume continues a device run as it was started; drop ARTIFACTS, --dataset "
                                   "and --out")
                out, artifacts, dataset = args.resume, None, None
            else:
                if not (args.artifacts and args.dataset and args.out):
                    raise BSRError("train needs ARTIFACTS, --dataset and --out (or --resume DEVICE_RUN)")
                out, artifacts, dataset = args.out, args.artifacts, args.dataset
            report = trainer.train(artifacts, dataset, out, resume=bool(args.resume), steps=args.steps,
                                   epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, threads=args.threads,
                                   graph_format=args.graph_format, arena=not args.no_arena, log=_log)
            print(f"device run {out}: test top-1 final {report['final_top1']:.2f}% best {report['best_top1']:.2f}% "
                  f"(step {report['best_step']}), {report['steps']} steps, step {report['step_ms_median']:.1f} ms "
                  f"median, peak RSS {report['peak_rss_mib']:.0f} MiB; model {out}/model.onnx")
        else:
            top1 = trainer.evaluate_run(args.run, log=_log)
            print(f"device run {args.run}: test top-1 {top1:.2f}%")
    except BSRError as e:
        print(f"bsr-device: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bsr-device: interrupted; the last checkpoint is intact: continue with bsr-device train --resume RUN",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
