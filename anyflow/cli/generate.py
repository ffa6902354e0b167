"""``anyflow generate``: a prompt (and optionally an image or a clip) to a video file, from a snapshot.

Every argument is checked before anything loads (the video extra installed, the output paths, the
snapshot's components, the sizes against the transformer's patches, the schedule, the image or
clip, LoRA adapters), the memory of every stage (text encoder, sampling, decoding) is estimated
against what is free and the compute stated; then the pipeline runs with one line per stage and
step. The video is written under a hidden partial name and renamed when complete; a FAR snapshot
appends frames to it as chunks finish. An error or Ctrl-C prints one line and leaves nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
import warnings
from dataclasses import dataclass, replace
from itertools import accumulate
from typing import List, Optional, Tuple

from ..model.parameters import DTYPE_CHOICES, FLOAT8_NAME
from ..pipeline.video_io import MAX_FPS, MAX_GIF_FPS
from ..runtime.video_shape import check_grid, latent_shape
from .common import (
    CLI_NAMES, DEVICE_HELP, LATENTS_KEY, LORA_HELP, LORA_SKIP_HELP, OFFLOAD_HELP, PIXEL_RULE,
    SEED_HELP, SIGMAS_HELP, STEPS_HELP, WEIGHT_DTYPE_HELP, ClaimedOutput, Progress, add_long_video_options,
    check_chunks, check_output_path, format_count, loaded_details, long_video_line, seed_number,
)

VIDEO_EXTENSIONS = (".mp4", ".gif", ".png", ".webp")
TEXT_TOKENS = 512  # the pipelines pad every prompt to 512 tokens
EXTRA = 'pip install -e ".[video]" (or: pip install tokenizers av)'


def add_command(commands) -> None:
    """The ``generate`` subcommand and its options."""
    generate = commands.add_parser(
        "generate", help="a prompt (and optionally an image or a clip) to a video file",
        description="Generate a video from a prompt with a pipeline snapshot as published (model_index.json, "
        "tokenizer/, text_encoder/, transformer/, vae/): UMT5 text encoder, AnyFlow transformer (or AnyFlow FAR, "
        f"chunk by chunk), Wan VAE, in PyTorch alone. Needs the video extra: {EXTRA}. Every argument is checked, and "
        "the memory of every stage estimated, before anything loads.",
    )
    generate.add_argument("--model", required=True, metavar="SNAPSHOT", help="pipeline snapshot folder")
    prompt = generate.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the text prompt")
    prompt.add_argument("--prompts", metavar="FILE", help="a text file of prompts, one a line (blank lines and lines "
                        "starting with # skipped): one video each (and one for each --seed), the model loaded once; "
                        "the files are named OUT-NNN-seedS (NNN: the prompt's number in the file)")
    prompt.add_argument("--prompt-schedule", metavar="FILE", help="FAR snapshots: a prompt that changes over the "
                        "video: a text file of 'CHUNK: prompt' lines (the prompt from that chunk on; the first at "
                        "chunk 0, the chunks in increasing order; blank lines and # comments skipped); at each "
                        "switch the cached frames are encoded again under the new prompt")
    generate.add_argument("--negative-prompt", help="negative prompt (used with --guidance-scale > 1 only)")
    generate.add_argument("--image", metavar="FILE", help="start the video with this image (its size must be "
                          "--width x --height): image-to-video")
    generate.add_argument("--video", metavar="FILE", help="start the video with the first 4k + 1 frames of this clip "
                          "(its size must be --width x --height): video continuation")
    generate.add_argument("--frames", type=int, default=81, help="video frames, 4k + 1 (default 81); a FAR snapshot "
                          "takes any number, generated, decoded and written chunk by chunk")
    generate.add_argument("--height", type=int, default=480, help=f"pixels (default 480): {PIXEL_RULE}")
    generate.add_argument("--width", type=int, default=832, help=f"pixels (default 832): {PIXEL_RULE}")
    generate.add_argument("--steps", type=int, default=4, help=STEPS_HELP)
    generate.add_argument("--shift", type=float, help="schedule shift (default: the snapshot's scheduler, 5)")
    generate.add_argument("--sigmas", type=float, nargs="+", metavar="SIGMA", help=SIGMAS_HELP)
    generate.add_argument("--guidance-scale", type=float, default=1.0,
                          help="classifier-free guidance (default 1: off; the released weights need none)")
    generate.add_argument("--chunk-partition", type=int, nargs="+", metavar="N",
                          help="FAR snapshots: latent frames of each chunk (default the checkpoint's, extended to any "
                          "length by its rule: 1, then 3s, the remainder last)")
    add_long_video_options(generate)
    generate.add_argument("--seed", type=seed_number, nargs="+", default=[0], metavar="SEED",
                          help=f"{SEED_HELP}; several seeds make one video each")
    generate.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                          help="transformer and text encoder dtype; auto = float32 on CPU, bfloat16 on CUDA "
                          "(float16 on GPUs before Ampere, which have no bfloat16 units) "
                          "(the VAE runs in float32)")
    generate.add_argument("--weight-dtype", choices=(FLOAT8_NAME,), default=None,
                          help=f"the transformer's: {WEIGHT_DTYPE_HELP}")
    generate.add_argument("--device", default=None, help=DEVICE_HELP)
    generate.add_argument("--compile", action="store_true",
                          help="compile the transformer's DiT blocks with torch.compile (the first step takes longer)")
    generate.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                          help=f"merge a LoRA adapter into the transformer when it loads, {LORA_HELP}")
    generate.add_argument("--lora-skip-unknown", action="store_true", help=LORA_SKIP_HELP)
    generate.add_argument("--offload", action="store_const", const="blocks", default=None,
                          help=f"block offload of the transformer: {OFFLOAD_HELP}")
    generate.add_argument("--vae-tile", type=int, nargs="*", metavar="PIXELS",
                          help="decode in overlapping spatial tiles, blended as diffusers' enable_tiling(): the "
                          "decoder holds a tile, not a frame (frames differ slightly where tiles meet); alone 256-pixel "
                          "tiles every 192, or TILE STRIDE in pixels (multiples of 8)")
    generate.add_argument("--fps", type=float, default=16.0,
                          help=f"frames per second of the file, above 0 and at most {MAX_FPS:g} (.gif: {MAX_GIF_FPS:g}; "
                          "default 16, Wan's)")
    generate.add_argument("--out", required=True, metavar="FILE",
                          help=f"the video: {', '.join(VIDEO_EXTENSIONS)} (H.264 mp4, GIF, animated PNG, animated WebP)")
    generate.add_argument("--save-latents", metavar="FILE", help="also write the latents (diffusers layout) to this "
                          ".safetensors file (a FAR snapshot's as they come, through a spill file beside it)")
    generate.add_argument("--max-hours", type=float, default=12.0, metavar="HOURS",
                          help="refuse a run whose estimated sampling time is longer (default 12; 0: no limit)")
    generate.add_argument("--force", action="store_true", help="replace existing output files (never an input)")
    generate.set_defaults(run=run_generate)


def check_video_extra() -> None:
    """The libraries ``generate`` needs beyond torch, or one line saying how to install them."""
    import importlib.util

    missing = [name for name, module in (("tokenizers", "tokenizers"), ("av", "av")) if importlib.util.find_spec(module) is None]
    if missing:
        raise ValueError(f"anyflow generate needs {' and '.join(missing)}: {EXTRA}")


def run_generate(args: argparse.Namespace) -> int:
    import math

    import torch

    from ..model.config import AnyFlowFARConfig
    from ..pipeline.estimates import estimate_sampling_run
    from ..pipeline.snapshot import check_components, component_sizes, read_snapshot
    from ..pipeline.video_io import check_fps, video_format
    from ..pipeline.video_pipeline import VideoPipeline
    from ..runtime.compute import duration, estimate_far_sampling_compute, estimate_sampling_compute, measure_matmul_rate
    from ..runtime.devices import dtype_warning, resolve_device, resolve_dtype
    from ..runtime.memory import available_memory, estimate_generation_memory, gib
    from ..sampling.far import LongVideoWarning
    from ..sampling.schedule import flow_map_sigmas, steps_to_run
    from weights_convert.lora import apply_adapters, parse_lora_argument
    from weights_convert.sources import open_checkpoint

    # ---- every check before anything loads ------------------------------------------------------
    check_video_extra()
    adapters = [parse_lora_argument(text) for text in args.lora]
    if os.path.splitext(args.out)[1].lower() not in VIDEO_EXTENSIONS:
        raise ValueError(f"--out {args.out}: a video file ends in one of {', '.join(VIDEO_EXTENSIONS)}")
    video_format(args.out)
    inputs = [("--model", args.model), ("--image", args.image), ("--video", args.video), ("--prompts", args.prompts),
              ("--prompt-schedule", args.prompt_schedule)]
    inputs += [("--lora", path) for path, _ in adapters]
    if args.save_latents and not args.save_latents.endswith(".safetensors"):
        raise ValueError(f"--save-latents {args.save_latents}: latents are written as a .safetensors file")
    jobs = video_jobs(args)
    for job in jobs:
        check_output_path(job.out, args.force, inputs)
        if job.latents:
            check_output_path(job.latents, args.force, inputs + [("--out", job.out)], "--save-latents")
    vae_tile = check_vae_tile(args.vae_tile)
    frames, h, w = latent_shape(args.frames, args.height, args.width, CLI_NAMES)
    if not math.isfinite(args.guidance_scale):
        raise ValueError(f"--guidance-scale must be a finite number, got {args.guidance_scale}")
    check_fps(args.fps, args.out, "--fps")
    if args.shift is not None and not (math.isfinite(args.shift) and args.shift > 0):
        raise ValueError(f"--shift must be a positive finite number, got {args.shift}")
    if not (math.isfinite(args.max_hours) and args.max_hours >= 0):
        raise ValueError(f"--max-hours must be a number of hours >= 0 (0: no limit), got {args.max_hours}")
    if args.image and args.video:
        raise ValueError("--image and --video: give one of them")
    if args.guidance_scale > 1 and args.negative_prompt is None:
        raise ValueError(f"--guidance-scale {args.guidance_scale} needs --negative-prompt")
    if args.negative_prompt is not None and args.guidance_scale <= 1:
        raise ValueError("--negative-prompt is used only with --guidance-scale > 1 (classifier-free guidance); give both "
                         "or neither")
    if args.lora_skip_unknown and not adapters:
        raise ValueError("--lora-skip-unknown: no --lora given")
    snapshot = read_snapshot(args.model)
    shift = snapshot.shift if args.shift is None else args.shift
    try:
        schedule = flow_map_sigmas(args.steps, shift, args.sigmas)
    except ValueError as exc:
        raise ValueError(f"{'--sigmas' if args.sigmas else '--steps'}: {exc}") from None
    device = resolve_device(args.device, "--device")
    dtype = resolve_dtype(args.dtype, DTYPE_CHOICES, argument="--dtype", device=device)
    if dtype_warning(device, dtype):
        print(dtype_warning(device, dtype), flush=True)
    transformer = open_checkpoint(snapshot.folder("transformer"))  # headers only
    try:
        apply_adapters(transformer.tensors, adapters, args.lora_skip_unknown)
    except ValueError as exc:
        raise ValueError(f"--lora: {exc}") from None
    config = transformer.config
    check_components(snapshot, config)
    check_grid(config, args.frames, args.height, args.width, CLI_NAMES)
    far = isinstance(config, AnyFlowFARConfig)
    given = None
    for argument, path in (("--image", args.image), ("--video", args.video)):
        if path:
            given = read_given_frames(argument, path, args.height, args.width, single=argument == "--image")
    call = dict(negative_prompt=args.negative_prompt, num_frames=args.frames, height=args.height, width=args.width,
                num_steps=args.steps, sigmas=args.sigmas, shift=shift, guidance_scale=args.guidance_scale,
                chunk_partition=args.chunk_partition, vae_tile=vae_tile, context_window=args.context_window,
                sink_frames=args.sink_frames,
                image=given if args.image else None, video=given if args.video else None)
    partition = check_chunks(args, config, frames)
    prompt_schedule = check_prompt_schedule_file(args, far, partition)
    long_line = long_video_line(args, config, frames)
    if long_line:
        print(long_line, flush=True)
    given_latents = 0 if given is None else 1 if args.image else (given.shape[0] - 1) // 4 + 1
    if given_latents >= frames:
        raise ValueError(f"--video {args.video}: its first {given.shape[0]} frames fill the whole video (--frames "
                         f"{args.frames}): nothing would be generated; give more --frames")
    if far and given_latents:
        from ..sampling.far import check_given_frames

        try:
            check_given_frames(torch.zeros(1, given_latents, 1, 1, 1), (1, frames, 1, 1, 1), partition)
        except ValueError as exc:
            raise ValueError(f"{'--image' if args.image else '--video'}: {exc}") from None

    steps = len(steps_to_run(schedule))
    noise_shape = (1, frames, config.in_channels, h, w)
    guided = args.guidance_scale > 1
    element_size = torch.empty(0, dtype=dtype).element_size()
    sampling = estimate_sampling_run(transformer, noise_shape, TEXT_TOKENS, partition, guided, device, dtype,
                                     args.weight_dtype, args.offload, args.context_window, args.sink_frames)
    memory = estimate_generation_memory(sampling, **component_sizes(snapshot, element_size), height=args.height,
                                        width=args.width, prompts=len(job_prompts(jobs, prompt_schedule)) * (1 + guided),
                                        vae_tile=None if vae_tile is False else (256 if vae_tile is True else vae_tile[0]))
    free = available_memory(device)
    print(f"memory: {memory.describe()}; {gib(free) if free is not None else 'unknown'} available on {device}", flush=True)
    if free is not None and memory.peak > free:
        raise ValueError(f"--frames {args.frames} --height {args.height} --width {args.width}: the run needs about "
                         f"{gib(memory.peak)} at its peak ({memory.peak_stage}) but {device} has {gib(free)} available; "
                         "use fewer frames or pixels")
    compute = (estimate_far_sampling_compute(config, noise_shape, TEXT_TOKENS, steps, partition, given_latents,
                                             args.context_window, args.sink_frames) if far
               else estimate_sampling_compute(config, noise_shape, TEXT_TOKENS, steps, guided))
    compute = replace(compute, rate=measure_matmul_rate(device, dtype, config.hidden_size))
    compute = replace(compute, flops=compute.flops * len(jobs), forwards=compute.forwards * len(jobs))
    print(f"compute (sampling{f', {len(jobs)} videos' if len(jobs) > 1 else ''}): {compute.describe()}", flush=True)
    if args.max_hours and compute.seconds > 3600 * args.max_hours:
        raise ValueError(f"--frames {args.frames} --height {args.height} --width {args.width} --steps {steps}: sampling "
                         f"needs about {compute.flops:.1e} FLOPs, about {duration(compute.seconds)} on {device}, more "
                         f"than --max-hours {args.max_hours:g}; use fewer frames, pixels or steps, or raise --max-hours "
                         "(0 turns the check off)")

    # ---- the run: the model loaded once, then each video ---------------------------------------------
    start = time.perf_counter()
    pipeline = VideoPipeline.from_pretrained(args.model, dtype=dtype, device=device, lora=adapters,
                                             lora_skip_unknown=args.lora_skip_unknown, offload=args.offload,
                                             weight_dtype=args.weight_dtype)
    if args.compile:
        pipeline.transformer.compile_blocks()
    print(f"loaded {args.model}: {'FAR' if far else 'bidirectional'} transformer "
          f"({format_count(sum(p.numel() for p in pipeline.transformer.parameters()))} parameters, {dtype}"
          + loaded_details(args, adapters) + f"), VAE, tokenizer on {device} in {time.perf_counter() - start:.1f} s",
          flush=True)
    stage = time.perf_counter()
    prompts = job_prompts(jobs, prompt_schedule)  # each prompt encoded once, in one pass
    embeddings = pipeline.encode_prompt(prompts + ([args.negative_prompt] if guided else []))
    print(f"  text encoder: {time.perf_counter() - stage:.1f} s for {len(embeddings)} prompt(s) (streamed block by "
          "block, then freed)", flush=True)
    negative = embeddings[-1:] if guided else None
    chunks = [i for i, end in enumerate(accumulate(partition)) if end > given_latents] if far else [None]
    with warnings.catch_warnings():  # the run's length was said before loading
        warnings.simplefilter("ignore", LongVideoWarning)
        for number, job in enumerate(jobs, 1):
            if len(jobs) > 1:
                print(f"video {number}/{len(jobs)}: " + (f"prompt {job.index} ({job.prompt[:60]!r}), " if job.prompt
                                                         else "") + f"seed {job.seed}", flush=True)
            if prompt_schedule:
                texts = dict(prompt_schedule=[(chunk, embeddings[prompts.index(text)][None])
                                              for chunk, text in prompt_schedule])
            else:
                texts = dict(prompt=job.prompt, prompt_embeds=embeddings[prompts.index(job.prompt)][None])
            metadata = {"seed": str(job.seed), "steps": str(steps), "shift": str(shift)}
            metadata.update({"prompt_schedule": json.dumps(prompt_schedule)} if prompt_schedule else {"prompt": job.prompt})
            write_video(pipeline, job, args, partition, chunks, steps, schedule, texts, negative, metadata, call)
    return 0


def write_video(pipeline, job: "VideoJob", args: argparse.Namespace, partition, chunks, steps: int, schedule,
                texts: dict, negative, metadata: dict, call: dict) -> None:
    """One video of a ``generate`` run, made chunk by chunk: each chunk's frames appended to the video file as
    soon as they are decoded (and its latents to --save-latents), nothing of the whole video kept."""
    from ..pipeline.latents_file import LatentsFile
    from ..pipeline.video_io import VideoWriter, to_uint8

    latents_claim = ClaimedOutput(job.latents, "--save-latents") if job.latents else contextlib.nullcontext()
    with ClaimedOutput(job.out) as video_out, latents_claim as latents_out:
        began = time.perf_counter()
        progress = Progress(len(chunks) * steps, print)
        writer = VideoWriter(video_out.partial, args.width, args.height, args.fps, extension_of=job.out)
        kept = {}

        def on_step(chunk, i, t):
            where = "" if chunk is None else f"chunk {chunk + 1}/{len(partition)} ({partition[chunk]} frames)"
            progress.step(where, t, 1000 * schedule[i + 1].item())
            kept["decode from"] = time.perf_counter()

        latents_file = LatentsFile(latents_out.partial, job.latents, LATENTS_KEY) if latents_out is not None else None
        try:
            with latents_file if latents_file is not None else contextlib.nullcontext():
                for frames in pipeline.stream(negative_prompt_embeds=negative, seed=job.seed, callback=on_step,
                                              on_latents=None if latents_file is None else latents_file.append,
                                              **texts, **call):
                    writer.write(to_uint8(frames[0]))
                    progress.note(f"  decoded frames {writer.frames - frames.shape[1] + 1}-{writer.frames} and "
                                  f"appended them to the video in "
                                  f"{time.perf_counter() - kept.get('decode from', time.perf_counter()):.1f} s")
                    progress.last = time.perf_counter()  # the next step's time leaves the decoding out
                if latents_file is not None:
                    latents_file.finish(metadata)
        finally:
            writer.close()
        if latents_out is not None:
            latents_out.finish()
        video_out.finish()
    print(f"wrote {job.out}: {writer.frames} frames of {args.width}x{args.height} at {args.fps:g} fps"
          + (f", and {job.latents}" if job.latents else "") + f" in {time.perf_counter() - began:.1f} s", flush=True)


def job_prompts(jobs: List["VideoJob"], prompt_schedule: Optional[List[Tuple[int, str]]]) -> List[str]:
    """The distinct prompts of a run, in order: the jobs' or the schedule's."""
    return list(dict.fromkeys([text for _, text in prompt_schedule] if prompt_schedule else [job.prompt for job in jobs]))


def check_prompt_schedule_file(args: argparse.Namespace, far: bool, partition) -> Optional[List[Tuple[int, str]]]:
    """The (chunk, prompt) pairs of --prompt-schedule, checked against the video's chunks, or None."""
    if not args.prompt_schedule:
        return None
    path = args.prompt_schedule
    if not far:
        raise ValueError(f"--prompt-schedule {path}: a prompt that changes over the video needs a FAR snapshot; "
                         f"{args.model} is bidirectional")
    schedule: List[Tuple[int, str]] = []
    for number, line in text_lines("--prompt-schedule", path):
        chunk, colon, text = line.partition(":")
        where = f"--prompt-schedule {path} line {number}"
        if not colon or not chunk.strip().isdigit() or not text.strip():
            raise ValueError(f"{where}: expected 'CHUNK: prompt' (a chunk number, a colon, the prompt), got {line!r}")
        chunk = int(chunk)
        if not schedule and chunk != 0:
            raise ValueError(f"{where}: the first prompt is chunk 0's (the start's), got chunk {chunk}")
        if schedule and chunk <= schedule[-1][0]:
            raise ValueError(f"{where}: chunk {chunk} comes after chunk {schedule[-1][0]}; give the chunks in "
                             "increasing order")
        if chunk >= len(partition):
            raise ValueError(f"{where}: chunk {chunk} is past the end: --frames {args.frames} makes {len(partition)} "
                             f"chunks (0 to {len(partition) - 1}: {' '.join(map(str, partition))} latent frames)")
        schedule.append((chunk, text.strip()))
    if not schedule:
        raise ValueError(f"--prompt-schedule {path}: holds no prompt (one 'CHUNK: prompt' a line)")
    return schedule


