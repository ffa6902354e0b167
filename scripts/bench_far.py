"""FAR generation, ours against diffusers' AnyFlowFARPipeline, side by side in one run.

    python scripts/bench_far.py [--layers 2] [--latent 60x104] [--partition 1 3 3 3] [--steps 4]
                                [--dtype bfloat16] [--repeats 1] [--deviation] [--workdir DIR]

Same random weights (1.3B widths: 12 heads of 128, ffn 8960; written once by the oracle's
``save_pretrained``), noise and text for every run. Each run is a fresh subprocess that loads the
model, makes every weight resident, resets the peak RSS (``/proc/self/clear_refs``) and generates
the whole video; the table gives its wall time, the peak RSS growth, and the cost of each chunk
(its denoising steps plus the cache refresh after it). Rows:

- ``ours``: :func:`anyflow.sample_far`, the cache refreshed incrementally;
- ``ours, full re-encode``: the same with ``incremental_cache=False`` (what the reference does);
- ``diffusers``: ``AnyFlowFARPipeline(output_type="latent")`` (flex attention, eager on CPU).

``--deviation`` also runs the pipeline with its cached step's zero padding taken out and prints
how far the padded pipeline is from the unpadded one and from ours (the deviation the README
states). Needs the test extra (diffusers).
"""

from __future__ import annotations

import argparse
import os
import statistics

from benchlib import run_worker, save_random_weights

WIDTHS = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960)

WORKER = r"""
import json, sys, time, types, gc
from unittest import mock
import torch
job = json.loads(sys.argv[1])
dtype = getattr(torch, job["dtype"])
from safetensors.torch import load_file
inputs = load_file(job["inputs"])
noise, text = inputs["noise"], inputs["text"].to(dtype)
partition, steps = job["partition"], job["steps"]
boundaries, refreshes = [], []  # when each cache refresh (one after every chunk but the last) ended; its seconds
def timed(fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        boundaries.append(time.perf_counter())
        refreshes.append(boundaries[-1] - start)
        return out
    return wrapper
if job["impl"].startswith("diffusers"):
    import diffusers.models.transformers.transformer_anyflow_far as far_module
    from diffusers import AnyFlowFARPipeline, AnyFlowFARTransformer3DModel, FlowMapEulerDiscreteScheduler
    model = AnyFlowFARTransformer3DModel.from_pretrained(job["weights"], torch_dtype=dtype).eval()
    pipe = AnyFlowFARPipeline(tokenizer=None, text_encoder=None, transformer=model, vae=None,
                              scheduler=FlowMapEulerDiscreteScheduler(shift=5.0))
    pipe.set_progress_bar_config(disable=True)
    pipe.encode_kv_cache = timed(pipe.encode_kv_cache)
    unpadded = types.SimpleNamespace(ceil=lambda v: v)
    patch = mock.patch.object(far_module, "math", unpadded if job["impl"] == "diffusers-unpadded" else far_module.math)
    frames, height, width = noise.shape[1], noise.shape[3], noise.shape[4]
    def generate():
        with torch.no_grad(), patch:
            return pipe(prompt_embeds=text, latents=noise.transpose(1, 2), output_type="latent", height=8 * height,
                        width=8 * width, num_frames=4 * (frames - 1) + 1, num_inference_steps=steps,
                        chunk_partition=partition).frames.transpose(1, 2)
else:
    from anyflow import AnyFlowFARTransformer3DModel, sample_far
    model = AnyFlowFARTransformer3DModel.from_pretrained(job["weights"], dtype=dtype)
    model.encode_cache = timed(model.encode_cache)
    def generate():
        return sample_far(model, noise, text, num_steps=steps, chunk_partition=partition,
                          incremental_cache=job["impl"] == "ours")
with torch.no_grad():
    for p in model.parameters():
        p.detach().reshape(-1)[::256].float().sum()
gc.collect()
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) / 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
start = time.perf_counter()
out = generate()
seconds = time.perf_counter() - start
ends = [start] + boundaries + [start + seconds]
chunks = [b - a for a, b in zip(ends, ends[1:])]  # per chunk: its steps and the refresh after it
torch.save(out.float(), job["output"])
print(json.dumps({"seconds": seconds, "rss_growth_mb": status("VmHWM") - base, "chunks": chunks, "refreshes": refreshes}))
"""


