"""The `bsr` command: `bsr train`, `eval`, `export`, `predict`, `plan`, `bench`, `study`, `study-combine`,
`show-tokens` and `weights`: one module per command (`study` also holds `study-combine` and `show-tokens`).

The CLI only parses and calls the library; each command module registers its parser (`add`) and runs it (`run`), and
no command module imports another. Flags of `train` and `bench` are generated from the dataclass fields of their
configs and their help strings (`bsr.cli.options`), so the two never drift apart. User errors (`BSRError`, and OS
errors such as a full disk) print one line `bsr: error: ...` and exit with status 2; no tracebacks. Anything else is a
bug in bsr: one line `bsr: internal error: ...` saying how to see the traceback and where to report it, exit status 1;
with `BSR_DEBUG=1` or `bsr --debug` every error is raised with its traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Optional, Sequence

from ..errors import BSRError
from ..version import __version__
from . import bench as _bench
from . import device as _device
from . import eval as _eval
from . import export as _export
from . import plan as _plan
from . import predict as _predict
from . import study as _study
from . import train as _train
from . import weights as _weights

EXIT_USER_ERROR = 2
EXIT_BUG = 1
REPORT_AT = "the project's issue tracker (README: Errors and reporting a bug)"
# in help order; each has add(subparsers)
COMMANDS = (_train, _eval, _export, _device, _predict, _plan, _bench, _study, _weights)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bsr", description="Block Selective Reprogramming of timm ViTs "
                                                             "(Sarkar et al., arXiv 2405.10951)")
    debug_help = "show the traceback of an error (also: BSR_DEBUG=1)"
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)  # only if given
    parser.add_argument("--version", action="version", version=f"bsr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add(sub)
    for command_parser in sub.choices.values():  # `bsr CMD ... --debug` works too
        command_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `bsr` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return EXIT_USER_ERROR
    debug = vars(args).pop("debug", False)  # not an option of the command
    debug = debug or os.environ.get("BSR_DEBUG", "") not in ("", "0")
    previous = _terminate_like_interrupt()
    try:
        return args.run(args)
    except KeyboardInterrupt as e:
        print(f"bsr: {'terminated' if isinstance(e, Terminated) else 'interrupted'}; the last checkpoint is intact: "
              f"continue with --resume RUN_DIR", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except Exception as e:
        if debug:
            raise
        return _report(e)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it ends like Ctrl-C: writes finish or roll back, one line."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _terminate_like_interrupt():
    """Handle SIGTERM as SIGINT in this process (main thread only); returns the previous handler (None if not set)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def _report(e: Exception) -> int:
    """One line for an exception out of a command, and the exit status: 2 for the user's input or environment, 1 for
    a bug in bsr."""
    if isinstance(e, BSRError):
        print(f"bsr: error: {_one_line(str(e))}", file=sys.stderr)
    elif isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":  # torch's, on a GPU
        print(f"bsr: error: out of memory ({_one_line(str(e), 120) or type(e).__name__}); lower --batch-size or "
              f"use a smaller model", file=sys.stderr)
    elif isinstance(e, OSError):  # e.g. disk full while writing metrics: the user's environment, not a bug
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"bsr: error: {_one_line(str(e.strerror or e))}{where}", file=sys.stderr)
    else:
        print(f"bsr: internal error: {type(e).__name__}: {_one_line(str(e), 300)} (a bug in bsr; rerun with "
              f"BSR_DEBUG=1 or --debug for the traceback and report it at {REPORT_AT})", file=sys.stderr)
        return EXIT_BUG
    return EXIT_USER_ERROR


def _one_line(text: str, limit: int = 0) -> str:
    text = " ".join(text.split())
    return text[:limit] + "..." if limit and len(text) > limit else text
