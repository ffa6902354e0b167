"""``anyflow app SNAPSHOT``: a page to make videos with one snapshot, loaded once (:mod:`anyflow.app`)."""

from __future__ import annotations

import argparse

from ..model.parameters import DTYPE_CHOICES, FLOAT8_NAME
from .common import DEVICE_HELP, OFFLOAD_HELP, WEIGHT_DTYPE_HELP


def add_command(commands) -> None:
    """The ``app`` subcommand and its options."""
    app = commands.add_parser(
        "app", help="serve a page to make videos with a snapshot (also usable over HTTP)",
        description="Serve a web page (Gradio) that makes videos with one pipeline snapshot, loaded once: prompt, "
        "steps, seed, length, size (and a start image for a FAR snapshot); a FAR snapshot's chunks play as they are "
        "made. One run at a time, the others queued; the same over HTTP with gradio_client (docs/APP.md). Needs the "
        'app extra: pip install -e ".[app]". Binds 127.0.0.1 unless --host says otherwise.',
    )
    app.add_argument("snapshot", metavar="SNAPSHOT", help="pipeline snapshot folder (as for generate --model)")
    app.add_argument("--host", default="127.0.0.1",
                     help="address to serve on (default 127.0.0.1: this machine only; 0.0.0.0 serves every machine "
                     "that can reach this one, with no login, and prints a warning)")
    app.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    app.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                     help="transformer and text encoder dtype, as for generate (auto: float32 on CPU, bfloat16 on CUDA)")
    app.add_argument("--weight-dtype", choices=(FLOAT8_NAME,), default=None, help=f"the transformer's: {WEIGHT_DTYPE_HELP}")
    app.add_argument("--offload", action="store_const", const="blocks", default=None,
                     help=f"block offload of the transformer: {OFFLOAD_HELP}")
    app.add_argument("--device", default=None, help=DEVICE_HELP)
    app.set_defaults(run=run_app, interrupted="the server stopped and removed its files")


def run_app(args: argparse.Namespace) -> int:
    from ..app import serve

    return serve(args)
