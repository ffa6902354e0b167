"""A run's checkpoints: what changes while it trains, written atomically and read back for an exact resume.

A checkpoint (every ``save_checkpoint_freq`` iterations) holds the trained parameters (each process its own
shards), the optimizers' state, the EMA, the iteration, the batches drawn and the random generator's
state. It is written into a hidden partial folder, renamed to ``checkpoints/step_NNNNNN`` when every
process has written its file; then the file ``checkpoints/latest`` is replaced by one naming it, and
checkpoints beyond ``keep_checkpoints`` are removed. A run resumes with the number of processes that
wrote it, and then continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional, Tuple

import torch
import torch.distributed as dist

CHECKPOINTS = "checkpoints"


def barrier() -> None:
    """Wait for every process (nothing alone)."""
    if dist.is_initialized():
        dist.barrier()


def write_atomically(path: str, text: str) -> None:
    """Replace the file ``path`` by one holding ``text``, never leaving half a file."""
    from weights_convert.partials import discard, partial_path

    partial = partial_path(path)
    try:
        with open(partial, "w") as f:
            f.write(text)
        os.replace(partial, path)
    finally:
        discard(partial)


class Checkpoints:
    """The ``checkpoints`` folder of a run in ``out``, as this process (``rank`` of ``world``) sees it."""

    def __init__(self, out: str, rank: int, world: int, keep: int):
        self.folder = os.path.join(out, CHECKPOINTS)
        self.rank, self.world, self.keep = rank, world, keep

    def save(self, step: int, state: dict) -> None:
        """Write this process's ``state`` of iteration ``step`` into ``step_NNNNNN`` (every process must call)."""
        from weights_convert.partials import discard, partial_path

        name = f"step_{step:06d}"
        partial = [partial_path(os.path.join(self.folder, name)) if self.rank == 0 else None]
        if self.world > 1:
            dist.broadcast_object_list(partial, src=0)
        partial = partial[0]
        try:
            if self.rank == 0:
                os.makedirs(partial)
            barrier()
            torch.save(state, os.path.join(partial, f"rank{self.rank}.pt"))
            barrier()
            if self.rank == 0:
                target = os.path.join(self.folder, name)
                shutil.rmtree(target, ignore_errors=True)  # a leftover of an earlier run past this step
                os.rename(partial, target)
                write_atomically(os.path.join(self.folder, "latest"), name + "\n")
                kept = sorted(e for e in os.listdir(self.folder) if e.startswith("step_"))
                for old in kept[: -self.keep]:
                    shutil.rmtree(os.path.join(self.folder, old), ignore_errors=True)
        finally:
            if self.rank == 0:
                discard(partial)
        barrier()

    def latest_name(self) -> Optional[str]:
        """The folder ``latest`` names, or None before the first checkpoint."""
        latest = os.path.join(self.folder, "latest")
        if not os.path.isfile(latest):
            return None
        with open(latest) as f:
            return os.path.join(self.folder, f.read().strip())

    def latest(self) -> Optional[Tuple[str, dict]]:
        """(folder, this process's state) of the checkpoint ``latest`` names; None when there is none."""
        latest = os.path.join(self.folder, "latest")
        if not os.path.isfile(latest):
            return None
        with open(latest) as f:
            name = f.read().strip()
        path = os.path.join(self.folder, name, f"rank{self.rank}.pt")
        if not os.path.isfile(path):
            raise ValueError(f"{latest} names {name}, which has no {os.path.basename(path)}: a checkpoint of fewer "
                             "processes? Resume with the number of processes that wrote it")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["processes"] != self.world:
            raise ValueError(f"{os.path.dirname(path)} was written by {state['processes']} processes, this run has "
                             f"{self.world}: resume with {state['processes']} (the shards and the draws depend on it)")
        return os.path.dirname(path), state
