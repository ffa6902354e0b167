"""The ``anyflow`` command: ``demo``, ``sample`` and ``inspect``.

Only argument parsing happens at start-up (``anyflow --help`` does not import torch); each
subcommand imports what it needs. This module is the top of the import graph: it may use the
library and the converter, and nothing imports it.

``sample`` checks every argument it can before it loads a model or allocates a latent (the
output path, the device, the schedule, the patch grid against the model's RoPE table, the
embeddings, the memory the run needs), claims its output file early, and removes it again on
any error or interrupt: a failed run leaves nothing behind and never replaces an input.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from itertools import accumulate
from typing import List, Optional

from . import __version__
from .interrupts import Interrupted, exit_now, run_interruptibly, signals_raise_interrupted
from .video_shape import check_grid, latent_shape
from weights_convert.names import FORMATS

PROMPT_KEY = "prompt_embeds"
NEGATIVE_KEY = "negative_prompt_embeds"
LATENTS_KEY = "latents"
TINY_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny")
TINY_FAR_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny_far")
MAX_STEPS = 1000  # anyflow.sampling.MAX_STEPS: the models' timestep grid has 1000 steps
OFFLOAD_HELP = ("keep the DiT blocks' weights in host memory (pinned) and copy each to the GPU just before it "
                "runs, the next one meanwhile: about two blocks on the GPU instead of all (14B: about 1.3 GiB instead "
                "of 26 GiB in bf16), for a little time per step; one process only; on the CPU it saves nothing")
PIXEL_RULE = ("a multiple of 16 (8 x the patch 2) for the bidirectional models, of 32 (8 x the compressed patch 4) "
              "for the FAR ones; the checkpoint's own patches decide and are checked before it loads")


FLOAT8_WEIGHTS = "float8_e4m3fn"  # anyflow.parameters.FLOAT8_NAME
WEIGHT_DTYPE_HELP = ("hold the blocks' linear weights in float8 e4m3 with a float32 scale per row (half the bytes of "
                     "bfloat16; they compute in --dtype; docs/FP8.md); default: the checkpoint's (--dtype, or float8 "
                     "for a checkpoint written by anyflow-convert --dtype float8_e4m3fn)")


def seed_number(text: str) -> int:
    """``--seed``: an integer that a torch generator takes (0 to 2^64 - 1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"{text} is outside 0 to 2^64 - 1 (18446744073709551615)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anyflow", description="AnyFlow video flow-map transformer tools.")
    parser.add_argument("--version", action="version", version=f"anyflow {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo", help="convert, check and sample the tiny checkpoints shipped in the package",
        description="Convert the embedded tiny AnyFlow checkpoints (bidirectional and FAR, Hub diffusers layout) with "
        "the real converter, load them, check a forward pass and 1/2/4-step samples (the FAR one also from a given "
        "frame) against the stored diffusers outputs, and print a table.",
    )
    demo.set_defaults(run=run_demo)

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
                        help="merge a LoRA adapter into the model when it is loaded, scaled by SCALE (default 1); "
                        "repeatable. Formats: diffusers / PEFT, Wan2.1 original / ComfyUI (with .diff / .diff_b), "
                        "musubi-tuner (.safetensors, or .pt loaded with weights_only)")
    sample.add_argument("--lora-skip-unknown", action="store_true",
                        help="leave out adapter modules this model does not have (for example the image "
                        "cross-attention k_img / v_img of an image-to-video LoRA) instead of refusing the adapter")
    sample.add_argument("--prompt-embeds", required=True, metavar="FILE",
                        help=f"safetensors file with UMT5 embeddings (B, S, 4096) under '{PROMPT_KEY}'")
    sample.add_argument("--negative-embeds", metavar="FILE",
                        help=f"safetensors file with the negative prompt's embeddings under '{NEGATIVE_KEY}' "
                        "(needed when --guidance-scale > 1)")
    sample.add_argument("--steps", type=int, default=4, help=f"number of steps, 1 to {MAX_STEPS} (default 4)")
    sample.add_argument("--shift", type=float, default=5.0, help="schedule shift (default 5, as the released models)")
    sample.add_argument("--sigmas", type=float, nargs="+", metavar="SIGMA",
                        help="custom strictly decreasing base noise levels in [0, 1]; they are shifted like the "
                        "default schedule (add --shift 1 to use them as given), a terminal 0 is appended, and "
                        "they replace --steps")
    sample.add_argument("--guidance-scale", type=float, default=1.0,
                        help="classifier-free guidance (default 1: off; the released weights need none)")
    sample.add_argument("--raw-euler", action="store_true", help="plain Euler steps (r = t) instead of flow-map steps")
    sample.add_argument("--context-latents", metavar="FILE",
                        help=f"safetensors file with K given latent frames under '{LATENTS_KEY}', diffusers layout "
                        "(B, C, K, H/8, W/8): the video starts with them (image-to-video with K = 1, video "
                        "continuation); for a FAR checkpoint K must end a chunk")
    sample.add_argument("--chunk-partition", type=int, nargs="+", metavar="N",
                        help="FAR checkpoints: latent frames of each chunk, summing to (frames - 1) / 4 + 1 "
                        "(default: the checkpoint's, 1 3 3 3 3 3 3 2 for 81 frames)")
    sample.add_argument("--frames", type=int, default=81, help="video frames, 4k + 1 (default 81)")
    sample.add_argument("--height", type=int, default=480, help=f"pixels (default 480): {PIXEL_RULE}")
    sample.add_argument("--width", type=int, default=832, help=f"pixels (default 832): {PIXEL_RULE}")
    sample.add_argument("--seed", type=seed_number, default=0, help="seed of the initial noise, 0 to 2^64 - 1 (default 0)")
    sample.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="model dtype; auto = float32 on CPU, bfloat16 on CUDA (float16 on GPUs before "
                        "Ampere, which have no bfloat16 units)")
    sample.add_argument("--weight-dtype", choices=(FLOAT8_WEIGHTS,), default=None, help=WEIGHT_DTYPE_HELP)
    sample.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
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

    from .cli_generate import add_generate_command

    add_generate_command(commands)

    from .cli_train import add_train_command

    add_train_command(commands)

    def run_app(args: argparse.Namespace) -> int:
        from anyflow.app import serve

        return serve(args)

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
    app.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                     help="transformer and text encoder dtype, as for generate (auto: float32 on CPU, bfloat16 on CUDA)")
    app.add_argument("--weight-dtype", choices=(FLOAT8_WEIGHTS,), default=None, help=f"the transformer's: {WEIGHT_DTYPE_HELP}")
    app.add_argument("--offload", action="store_const", const="blocks", default=None,
                     help=f"block offload of the transformer: {OFFLOAD_HELP}")
    app.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    app.set_defaults(run=run_app)

    inspect = commands.add_parser("inspect", help="describe a checkpoint or a LoRA adapter from its headers",
                                  description="Describe a checkpoint from its headers: format, files, config "
                                  "(and config keys set aside), parameters, dtypes; or a LoRA adapter: format, "
                                  "rank, alpha, which modules, for which model width and depth. No weights are read "
                                  "(a .pt file is loaded whole, with weights_only).")
    inspect.add_argument("path", metavar="PATH", help="checkpoint file or folder, or a LoRA adapter file")
    inspect.add_argument("--from", dest="from_format", choices=FORMATS,
                         help="read the checkpoint's names as this layout instead of detecting it")
    inspect.set_defaults(run=run_inspect)
    return parser


