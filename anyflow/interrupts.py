"""Ctrl-C and SIGTERM as one clean way out of a command: an exception that cleanup code sees.

Both signals raise :class:`Interrupted` (a ``KeyboardInterrupt``) in the main thread, so ``finally``
blocks and ``except BaseException`` cleanups run (partial files are removed) and the command
prints one line instead of a traceback.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Iterator


class Interrupted(KeyboardInterrupt):
    """The command was stopped by a signal; ``exit_code`` is 128 + its number (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


@contextlib.contextmanager
def signals_raise_interrupted() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted` (call from the main thread)."""

    def handler(signum, frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
