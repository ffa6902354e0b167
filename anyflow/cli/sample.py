"""``anyflow sample``: latents from prompt embeddings in any number of steps, on one process or several.

Every argument it can is checked before a model loads or a latent is allocated (the output path,
the device, the schedule, the patch grid against the model's RoPE table, the embeddings, the memory
and compute the run needs); the output file is claimed early and removed again on any error or
interrupt: a failed run leaves nothing behind and never replaces an input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field, replace
from itertools import accumulate
from typing import List, Optional

from ..model.parameters import DTYPE_CHOICES, FLOAT8_NAME
from ..runtime.video_shape import check_grid, latent_shape
from .common import (
    CLI_NAMES, DEVICE_HELP, LATENTS_KEY, LORA_HELP, LORA_SKIP_HELP, NEGATIVE_KEY, OFFLOAD_HELP,
    PIXEL_RULE, PROMPT_KEY, SEED_HELP, SIGMAS_HELP, STEPS_HELP, WEIGHT_DTYPE_HELP, ClaimedOutput, Progress,
    add_long_video_options, check_chunks, check_output_path, format_count, loaded_details,
    long_video_line, seed_number,
)


def add_command(commands) -> None:
    """The ``sample`` subcommand and its options."""
    sample = commands.add_parser(
        "sample", help="sample latents from prompt embeddings in any number of steps",
        description=f"Sample video latents. The embeddings file is a safetensors file holding UMT5 embeddings "
        f"(B, S, 4096) under the key '{PROMPT_KEY}' (the negative file: '{NEGATIVE_KEY}'; it may be the same "
        f"file). The output safetensors file holds the latents under '{LATENTS_KEY}' in the diffusers layout "
        "(B, C, F, H/8, W/8) that the Wan VAE decodes (scripts/encode_decode.py decode; anyflow generate goes "
        "from a prompt to a video). A FAR (frame-autoregressive) checkpoint generates chunk by chunk. Every "
        "argument is checked, and the memory and compute the run needs estimated, before the model is loaded.",
    )
    sample.add_argument("--model", required=True, metavar="PATH",
                        help="checkpoint: our layout, a Hub snapshot or its transformer/ folder, a .safetensors, "
                        "an authors' .pt, a Wan2.1 base (anything from_pretrained takes)")
    sample.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                        help=f"merge a LoRA adapter into the model when it is loaded, {LORA_HELP}")
    sample.add_argument("--lora-skip-unknown", action="store_true", help=LORA_SKIP_HELP)
    sample.add_argument("--prompt-embeds", required=True, metavar="FILE",
                        help=f"safetensors file with UMT5 embeddings (B, S, 4096) under '{PROMPT_KEY}'")
    sample.add_argument("--negative-embeds", metavar="FILE",
                        help=f"safetensors file with the negative prompt's embeddings under '{NEGATIVE_KEY}' "
                        "(with --guidance-scale > 1 only)")
    sample.add_argument("--steps", type=int, default=4, help=STEPS_HELP)
    sample.add_argument("--shift", type=float, default=5.0, help="schedule shift (default 5, as the released models)")
    sample.add_argument("--sigmas", type=float, nargs="+", metavar="SIGMA", help=SIGMAS_HELP)
    sample.add_argument("--guidance-scale", type=float, default=1.0,
                        help="classifier-free guidance (default 1: off; the released weights need none)")
    sample.add_argument("--raw-euler", action="store_true", help="plain Euler steps (r = t) instead of flow-map steps")
    sample.add_argument("--context-latents", metavar="FILE",
                        help=f"safetensors file with K given latent frames under '{LATENTS_KEY}', diffusers layout "
                        "(B, C, K, H/8, W/8): the video starts with them (image-to-video with K = 1, video "
                        "continuation); for a FAR checkpoint K must end a chunk")
    sample.add_argument("--chunk-partition", type=int, nargs="+", metavar="N",
                        help="FAR checkpoints: latent frames of each chunk, summing to (frames - 1) / 4 + 1 "
                        "(default: the checkpoint's, 1 3 3 3 3 3 3 2 for 81 frames, extended to any length by its "
                        "rule: 1, then 3s, the remainder last)")
    add_long_video_options(sample)
    sample.add_argument("--frames", type=int, default=81, help="video frames, 4k + 1 (default 81); a FAR checkpoint "
                        "takes any number, generated chunk by chunk")
    sample.add_argument("--height", type=int, default=480, help=f"pixels (default 480): {PIXEL_RULE}")
    sample.add_argument("--width", type=int, default=832, help=f"pixels (default 832): {PIXEL_RULE}")
    sample.add_argument("--seed", type=seed_number, default=0, help=SEED_HELP)
    sample.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="model dtype; auto = float32 on CPU, bfloat16 on CUDA (float16 on GPUs before "
                        "Ampere, which have no bfloat16 units)")
    sample.add_argument("--weight-dtype", choices=(FLOAT8_NAME,), default=None, help=WEIGHT_DTYPE_HELP)
    sample.add_argument("--device", default=None, help=DEVICE_HELP)
    sample.add_argument("--compile", action="store_true",
                        help="compile the DiT blocks with torch.compile (one graph for every block and step; the first "
                        "step takes longer, one process only)")
    sample.add_argument("--shard-weights", action="store_true",
                        help="under torchrun: shard the weights over the processes (FSDP2; each reads only its shard)")
    sample.add_argument("--sequence-parallel", action="store_true",
                        help="under torchrun: split the tokens over the processes (Ulysses; bidirectional model; the "
                        "attention heads must divide evenly)")
    sample.add_argument("--offload", action="store_const", const="blocks", default=None,
                        help=f"block offload: {OFFLOAD_HELP}")
    sample.add_argument("--out", required=True, metavar="FILE",
                        help="output .safetensors file: the latents in the model's dtype (see --dtype)")
    sample.add_argument("--max-hours", type=float, default=12.0, metavar="HOURS",
                        help="refuse a run whose estimated compute time on this device is longer (default 12; "
                        "0 turns the check off); the estimate is printed before the model loads")
    sample.add_argument("--force", action="store_true",
                        help="replace an existing output file (never one of the inputs)")
    sample.set_defaults(run=run_sample)


def read_embeddings(argument: str, path: str, key: str, text_dim: int):
    """The embeddings (B, S, text_dim) under ``key`` in a safetensors file, checked, with errors naming both."""
    import torch

    from weights_convert.safetensors_io import read_header

    records, _ = read_header(path)
    if key not in records:
        raise ValueError(f"{argument} {path}: no tensor under the key '{key}' (keys: {sorted(records)[:10]})")
    tensor = records[key].read()
    shape = tuple(tensor.shape)
    if len(shape) != 3 or shape[2] != text_dim or not tensor.is_floating_point():
        raise ValueError(f"{argument} {path}: '{key}' is {tensor.dtype} {shape}; expected floats (B, S, {text_dim})")
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"{argument} {path}: '{key}' of shape {shape} holds no {'prompt' if shape[0] == 0 else 'token'}")
    bad = (~torch.isfinite(tensor)).sum().item()
    if bad:
        raise ValueError(f"{argument} {path}: '{key}' has {bad} NaN or infinite values")
    return tensor


@dataclass
class SampleRun:
    """Everything ``anyflow sample`` checked before loading the model."""

    config: object
    far: bool
    schedule: object  # the N + 1 noise levels
    steps: List[int]  # the steps that run
    device: object
    dtype: object
    noise_shape: tuple  # (B, F, C, H, W)
    text: object
    negative: object = None
    given: object = None  # (B, K, C, H, W) given frames
    partition: Optional[tuple] = None  # FAR chunks
    adapters: List[tuple] = field(default_factory=list)  # (LoRA file, scale), merged when loading


def check_sample_run(args: argparse.Namespace, processes) -> SampleRun:
    """Every check of ``anyflow sample`` that needs neither the model's weights nor the noise (see the module
    docstring), ending with the memory estimate, printed and enforced."""
    from weights_convert.lora import parse_lora_argument

    adapters = [parse_lora_argument(text) for text in args.lora]
    if args.lora_skip_unknown and not adapters:
        raise ValueError("--lora-skip-unknown: no --lora given")
    inputs = [("--prompt-embeds", args.prompt_embeds), ("--negative-embeds", args.negative_embeds),
              ("--context-latents", args.context_latents), ("--model", args.model)]
    check_output_path(args.out, args.force, inputs + [("--lora", path) for path, _ in adapters])
    frames, h, w = latent_shape(args.frames, args.height, args.width, CLI_NAMES)
    if not (math.isfinite(args.shift) and args.shift > 0):
        raise ValueError(f"--shift must be a positive finite number, got {args.shift}")
    if not math.isfinite(args.guidance_scale):
        raise ValueError(f"--guidance-scale must be a finite number, got {args.guidance_scale}")
    if not (math.isfinite(args.max_hours) and args.max_hours >= 0):
        raise ValueError(f"--max-hours must be a number of hours >= 0 (0: no limit), got {args.max_hours}")

    from ..model.config import AnyFlowFARConfig
    from ..pipeline.estimates import estimate_sampling_run
    from ..runtime.compute import duration, estimate_far_sampling_compute, estimate_sampling_compute
    from ..runtime.devices import dtype_warning, resolve_dtype
    from ..runtime.memory import available_memory, gib
    from ..sampling.schedule import flow_map_sigmas, steps_to_run
    from weights_convert.lora import apply_adapters
    from weights_convert.sources import open_checkpoint

    try:
        schedule = flow_map_sigmas(args.steps, args.shift, args.sigmas)
    except ValueError as exc:
        raise ValueError(f"{'--sigmas' if args.sigmas else '--steps'}: {exc}") from None
    device = processes.device
    dtype = resolve_dtype(args.dtype, DTYPE_CHOICES, argument="--dtype", device=device)
    if dtype_warning(device, dtype):
        processes.say(dtype_warning(device, dtype))

    checkpoint = open_checkpoint(args.model)  # headers only: config and sizes before loading anything
    check_output_path(args.out, args.force, [("--model", f) for f in checkpoint.files + [checkpoint.config_file]])
    if not args.out.endswith(".safetensors"):
        raise ValueError(f"--out {args.out}: anyflow sample writes latents as a .safetensors file; name it "
                         f"{os.path.splitext(args.out)[0]}.safetensors; for a video, use anyflow generate")
    try:
        apply_adapters(checkpoint.tensors, adapters, args.lora_skip_unknown)  # every adapter checked against the model
    except ValueError as exc:
        raise ValueError(f"--lora: {exc}") from None
    config = checkpoint.config
    far = isinstance(config, AnyFlowFARConfig)
    if args.weight_dtype and processes.count > 1:
        raise ValueError("--weight-dtype: runs in one process (the parallel loader dequantises float8 checkpoints)")
    if args.offload and processes.count > 1:
        raise ValueError("--offload: runs in one process (with --shard-weights each process holds a share already)")
    if args.compile and processes.count > 1:
        raise ValueError("--compile: compiling runs on one process; leave it out under torchrun")
    if far and args.sequence_parallel:
        raise ValueError("--sequence-parallel: the FAR model runs over several processes with --shard-weights only")
    check_grid(config, args.frames, args.height, args.width, CLI_NAMES)
    guided = args.guidance_scale > 1
    partition = check_chunks(args, config, frames)
    long_line = long_video_line(args, config, frames)
    if long_line:
        processes.say(long_line)
    text = read_embeddings("--prompt-embeds", args.prompt_embeds, PROMPT_KEY, config.text_dim)
    negative = None
    if args.negative_embeds and not guided:
        raise ValueError("--negative-embeds is used only with --guidance-scale > 1 (classifier-free guidance); give both "
                         "or neither")
    if guided and not args.negative_embeds:
        raise ValueError(f"--guidance-scale {args.guidance_scale} needs --negative-embeds (the negative prompt's embeddings)")
    if guided:
        negative = read_embeddings("--negative-embeds", args.negative_embeds, NEGATIVE_KEY, config.text_dim)
        if negative.shape != text.shape:
            raise ValueError(f"--negative-embeds: shape {tuple(negative.shape)} differs from --prompt-embeds "
                             f"{tuple(text.shape)}")
    noise_shape = (text.shape[0], frames, config.in_channels, h, w)
    given = read_context_latents(args.context_latents, noise_shape, partition)

    text_tokens = text.shape[1]
    estimate = estimate_sampling_run(checkpoint, noise_shape, text_tokens, partition, guided, device, dtype,
                                     args.weight_dtype, args.offload, args.context_window, args.sink_frames)
    estimate = memory_share(processes, estimate, args.shard_weights, args.sequence_parallel)
    free = available_memory(device)
    need, where = shared_memory(processes, estimate.total, device)
    processes.say(f"memory: about {estimate.describe()} needed{' per process' if processes.count > 1 else ''}; "
                  f"{gib(free) if free is not None else 'unknown'} available on {where}")
    if free is not None and need > free:
        raise ValueError(f"--frames {args.frames} --height {args.height} --width {args.width}: the run needs about "
                         f"{gib(need)} but {where} has {gib(free)} available; use fewer frames or pixels")
    steps = len(steps_to_run(schedule))
    compute = (estimate_far_sampling_compute(config, noise_shape, text_tokens, steps, partition,
                                             0 if given is None else given.shape[1], args.context_window,
                                             args.sink_frames) if far
               else estimate_sampling_compute(config, noise_shape, text_tokens, steps, guided))
    compute = compute_share(processes, compute, args.sequence_parallel, device, dtype, config.hidden_size)
    processes.say(f"compute: {compute.describe()}{' per process' if processes.count > 1 else ''}")
    if args.max_hours and compute.seconds > 3600 * args.max_hours:
        raise ValueError(f"--frames {args.frames} --height {args.height} --width {args.width} --steps {steps}: the run "
                         f"needs about {compute.flops:.1e} FLOPs, about {duration(compute.seconds)} on {device}, more "
                         f"than --max-hours {args.max_hours:g}; use fewer frames, pixels or steps, or raise "
                         "--max-hours (0 turns the check off)")
    return SampleRun(config, far, schedule, steps_to_run(schedule), device, dtype, noise_shape, text, negative, given,
                     partition, adapters)


def check_parallel_flags(args: argparse.Namespace) -> None:
    """--shard-weights and --sequence-parallel against the number of processes torchrun started."""
    count = int(os.environ.get("WORLD_SIZE", "1"))
    parallel = [flag for flag, on in (("--shard-weights", args.shard_weights),
                                      ("--sequence-parallel", args.sequence_parallel)) if on]
    if count == 1 and parallel:
        raise ValueError(f"{parallel[0]} needs several processes: torchrun --nproc-per-node N -m anyflow sample ...")
    if count > 1 and not parallel:
        raise ValueError(f"running in {count} processes (torchrun): pass --shard-weights and/or "
                         "--sequence-parallel, or every process would do the whole job")


def memory_share(processes, estimate, shard_weights: bool, sequence_parallel: bool):
    """One process's part of a run's memory estimate."""
    weights = estimate.weights // processes.count if shard_weights else estimate.weights
    activations = estimate.activations // processes.count if sequence_parallel else estimate.activations
    return replace(estimate, weights=weights, activations=activations)


def compute_share(processes, estimate, sequence_parallel: bool, device, dtype, width: int):
    """One process's part of a run's compute (the tokens split over the processes, or not), timed at the
    rate of a matmul of the model's ``width`` that this process measures on ``device``."""
    from ..runtime.compute import measure_matmul_rate

    flops = estimate.flops / processes.count if sequence_parallel else estimate.flops
    return replace(estimate, flops=flops, rate=measure_matmul_rate(device, dtype, width))


