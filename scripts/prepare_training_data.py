"""Make a training-data folder (anyflow/training/data.py) from videos and their captions, with this
project's own Wan VAE and UMT5 text encoder.

    python scripts/prepare_training_data.py --model ~/hf/AnyFlow-Wan2.1-T2V-1.3B-Diffusers \\
        --videos clips/ --out data/latents --frames 81 --height 480 --width 832

``--videos`` is a folder of video files, each with its caption in a text file of the same name
(``clips/fox.mp4`` and ``clips/fox.txt``), the usual layout of LoRA training sets. Each video's
first ``--frames`` frames are resized to cover ``--width`` x ``--height`` and cropped at the centre,
encoded by the VAE (the posterior mean, normalised, as the pipelines encode) and stored with the
caption's embedding (512 tokens). Videos with fewer frames are skipped and named. The negative
prompt's embedding (Wan's by default, the one the authors train with) is stored beside them.
Needs the video extra (PyAV and tokenizers): pip install -e ".[video]".
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")
# Wan2.1's default negative prompt, whose embedding the authors' training uses (wan_negemb_cn.pth)
WAN_NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
                       "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
                       "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


def clips(folder: str):
    """(video path, caption) of every video in ``folder`` that has a caption file beside it; one line per one without."""
    if not os.path.isdir(folder):
        raise ValueError(f"--videos {folder}: no such folder")
    found = []
    for name in sorted(os.listdir(folder)):
        stem, suffix = os.path.splitext(name)
        if suffix.lower() not in VIDEO_SUFFIXES:
            continue
        caption_path = os.path.join(folder, stem + ".txt")
        if not os.path.isfile(caption_path):
            raise ValueError(f"--videos {folder}: {name} has no caption file {stem}.txt beside it")
        with open(caption_path, encoding="utf-8") as f:
            found.append((os.path.join(folder, name), f.read().strip()))
    if not found:
        raise ValueError(f"--videos {folder}: no video files ({', '.join(VIDEO_SUFFIXES)}) in it")
    return found


def fit(frames, height: int, width: int):
    """uint8 frames (F, H, W, 3) -> float (F, height, width, 3) in [0, 1]: scaled to cover, centre-cropped."""
    import torch
    import torch.nn.functional as F

    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255  # (F, 3, H, W)
    scale = max(height / video.shape[2], width / video.shape[3])
    size = (max(height, round(video.shape[2] * scale)), max(width, round(video.shape[3] * scale)))
    video = F.interpolate(video, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return video[:, :, top : top + height, left : left + width].permute(0, 2, 3, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, metavar="SNAPSHOT", help="pipeline snapshot (its vae/, text_encoder/, tokenizer/)")
    parser.add_argument("--videos", required=True, metavar="FOLDER", help="videos with same-named .txt captions")
    parser.add_argument("--out", required=True, metavar="FOLDER", help="the training-data folder to make (new)")
    parser.add_argument("--frames", type=int, default=81, help="frames per clip, 4k + 1 (default 81)")
    parser.add_argument("--height", type=int, default=480, help="pixels, a multiple of 16 (default 480)")
    parser.add_argument("--width", type=int, default=832, help="pixels, a multiple of 16 (default 832)")
    parser.add_argument("--negative-prompt", default=WAN_NEGATIVE_PROMPT, help="default: Wan2.1's negative prompt")
    parser.add_argument("--shard-size", type=int, default=64, help="samples per shard file (default 64)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    args = parser.parse_args(argv)
    try:
        return prepare(args)
    except ValueError as exc:
        print(f"prepare_training_data: error: {exc}", file=sys.stderr)
        return 1


def prepare(args: argparse.Namespace) -> int:
    import torch

    from anyflow.runtime.devices import resolve_device
    from anyflow.pipeline import VideoPipeline
    from anyflow.training.data import DatasetWriter
    from anyflow.pipeline.video_io import read_frames

    if (args.frames - 1) % 4 or args.frames < 1:
        raise ValueError(f"--frames must be 4k + 1 (the VAE's temporal compression), got {args.frames}")
    if args.height % 16 or args.width % 16:
        raise ValueError(f"--height and --width must be multiples of 16, got {args.height} x {args.width}")
    if args.shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1 (samples a shard file), got {args.shard_size}")
    found = clips(args.videos)
    device = resolve_device(args.device)
    pipe = VideoPipeline.from_pretrained(args.model, device=device, keep_text_encoder=True)
    negative = pipe.encode_prompt([args.negative_prompt])[0]  # (512, D)
    skipped, written = [], 0
    with DatasetWriter(args.out, negative=negative, shard_size=args.shard_size) as writer:
        for path, caption in found:
            frames = read_frames(path, limit=args.frames)
            if len(frames) < args.frames:
                skipped.append(f"{os.path.basename(path)} ({len(frames)} frames)")
                continue
            video = fit(frames, args.height, args.width)[None]  # (1, F, H, W, 3)
            latents = pipe.encode(video)[0].float()  # (F', C, h, w)
            writer.add(latents, pipe.encode_prompt([caption])[0], caption)
            written += 1
            print(f"  {written}/{len(found)} {os.path.basename(path)}: latents {tuple(latents.shape)}", flush=True)
        if not written:
            raise ValueError(f"no video in {args.videos} has {args.frames} frames")
    if skipped:
        print(f"skipped, fewer than {args.frames} frames: {', '.join(skipped)}")
    print(f"wrote {written} samples to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
