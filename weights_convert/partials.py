"""Partial outputs: the hidden ``.NAME.partial-HOST-PID`` file or folder an output is built in.

Every command writes beside its target under such a name and renames it onto the target only
when complete. The names let three things happen that plain temporary names would not:

- a partial left by a process that died (SIGKILL, power loss) is recognised by the next run that
  writes in the same folder on the same host (its process is gone), whatever its target was (the
  trainer's next step, a renamed OUT, a file the rerun no longer writes), and removed, while one of a
  live process, or of another host sharing the folder, is left alone;
- the partials this process made are registered, so that a command abandoning a worker stuck in
  native code (see :func:`anyflow.runtime.interrupts.run_interruptibly`) can remove them before it exits;
- a user who finds one knows what made it.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
from typing import List, Set

_registered: Set[str] = set()
_lock = threading.Lock()


def _host() -> str:
    return socket.gethostname().replace(os.sep, "_").replace("-", "_") or "host"


def partial_path(out: str) -> str:
    """The partial path of this process for the target ``out`` (absolute), registered until discarded.

    First the partials that dead processes of this host left in that folder are removed
    (:func:`remove_stale`), and a leftover of this same process under that name (an earlier run inside it).
    """
    folder, name = os.path.split(os.path.abspath(out))
    path = os.path.join(folder, f".{name}.partial-{_host()}-{os.getpid()}")
    remove_stale(out)
    _remove(path)
    with _lock:
        _registered.add(path)
    return path


def discard(path: str) -> None:
    """Remove ``path`` (file or folder) if it exists and forget it."""
    _remove(path)
    with _lock:
        _registered.discard(path)


def remove_registered() -> None:
    """Remove every partial this process still holds (the last thing a process does on an interrupt)."""
    with _lock:
        paths = list(_registered)
        _registered.clear()
    for path in paths:
        _remove(path)


def remove_stale(out: str) -> List[str]:
    """Remove the partials that dead processes of this host left in the folder of the target ``out``,
    whatever their target (``.NAME.partial-HOST-PID``, any NAME); their names.

    ``.NAME.partial-PID`` (the names of earlier versions, taken as this host's) counts too. A folder
    that does not exist yet holds none.
    """
    folder = os.path.dirname(os.path.abspath(out))
    host = _host()
    try:
        entries = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for entry in entries:
        target, partial, owner_pid = entry.rpartition(".partial-")
        if not (partial and target.startswith(".") and len(target) > 1):
            continue
        owner, _, pid = owner_pid.rpartition("-")
        if pid.isdigit() and owner in ("", host) and not _alive(int(pid)):
            _remove(os.path.join(folder, entry))
            removed.append(entry)
    return removed


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