@dataclass(frozen=True)
class VideoJob:
    """One video of a run: its prompt (and the prompt's number in --prompts; None with --prompt-schedule), seed and
    output files."""

    index: int
    prompt: Optional[str]
    seed: int
    out: str
    latents: Optional[str]


def video_jobs(args: argparse.Namespace) -> List[VideoJob]:
    """The videos a ``generate`` run makes: one, or one for each prompt of --prompts and each --seed, named
    ``STEM-NNN-seedS.EXT`` after --out (and --save-latents) when there are several."""
    prompts = [(1, args.prompt)] if args.prompts is None else read_prompts(args.prompts)  # (a --prompt-schedule: None)
    pairs = [(index, prompt, seed) for index, prompt in prompts for seed in args.seed]
    if len(set(args.seed)) != len(args.seed):
        raise ValueError(f"--seed {' '.join(map(str, args.seed))}: a seed given twice would make the same video twice")

    def named(path: Optional[str], index: int, seed: int) -> Optional[str]:
        if path is None or len(pairs) == 1:
            return path
        stem, extension = os.path.splitext(path)
        return f"{stem}-{index:03d}-seed{seed}{extension}"

    return [VideoJob(index, prompt, seed, named(args.out, index, seed), named(args.save_latents, index, seed))
            for index, prompt, seed in pairs]