def shared_memory(processes, per_process: int, device):
    """What the processes on ``device`` need together, and where: CPU processes of one machine share its memory."""
    if device.type == "cpu" and processes.count > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", processes.count))
        return per_process * local, f"this machine ({local} processes)"
    return per_process, str(device)


def run_sample(args: argparse.Namespace) -> int:
    from ..runtime.processes import Processes

    check_parallel_flags(args)
    with Processes(args.device, "--device") as processes:
        return sample_in(processes, args)


def sample_in(processes, args: argparse.Namespace) -> int:
    import torch

    from ..pretrained import AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel, load_parallel
    from ..pipeline.latents_file import LatentsFile
    from ..sampling.bidirectional import sample
    from ..sampling.far import LongVideoWarning, sample_far_chunks
    from ..sampling.noise import SeededNoise

    failure, output = None, None
    try:
        run = check_sample_run(args, processes)
        output = ClaimedOutput(args.out) if processes.rank == 0 else None
    except (ValueError, OSError) as exc:
        failure = exc
    if not processes.agree(failure is None):
        if output is not None:
            output.__exit__(None, None, None)
        raise failure or ValueError("another process stopped at its checks (its error is above); nothing was written")
    schedule, steps, partition = run.schedule, run.steps, run.partition
    with output if output is not None else contextlib.nullcontext():
        start = time.perf_counter()
        model_class = AnyFlowFARTransformer3DModel if run.far else AnyFlowTransformer3DModel
        lora = dict(lora=run.adapters, lora_skip_unknown=args.lora_skip_unknown)
        if processes.mesh is None:
            model = model_class.from_pretrained(args.model, dtype=run.dtype, device=run.device, offload=args.offload,
                                                weight_dtype=args.weight_dtype, **lora)
        else:
            model = load_parallel(model_class, args.model, processes.mesh, run.dtype, run.device,
                                  shard_weights=args.shard_weights, sequence_parallel=args.sequence_parallel, **lora)
        if args.compile:
            model.compile_blocks()
        processes.say(f"loaded {args.model} ({format_count(sum(p.numel() for p in model.parameters()))} parameters, "
                      f"{run.dtype}, {run.device}" + loaded_details(args, run.adapters)
                      + (f", {processes.count} processes" if processes.count > 1 else "")
                      + f") in {time.perf_counter() - start:.1f} s")
        common = dict(num_steps=args.steps, sigmas=args.sigmas, shift=args.shift, use_mean_velocity=not args.raw_euler,
                      context_latents=run.given)
        text = run.text.to(run.dtype)
        metadata = {"steps": str(len(steps)), "sigmas": json.dumps([round(s, 6) for s in schedule.tolist()]),
                    "shift": str(args.shift), "seed": str(args.seed), "guidance_scale": str(args.guidance_scale),
                    "flow_map": str(not args.raw_euler).lower(),
                    "given_frames": str(0 if run.given is None else run.given.shape[1])}
        if run.far:
            metadata["chunk_partition"] = json.dumps(list(partition))
            given_frames = 0 if run.given is None else run.given.shape[1]
            chunks = [i for i, end in enumerate(accumulate(partition)) if end > given_frames]
            progress = Progress(len(chunks) * len(steps), processes.say)
            with warnings.catch_warnings():  # the run's length was said before loading
                warnings.simplefilter("ignore", LongVideoWarning)
                made = sample_far_chunks(model, SeededNoise(run.noise_shape, args.seed), text, chunk_partition=partition,
                                         context_window=args.context_window, sink_frames=args.sink_frames, **common,
                                         callback=lambda chunk, i, t, z: progress.step(
                                             f"chunk {chunk + 1}/{len(partition)} ({partition[chunk]} frames)", t,
                                             1000 * schedule[i + 1].item()))
            # the chunks go to the file as they come (rank 0); nothing holds the whole video
            with (LatentsFile(output.partial, args.out, LATENTS_KEY) if output is not None
                  else contextlib.nullcontext()) as latents_file:
                for _, chunk in made:
                    if latents_file is not None:
                        latents_file.append(chunk)
                shape, dtype = (chunk.shape[0], chunk.shape[2], run.noise_shape[1], *chunk.shape[3:]), chunk.dtype
                if latents_file is not None:
                    latents_file.finish(metadata)
                    output.finish()
        else:
            noise = torch.randn(run.noise_shape, generator=torch.Generator().manual_seed(args.seed))
            progress = Progress(len(steps), processes.say)
            negative = None if run.negative is None else run.negative.to(run.dtype)
            latents = sample(model, noise, text, guidance_scale=args.guidance_scale,
                             negative_encoder_hidden_states=negative, **common,
                             callback=lambda i, t, z: progress.step("", t, 1000 * schedule[i + 1].item()))
            latents = latents.transpose(1, 2).contiguous().cpu()  # diffusers layout (B, C, F, H, W), the model's dtype
            shape, dtype = tuple(latents.shape), latents.dtype
            if output is not None:
                output.commit([(LATENTS_KEY, latents)], metadata)
    processes.say(f"wrote {args.out}: '{LATENTS_KEY}' {tuple(shape)} {str(dtype).replace('torch.', '')} (B, C, F, H, W) "
                  f"after {len(steps)} step(s)" + (f" in each of {len(chunks)} chunk(s)" if run.far else ""))
    return 0