def count(n: float) -> str:
    """A count in engineering-style scientific notation: 1.42e9, 4.44e5, 12."""
    if n < 1000:
        return f"{n:g}"
    exponent = int(math.floor(math.log10(n)))
    mantissa = round(n / 10**exponent, 2)
    if mantissa >= 10:  # 9.996e5 rounds to 10.00
        mantissa, exponent = mantissa / 10, exponent + 1
    return f"{mantissa:.2f}e{exponent}"


def run_inspect(args: argparse.Namespace) -> int:
    """Describe a checkpoint or a LoRA adapter from its headers.

    Paths: PATH as given, made absolute, is printed once (``path:``, or ``adapter:`` for an adapter);
    the files read (``files:``, the config file) are printed relative to PATH when it is a folder, else
    relative to the folder PATH is in. An adapter that loading would refuse whatever the model (half a
    pair of factors, ranks that differ) raises ValueError, as ``sample --lora`` would.
    """
    from collections import Counter

    from weights_convert.cli import summarize
    from weights_convert.configs import describe_keys
    from weights_convert.lora import AdapterFileError, describe, open_adapter
    from weights_convert.safetensors_io import DTYPES
    from weights_convert.sources import open_checkpoint

    try:
        checkpoint = open_checkpoint(args.path, args.from_format)
    except AdapterFileError:
        print("\n".join(describe(open_adapter(args.path))))
        return 0
    dtypes = Counter()
    for lazy in checkpoint.tensors.values():
        dtypes[DTYPES[lazy.dtype][1]] += lazy.nbytes
    folder = checkpoint.path if os.path.isdir(checkpoint.path) else os.path.dirname(checkpoint.path)

    def relative(path: str) -> str:
        return os.path.relpath(os.path.abspath(path), folder)

    config_source = relative(checkpoint.config_file) if checkpoint.config_file else checkpoint.config_source
    print(f"path: {checkpoint.path}")
    print(f"format: {checkpoint.description}")
    print(f"files: {summarize([relative(f) for f in checkpoint.files])}")
    print(f"config: {checkpoint.config.to_dict()} ({config_source})")
    if checkpoint.config_set_aside:
        print(f"config keys set aside (they do not change this model): {describe_keys(checkpoint.config_set_aside)}")
    print(f"parameters: {checkpoint.num_parameters:,} ({count(checkpoint.num_parameters)}) in {len(checkpoint.tensors)} tensors")
    print(f"dtypes: {', '.join(f'{d} {n / 1e6:.1f} MB' for d, n in sorted(dtypes.items()))}")
    print(f"bytes: {checkpoint.nbytes:,}")
    if os.path.isfile(os.path.join(args.path, "model_index.json")):
        components = describe_components(args.path)
        print(f"components: {len(components)} folder(s)")
        for line in components:
            print(f"  {line}")
    return 0


