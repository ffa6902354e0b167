"""What the ``anyflow`` commands share: file keys and help texts, argument types, output files claimed early
and removed on failure, the sampling checks and estimates of ``sample`` and ``generate``, progress lines."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import List, Optional

from ..model.config import TRAIN_TIMESTEPS

PROMPT_KEY = "prompt_embeds"
NEGATIVE_KEY = "negative_prompt_embeds"
LATENTS_KEY = "latents"
CLI_NAMES = ("--frames", "--height", "--width")
OFFLOAD_HELP = ("keep the DiT blocks' weights in host memory (pinned) and copy each to the GPU just before it "
                "runs, the next one meanwhile: about two blocks on the GPU instead of all (14B: about 1.3 GiB instead "
                "of 26 GiB in bf16), for a little time per step; one process only; on the CPU it saves nothing")
PIXEL_RULE = ("a multiple of 16 (8 x the patch 2) for the bidirectional models, of 32 (8 x the compressed patch 4) "
              "for the FAR ones; the checkpoint's own patches decide and are checked before it loads")
STEPS_HELP = f"number of steps, 1 to {TRAIN_TIMESTEPS} (the models' timestep grid; default 4)"
DEVICE_HELP = "cpu, cuda or cuda:N (default: cuda when available, else cpu)"
SEED_HELP = "seed of the initial noise, 0 to 2^64 - 1 (default 0); the same seed draws the same noise on any device"
SIGMAS_HELP = ("custom strictly decreasing base noise levels in [0, 1]; they are shifted like the default schedule (add "
               "--shift 1 to use them as given), a terminal 0 is appended, and they replace --steps")
LORA_HELP = ("scaled by SCALE (default 1); repeatable. Formats: diffusers / PEFT, Wan2.1 original / ComfyUI (with .diff / "
             ".diff_b), musubi-tuner (.safetensors, or .pt loaded with weights_only)")
LORA_SKIP_HELP = ("leave out adapter modules this model does not have (for example the image cross-attention k_img / "
                  "v_img of an image-to-video LoRA) instead of refusing the adapter")
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


def format_count(n: float) -> str:
    """A count in engineering-style scientific notation: 1.42e9, 4.44e5, 12."""
    if n < 1000:
        return f"{n:g}"
    exponent = int(math.floor(math.log10(n)))
    mantissa = round(n / 10**exponent, 2)
    if mantissa >= 10:  # 9.996e5 rounds to 10.00
        mantissa, exponent = mantissa / 10, exponent + 1
    return f"{mantissa:.2f}e{exponent}"


def same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def inside(path: str, folder: str) -> bool:
    folder = os.path.realpath(folder).rstrip(os.sep) + os.sep
    return os.path.realpath(path).startswith(folder)


def check_output_path(out: str, force: bool, inputs: List[tuple], argument: str = "--out") -> None:
    """Refuse an output file (the option ``argument``) that is a folder, lies in no folder, exists (without
    --force) or is an input.

    ``inputs`` are (argument, path) pairs; a folder input (a checkpoint folder) protects all it holds.
    """
    named = f"{argument} {out}"
    for option, path in inputs:
        if path and same_file(out, path):
            raise ValueError(f"{named}: is the input {option} {path}; --force never replaces an input")
        if path and os.path.isdir(path) and inside(out, path):
            raise ValueError(f"{named}: is inside the input {option} {path}; --force never replaces an input")
    if os.path.isdir(out):
        raise ValueError(f"{named}: is a folder; give a file name, for example {os.path.join(out, 'latents.safetensors')}")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ValueError(f"{named}: the folder {parent} does not exist")
    if os.path.lexists(out) and not force:
        raise ValueError(f"{named}: already exists; pass --force to replace it")


def add_long_video_options(parser) -> None:
    """--context-window and --sink-frames: a FAR checkpoint's bounded cache (``sample`` and ``generate``)."""
    parser.add_argument("--context-window", type=int, metavar="N",
                        help="FAR checkpoints: keep N latent frames of compressed context behind the full-resolution "
                        "chunks, the oldest leaving first: memory and time per chunk stay flat at any length "
                        "(default: every frame, the authors' model; 12 with --sink-frames 1 is what the released "
                        "models saw in training; docs/LONG_VIDEO.md)")
    parser.add_argument("--sink-frames", type=int, default=0, metavar="N",
                        help="FAR checkpoints, with --context-window: also keep the first N latent frames, whatever "
                        "the length (an attention sink; default 0)")


