"""The ``anyflow`` command: ``anyflow inspect PATH`` (and more subcommands as they land).

Only argument parsing happens at start-up; torch is imported by the subcommand that needs it.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anyflow", description="AnyFlow video flow-map transformer tools.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    inspect = commands.add_parser("inspect", help="describe a checkpoint from its headers (no weights read)")
    inspect.add_argument("path", metavar="PATH", help="checkpoint file or folder")
    inspect.add_argument("--from", dest="from_format", choices=("anyflow", "diffusers", "wan-diffusers", "wan-original"))
    inspect.set_defaults(run=run_inspect)
    return parser


def run_inspect(args: argparse.Namespace) -> int:
    from collections import Counter

    from weights_convert.sources import open_checkpoint

    checkpoint = open_checkpoint(args.path, args.from_format)
    dtypes = Counter()
    for lazy in checkpoint.tensors.values():
        dtypes[str(lazy.dtype).replace("torch.", "")] += lazy.nbytes
    print(f"path: {checkpoint.path}")
    print(f"format: {checkpoint.description}")
    print(f"files: {', '.join(checkpoint.files)}")
    print(f"config: {checkpoint.config.to_dict()}")
    print(f"parameters: {checkpoint.num_parameters:,} ({checkpoint.num_parameters / 1e9:.2f}e9) in {len(checkpoint.tensors)} tensors")
    print(f"dtypes: {', '.join(f'{d} {n / 1e6:.1f} MB' for d, n in sorted(dtypes.items()))}")
    print(f"bytes: {checkpoint.nbytes:,}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as exc:  # CheckpointError and KeyMismatchError are ValueErrors
        print(f"anyflow {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
