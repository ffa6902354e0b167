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
"""

from __future__ import annotations

import argparse
import os

import torch

PROMPT_KEY = "prompt_embeds"
NEGATIVE_KEY = "negative_prompt_embeds"
LATENTS_KEY = "latents"


def encode(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file

    from anyflow.text.tokenizer import encode_prompts, load_tokenizer
    from anyflow.text.encoder import UMT5Encoder

    tokenizer = load_tokenizer(os.path.join(args.pipeline, "tokenizer"))
    encoder = UMT5Encoder.streaming(os.path.join(args.pipeline, "text_encoder"), device=args.device)
    prompts = args.prompt + (args.negative_prompt or [])
    embeddings = encode_prompts(tokenizer, encoder, prompts).float().cpu()  # (B, 512, 4096)
    tensors = {PROMPT_KEY: embeddings[:len(args.prompt)].contiguous()}
    if args.negative_prompt:
        tensors[NEGATIVE_KEY] = embeddings[len(args.prompt):].contiguous()
    save_file(tensors, args.out)
    print(f"wrote {args.out}: " + ", ".join(f"'{k}' {tuple(v.shape)}" for k, v in tensors.items()))


def decode(args: argparse.Namespace) -> None:
    from safetensors.torch import load_file

    from anyflow.vae import WanVAE
    from anyflow.pipeline.video_io import VideoWriter, to_uint8

    vae = WanVAE.from_pretrained(os.path.join(args.pipeline, "vae"), dtype="float32", device=args.device)
    latents = load_file(args.latents)[LATENTS_KEY][:1].to(args.device, torch.float32)  # (1, C, F, H, W)
    stream = vae.decoder_stream()
    writer = VideoWriter(args.out, latents.shape[-1] * 8, latents.shape[-2] * 8, args.fps)
    try:
        with torch.no_grad():
            for frame in range(latents.shape[2]):  # one latent frame at a time: memory bounded by one
                video = stream.push(latents[:, :, frame:frame + 1])  # (1, 3, F', H, W) in [-1, 1]
                writer.write(to_uint8((video[0].permute(1, 2, 3, 0) + 1) / 2))
    finally:
        writer.close()
    print(f"wrote {args.out}: {writer.frames} frames of {latents.shape[-1] * 8}x{latents.shape[-2] * 8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    enc = commands.add_parser("encode", help="prompt -> UMT5 embeddings (safetensors)")
    enc.add_argument("--pipeline", required=True)
    enc.add_argument("--prompt", required=True, nargs="+")
    enc.add_argument("--negative-prompt", nargs="+")
    enc.add_argument("--out", required=True)
    enc.set_defaults(run=encode)
    dec = commands.add_parser("decode", help="latents (safetensors) -> mp4")
    dec.add_argument("--pipeline", required=True)
    dec.add_argument("--latents", required=True)
    dec.add_argument("--out", required=True)
    dec.add_argument("--fps", type=int, default=16)
    dec.set_defaults(run=decode)
    for sub in (enc, dec):
        sub.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if not os.path.isdir(args.pipeline):
        raise SystemExit(f"--pipeline {args.pipeline}: not a local folder (nothing is downloaded)")
    args.run(args)


if __name__ == "__main__":
    main()