def check_chunks(args: argparse.Namespace, config, frames: int) -> Optional[tuple]:
    """--chunk-partition, --guidance-scale, --context-window and --sink-frames against the model: a FAR model's
    chunks (given, checked to sum to the latent frames, or the checkpoint's extended to them by its rule) and
    no guidance; none of these for a bidirectional one. None for a bidirectional model."""
    from ..model.config import AnyFlowFARConfig, check_chunk_partition
    from ..sampling.far import check_context_window

    if not isinstance(config, AnyFlowFARConfig):
        for option, value in (("--chunk-partition", args.chunk_partition), ("--context-window", args.context_window),
                              ("--sink-frames", args.sink_frames)):
            if value:
                raise ValueError(f"{option}: {args.model} is a bidirectional checkpoint, which has no chunks")
        return None
    if args.guidance_scale > 1:
        raise ValueError(f"--guidance-scale {args.guidance_scale}: the FAR sampler runs without guidance "
                         "(the released FAR weights have it built in)")
    if not args.chunk_partition:
        partition = config.chunk_partition_for(frames)
    else:
        try:
            partition = check_chunk_partition(args.chunk_partition, frames, "--chunk-partition")
        except ValueError as exc:
            raise ValueError(f"{exc} (--frames {args.frames}); give a --chunk-partition that sums to {frames}") from None
    check_context_window(config, partition, args.context_window, args.sink_frames, ("--context-window", "--sink-frames"))
    return partition


def long_video_line(args: argparse.Namespace, config, frames: int) -> Optional[str]:
    """The one line a FAR run past the frames its checkpoint was trained on prints before loading, or None."""
    from ..model.config import AnyFlowFARConfig
    from ..sampling.far import long_video_note

    note = long_video_note(config, frames) if isinstance(config, AnyFlowFARConfig) else None
    return None if note is None else f"--frames {args.frames}: {note}"


def loaded_details(args: argparse.Namespace, adapters: List[tuple]) -> str:
    """What a "loaded" line adds after the dtype: float8 weights, block offload, compiling, LoRA merged."""
    return ((f", {args.weight_dtype} block weights" if getattr(args, "weight_dtype", None) else "")
            + (", DiT blocks offloaded to host memory" if getattr(args, "offload", None) else "")
            + (", DiT blocks compiled on first use" if getattr(args, "compile", False) else "")
            + "".join(f", LoRA {path} x {scale:g} merged" for path, scale in adapters))


class ClaimedOutput:
    """The output file, claimed before the expensive part: a hidden partial file in the target folder
    (which proves it writable), renamed onto the target when complete and removed otherwise. Partial
    files that dead processes left in that folder are removed first."""

    def __init__(self, out: str, argument: str = "--out"):
        from weights_convert.partials import partial_path

        self.out = out
        try:
            self.partial = partial_path(out)  # (dead processes' partials in its folder are removed first)
            os.close(os.open(self.partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask applies
        except OSError as exc:
            raise ValueError(f"{argument} {out}: cannot write in {os.path.dirname(os.path.abspath(out))}: "
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


class Progress:
    """The steps of a run as they go: a progress bar in a terminal (tqdm), one line per step otherwise (which
    step, the timesteps, its seconds, elapsed, and what is left, estimated from the steps after the first: the
    first may include compiling). :meth:`note` prints a line without breaking the bar."""

    def __init__(self, total: int, say=print):
        self.total, self.done, self.say = total, 0, say
        self.started = self.last = time.perf_counter()
        self.first_done: Optional[float] = None  # when the first step ended
        self.bar = None
        if say is print and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)

    def step(self, where: str, t: float, r: float) -> None:
        now = time.perf_counter()
        self.done += 1
        if self.first_done is None:
            self.first_done = now
        left = (now - self.first_done) / (self.done - 1) * (self.total - self.done) if self.done > 1 else None
        if self.bar is not None:
            self.bar.set_postfix_str(f"{where + ', ' if where else ''}t {t:.0f} -> {r:.0f}", refresh=False)
            self.bar.update(1)
            if self.done == self.total:
                self.bar.close()
        else:
            estimate = f", about {left:.1f} s left" if left is not None else ""
            self.say(f"  {where + ': ' if where else ''}step {self.done}/{self.total}: t = {t:7.2f} -> r = {r:7.2f}  "
                     f"{now - self.last:.2f} s  (elapsed {now - self.started:.1f} s{estimate})")
        self.last = now

    def note(self, message: str) -> None:
        """A line between the steps (above the bar in a terminal)."""
        if self.bar is not None:
            self.bar.write(message)
        else:
            self.say(message)
