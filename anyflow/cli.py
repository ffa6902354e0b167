"""The ``anyflow`` command: ``demo``, ``sample`` and ``inspect``.

Only argument parsing happens at start-up (``anyflow --help`` does not import torch); each
subcommand imports what it needs. This module is the top of the import graph: it may use the
library and the converter, and nothing imports it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

from weights_convert.names import FORMATS

PROMPT_KEY = "prompt_embeds"
NEGATIVE_KEY = "negative_prompt_embeds"
LATENTS_KEY = "latents"
TINY_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anyflow", description="AnyFlow video flow-map transformer tools.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo", help="convert, check and sample the tiny checkpoint shipped in the package",
        description="Convert the embedded tiny AnyFlow checkpoint (Hub diffusers layout) with the real converter, "
        "load it, check a forward pass and 1/2/4-step samples against the stored diffusers outputs, and print a table.",
    )
    demo.set_defaults(run=run_demo)

    sample = commands.add_parser(
        "sample", help="sample latents from prompt embeddings in any number of steps",
        description=f"Sample video latents. The embeddings file is a safetensors file holding UMT5 embeddings "
        f"(B, S, 4096) under the key '{PROMPT_KEY}' (the negative file: '{NEGATIVE_KEY}'; it may be the same "
        f"file). The output safetensors file holds the latents under '{LATENTS_KEY}' in the diffusers layout "
        "(B, C, F, H/8, W/8) that the Wan VAE decodes (see scripts/encode_decode.py).",
    )
    sample.add_argument("--model", required=True, metavar="PATH", help="anything from_pretrained takes")
    sample.add_argument("--prompt-embeds", required=True, metavar="FILE")
    sample.add_argument("--negative-embeds", metavar="FILE", help="needed when --guidance-scale > 1")
    sample.add_argument("--steps", type=int, default=4, help="number of steps (default 4)")
    sample.add_argument("--shift", type=float, default=5.0, help="schedule shift (default 5)")
    sample.add_argument("--sigmas", type=float, nargs="+", help="custom decreasing noise levels in [0, 1]; sets the steps")
    sample.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance (default 1: off)")
    sample.add_argument("--raw-euler", action="store_true", help="plain Euler steps (r = t) instead of flow-map steps")
    sample.add_argument("--frames", type=int, default=81, help="video frames, 4k + 1 (default 81)")
    sample.add_argument("--height", type=int, default=480, help="pixels, a multiple of 16 (default 480)")
    sample.add_argument("--width", type=int, default=832, help="pixels, a multiple of 16 (default 832)")
    sample.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    sample.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="model dtype; auto = bfloat16 on CUDA, float32 on CPU")
    sample.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    sample.add_argument("--out", required=True, metavar="FILE", help="output .safetensors file")
    sample.add_argument("--force", action="store_true", help="replace an existing output file")
    sample.set_defaults(run=run_sample)

    inspect = commands.add_parser("inspect", help="describe a checkpoint from its headers (no weights read)")
    inspect.add_argument("path", metavar="PATH", help="checkpoint file or folder")
    inspect.add_argument("--from", dest="from_format", choices=FORMATS)
    inspect.set_defaults(run=run_inspect)
    return parser


def run_inspect(args: argparse.Namespace) -> int:
    from collections import Counter

    from weights_convert.safetensors_io import DTYPES
    from weights_convert.sources import open_checkpoint

    checkpoint = open_checkpoint(args.path, args.from_format)
    dtypes = Counter()
    for lazy in checkpoint.tensors.values():
        dtypes[DTYPES[lazy.dtype][1]] += lazy.nbytes
    print(f"path: {checkpoint.path}")
    print(f"format: {checkpoint.description}")
    print(f"files: {', '.join(checkpoint.files)}")
    print(f"config: {checkpoint.config.to_dict()}")
    print(f"parameters: {checkpoint.num_parameters:,} ({checkpoint.num_parameters / 1e9:.2f}e9) in {len(checkpoint.tensors)} tensors")
    print(f"dtypes: {', '.join(f'{d} {n / 1e6:.1f} MB' for d, n in sorted(dtypes.items()))}")
    print(f"bytes: {checkpoint.nbytes:,}")
    return 0


def read_embeddings(path: str, key: str):
    """The tensor under ``key`` in a safetensors file, with an error that names both."""
    from weights_convert.safetensors_io import read_header

    records, _ = read_header(path)
    if key not in records:
        raise ValueError(f"{path}: no tensor under the key '{key}' (keys: {sorted(records)[:10]})")
    return records[key].read()


def latent_shape(frames: int, height: int, width: int):
    """(F, H/8, W/8) of the Wan VAE latents for a video, with errors naming the argument."""
    if frames < 1 or (frames - 1) % 4:
        raise ValueError(f"--frames must be 4k + 1 (the Wan VAE compresses time by 4), got {frames}")
    for name, value in (("--height", height), ("--width", width)):
        if value < 16 or value % 16:
            raise ValueError(f"{name} must be a positive multiple of 16 (VAE stride 8 x patch 2), got {value}")
    return (frames - 1) // 4 + 1, height // 8, width // 8


def run_sample(args: argparse.Namespace) -> int:
    import torch

    from anyflow import AnyFlowTransformer3DModel, flow_map_sigmas, sample
    from weights_convert.safetensors_io import write_file

    if os.path.exists(args.out) and not args.force:
        raise ValueError(f"{args.out}: already exists; pass --force to replace it")
    frames, h, w = latent_shape(args.frames, args.height, args.width)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    text = read_embeddings(args.prompt_embeds, PROMPT_KEY)
    negative = read_embeddings(args.negative_embeds, NEGATIVE_KEY) if args.negative_embeds else None
    schedule = flow_map_sigmas(args.steps, args.shift, args.sigmas)  # checks the schedule before loading

    start = time.perf_counter()
    model = AnyFlowTransformer3DModel.from_pretrained(args.model, dtype=dtype, device=device)
    print(f"loaded {args.model} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}e9 parameters, {dtype}, "
          f"{device}) in {time.perf_counter() - start:.1f} s", flush=True)
    generator = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(text.shape[0], frames, model.config.in_channels, h, w, generator=generator)

    steps = len(schedule) - 1
    last = [time.perf_counter()]

    def progress(i: int, t: float, latents) -> None:
        now = time.perf_counter()
        print(f"  step {i + 1}/{steps}: t = {t:7.2f} -> r = {1000 * schedule[i + 1].item():7.2f}  "
              f"{now - last[0]:.2f} s", flush=True)
        last[0] = now

    latents = sample(model, noise, text.to(dtype), num_steps=args.steps, sigmas=args.sigmas, shift=args.shift,
                     use_mean_velocity=not args.raw_euler, guidance_scale=args.guidance_scale,
                     negative_encoder_hidden_states=None if negative is None else negative.to(dtype), callback=progress)
    latents = latents.float().transpose(1, 2).contiguous().cpu()  # diffusers layout (B, C, F, H, W)
    partial = f"{args.out}.partial-{os.getpid()}"
    write_file(partial, [(LATENTS_KEY, latents)], {"steps": str(steps), "shift": str(args.shift), "seed": str(args.seed)})
    os.replace(partial, args.out)
    print(f"wrote {args.out}: '{LATENTS_KEY}' {tuple(latents.shape)} float32 (B, C, F, H, W)")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    import tempfile

    import torch

    from anyflow import AnyFlowTransformer3DModel, sample
    from weights_convert import convert
    from weights_convert.safetensors_io import read_header

    golden = {k: r.read() for k, r in read_header(os.path.join(TINY_CHECKPOINT, "golden.safetensors"))[0].items()}
    bar = 1e-5  # the fp32 parity bar: max|ours - diffusers| <= bar * max|diffusers|

    def error(ours, reference) -> float:
        return ((ours - reference).abs().max() / reference.abs().max()).item()

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "tiny-anyflow")
        start = time.perf_counter()
        report = convert(TINY_CHECKPOINT, out, progress=None)
        print(f"converted {report.source.description} -> anyflow layout in {time.perf_counter() - start:.2f} s")
        model = AnyFlowTransformer3DModel.from_pretrained(out)
    print(f"loaded: {sum(p.numel() for p in model.parameters()):,} parameters, config {model.config.to_dict()}")
    with torch.no_grad():
        velocity = model(golden["noise"], golden["timestep"], golden["r_timestep"], golden["prompt_embeds"]).sample
    failures = 0
    forward_error = error(velocity, golden["forward"])
    failures += forward_error > bar
    print(f"forward pass vs diffusers: max error {forward_error:.1e} of max|ref| ({'ok' if forward_error <= bar else 'FAIL'})")
    print(f"\n{'steps':>5} {'seconds':>8} {'mean':>8} {'std':>7} {'error vs diffusers':>19}")
    for steps in (1, 2, 4):
        start = time.perf_counter()
        latents = sample(model, golden["noise"], golden["prompt_embeds"], num_steps=steps)
        seconds = time.perf_counter() - start
        e = error(latents, golden[f"sample_{steps}_steps"])
        failures += e > bar
        print(f"{steps:>5} {seconds:8.3f} {latents.mean().item():8.4f} {latents.std().item():7.4f} "
              f"{e:15.1e} {'ok' if e <= bar else 'FAIL'}")
    print("\ndemo passed: converter, loader, forward and sampler agree with diffusers" if not failures
          else f"\ndemo FAILED: {failures} check(s) outside the {bar:.0e} bar")
    return 1 if failures else 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as exc:  # CheckpointError and KeyMismatchError are ValueErrors
        print(f"anyflow {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
