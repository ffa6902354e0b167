"""Wan2.1 VAE decode, ours against diffusers' AutoencoderKLWan, side by side: time and peak memory.

    python scripts/bench_vae.py [--frames 21] [--height 60] [--width 104] [--repeats 1] [--workdir DIR]

The released VAE's config (base_dim 96, 127M parameters) with random weights (written once by
diffusers' ``save_pretrained``, re-drawn for O(1) activations), float32, the same latents (B = 1,
``--frames`` latent frames of ``--height`` x ``--width`` latents: 21 x 60 x 104 is 81 frames at
480 x 832). Each measurement is a fresh interpreter (ours and diffusers alternating): load, decode
the whole video in one call, report the decode's wall and CPU seconds and the process's peak RSS
(VmHWM: weights, the decode's activations and caches, the output video, and the ~0.2 GB torch
itself takes). Ours loads with ``WanVAE.from_pretrained``, which maps the safetensors file (only
the decoder's weights are ever read when decoding), diffusers with ``from_pretrained`` and
``.decode(...)`` after denormalising the latents as its AnyFlow pipelines do. The outputs are
compared (max |ours - diffusers|).

Time and the activation part of the memory grow with frames x height x width (the caches with
height x width only); the weights do not.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

from benchlib import probe, save_random_weights

LOAD_AND_DECODE = r"""
import torch, time
if {threads}:
    torch.set_num_threads({threads})
torch.manual_seed(0)
latents = torch.randn(1, 16, {frames}, {height}, {width})
if {ours}:
    from anyflow.vae import WanVAE
    vae = WanVAE.from_pretrained({weights!r})
    decode = lambda: vae.decode(latents)
else:
    from diffusers import AutoencoderKLWan
    vae = AutoencoderKLWan.from_pretrained({weights!r}).eval()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    def decode():
        with torch.no_grad():
            return vae.decode(latents / inv_std + mean, return_dict=False)[0]
loaded = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
start, cpu = time.perf_counter(), time.process_time()
video = decode()
INNER = {{"decode_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu, "shape": list(video.shape),
          "loaded_mb": loaded}}
torch.save(video, {output!r})
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=21, help="latent frames (21: 81 video frames)")
    parser.add_argument("--height", type=int, default=60, help="latent height (60: 480 pixels)")
    parser.add_argument("--width", type=int, default=104, help="latent width (104: 832 pixels)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch's default)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "anyflow-bench-vae"))
    args = parser.parse_args()

    import torch

    weights = os.path.join(args.workdir, "vae-wan2.1-random")
    if not os.path.isdir(weights):
        from diffusers import AutoencoderKLWan

        os.makedirs(args.workdir, exist_ok=True)
        save_random_weights(AutoencoderKLWan(), weights)
    results = {"ours": [], "diffusers": []}
    outputs = {}
    for _ in range(args.repeats):
        for impl in ("ours", "diffusers"):
            output = os.path.join(args.workdir, f"video-{impl}.pt")
            body = LOAD_AND_DECODE.format(frames=args.frames, height=args.height, width=args.width, threads=args.threads,
                                          ours=impl == "ours", weights=weights, output=output)
            result = probe(body)
            results[impl].append(result)
            outputs[impl] = output
            inner = result["inner"]
            print(f"  {impl:9s} decode {inner['decode_s']:7.1f} s (CPU {inner['cpu_s']:7.1f} s)  RSS loaded "
                  f"{inner['loaded_mb']:5.0f} MB, peak {result['rss_mb']:6.0f} MB  video {inner['shape']}", flush=True)
    ours, theirs = torch.load(outputs["ours"]), torch.load(outputs["diffusers"])
    keys = ("decode_s", "cpu_s", "loaded_mb", "rss_mb")
    med = {impl: {key: statistics.median(r[key] if key == "rss_mb" else r["inner"][key] for r in runs) for key in keys}
           for impl, runs in results.items()}
    threads = args.threads or torch.get_num_threads()
    print(f"latents 1 x 16 x {args.frames} x {args.height} x {args.width} -> video {list(ours.shape)}, float32, "
          f"{threads} thread(s), median of {args.repeats}")
    print(f"{'':10s}{'decode s':>10s}{'CPU s':>10s}{'loaded MB':>11s}{'peak RSS MB':>13s}")
    for impl in ("ours", "diffusers"):
        m = med[impl]
        print(f"{impl:10s}{m['decode_s']:10.1f}{m['cpu_s']:10.1f}{m['loaded_mb']:11.0f}{m['rss_mb']:13.0f}")
    print(f"{'ratio':10s}" + "".join(f"{med['ours'][k] / med['diffusers'][k]:{w}.2f}" for k, w in zip(keys, (10, 10, 11, 13))))
    print(f"max |ours - diffusers| = {(ours - theirs).abs().max().item():.2e} (max |diffusers| {theirs.abs().max().item():.2f})")


if __name__ == "__main__":
    sys.exit(main())