def read_context_latents(path: Optional[str], noise_shape, chunk_partition):
    """Given latent frames from --context-latents, (B, K, C, H, W), checked against the run, or None."""
    if path is None:
        return None
    import torch

    from ..sampling.far import check_given_frames
    from weights_convert.safetensors_io import read_header

    records, _ = read_header(path)
    if LATENTS_KEY not in records:
        raise ValueError(f"--context-latents {path}: no tensor under the key '{LATENTS_KEY}' (keys: {sorted(records)[:10]})")
    stored = records[LATENTS_KEY].read()
    b, f, c, h, w = noise_shape
    if stored.dim() != 5 or not stored.is_floating_point() or stored.shape[0] not in (1, b) or \
            tuple(stored.shape[1:2]) + tuple(stored.shape[3:]) != (c, h, w):
        raise ValueError(f"--context-latents {path}: '{LATENTS_KEY}' is {stored.dtype} {tuple(stored.shape)}; "
                         f"expected floats (B={b}, C={c}, K, H={h}, W={w}) (diffusers layout)")
    if not torch.isfinite(stored).all():
        raise ValueError(f"--context-latents {path}: '{LATENTS_KEY}' has NaN or infinite values")
    given = stored.transpose(1, 2).float().expand(b, -1, -1, -1, -1)  # (B, K, C, H, W)
    if chunk_partition is not None:
        try:
            check_given_frames(given, noise_shape, chunk_partition)
        except ValueError as exc:
            raise ValueError(f"--context-latents {path}: {exc}") from None
    elif given.shape[1] > f:
        raise ValueError(f"--context-latents {path}: {given.shape[1]} frames, more than the video's {f}")
    return given
