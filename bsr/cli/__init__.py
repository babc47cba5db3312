"""The `bsr` command: `bsr train`, `eval`, `export`, `predict`, `bench`, `study` and `show-tokens`, one module each.

The CLI only parses and calls the library; each command module registers its parser (`add`) and runs it (`run`), and
no command module imports another. Flags of `train` and `bench` are generated from the dataclass fields of their
configs and their help strings (`bsr.cli.options`), so the two never drift apart. User errors (`BSRError`, and OS
errors such as a full disk) print one line `bsr: error: ...` and exit with status 2; no tracebacks.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..errors import BSRError
from . import bench as _bench
from . import eval as _eval
from . import export as _export
from . import predict as _predict
from . import study as _study
from . import train as _train
from . import weights as _weights

EXIT_USER_ERROR = 2
COMMANDS = (_train, _eval, _export, _predict, _bench, _study, _weights)  # in help order; each has add(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bsr", description="Block Selective Reprogramming of timm ViTs "
                                                             "(Sarkar et al., arXiv 2405.10951)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add(sub)
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