def describe_components(root: str) -> List[str]:
    """One line per component folder of a pipeline snapshot: its class, files, bytes and dtypes (headers only)."""
    from collections import Counter

    from weights_convert.safetensors_io import DTYPES, read_header

    lines = []
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder) or name.startswith("."):
            continue
        files = sorted(os.listdir(folder))
        config = next((os.path.join(folder, f) for f in ("config.json", "scheduler_config.json", "tokenizer_config.json")
                       if f in files), None)
        kind = ""
        if config:
            with open(config) as f:
                data = json.load(f)
            kind = data.get("_class_name") or (data.get("architectures") or [data.get("tokenizer_class", "")])[0]
        dtypes = Counter()
        for file in files:
            if file.endswith(".safetensors"):
                for record in read_header(os.path.join(folder, file))[0].values():
                    dtypes[DTYPES[record.dtype][1]] += record.nbytes
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in files if os.path.isfile(os.path.join(folder, f)))
        weights = f"; {', '.join(f'{d} {n / 1e6:,.1f} MB' for d, n in sorted(dtypes.items()))}" if dtypes else ""
        lines.append(f"{name + '/':<14} {kind or '-'}: {len(files)} file(s), {size / 1e6:,.1f} MB{weights}")
    return lines


def same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def inside(path: str, folder: str) -> bool:
    folder = os.path.realpath(folder).rstrip(os.sep) + os.sep
    return os.path.realpath(path).startswith(folder)