def text_lines(option: str, path: str) -> List[Tuple[int, str]]:
    """The lines of the text file ``path`` given to ``option``, stripped, with their numbers; blank lines and #
    comments skipped. A file that cannot be read is one line naming the option."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise ValueError(f"{option} {path}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{option} {path}: not UTF-8 text") from None
    return [(number, line.strip()) for number, line in enumerate(lines, 1)
            if line.strip() and not line.lstrip().startswith("#")]


def read_prompts(path: str) -> List[Tuple[int, str]]:
    """The prompts of a --prompts file with their line numbers: one a line, blank lines and # comments skipped."""
    prompts = text_lines("--prompts", path)
    if not prompts:
        raise ValueError(f"--prompts {path}: holds no prompt (one a line; blank lines and # comments are skipped)")
    return prompts


def check_vae_tile(values: Optional[List[int]]):
    """--vae-tile: off (None), the default tiles (given alone: True), or (tile, stride) in pixels."""
    if values is None:
        return False
    if not values:
        return True
    if len(values) != 2 or any(v < 8 or v % 8 for v in values) or values[1] > values[0]:
        raise ValueError(f"--vae-tile {' '.join(map(str, values))}: give it alone (256-pixel tiles every 192) or TILE "
                         "STRIDE in pixels, multiples of 8, the stride at most the tile")
    return tuple(values)


def read_given_frames(argument: str, path: str, height: int, width: int, single: bool):
    """The frames of --image (one, (H, W, 3)) or --video (the first 4k + 1, (F, H, W, 3)), uint8, checked
    against the video's size."""
    from ..pipeline.video_io import read_frames

    try:
        frames = read_frames(path, limit=1 if single else None)
    except ValueError as exc:
        raise ValueError(f"{argument} {exc}") from None
    if not single:
        frames = frames[:(frames.shape[0] - 1) // 4 * 4 + 1]
    if frames.shape[1:3] != (height, width):
        raise ValueError(f"{argument} {path}: {frames.shape[2]}x{frames.shape[1]} pixels (width x height), but the video "
                         f"is --width {width} --height {height}; resize it first or change the size")
    return frames[0] if single else frames
