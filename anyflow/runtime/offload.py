"""Block offload: the DiT blocks' weights stay in host memory and visit the compute device one block at a time.

Everything outside the blocks (patch and timestep embeddings, the context projections, the head)
lives on the device. Each block's weights are held in host memory, page-locked (pinned) when
the device is a CUDA GPU so that the copies are asynchronous. The model knows nothing of it:
:func:`offload_blocks` installs hooks on the blocks (a forward pre-hook and hook, and a wrapper of
``context_kv``, which :meth:`~anyflow.model.transformer.AnyFlowBackbone.prepare_context` calls), so
whatever runs the blocks in order (a forward pass, ``prepare_context``, the FAR model's
``encode_cache`` and ``step``) gives each block a device copy of its weights just before it runs,
has the next block's copy made meanwhile on a side CUDA stream, and drops a block's copy once it
has run. At most two blocks' weights are on the device at a time; an error inside a block puts every
block back. The hooks are kept out of ``torch.compile``'s graphs (a compiled block runs between them).

On a CUDA device:

- the compute stream waits for the side stream (``wait_stream``) before a block's copy is used;
- each copy is marked as used by the compute stream (``record_stream``), so the allocator does
  not hand its memory to a later copy while the GPU may still read it;
- before the next block's copy is allocated, the host waits until the block before the running
  one has finished on the GPU. The host otherwise runs ahead of the GPU, and copies of many
  blocks could be alive at once; waiting costs nothing, as the running block is still queued.

Any other device (the CPU) runs the same steps with synchronous copies: the tests exercise the
logic there, and an offloaded model on the CPU computes what the plain one does (copies of the
same values, the same kernels) while saving no memory.

Inference only: gradients through offloaded blocks are refused (the device copies would receive
them, and are dropped).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .devices import resolve_device

OFFLOAD_MODES = ("blocks",)  # what ``from_pretrained(offload=...)`` and ``--offload`` take

# A tensor a module holds: (module, "_parameters" or "_buffers", name).
Slot = Tuple[nn.Module, str, str]


def check_offload(offload: Optional[str]) -> Optional[str]:
    """``offload`` checked: None (everything on the device) or "blocks"; a ValueError naming it otherwise."""
    if offload is not None and offload not in OFFLOAD_MODES:
        raise ValueError(f"offload must be None or one of {list(OFFLOAD_MODES)}, got {offload!r}")
    return offload


def block_slots(block: nn.Module) -> List[Slot]:
    """Every parameter and buffer a block holds, as the places its tensor is kept."""
    return [(module, table, name) for module in block.modules() for table in ("_parameters", "_buffers")
            for name, tensor in getattr(module, table).items() if tensor is not None]


def _get(slot: Slot) -> torch.Tensor:
    module, table, name = slot
    tensor = getattr(module, table)[name]
    return tensor.data if table == "_parameters" else tensor


def _put(slot: Slot, tensor: torch.Tensor) -> None:
    module, table, name = slot
    if table == "_parameters":
        module._parameters[name].data = tensor  # the Parameter object stays: optimisers, names, hooks keep it
    else:
        module._buffers[name] = tensor


class BlockOffloader:
    """Gives a model's blocks their weights on ``device`` one at a time (see the module docstring).

    :func:`offload_blocks` makes one and installs its hooks; ``model.block_offload`` keeps it.
    ``resident`` names the blocks whose device copies are alive.
    """

    def __init__(self, blocks: nn.ModuleList, device: torch.device):
        self.blocks = blocks
        self.device = device
        self.slots = [block_slots(block) for block in blocks]
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.copies: Dict[int, List[torch.Tensor]] = {}  # block index -> its device copies, slot by slot
        self.hosts: Dict[int, List[torch.Tensor]] = {}  # block index in use -> its host tensors, to put back
        self.finished: List[torch.cuda.Event] = []  # CUDA: recorded after each block that was put back

    @property
    def resident(self) -> List[int]:
        """Indices of the blocks whose weights have a copy on the device now (at most two)."""
        return sorted(self.copies)

    def install(self) -> None:
        """Hook every block: its weights come to the device as it starts, and go back when it ends."""
        # never traced by a compiler; wrapped here, not where defined: torch.compiler.disable imports dynamo (seconds)
        starts, ends = torch.compiler.disable(self._block_starts), torch.compiler.disable(self._block_ends)
        for i, block in enumerate(self.blocks):
            block.register_forward_pre_hook(functools.partial(starts, i))
            block.register_forward_hook(functools.partial(ends, i), always_call=True)
            block.context_kv = self._around(i, block.context_kv)

    def _block_starts(self, i: int, *_) -> None:
        if torch.is_grad_enabled():
            raise RuntimeError("block offload runs inference only: call the model under torch.no_grad() or "
                               "torch.inference_mode() (to train, load the model without offload)")
        if i in self.hosts:
            raise RuntimeError(f"block {i} is already running with offloaded weights (a block called the model again?)")
        if i not in self.copies:
            self._fetch(i)
        self._use(i)
        if i + 1 < len(self.blocks):
            self._fetch(i + 1)  # copied on the side stream while block i runs

    def _block_ends(self, i: int, module: nn.Module, args, output) -> None:
        self._put_back(i)
        if output is None:  # the block raised (an always-called hook gets no output): nothing stays on the device
            for j in list(self.copies):
                self._put_back(j)

    def _around(self, i: int, method: Callable) -> Callable:
        """``method`` of block i run with the block's weights on the device."""

        @functools.wraps(method)
        def run(*args, **kwargs):
            self._block_starts(i)
            output = None
            try:
                output = method(*args, **kwargs)
            finally:
                self._block_ends(i, None, args, output)
            return output

        return run

    def _fetch(self, i: int) -> None:
        """Queue the copy of block i's weights to the device."""
        for event in self.finished:  # the blocks put back have finished: their memory is free for this copy
            event.synchronize()
        self.finished.clear()
        hosts = [_get(slot) for slot in self.slots[i]]
        stream = torch.cuda.stream(self.copy_stream) if self.copy_stream is not None else contextlib.nullcontext()
        with stream:
            self.copies[i] = [torch.empty_like(h, device=self.device).copy_(h, non_blocking=True) for h in hosts]

    def _use(self, i: int) -> None:
        """Point block i's parameters and buffers at their device copies."""
        copies = self.copies[i]
        if self.copy_stream is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self.copy_stream)
            for copy in copies:
                copy.record_stream(compute)
        self.hosts[i] = [_get(slot) for slot in self.slots[i]]
        for slot, copy in zip(self.slots[i], copies):
            _put(slot, copy)

    def _put_back(self, i: int) -> None:
        """Block i's parameters and buffers back to their host tensors; its device copies dropped."""
        for slot, host in zip(self.slots[i], self.hosts.pop(i, ())):
            _put(slot, host)
        if self.copies.pop(i, None) is not None and self.copy_stream is not None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self.finished.append(event)


def offload_blocks(model: nn.Module, device: Union[str, torch.device]) -> nn.Module:
    """Run an AnyFlow transformer with block offload on ``device``; returns the model.

    Everything outside ``model.blocks`` moves to ``device``; the blocks' weights move to host memory
    (pinned when ``device`` is a CUDA GPU) and are copied to ``device`` block by block as they run
    (see the module docstring). ``model.device`` is then ``device``. On the CPU this saves nothing
    and only tests the logic.
    """
    device = resolve_device(device)
    if any(hasattr(p, "to_local") for p in model.parameters()):
        raise ValueError("offload on a parallel (FSDP) model: sharding already splits the weights; use one or the other")
    pin = device.type == "cuda"
    for name, child in model.named_children():
        if name != "blocks":
            child.to(device)
    for block in model.blocks:
        for slot in block_slots(block):
            host = _get(slot).detach().to("cpu")
            _put(slot, host.pin_memory() if pin and not host.is_pinned() else host)
    model.block_offload = BlockOffloader(model.blocks, device)
    model.block_offload.install()
    return model
