"""``anyflow convert``: the converter, ``anyflow-convert``, under the ``anyflow`` command (the same arguments)."""

from __future__ import annotations

from typing import List

COMMAND = "convert"


def add_command(commands) -> None:
    """The ``convert`` subcommand, listed in ``anyflow --help``; :func:`anyflow.cli.main` hands its arguments to
    :func:`run` before parsing."""
    commands.add_parser(COMMAND, add_help=False,
                        help="convert a checkpoint into our layout or back to diffusers (= anyflow-convert)")


def run(arguments: List[str]) -> int:
    """``anyflow-convert ARGUMENTS``, named ``anyflow convert`` in its messages; it handles its own interrupts."""
    from weights_convert.cli import main

    return main(arguments, prog=f"anyflow {COMMAND}")
