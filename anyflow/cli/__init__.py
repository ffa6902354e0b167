"""The ``anyflow`` command: ``demo``, ``sample``, ``generate``, ``train``, ``app``, ``inspect``, ``convert``, one
module each.

Only argument parsing happens at start-up (``anyflow --help`` does not import torch); each command
imports what it needs when it runs. This package is the top of the import graph: it uses the
library and the converter, and nothing of the library imports it. What the commands share is in
:mod:`.common`; ``anyflow-convert`` is :mod:`weights_convert.cli`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .. import __version__
from ..runtime.interrupts import Interrupted, exit_now, reader_gone, run_interruptibly, signals_raise_interrupted
from . import app, convert, demo, generate, inspect, sample, train

COMMANDS = (demo, sample, generate, train, app, inspect, convert)


def build_parser() -> argparse.ArgumentParser:
    """The ``anyflow`` parser, every command's options included."""
    parser = argparse.ArgumentParser(
        prog="anyflow", description="AnyFlow video flow-map transformer tools. Checkpoint conversion: anyflow convert, "
        "the same as the anyflow-convert command.")
    parser.add_argument("--version", action="version", version=f"anyflow {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_command(commands)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [convert.COMMAND]:  # every argument after it is the converter's (its --help too)
        return convert.run(argv[1:])
    code = run_command(build_parser().parse_args(argv))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, end without the interpreter's teardown: a C++ thread of torch's distributed layer
        # can still be running when it destroys its static objects, and the process then aborts (SIGABRT,
        # "terminate called without an active exception") after its work is done, which torchrun reports
        # as a failure (a 2-rank gloo stand-in under load: 14 of 30 launches failed so; 0 of 30 with this exit).
        exit_now(code)
    return code


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command: its exit code, one line on stderr for an error or an interrupt."""
    from weights_convert.partials import remove_registered

    try:
        with signals_raise_interrupted():
            code = run_interruptibly(lambda: args.run(args), cleanup=remove_registered)
        sys.stdout.flush()  # a reader that went away is seen here, not as a traceback at exit
        return code
    except BrokenPipeError:  # the reader went away (anyflow inspect ... | head): end quietly, as Unix tools do
        return reader_gone()
    except (ValueError, OSError) as exc:  # CheckpointError and KeyMismatchError are ValueErrors
        print(f"anyflow {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except Interrupted as stop:
        print(f"anyflow {args.command}: interrupted ({stop}); {getattr(args, 'interrupted', 'nothing was written')}",
              file=sys.stderr)
        if stop.abandoned:
            exit_now(stop.exit_code)
        return stop.exit_code


if __name__ == "__main__":
    sys.exit(main())
