"""The two ends of a video without the transformer: prompts to an embeddings file, latents to a video file.

    # prompt -> UMT5 embeddings file for `anyflow sample --prompt-embeds`
    python scripts/encode_decode.py encode --pipeline PATH --prompt "a red fox in snow" \
        [--negative-prompt "blurry"] --out embeds.safetensors
    # latents from `anyflow sample --out` -> mp4 (.gif, .png, .webp)
    python scripts/encode_decode.py decode --pipeline PATH --latents latents.safetensors --out video.mp4

PATH is a local pipeline snapshot with ``tokenizer/``, ``text_encoder/`` and ``vae/`` (for example
``nvidia/AnyFlow-Wan2.1-T2V-1.3B-Diffusers`` downloaded beforehand; nothing is downloaded here). It
uses this project's own text encoder (streamed block by block), tokenizer and VAE: the video extra
(``pip install -e ".[video]"``), no diffusers or transformers. ``anyflow generate`` does both ends and
the sampling between them in one command.

Every input is checked before anything loads; an existing --out is refused without --force (never an
input). The output is written beside its target under a hidden partial name and renamed onto it when
complete, so a failed or interrupted run leaves nothing. An error is one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

import torch

from anyflow.cli.common import LATENTS_KEY, NEGATIVE_KEY, PROMPT_KEY, ClaimedOutput, check_output_path

NAME = os.path.basename(__file__)


def snapshot_folder(pipeline: str, component: str, command: str) -> str:
    """``pipeline/component``, or one line saying that the snapshot lacks it."""
    if not os.path.isdir(pipeline):
        raise ValueError(f"--pipeline {pipeline}: not a local folder (nothing is downloaded)")
    folder = os.path.join(pipeline, component)
    if not os.path.isdir(folder):
        raise ValueError(f"--pipeline {pipeline}: has no {component}/ folder, which {command} needs")
    return folder


def compute_device(name: Optional[str]) -> torch.device:
    """``--device`` as a device that computes here (cuda when available, else the CPU, by default)."""
    from anyflow.runtime.devices import resolve_device

    return resolve_device(name, "--device")  # refuses meta, which holds no values


def encode(args: argparse.Namespace) -> int:
    """``encode``: the prompts (and negative prompts) -> one safetensors file of UMT5 embeddings."""
    from anyflow.text.encoder import UMT5Config, UMT5Encoder
    from anyflow.text.tokenizer import encode_prompts, load_tokenizer

    tokenizer_folder = snapshot_folder(args.pipeline, "tokenizer", "encode")
    text_encoder = snapshot_folder(args.pipeline, "text_encoder", "encode")
    if not args.out.endswith(".safetensors"):
        raise ValueError(f"--out {args.out}: embeddings are written as a .safetensors file")
    check_output_path(args.out, args.force, [("--pipeline", args.pipeline)])
    tokenizer = load_tokenizer(tokenizer_folder)
    UMT5Config.from_pretrained(text_encoder)
    device = compute_device(args.device)

    with ClaimedOutput(args.out) as output:
        encoder = UMT5Encoder.streaming(text_encoder, device=device)
        prompts = args.prompt + (args.negative_prompt or [])
        embeddings = encode_prompts(tokenizer, encoder, prompts).float().cpu()  # (B, 512, D)
        tensors = [(PROMPT_KEY, embeddings[:len(args.prompt)].contiguous())]
        if args.negative_prompt:
            tensors.append((NEGATIVE_KEY, embeddings[len(args.prompt):].contiguous()))
        output.commit(tensors, None)
    print(f"wrote {args.out}: " + ", ".join(f"'{k}' {tuple(v.shape)}" for k, v in tensors))
    return 0


def read_latents(path: str, z_dim: int) -> torch.Tensor:
    """The latents (B, C, F, h, w) under ``LATENTS_KEY`` in ``path``, checked against the VAE's channels;
    errors name the file, the key and the file's shape."""
    from weights_convert.safetensors_io import CheckpointError, read_header

    try:
        records, _ = read_header(path)
    except CheckpointError as exc:
        raise ValueError(f"--latents {exc}") from None
    if LATENTS_KEY not in records:
        hint = (f": it holds prompt embeddings, as {NAME} encode writes; decode takes the latents that "
                "anyflow sample --out writes" if PROMPT_KEY in records else "")
        raise ValueError(f"--latents {path}: no tensor under the key '{LATENTS_KEY}' "
                         f"(keys: {sorted(records)[:10]}){hint}")
    latents = records[LATENTS_KEY].read()
    shape = tuple(latents.shape)
    if len(shape) != 5 or shape[1] != z_dim or 0 in shape or not latents.is_floating_point():
        raise ValueError(f"--latents {path}: '{LATENTS_KEY}' is {str(latents.dtype).replace('torch.', '')} {shape}; "
                         f"expected floats (B, C={z_dim}, F, h, w), the layout anyflow sample --out writes, with "
                         f"this VAE's {z_dim} latent channels")
    bad = (~torch.isfinite(latents)).sum().item()
    if bad:
        raise ValueError(f"--latents {path}: '{LATENTS_KEY}' has {bad} NaN or infinite values")
    return latents


