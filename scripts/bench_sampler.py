"""What preparing the context once per sampling call saves, against re-embedding it every step.

    python scripts/bench_sampler.py [--layers 4] [--steps 1,4,8] [--latent 3,30,52] [--dtype float32]

``anyflow.sample`` embeds the text and computes every block's cross-attention keys and values once
per call; the reference loop below is the same sampler calling the model with the raw embeddings,
so each step redoes that work. Prints both times, the saving, and checks the outputs are equal.
"""

from __future__ import annotations

import argparse
import time

import torch

from anyflow import AnyFlowConfig, AnyFlowTransformer3DModel, flow_map_sigmas, sample


def uncached_sample(model, noise, text, num_steps):
    """The plain flow-map loop, re-embedding the context at every step."""
    sigmas = flow_map_sigmas(num_steps)
    latents = noise.clone()
    for i in range(num_steps):
        t, r = 1000 * sigmas[i].item(), 1000 * sigmas[i + 1].item()
        t_grid = torch.full(latents.shape[:2], t, dtype=torch.float64)
        with torch.no_grad():
            u = model(latents, t_grid, torch.full_like(t_grid, r), text).sample
        latents = (latents - (sigmas[i] - sigmas[i + 1]).item() * u).to(u.dtype)
    return latents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", default="2,4,8")
    parser.add_argument("--latent", default="3,30,52", help="F,H,W of the latent")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    config = AnyFlowConfig(num_attention_heads=12, ffn_dim=8960, num_layers=args.layers)  # 1.3B widths
    model = AnyFlowTransformer3DModel(config).eval().to_dtype(dtype)
    f, h, w = map(int, args.latent.split(","))
    noise = torch.randn(1, f, 16, h, w).to(dtype)
    text = torch.randn(1, 512, 4096).to(dtype)
    with torch.no_grad():
        start = time.perf_counter()
        model.prepare_context(text)
        prepare = time.perf_counter() - start
    print(f"1.3B widths, {args.layers} layers, latent {f}x{h}x{w} ({f * h * w // 4} tokens), 512 text tokens, "
          f"{args.dtype}; prepare_context: {prepare:.3f} s")
    sample(model, noise, text, num_steps=1)  # warm-up: first-call costs would land on whichever ran first
    print(f"{'steps':>5} {'cached s':>9} {'uncached s':>11} {'saved s':>8} {'saved %':>8} {'equal':>6}")
    for steps in map(int, args.steps.split(",")):
        timings = {"cached": [], "uncached": []}
        for _ in range(2):  # alternate, keep the faster of two
            start = time.perf_counter()
            cached = sample(model, noise, text, num_steps=steps)
            timings["cached"].append(time.perf_counter() - start)
            start = time.perf_counter()
            uncached = uncached_sample(model, noise, text, steps)
            timings["uncached"].append(time.perf_counter() - start)
        cached_s, uncached_s = min(timings["cached"]), min(timings["uncached"])
        print(f"{steps:>5} {cached_s:9.2f} {uncached_s:11.2f} {uncached_s - cached_s:8.2f} "
              f"{100 * (uncached_s - cached_s) / uncached_s:7.1f}% {str(torch.equal(cached, uncached)):>6}")


if __name__ == "__main__":
    main()
