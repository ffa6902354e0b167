"""The whole prompt-to-video path: ours (VideoPipeline) against diffusers' AnyFlowPipeline, each in a fresh process.

    python scripts/bench_video.py [--workdir DIR] [--rows tiny,wide] [--repeats 1]

Rows (snapshots written once into --workdir, random weights, float32, CPU):

- ``tiny``: the tiny complete snapshot of the tests (tests/snapshot_fixtures.py), 17 frames of 64 x 64, 2 steps;
- ``wide``: the released widths with few layers: the 1.3B transformer's width (2 blocks), UMT5-XXL's
  (d_model 4096, d_ff 10240, 64 heads; 2 blocks, and a 32,128-token vocabulary instead of 256,384, so the
  embedding table is 0.5 GB, not 4 GB: the tokenizer is the tests' tiny one anyway), the released Wan VAE
  (base_dim 96, z_dim 16); 17 frames of 240 x 416, 2 steps.

Each run goes from the prompt to frames (B, F, H, W, 3) in [0, 1]: loading, text encoding, sampling,
decoding. Printed: wall time after interpreter start-up, peak RSS (VmHWM), and ours / diffusers.
Needs the test extra (diffusers, transformers).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys

from benchlib import ROOT, probe

sys.path.insert(0, os.path.join(ROOT, "tests"))  # the snapshot writers of the tests

ROWS = {
    "tiny": dict(frames=17, height=64, width=64),
    "wide": dict(frames=17, height=240, width=416),
}
PROMPT = "A cat walks across a sunny garden, then jumps onto the old stone wall."


def ensure_snapshot(workdir: str, row: str) -> str:
    """The row's snapshot folder, written once."""
    from snapshot_fixtures import make_tiny_snapshot

    root = os.path.join(workdir, f"snapshot-{row}")
    if os.path.isdir(root):
        return root
    if row == "tiny":
        return make_tiny_snapshot(root)
    from anyflow import AnyFlowConfig

    config = dataclasses.replace(AnyFlowConfig.from_preset("anyflow-wan2.1-t2v-1.3b"), num_layers=2)
    text = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64)
    vae = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2)
    return make_tiny_snapshot(root, config=config, text_encoder=text, vae=vae)


def run(root: str, row: str, which: str) -> dict:
    size = ROWS[row]
    common = f"noise = torch.randn(1, {(size['frames'] - 1) // 4 + 1}, CHANNELS, {size['height'] // 8}, {size['width'] // 8}, generator=torch.Generator().manual_seed(0))\n"
    if which == "ours":
        body = (
            "import torch\nfrom anyflow import VideoPipeline\n"
            f"pipe = VideoPipeline.from_pretrained({root!r})\n"
            "CHANNELS = pipe.transformer.config.in_channels\n" + common +
            f"frames = pipe({PROMPT!r}, num_frames={size['frames']}, height={size['height']}, width={size['width']}, "
            "num_steps=2, noise=noise)\n"
        )
    else:
        body = (
            "import torch\nfrom diffusers import AnyFlowPipeline\n"
            f"pipe = AnyFlowPipeline.from_pretrained({root!r})\n"
            "CHANNELS = pipe.transformer.config.in_channels\n" + common +
            f"frames = pipe({PROMPT!r}, num_frames={size['frames']}, height={size['height']}, width={size['width']}, "
            "num_inference_steps=2, latents=noise.transpose(1, 2), output_type='np').frames\n"
        )
    return probe(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=os.path.expanduser("~/.cache/anyflow-bench"))
    parser.add_argument("--rows", default="tiny,wide")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    print(f"{'row':<6} {'ours s':>8} {'diffusers s':>12} {'time ratio':>11} {'ours MB':>9} {'diffusers MB':>13} "
          f"{'memory ratio':>13}")
    for row in args.rows.split(","):
        root = ensure_snapshot(args.workdir, row)
        results = {which: [run(root, row, which) for _ in range(args.repeats)] for which in ("ours", "diffusers")}
        seconds = {w: statistics.median(r["seconds"] for r in rs) for w, rs in results.items()}
        rss = {w: statistics.median(r["rss_mb"] for r in rs) for w, rs in results.items()}
        print(f"{row:<6} {seconds['ours']:8.1f} {seconds['diffusers']:12.1f} {seconds['ours'] / seconds['diffusers']:11.2f} "
              f"{rss['ours']:9,.0f} {rss['diffusers']:13,.0f} {rss['ours'] / rss['diffusers']:13.2f}", flush=True)


if __name__ == "__main__":
    main()