def prepare(args, workdir: str):
    """Random weights (the oracle's save_pretrained, fp32) and inputs, made once per shape."""
    import torch
    from safetensors.torch import save_file

    h, w = args.latent
    key = f"far-{args.layers}l-{h}x{w}-{'-'.join(map(str, args.partition))}"
    weights, inputs = os.path.join(workdir, f"{key}-weights"), os.path.join(workdir, f"{key}-inputs.safetensors")
    if not os.path.isdir(weights):
        from diffusers import AnyFlowFARTransformer3DModel as Oracle

        torch.manual_seed(0)
        save_random_weights(Oracle(**WIDTHS, num_layers=args.layers, chunk_partition=tuple(args.partition)), weights)
    if not os.path.exists(inputs):
        gen = torch.Generator().manual_seed(1)
        save_file({"noise": torch.randn(1, sum(args.partition), 16, h, w, generator=gen),
                   "text": torch.randn(1, 512, 4096, generator=gen)}, inputs)
    return weights, inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--latent", default="60x104", help="latent H x W (60x104: 480 x 832 pixels)")
    parser.add_argument("--partition", type=int, nargs="+", default=[1, 3, 3, 3])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--deviation", action="store_true", help="also measure diffusers' padding deviation")
    parser.add_argument("--workdir", default=os.path.expanduser("~/.cache/anyflow-bench"))
    args = parser.parse_args()
    args.latent = tuple(int(v) for v in args.latent.lower().split("x"))
    os.makedirs(args.workdir, exist_ok=True)
    import torch

    weights, inputs = prepare(args, args.workdir)
    impls = ["ours", "ours-full", "diffusers"] + (["diffusers-unpadded"] if args.deviation else [])
    names = {"ours": "ours", "ours-full": "ours, full re-encode", "diffusers": "diffusers",
             "diffusers-unpadded": "diffusers, unpadded"}
    outputs = {impl: os.path.join(args.workdir, f"far-out-{impl}.pt") for impl in impls}
    results = {impl: [] for impl in impls}
    for _ in range(args.repeats):
        for impl in impls:  # alternate, so drift hits all alike
            results[impl].append(run_worker(WORKER, dict(impl=impl, dtype=args.dtype, weights=weights, inputs=inputs,
                                          output=outputs[impl], partition=args.partition, steps=args.steps)))
    h, w = args.latent
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}; 1.3B widths, {args.layers} layers, "
          f"{args.dtype}, latents {h}x{w} ({h * w // 4} tokens a frame), chunks {args.partition}, {args.steps} steps")
    reference = torch.load(outputs["diffusers"])
    base_s = statistics.median(r["seconds"] for r in results["diffusers"])
    base_mb = statistics.median(r["rss_growth_mb"] for r in results["diffusers"])
    header = f"{'':<22} {'seconds':>8} {'ratio':>6} {'peak RSS+ MB':>12} {'ratio':>6}"
    print("\n" + header + "\n" + "-" * len(header))
    for impl in impls:
        seconds = statistics.median(r["seconds"] for r in results[impl])
        mb = statistics.median(r["rss_growth_mb"] for r in results[impl])
        print(f"{names[impl]:<22} {seconds:8.1f} {seconds / base_s:6.2f} {mb:12.0f} {mb / base_mb:6.2f}")
    print("\nper chunk, s: its steps and the cache refresh after it / the refresh alone (first run)")
    for impl in impls:
        run_ = results[impl][0]
        print(f"{names[impl]:<22} " + " ".join(f"{c:6.1f}" for c in run_["chunks"]))
        print(f"{'  refresh':<22} " + " ".join(f"{c:6.1f}" for c in run_["refreshes"]))
    ours = torch.load(outputs["ours"])

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    print(f"\nours vs its full re-encode: max rel error {rel(ours, torch.load(outputs['ours-full'])):.1e}")
    print(f"ours vs diffusers (padded): max rel error {rel(ours, reference):.1e}")
    if args.deviation:
        unpadded = torch.load(outputs["diffusers-unpadded"])
        print(f"ours vs diffusers, unpadded: max rel error {rel(ours, unpadded):.1e}")
        l2 = ((reference - unpadded).norm() / unpadded.norm()).item()
        print(f"diffusers padded vs unpadded (the deviation): max rel error {rel(reference, unpadded):.1e}, rel L2 {l2:.1e}")


if __name__ == "__main__":
    main()
