"""The `bsr` command: `bsr train`, `bsr eval`, `bsr export`.

The CLI only parses and calls the library. `train` flags are generated from the `TrainConfig` and `BSRConfig`
dataclass fields and their help strings, so the two never drift apart. User errors (`BSRError`, and OS errors such as
a full disk) print one line `bsr: error: ...` and exit with status 2; no tracebacks.
"""

from __future__ import annotations

import argparse
import sys
import types
from dataclasses import MISSING, fields
from typing import Any, Callable, Optional, Sequence, Union, get_args, get_origin, get_type_hints

from .core.config import PRESETS, BSRConfig
from .errors import BSRError

EXIT_USER_ERROR = 2


# ------------------------------------------------------------------------------------------------- flag generation


def _parser_for(tp: Any) -> Callable[[str], Any]:
    """A string -> value converter for a dataclass type hint; "none" gives None for optional fields."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            base = _parser_for(inner[0])
            return lambda s: None if s.lower() in ("none", "off", "null") else base(s)
        return str  # e.g. block specs (str or list of ints): BSRConfig parses them itself
    if origin is list:
        item = _parser_for(args[0])
        return lambda s: [item(part) for part in s.split(",") if part.strip()]
    if tp in (int, float, str):
        return tp
    return str


def _default_text(f) -> str:
    if f.default is not MISSING:
        value = f.default
    elif f.default_factory is not MISSING:
        value = f.default_factory()
    else:
        return ""
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)
    return f" [default: {value}]"


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, prefix: str = "", skip: Sequence[str] = ()):
    """One `--flag` per field of `cls` (help from the field's metadata); only flags the user gives get a value."""
    hints = get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip or "help" not in f.metadata:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"] + _default_text(f)
        dest = prefix + f.name
        if hints[f.name] is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=dest, type=_parser_for(hints[f.name]), default=argparse.SUPPRESS,
                                metavar=f.name.upper(), help=help_text)


def flags_to_values(namespace: argparse.Namespace, ignore: Sequence[str]) -> dict:
    """Flags the user gave, nested like `TrainConfig.to_dict()` (`bsr.<field>` under "bsr")."""
    values: dict = {}
    for key, value in vars(namespace).items():
        if key in ignore:
            continue
        if key.startswith("bsr."):
            values.setdefault("bsr", {})[key[4:]] = value
        else:
            values[key] = value
    return values


# ------------------------------------------------------------------------------------------------- subcommands


def _add_train(sub) -> None:
    from .train import TrainConfig

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
    p.set_defaults(run=_run_train)


# Flags that may accompany --resume: they change how, not what, is computed.
_RESUME_FLAGS = ("device", "workers", "threads")


def _run_train(args: argparse.Namespace) -> int:
    from .train.distributed import is_main
    from .train import config_of_run, resolve_config, summary_lines, train

    flags = flags_to_values(args, ignore=("command", "run", "config_file", "resume", "no_progress"))
    if args.resume is not None:
        extra = [k for k in flags if k not in _RESUME_FLAGS] + (["config"] if args.config_file else [])
        if extra:
            raise BSRError(f"--resume continues the saved config; drop --{extra[0].replace('_', '-')}")
        cfg, _ = config_of_run(args.resume)
        for key, value in flags.items():
            setattr(cfg, key, value)
        cfg.out = args.resume
    else:
        cfg = resolve_config(flags, args.config_file)
    report = train(cfg, resume=args.resume, progress=not args.no_progress)
    if is_main():  # under torchrun, one summary (rank 0's) rather than one per process
        print("\n".join(summary_lines(report)))
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="top-1 accuracy of a trained run", description="Evaluate a run's checkpoint.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="directory written by bsr train --out")
    p.add_argument("--dataset", default=None, help="dataset (default: the run's)")
    p.add_argument("--data-dir", default=None, help="folder holding the dataset")
    p.add_argument("--limit", type=int, default=None, help="evaluate only this many test images")
    p.add_argument("--batch-size", type=int, default=None, help="evaluation batch size")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from .train import evaluate_run

    r = evaluate_run(args.run_dir, dataset=args.dataset, data_dir=args.data_dir, limit=args.limit,
                     device=args.device, batch_size=args.batch_size)
    mean = " (mean over tasks)" if "tasks" in r else ""
    print(f"top-1 {r['top1']:.2f}%{mean} on {r['dataset']} test ({r['images']} images, method {r['method']})")
    for name, acc in r.get("tasks", {}).items():
        print(f"  {name:<16} {acc:.2f}%")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a run's model as plain timm weights (.safetensors)",
                       description="Write the trained model of RUN_DIR as a timm state dict: BSR patch undone, "
                                   "LoRA merged. Load it back with --checkpoint OUT.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("out", metavar="OUT.safetensors")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="stored precision")
    p.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from .train import export_weights

    r = export_weights(args.run_dir, args.out, args.dtype)
    print(f"wrote {r['path']} ({r['tensors']} tensors, {r['bytes'] / 2**20:.2f} MiB, {args.dtype})")
    return 0


def _add_bench(sub) -> None:
    from .bench_cli import add_bench_parser

    add_bench_parser(sub)


def _add_study(sub) -> None:
    from .study_cli import add_show_tokens_parser, add_study_parser

    add_study_parser(sub)
    add_show_tokens_parser(sub)


# Subcommands in help order, each one (name, adder) pair.
SUBCOMMANDS: list[tuple[str, Callable]] = [("train", _add_train), ("eval", _add_eval), ("export", _add_export),
                                           ("bench", _add_bench), ("study", _add_study)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bsr", description="Block Selective Reprogramming of timm ViTs "
                                                             "(Sarkar et al., arXiv 2405.10951)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _, add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `bsr` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return args.run(args)
    except BSRError as e:
        print(f"bsr: error: {e}", file=sys.stderr)
    except OSError as e:  # e.g. disk full while writing metrics: the user's environment, not a bug
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"bsr: error: {e.strerror or e}{where}", file=sys.stderr)
    except KeyboardInterrupt:
        print("bsr: interrupted; continue with --resume RUN_DIR from the last checkpoint", file=sys.stderr)
        return 130
    return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