def decode(args: argparse.Namespace) -> int:
    """``decode``: the first latents of a safetensors file -> a video, one latent frame at a time."""
    from anyflow.pipeline.video_io import VideoWriter, to_uint8, video_format
    from anyflow.vae import WanVAE
    from anyflow.vae.checkpoint import open_vae_checkpoint

    vae_folder = snapshot_folder(args.pipeline, "vae", "decode")
    try:
        video_format(args.out)
    except ValueError as exc:
        raise ValueError(f"--out {exc}") from None
    check_output_path(args.out, args.force, [("--pipeline", args.pipeline), ("--latents", args.latents)])
    config = open_vae_checkpoint(vae_folder).config  # headers only: every key and shape checked
    if args.fps <= 0:
        raise ValueError(f"--fps must be positive, got {args.fps}")
    device = compute_device(args.device)
    stored = read_latents(args.latents, config.z_dim)
    latents = stored[:1].to(device, torch.float32)  # (1, C, F, h, w)
    width, height = latents.shape[-1] * config.spatial_stride, latents.shape[-2] * config.spatial_stride

    with ClaimedOutput(args.out) as output:
        vae = WanVAE.from_pretrained(vae_folder, dtype="float32", device=device)
        stream = vae.decoder_stream()
        writer = VideoWriter(output.partial, width, height, args.fps, extension_of=args.out)
        try:
            with torch.no_grad():
                for frame in range(latents.shape[2]):  # one latent frame at a time: memory bounded by one
                    video = stream.push(latents[:, :, frame:frame + 1])  # (1, 3, F', H, W) in [-1, 1]
                    writer.write(to_uint8((video[0].permute(1, 2, 3, 0) + 1) / 2))
        finally:
            writer.close()
        output.finish()
    first = f" (the first of the {stored.shape[0]} videos in {args.latents})" if stored.shape[0] > 1 else ""
    print(f"wrote {args.out}: {writer.frames} frames of {width}x{height}{first}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """The command line: its exit code (0 done, 1 an error, 2 a usage error, 130 interrupted)."""
    parser = argparse.ArgumentParser(prog=NAME, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    enc = commands.add_parser("encode", help="prompt -> UMT5 embeddings (safetensors)")
    enc.add_argument("--pipeline", required=True)
    enc.add_argument("--prompt", required=True, nargs="+")
    enc.add_argument("--negative-prompt", nargs="+")
    enc.add_argument("--out", required=True, help="a .safetensors file")
    enc.set_defaults(run=encode)
    dec = commands.add_parser("decode", help="latents (safetensors) -> mp4")
    dec.add_argument("--pipeline", required=True)
    dec.add_argument("--latents", required=True, help=f"a safetensors file with (B, C, F, h, w) under '{LATENTS_KEY}' "
                     "(as anyflow sample --out writes); the first of B is decoded")
    dec.add_argument("--out", required=True, help="a video file: .mp4, .gif, .png or .webp")
    dec.add_argument("--fps", type=int, default=16)
    dec.set_defaults(run=decode)
    for sub in (enc, dec):
        sub.add_argument("--device", default=None, help="cuda when available, else cpu")
        sub.add_argument("--force", action="store_true", help="replace an existing --out (never an input)")
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError, ImportError) as exc:  # CheckpointError and TokenizerError are ValueErrors
        print(f"{NAME} {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{NAME} {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