def check_out(out: str, force: bool, inputs: List[tuple]) -> None:
    """Refuse an --out that is a folder, lies in no folder, exists (without --force) or is an input.

    ``inputs`` are (argument, path) pairs; a folder input (a checkpoint folder) protects all it holds.
    """
    for argument, path in inputs:
        if path and same_file(out, path):
            raise ValueError(f"--out {out}: is the input {argument} {path}; --force never replaces an input")
        if path and os.path.isdir(path) and inside(out, path):
            raise ValueError(f"--out {out}: is inside the input {argument} {path}; --force never replaces an input")
    if os.path.isdir(out):
        raise ValueError(f"--out {out}: is a folder; give a file name, for example {os.path.join(out, 'latents.safetensors')}")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ValueError(f"--out {out}: the folder {parent} does not exist")
    if os.path.lexists(out) and not force:
        raise ValueError(f"--out {out}: already exists; pass --force to replace it")


CLI_NAMES = ("--frames", "--height", "--width")


def estimate_sampling_run(args: argparse.Namespace, checkpoint, noise_shape: tuple, text_tokens: int,
                          partition: Optional[tuple], guided: bool, device, dtype):
    """The memory a ``sample`` or ``generate`` run's sampling needs (a :class:`anyflow.memory.MemoryEstimate`), from
    the opened ``checkpoint``'s headers and the arguments: the weights as loaded (``--weight-dtype``), the
    device's kernels, the FAR cache, and ``--offload``."""
    import torch

    from anyflow.config import AnyFlowFARConfig
    from anyflow.memory import (
        ForwardKernels, estimate_far_sampling_memory, estimate_sampling_memory, weight_bytes, with_block_offload,
    )
    from weights_convert.conversion import loaded_nbytes
    from weights_convert.scaled_fp8 import stored_as_float8

    config = checkpoint.config
    element_size = torch.empty(0, dtype=dtype).element_size()
    weights = loaded_nbytes(checkpoint, dtype, args.weight_dtype)
    kernels = ForwardKernels.on(device, dtype)
    if isinstance(config, AnyFlowFARConfig):
        estimate = estimate_far_sampling_memory(config, weights, noise_shape, text_tokens, element_size, partition,
                                                kernels)
    else:
        estimate = estimate_sampling_memory(config, weights, noise_shape, text_tokens, element_size, guided, kernels)
    if not args.offload:
        return estimate
    # the blocks as loaded: float8 when asked for, or when the checkpoint holds (folded) float8 pairs
    stored = any(stored_as_float8(t) for t in checkpoint.tensors.values())
    float8 = args.weight_dtype or (FLOAT8_WEIGHTS if stored else None)
    return with_block_offload(estimate, weight_bytes(config, element_size, float8), host_is_device=device.type == "cpu")


def check_chunks(args: argparse.Namespace, config, frames: int) -> Optional[tuple]:
    """--chunk-partition and --guidance-scale against the model: a FAR model's chunks (checked to sum to the
    latent frames) and no guidance; no chunks for a bidirectional one. None for a bidirectional model."""
    from anyflow.config import AnyFlowFARConfig, check_chunk_partition

    if not isinstance(config, AnyFlowFARConfig):
        if args.chunk_partition:
            raise ValueError(f"--chunk-partition: {args.model} is a bidirectional checkpoint, which has no chunks")
        return None
    if args.guidance_scale > 1:
        raise ValueError(f"--guidance-scale {args.guidance_scale}: the FAR sampler runs without guidance "
                         "(the released FAR weights have it built in)")
    try:
        return check_chunk_partition(args.chunk_partition or config.chunk_partition, frames, "--chunk-partition")
    except ValueError as exc:
        raise ValueError(f"{exc} (--frames {args.frames}); give a --chunk-partition that sums to {frames}") from None


def resolve_device(name: Optional[str]):
    """The torch device named by --device, checked to exist here."""
    from anyflow.devices import resolve_device as resolve

    try:
        return resolve(name)
    except ValueError as exc:  # "device 'x': why" -> "--device x: why"
        raise ValueError(f"--device {name}: {str(exc).partition(': ')[2]}") from None


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


