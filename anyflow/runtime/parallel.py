"""A model over several processes with PyTorch's own engine: FSDP2 for the weights, Ulysses for the tokens.

    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))       # this rank's GPU, before anything else
    torch.distributed.init_process_group()                      # torchrun sets the environment
    mesh = init_device_mesh("cuda", (torch.distributed.get_world_size(),))
    model = anyflow.load_parallel(AnyFlowTransformer3DModel, path, mesh, dtype="bfloat16")  # each rank reads its shard
    latents = sample(model, noise, text)                         # the same call as on one device

:func:`parallelize` applies both to a model from outside, as torchtitan applies its parallelisms: the
model's modules get FSDP2's hooks, and sequence parallelism's (:mod:`anyflow.runtime.sequence_parallel`);
``anyflow.load_parallel`` (:mod:`anyflow.pretrained`) builds a model on the meta device, parallelizes it
and reads each rank's shard from the checkpoint.

Call a parallel model under ``torch.no_grad()``, not ``torch.inference_mode()``: FSDP2's gathered
weights are version-counted tensors, which some torch releases refuse to use inside inference mode
(``sample`` and ``sample_far`` use ``no_grad``).

- Weight sharding: ``fully_shard`` (FSDP2) per block, per module that runs once a forward (time
  embedding, text projection, head), then the root; a unit's weights are all-gathered just before
  it runs and freed after. The fp32 islands (modulation tables, source-time MLP, affine norms;
  :data:`anyflow.model.parameters.FP32_ISLANDS`) stay whole on every rank: FSDP2 gathers a unit's
  weights as one buffer of one dtype, and holding them in the half dtype would change the
  numerics. They are small (about 110 MB in float32 for 14B), and their gradients are averaged
  over the ranks in one all-reduce at the end of each backward pass, as FSDP averages the sharded
  ones. FSDP reduces the sharded gradients in float32 whatever the weights' dtype.
- Sequence parallelism (bidirectional model, inference): each rank holds about L/P tokens and
  attention exchanges heads for tokens (:mod:`anyflow.runtime.sequence_parallel`). The attention heads
  must divide evenly over the ranks.

Both are optional and combine over one 1-D mesh. Every check that could fail on one rank only is
agreed on by all, so a bad setup ends with the same error on every rank instead of a hang.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ..model.config import AnyFlowFARConfig
from ..model.parameters import is_fp32_island
from .sequence_parallel import apply_sequence_parallel

T = TypeVar("T")

# methods besides forward that run blocks or root weights, so FSDP must gather weights for them
FORWARD_METHODS = ("prepare_context", "step", "encode_cache")


def parallelize(model: nn.Module, mesh, *, shard_weights: bool = True, sequence_parallel: bool = True) -> nn.Module:
    """Make ``model`` (on every rank, possibly on the meta device) run over the 1-D device ``mesh``; in place."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    check_mesh(model, mesh)
    ranks = mesh.size()
    if sequence_parallel:
        if isinstance(model.config, AnyFlowFARConfig):
            raise ValueError("sequence parallelism is for the bidirectional model; shard the FAR model's weights alone")
        heads = model.config.num_attention_heads
        if heads % ranks:
            valid = [p for p in range(1, heads + 1) if heads % p == 0]
            raise ValueError(f"sequence parallelism splits the {heads} attention heads evenly over the ranks; "
                             f"{ranks} ranks do not divide them (use one of {valid})")
        apply_sequence_parallel(model, mesh.get_group())
    if shard_weights:
        islands = {p for name, p in model.named_parameters() if is_fp32_island(name)}
        # weights computed in the dtype they are held in; gradients reduced over the ranks in float32
        shard = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))
        for block in model.blocks:
            fully_shard(block, **shard, ignored_params=islands & set(block.parameters()))
            register_fsdp_forward_method(block, "context_kv")
        for once in (model.time_embed, model.text_proj, model.head):  # run once a forward: gathered only then
            fully_shard(once, **shard, ignored_params=islands & set(once.parameters()))
        fully_shard(model, **shard, ignored_params=islands)
        for method in FORWARD_METHODS:
            if hasattr(model, method):
                register_fsdp_forward_method(model, method)
        if model.device.type != "meta":  # a meta model gets its parameters, and these hooks, in load_parallel
            average_island_gradients(model, mesh)
    return model


