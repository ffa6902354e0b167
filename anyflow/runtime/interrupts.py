"""Ctrl-C and SIGTERM as one clean way out of a command, within seconds, whatever it is doing.

Python runs a signal handler only between two lines of Python. A command inside one long native
call (a single attention over millions of tokens can take hours) would not see Ctrl-C until the
call returns. So a command's work runs in a worker thread (:func:`run_interruptibly`) while the
main thread waits, where a signal raises :class:`Interrupted` at once. The worker is then asked to
stop: :class:`Stopped` (a ``KeyboardInterrupt``) is raised in it at its next line of Python, so its
``finally`` blocks and ``except BaseException`` cleanups run (partial files are removed). A worker
still inside native code after a grace period is abandoned: the registered partial files are
removed and the process exits at once (see :func:`exit_now`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")
GRACE_SECONDS = 3.0


class Interrupted(KeyboardInterrupt):
    """The command was stopped by a signal; ``exit_code`` is 128 + its number (130 for Ctrl-C, 143 for SIGTERM).

    ``abandoned`` is true when the worker did not stop within the grace period: the process must
    then end with :func:`exit_now`, since a thread inside native code cannot be joined.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum
        self.abandoned = False


class Stopped(KeyboardInterrupt):
    """Raised inside a worker thread when its command was interrupted."""


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


def run_interruptibly(work: Callable[[], T], cleanup: Callable[[], None], grace: float = GRACE_SECONDS) -> T:
    """``work()`` in a worker thread, its result or exception returned or raised here.

    Call it from the main thread inside :func:`signals_raise_interrupted`. On SIGINT or SIGTERM
    the worker gets :class:`Stopped` and ``grace`` seconds to unwind; if it is still running
    then (or a second signal comes), ``cleanup()`` runs and the :class:`Interrupted` raised here
    has ``abandoned`` set. torch's intra-op thread count of the caller is kept in the worker.
    """
    outcome = {}
    done = threading.Event()  # waited on rather than Thread.join: a join that a signal interrupts can
    threads = _torch_threads()  # mark a running thread as stopped (CPython gh-90882)

    def target() -> None:
        try:
            if threads:
                import torch

                torch.set_num_threads(threads)
            outcome["result"] = work()
        except BaseException as exc:  # handed to the main thread
            outcome["error"] = exc
        finally:
            done.set()

    worker = threading.Thread(target=target, name="anyflow-command", daemon=True)
    worker.start()
    try:
        while not done.wait(0.5):
            pass
    except Interrupted as stop:
        raise_in(worker, Stopped)
        try:
            done.wait(grace)
        except Interrupted:  # a second signal: no more waiting
            pass
        if not done.is_set():
            cleanup()
            stop.abandoned = True
        raise stop from None
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def reader_gone() -> int:
    """After a BrokenPipeError on stdout (``anyflow inspect ... | head``): send what is left of stdout nowhere,
    so that nothing more fails at exit, and return the exit code of a process ended by SIGPIPE (141), as Unix
    tools end quietly when their reader leaves."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


def exit_now(code: int) -> None:
    """End the process at once (a worker thread may be inside native code and cannot be joined)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def raise_in(thread: threading.Thread, exception: type) -> None:
    """Raise ``exception`` in ``thread`` at its next line of Python (to stop a worker from another thread)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exception))


def _torch_threads() -> int:
    """The caller's torch intra-op thread count, when torch is already imported (0 otherwise)."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else 0