class ClaimedOutput:
    """The output file, claimed before the expensive part: a hidden partial file in the target folder
    (which proves it writable), renamed onto the target when complete and removed otherwise. Partial
    files that dead processes left for the same target are removed first."""

    def __init__(self, out: str):
        from weights_convert.partials import partial_path, remove_stale

        self.out = out
        try:
            remove_stale(out)
            self.partial = partial_path(out)
            os.close(os.open(self.partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except OSError as exc:
            raise ValueError(f"--out {out}: cannot write in {os.path.dirname(os.path.abspath(out))}: "
                             f"{exc.strerror}") from None

    def __enter__(self) -> "ClaimedOutput":
        return self

    def __exit__(self, *exc) -> None:
        from weights_convert.partials import discard

        discard(self.partial)

    def commit(self, tensors, metadata) -> None:
        from weights_convert.safetensors_io import write_file

        write_file(self.partial, tensors, metadata)
        self.finish()

    def finish(self) -> None:
        """The partial file, complete, renamed onto the target."""
        os.replace(self.partial, self.out)


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


def check_sample_run(args: argparse.Namespace, processes: "Processes") -> SampleRun:
    """Every check of ``anyflow sample`` that needs neither the model's weights nor the noise (see the module
    docstring), ending with the memory estimate, printed and enforced."""
    from weights_convert.lora import parse_lora_argument

    adapters = [parse_lora_argument(text) for text in args.lora]
    if args.lora_skip_unknown and not adapters:
        raise ValueError("--lora-skip-unknown: no --lora given")
    inputs = [("--prompt-embeds", args.prompt_embeds), ("--negative-embeds", args.negative_embeds),
              ("--context-latents", args.context_latents), ("--model", args.model)]
    check_out(args.out, args.force, inputs + [("--lora", path) for path, _ in adapters])
    frames, h, w = latent_shape(args.frames, args.height, args.width, CLI_NAMES)
    if not (math.isfinite(args.shift) and args.shift > 0):
        raise ValueError(f"--shift must be a positive finite number, got {args.shift}")
    if not math.isfinite(args.guidance_scale):
        raise ValueError(f"--guidance-scale must be a finite number, got {args.guidance_scale}")
    if not (math.isfinite(args.max_hours) and args.max_hours >= 0):
        raise ValueError(f"--max-hours must be a number of hours >= 0 (0: no limit), got {args.max_hours}")

    from anyflow.compute import duration, estimate_far_sampling_compute, estimate_sampling_compute
    from anyflow.config import AnyFlowFARConfig
    from anyflow.devices import choose_dtype, dtype_warning
    from anyflow.memory import available_memory, gib
    from anyflow.sampling import flow_map_sigmas, steps_to_run
    from weights_convert.lora import apply_adapters
    from weights_convert.sources import open_checkpoint

    try:
        schedule = flow_map_sigmas(args.steps, args.shift, args.sigmas)
    except ValueError as exc:
        raise ValueError(f"{'--sigmas' if args.sigmas else '--steps'}: {exc}") from None
    device = processes.device
    dtype = choose_dtype(args.dtype, device)
    if dtype_warning(device, dtype):
        processes.say(dtype_warning(device, dtype))

    checkpoint = open_checkpoint(args.model)  # headers only: config and sizes before loading anything
    check_out(args.out, args.force, [("--model", f) for f in checkpoint.files + [checkpoint.config_file]])
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
    text = read_embeddings("--prompt-embeds", args.prompt_embeds, PROMPT_KEY, config.text_dim)
    negative = None
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
    estimate = estimate_sampling_run(args, checkpoint, noise_shape, text_tokens, partition, guided, device, dtype)
    estimate = processes.share(estimate, args.shard_weights, args.sequence_parallel)
    free = available_memory(device)
    need, where = processes.sharing_memory(estimate.total, device)
    processes.say(f"memory: about {estimate.describe()} needed{' per process' if processes.count > 1 else ''}; "
                  f"{gib(free) if free is not None else 'unknown'} available on {where}")
    if free is not None and need > free:
        raise ValueError(f"--frames {args.frames} --height {args.height} --width {args.width}: the run needs about "
                         f"{gib(need)} but {where} has {gib(free)} available; use fewer frames or pixels")
    steps = len(steps_to_run(schedule))
    compute = (estimate_far_sampling_compute(config, noise_shape, text_tokens, steps, partition,
                                             0 if given is None else given.shape[1]) if far
               else estimate_sampling_compute(config, noise_shape, text_tokens, steps, guided))
    compute = processes.share_compute(compute, args.sequence_parallel, device, dtype, config.hidden_size)
    processes.say(f"compute: {compute.describe()}{' per process' if processes.count > 1 else ''}")
    if args.max_hours and compute.seconds > 3600 * args.max_hours:
        raise ValueError(f"--frames {args.frames} --height {args.height} --width {args.width} --steps {steps}: the run "
                         f"needs about {compute.flops:.1e} FLOPs, about {duration(compute.seconds)} on {device}, more "
                         f"than --max-hours {args.max_hours:g}; use fewer frames, pixels or steps, or raise "
                         "--max-hours (0 turns the check off)")
    return SampleRun(config, far, schedule, steps_to_run(schedule), device, dtype, noise_shape, text, negative, given,
                     partition, adapters)


class Processes:
    """The processes of a run: one, or the ranks torchrun started (rank 0 prints and writes)."""

    def __init__(self, args: argparse.Namespace):
        import torch

        self.count = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.mesh = None
        parallel = [flag for flag, on in (("--shard-weights", args.shard_weights),
                                          ("--sequence-parallel", args.sequence_parallel)) if on]
        if self.count == 1 and parallel:
            raise ValueError(f"{parallel[0]} needs several processes: torchrun --nproc-per-node N -m anyflow sample ...")
        if self.count > 1 and not parallel:
            raise ValueError(f"running in {self.count} processes (torchrun): pass --shard-weights and/or "
                             "--sequence-parallel, or every process would do the whole job")
        self.device = resolve_device(args.device)
        if self.count > 1:
            import torch.distributed as dist
            from torch.distributed.device_mesh import init_device_mesh

            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.mesh = init_device_mesh(self.device.type, (self.count,))

    def say(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def share(self, estimate, shard_weights: bool, sequence_parallel: bool):
        """One process's part of a run's memory estimate."""
        from dataclasses import replace

        weights = estimate.weights // self.count if shard_weights else estimate.weights
        activations = estimate.activations // self.count if sequence_parallel else estimate.activations
        return replace(estimate, weights=weights, activations=activations)

    def share_compute(self, estimate, sequence_parallel: bool, device, dtype, width: int):
        """One process's part of a run's compute (the tokens split over the processes, or not), timed at the
        rate of a matmul of the model's ``width`` that this process measures on ``device``."""
        from dataclasses import replace

        from anyflow.compute import measure_matmul_rate

        flops = estimate.flops / self.count if sequence_parallel else estimate.flops
        return replace(estimate, flops=flops, rate=measure_matmul_rate(device, dtype, width))

    def sharing_memory(self, per_process: int, device):
        """What the processes on ``device`` need together, and where: CPU processes of one machine share its memory."""
        if device.type == "cpu" and self.count > 1:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", self.count))
            return per_process * local, f"this machine ({local} processes)"
        return per_process, str(device)

    def agree(self, ok: bool) -> bool:
        """Whether every process got this far (always true alone): a rank that failed its checks stops the others."""
        if self.count == 1:
            return ok
        import torch
        import torch.distributed as dist

        flag = torch.tensor([int(ok)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def close(self, finished: bool) -> None:
        """Tear the process group down. After a run every rank finished, all first meet at a barrier, so
        that none closes its connections while another still uses them (rank 0 writing its file, say);
        after a failure each rank leaves at once: a barrier could wait on a rank that never comes."""
        if self.count > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                if finished:
                    dist.barrier()
                dist.destroy_process_group()


def run_sample(args: argparse.Namespace) -> int:
    processes = Processes(args)
    try:
        code = sample_in(processes, args)
    except BaseException:
        processes.close(finished=False)
        raise
    processes.close(finished=True)
    return code


def sample_in(processes: Processes, args: argparse.Namespace) -> int:
    import contextlib

    import torch

    from anyflow import AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel, sample, sample_far
    from anyflow.parallel import load_parallel

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
        merged = "".join(f", LoRA {path} x {scale:g} merged" for path, scale in run.adapters)
        processes.say(f"loaded {args.model} ({count(sum(p.numel() for p in model.parameters()))} parameters, "
                      f"{run.dtype}, {run.device}"
                      + (", DiT blocks offloaded to host memory" if args.offload else "")
                      + (", DiT blocks compiled on first use" if args.compile else "")
                      + (f", {processes.count} processes" if processes.count > 1 else "")
                      + f"{merged}) in {time.perf_counter() - start:.1f} s")
        noise = torch.randn(run.noise_shape, generator=torch.Generator().manual_seed(args.seed))
        common = dict(num_steps=args.steps, sigmas=args.sigmas, shift=args.shift, use_mean_velocity=not args.raw_euler,
                      context_latents=run.given)
        text = run.text.to(run.dtype)
        if run.far:
            given_frames = 0 if run.given is None else run.given.shape[1]
            chunks = [i for i, end in enumerate(accumulate(partition)) if end > given_frames]
            progress = Progress(len(chunks) * len(steps), processes.say)
            latents = sample_far(model, noise, text, chunk_partition=partition, **common,
                                 callback=lambda chunk, i, t, z: progress.step(
                                     f"chunk {chunk + 1}/{len(partition)} ({partition[chunk]} frames)", t,
                                     1000 * schedule[i + 1].item()))
        else:
            progress = Progress(len(steps), processes.say)
            negative = None if run.negative is None else run.negative.to(run.dtype)
            latents = sample(model, noise, text, guidance_scale=args.guidance_scale,
                             negative_encoder_hidden_states=negative, **common,
                             callback=lambda i, t, z: progress.step("", t, 1000 * schedule[i + 1].item()))
        latents = latents.transpose(1, 2).contiguous().cpu()  # diffusers layout (B, C, F, H, W), the model's dtype
        if output is not None:
            metadata = {"steps": str(len(steps)), "sigmas": json.dumps([round(s, 6) for s in schedule.tolist()]),
                        "shift": str(args.shift), "seed": str(args.seed), "guidance_scale": str(args.guidance_scale),
                        "flow_map": str(not args.raw_euler).lower(),
                        "given_frames": str(0 if run.given is None else run.given.shape[1])}
            if run.far:
                metadata["chunk_partition"] = json.dumps(list(partition))
            output.commit([(LATENTS_KEY, latents)], metadata)
    processes.say(f"wrote {args.out}: '{LATENTS_KEY}' {tuple(latents.shape)} {str(latents.dtype).replace('torch.', '')} (B, C, F, H, W) after "
                  f"{len(steps)} step(s)" + (f" in each of {len(chunks)} chunk(s)" if run.far else ""))
    return 0


class Progress:
    """One line per step: which, the timesteps, its seconds, elapsed and an estimate of what is left."""

    def __init__(self, total: int, say=print):
        self.total, self.done, self.say = total, 0, say
        self.started = self.last = time.perf_counter()

    def step(self, where: str, t: float, r: float) -> None:
        now = time.perf_counter()
        self.done += 1
        left = (now - self.started) / self.done * (self.total - self.done)
        self.say(f"  {where + ': ' if where else ''}step {self.done}/{self.total}: t = {t:7.2f} -> r = {r:7.2f}  "
                 f"{now - self.last:.2f} s  (elapsed {now - self.started:.1f} s, about {left:.1f} s left)")
        self.last = now


def read_context_latents(path: Optional[str], noise_shape, chunk_partition):
    """Given latent frames from --context-latents, (B, K, C, H, W), checked against the run, or None."""
    if path is None:
        return None
    import torch

    from anyflow.sampling import check_given_frames
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


def run_demo(args: argparse.Namespace) -> int:
    failures = demo_checkpoint("bidirectional", TINY_CHECKPOINT) + demo_checkpoint("FAR", TINY_FAR_CHECKPOINT)
    print("\ndemo passed: converter, loaders, forward passes and samplers agree with diffusers" if not failures
          else f"\ndemo FAILED: {failures} check(s) outside the {DEMO_BAR:.0e} bar")
    return 1 if failures else 0


DEMO_BAR = 1e-5  # the fp32 parity bar: max|ours - diffusers| <= bar * max|diffusers|


def demo_checkpoint(kind: str, folder: str) -> int:
    """Convert, load, and check one embedded checkpoint against its stored diffusers outputs; the failures."""
    import tempfile

    import torch

    from anyflow import AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel, sample, sample_far
    from weights_convert import convert
    from weights_convert.safetensors_io import read_header

    golden = {k: r.read() for k, r in read_header(os.path.join(folder, "golden.safetensors"))[0].items()}
    far = kind == "FAR"

    def error(ours, reference) -> float:
        return ((ours - reference).abs().max() / reference.abs().max()).item()

    print(f"\n== {kind} ==")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "tiny-anyflow")
        start = time.perf_counter()
        report = convert(folder, out, progress=None)
        print(f"converted {report.source.description} -> anyflow layout in {time.perf_counter() - start:.2f} s")
        model = (AnyFlowFARTransformer3DModel if far else AnyFlowTransformer3DModel).from_pretrained(out)
    print(f"loaded: {sum(p.numel() for p in model.parameters()):,} parameters, config {model.config.to_dict()}")
    noise, text = golden["noise"], golden["prompt_embeds"]
    with torch.no_grad():
        velocity = model(noise, golden["timestep"], golden["r_timestep"], text).sample
    failures = 0
    forward_error = error(velocity, golden["forward"])
    failures += forward_error > DEMO_BAR
    print(f"forward pass vs diffusers: max error {forward_error:.1e} of max|ref| "
          f"({'ok' if forward_error <= DEMO_BAR else 'FAIL'})")
    runs = {f"sample_{steps}_steps": (steps, None) for steps in (1, 2, 4)}
    if far:
        runs["sample_2_steps_from_given_frame"] = (2, golden["given_frame"])
    print(f"\n{'run':<32} {'seconds':>8} {'mean':>8} {'std':>7} {'error vs diffusers':>19}")
    for name, (steps, given) in runs.items():
        start = time.perf_counter()
        latents = (sample_far if far else sample)(model, noise, text, num_steps=steps, context_latents=given)
        seconds = time.perf_counter() - start
        e = error(latents, golden[name])
        failures += e > DEMO_BAR
        label = f"{steps} step(s)" + (", 1 given frame" if given is not None else "")
        print(f"{label:<32} {seconds:8.3f} {latents.mean().item():8.4f} {latents.std().item():7.4f} "
              f"{e:15.1e} {'ok' if e <= DEMO_BAR else 'FAIL'}")
    return failures


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    code = run_command(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, end without the interpreter's teardown: a C++ thread of torch's distributed layer
        # can still be running when it destroys its static objects, and the process then aborts (SIGABRT,
        # "terminate called without an active exception") after its work is done, which torchrun reports
        # as a failure (a 2-rank gloo stand-in under load: 14 of 30 launches failed so; 0 of 30 with this exit).
        exit_now(code)
    return code


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command: its exit code, one line on stderr for an error or an interrupt."""
    from weights_convert.partials import remove_registered

    try:
        with signals_raise_interrupted():
            return run_interruptibly(lambda: args.run(args), cleanup=remove_registered)
    except (ValueError, OSError) as exc:  # CheckpointError and KeyMismatchError are ValueErrors
        print(f"anyflow {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except Interrupted as stop:
        print(f"anyflow {args.command}: interrupted ({stop}); nothing was written", file=sys.stderr)
        if stop.abandoned:
            exit_now(stop.exit_code)
        return stop.exit_code


if __name__ == "__main__":
    sys.exit(main())