def average_island_gradients(model: nn.Module, mesh) -> None:
    """Average the replicated fp32 islands' gradients over the ranks after backward, as FSDP averages the rest.

    The first island gradient of a backward pass queues one callback for the end of that pass, which
    sums every island gradient over the ranks in one all-reduce (one flat float32 buffer) and divides.
    """
    islands = [param for name, param in model.named_parameters() if is_fp32_island(name) and param.requires_grad]
    averaging = IslandAveraging(islands, mesh.get_group())
    for param in islands:
        param.register_post_accumulate_grad_hook(averaging.gradient_ready)


def this_ranks_device(mesh) -> torch.device:
    """The device of this rank on ``mesh``: the CPU, or the current CUDA device, which must be this
    rank's (``LOCAL_RANK``, as torchrun sets it) when torchrun started the processes."""
    if mesh.device_type != "cuda":
        return torch.device(mesh.device_type)
    current = torch.cuda.current_device()
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and int(local_rank) % torch.cuda.device_count() != current:
        raise RuntimeError(
            f"rank {dist.get_rank()} (LOCAL_RANK {local_rank}) would run on cuda:{current}: call "
            f"torch.cuda.set_device(int(os.environ['LOCAL_RANK'])) before init_process_group, or pass "
            f"device_id=torch.device('cuda', int(os.environ['LOCAL_RANK'])) to it"
        )
    return torch.device("cuda", current)


def agreed(work: Callable[[], T]) -> T:
    """``work()`` on every rank; when it raises on any rank, every rank raises (the failing ones their own
    error, the others one naming it) instead of the others waiting in their next collective.

    The ranks agree over a CPU (gloo) group, which needs no device: a rank whose GPU is not set up
    can still take part.
    """
    error, result = None, None
    try:
        result = work()
    except Exception as exc:  # every failure, shared with the other ranks, then raised
        error = exc
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}", group=_host_group())
    if error is not None:
        raise error
    failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
    if failed:
        rank, message = failed[0]
        raise RuntimeError(f"rank {rank} failed before loading ({message}); every rank stops")
    return result


_HOST_GROUPS = {}


def _host_group():
    """A gloo group over every rank (the default group when it is gloo already), made once."""
    if dist.get_backend() == "gloo":
        return None
    if "gloo" not in _HOST_GROUPS:
        _HOST_GROUPS["gloo"] = dist.new_group(backend="gloo")
    return _HOST_GROUPS["gloo"]


def check_mesh(model: nn.Module, mesh) -> None:
    """A 1-D mesh, and the model on the mesh's device type (or meta) alike on every rank."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: run under torchrun and call init_process_group")
    if mesh.ndim != 1:
        raise ValueError(f"the mesh must be 1-D (one group for weights and tokens alike), got {mesh.ndim} dimensions")
    mine = model.device.type
    devices = [None] * mesh.size()
    dist.all_gather_object(devices, mine, group=mesh.get_group())
    expected = {mesh.device_type, "meta"}
    if len(set(devices)) != 1 or devices[0] not in expected:
        listing = ", ".join(f"rank {r} {d}" for r, d in enumerate(devices))
        raise ValueError(f"the model must be on the mesh's device type ({mesh.device_type}) on every rank, alike; "
                         f"got {listing}")


class IslandAveraging:
    """One all-reduce of every fp32 island's gradient at the end of each backward pass."""

    def __init__(self, params: Sequence[torch.nn.Parameter], group):
        self.params, self.group = list(params), group
        self.queued = False

    def gradient_ready(self, param: torch.Tensor) -> None:
        if not self.queued:
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.average)

    def average(self) -> None:
        self.queued = False
        grads = [p.grad for p in self.params if p.grad is not None]  # the same islands on every rank
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])  # all float32
        dist.all_reduce(flat, group=self.group)  # a sum: AVG is not on every backend
        flat.div_(dist.get_world_size(self.group))
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
