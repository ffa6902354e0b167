"""The processes of a run: one, or the ranks ``torchrun`` started, with their process group set up and torn down once.

    with Processes(device) as processes:       # under torchrun: the group and a 1-D device mesh over every rank
        processes.say("on rank 0 only")
        ...                                     # a finished block meets the others at a barrier, then tears down

``anyflow sample`` and ``anyflow train`` (and :class:`anyflow.training.Trainer`) use it alike.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch
import torch.distributed as dist

from .devices import resolve_device


class Processes:
    """One process, or the ranks ``torchrun`` started (its ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``).

    ``device``: as :func:`~anyflow.runtime.devices.resolve_device` takes it (None: CUDA when available,
    else the CPU); under torchrun on CUDA each rank takes the GPU of its ``LOCAL_RANK``. Several ranks
    join one process group (NCCL on CUDA, gloo on the CPU; an existing group is used as it is) and a
    1-D device ``mesh`` over all of them. Rank 0 prints (:meth:`say`).
    """

    def __init__(self, device: Optional[Union[str, torch.device]] = None, argument: str = "device"):
        self.count = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = resolve_device(device, argument)
        self.mesh = None
        if self.count > 1:
            from torch.distributed.device_mesh import init_device_mesh

            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.mesh = init_device_mesh(self.device.type, (self.count,))

    def say(self, message: str) -> None:
        """Print ``message`` on rank 0."""
        if self.rank == 0:
            print(message, flush=True)

    def agree(self, ok: bool) -> bool:
        """Whether every process got this far (always ``ok`` alone): a rank that failed its checks stops the others."""
        if self.count == 1:
            return ok
        flag = torch.tensor([int(ok)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def close(self, finished: bool) -> None:
        """Tear the process group down. After a run every rank finished, all first meet at a barrier, so
        that none closes its connections while another still uses them (rank 0 writing its file, say);
        after a failure each rank leaves at once: a barrier could wait on a rank that never comes."""
        if self.count > 1 and dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()

    def __enter__(self) -> "Processes":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(finished=kind is None)
