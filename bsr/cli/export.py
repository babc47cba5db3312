"""`bsr export`: a run's model as a deployable file (`bsr.train.deploy.export_run`), or on-device training artifacts
of a run or of a config (`bsr.train.device.export_device`)."""

from __future__ import annotations

import argparse
import sys

from ..core.config import PRESETS, BSRConfig
from ..errors import BSRError
from .options import add_dataclass_flags, flags_to_values

FORMATS = ("safetensors", "onnx", "timm", "ort-training")
_OWN = ("command", "run", "paths", "format", "delta", "dtype", "verify", "config_file", "debug")


def add(sub) -> None:
    """Register `bsr export` on the `bsr` subparsers."""
    from ..train import TrainConfig

    p = sub.add_parser("export", help="write a run's model as a deployable file (bsr safetensors, ONNX, timm) or as "
                                      "on-device training artifacts",
                       description="bsr export RUN_DIR OUT: write the trained model of RUN_DIR. safetensors "
                                   "(default): a bsr model file that keeps the BSR config, class names, mean/std and "
                                   "image size; bsr.load(OUT) or bsr predict OUT rebuilds the model with its token "
                                   "dropping. --delta: only what training changed, for bsr.deploy.apply_delta onto "
                                   "the base weights the run started from (checked by sha256). onnx: token dropping "
                                   "inside the graph, checked against PyTorch on test images right after export. "
                                   "timm: a plain timm state dict, BSR patch undone, LoRA merged (load it back with "
                                   "--checkpoint OUT). ort-training: a folder of ONNX Runtime on-device training "
                                   "artifacts (training/eval/optimizer graphs, checkpoint, .ort copies, "
                                   "bsr-device.json) that bsr-device trains without PyTorch; bsr export "
                                   "--format ort-training OUT [training options] exports a config instead of a run "
                                   "(e.g. the pretrained backbone with BSR applied).")
    p.add_argument("paths", nargs="+", metavar="RUN_DIR OUT", help="the run and the output file (.safetensors or "
                   ".onnx) or folder (ort-training); with --format ort-training and no run, OUT alone")
    p.add_argument("--format", default=None, choices=FORMATS,
                   help="what to write [default: by OUT's extension: .safetensors a bsr model file, .onnx ONNX]")
    p.add_argument("--delta", action="store_true", help="with safetensors: write only what training changed")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                   help="stored precision of safetensors/timm files (bsr files load back to float32) [default: fp32]")
    p.add_argument("--verify", type=int, nargs="?", const=50, default=None, metavar="STEPS",
                   help="ort-training: train STEPS steps (default 50) in onnxruntime and in PyTorch from the same "
                        "start on the same batches, print the largest loss difference, exit 2 above 1e-4")
    group = p.add_argument_group("training options (ort-training from a config: the same as bsr train's)")
    group.add_argument("--config", dest="config_file", default=None, metavar="YAML", help="YAML file of options")
    add_dataclass_flags(group, TrainConfig, skip=("bsr", "out"))
    group.add_argument("--preset", dest="bsr.preset", default=argparse.SUPPRESS, choices=sorted(PRESETS),
                       help="named BSR configuration the other BSR options override")
    add_dataclass_flags(group, BSRConfig, prefix="bsr.")
    p.set_defaults(run=run)


def _log(message: str) -> None:
    print(f"bsr export: {message}", file=sys.stderr, flush=True)


def _first_option(args: argparse.Namespace, flags: dict) -> str:
    """The first training option, --config or --verify the user gave, as a flag."""
    name = next(iter(flags), "config" if args.config_file else "verify")
    return "--" + name.replace("_", "-")


def _device(args: argparse.Namespace, flags: dict) -> int:
    from ..train import resolve_config
    from ..train.device import VERIFY_TOLERANCE, export_device

    if len(args.paths) == 2:
        if flags or args.config_file:
            raise BSRError(f"RUN_DIR carries its own config; drop {_first_option(args, flags)} (or drop RUN_DIR to "
                           f"export a config)")
        source, out = args.paths
    else:
        source, out = resolve_config(flags, args.config_file), args.paths[0]
    if args.verify is not None and args.verify < 1:
        raise BSRError(f"--verify {args.verify} must be at least 1 step")
    r = export_device(source, out, verify_steps=args.verify or 0, log=_log)
    print(f"wrote {r['path']} (on-device training artifacts, {r['trained']} trained / {r['frozen']} frozen tensors, "
          f"checkpoint {r['files'].get('checkpoint', 0) / 2**20:.1f} MiB, {r['seconds']:.1f} s)")
    if "verify" in r:
        v = r["verify"]
        ref = "" if v["reference"] == "the model" else f" (PyTorch with the {v['reference']})"
        print(f"  onnxruntime vs PyTorch{ref}, {v['steps']} steps of batch {v['batch']}: largest loss difference "
              f"{v['max_loss_diff']:.2e}")
        if not v["max_loss_diff"] <= VERIFY_TOLERANCE:
            raise BSRError(f"the artifacts train differently from PyTorch (loss difference {v['max_loss_diff']:.2e} "
                           f"> {VERIFY_TOLERANCE:.0e}); report the model and options")
    return 0


def run(args: argparse.Namespace) -> int:
    from ..train.deploy import export_run

    flags = flags_to_values(args, ignore=_OWN)
    if args.format == "ort-training":
        return _device(args, flags)
    if len(args.paths) != 2:
        raise BSRError(f"bsr export --format {args.format} takes RUN_DIR and OUT; only ort-training exports a config")
    if flags or args.config_file or args.verify is not None:
        raise BSRError(f"{_first_option(args, flags)} is for --format ort-training; drop it")
    run_dir, out = args.paths
    r = export_run(run_dir, out, fmt=args.format, delta=args.delta, dtype=args.dtype, log=_log)
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
