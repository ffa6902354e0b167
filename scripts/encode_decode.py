"""Bridge to the real text encoder and VAE, for users who hold the Wan2.1 / AnyFlow diffusers weights.

    # prompt -> UMT5 embeddings file for `anyflow sample --prompt-embeds`
    python scripts/encode_decode.py encode --pipeline PATH --prompt "a red fox in snow" \
        [--negative-prompt "blurry"] --out embeds.safetensors
    # latents from `anyflow sample --out` -> mp4
    python scripts/encode_decode.py decode --pipeline PATH --latents latents.safetensors --out video.mp4

PATH is a local diffusers snapshot with ``tokenizer/``, ``text_encoder/`` and ``vae/`` (for example
``nvidia/AnyFlow-Wan2.1-T2V-1.3B-Diffusers`` downloaded beforehand; nothing is downloaded here).
Needs the optional packages diffusers, transformers (and ftfy, imageio, imageio-ffmpeg for video);
the ``anyflow`` library itself needs none of them. Embeddings come from the pipeline's own
``encode_prompt`` (512 tokens, zero padded), so they equal what ``AnyFlowPipeline`` feeds its transformer.
"""

from __future__ import annotations

import argparse
import os

import torch

PROMPT_KEY = "prompt_embeds"
NEGATIVE_KEY = "negative_prompt_embeds"
LATENTS_KEY = "latents"


def encode(args: argparse.Namespace) -> None:
    from diffusers import AnyFlowPipeline
    from safetensors.torch import save_file

    pipe = AnyFlowPipeline.from_pretrained(args.pipeline, transformer=None, vae=None, torch_dtype=torch.bfloat16)
    pipe.text_encoder.to(args.device)
    with torch.no_grad():
        positive, negative = pipe.encode_prompt(
            prompt=args.prompt, negative_prompt=args.negative_prompt,
            do_classifier_free_guidance=args.negative_prompt is not None,
            max_sequence_length=512, device=torch.device(args.device),
        )
    tensors = {PROMPT_KEY: positive.float().cpu().contiguous()}
    if negative is not None:
        tensors[NEGATIVE_KEY] = negative.float().cpu().contiguous()
    save_file(tensors, args.out)
    print(f"wrote {args.out}: " + ", ".join(f"'{k}' {tuple(v.shape)}" for k, v in tensors.items()))


def decode(args: argparse.Namespace) -> None:
    from diffusers import AutoencoderKLWan
    from diffusers.utils import export_to_video
    from diffusers.video_processor import VideoProcessor
    from safetensors.torch import load_file

    vae = AutoencoderKLWan.from_pretrained(args.pipeline, subfolder="vae", torch_dtype=torch.float32).to(args.device)
    latents = load_file(args.latents)[LATENTS_KEY].to(args.device, torch.float32)  # (B, C, F, H, W)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
    with torch.no_grad():
        video = vae.decode(latents * std + mean, return_dict=False)[0]
    frames = VideoProcessor(vae_scale_factor=8).postprocess_video(video, output_type="np")[0]
    export_to_video(frames, args.out, fps=args.fps)
    print(f"wrote {args.out}: {len(frames)} frames of {frames.shape[1]}x{frames.shape[2]}")


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
