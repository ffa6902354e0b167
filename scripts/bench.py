"""Forward speed and memory, ours against diffusers' AnyFlowTransformer3DModel, side by side in one run.

    python scripts/bench.py [--configs tiny,mid,full-1.3b,480p-1-layer] [--dtypes float32,bfloat16] [--repeats 5]
                            [--compile] [--cold] [--device cpu|cuda] [--workdir DIR]

Both models get the same random weights (written once by the oracle's ``save_pretrained``; ours
loads them with ``from_pretrained``, the oracle with ``from_pretrained(..., torch_dtype=...)``, so
its bf16 model keeps its fp32 islands) and the same inputs. Every measurement runs in a fresh
subprocess, ours and the oracle alternating: load, one warm-up forward, then one timed forward
with the peak RSS reset just before it (``/proc/self/clear_refs``) and every weight made resident
first, so the RSS growth is the forward's own in the steady state of a sampler's forwards (a cold
first forward measures more, and less steadily: 522 MB instead of 421 for ours at ``mid`` fp32;
``--cold`` measures it). The table gives medians over --repeats, the ratios ours/oracle, achieved
GFLOP/s (matmul and attention FLOPs of the forward) next to a matmul rate measured in this run,
and the parity of the two outputs. For ours, ``est MB`` is the activation part of the memory
estimate ``anyflow sample`` checks before a run (:mod:`anyflow.runtime.memory`), to set beside the measured
RSS growth. Under each group a line gives the forward's memory, ours against diffusers, beside the
goal ``RSS_GOAL``, so that a regression shows. Needs the test extra (diffusers) for the oracle.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from benchlib import RESET_PEAKS, ROOT, ensure_random_weights, run_worker

D13 = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960)
RSS_GOAL = 0.5  # the forward's peak RSS growth, ours / diffusers' (docs/PERFORMANCE.md: the goals of `mid`)
CONFIGS = {
    # name: (model config, latent (F, C, H, W), text tokens)
    "tiny": (dict(num_attention_heads=2, attention_head_dim=64, ffn_dim=256, num_layers=2), (3, 16, 16, 16), 64),
    "mid": (dict(D13, num_layers=2), (5, 16, 60, 104), 512),
    "full-1.3b": (dict(D13, num_layers=30), (1, 16, 60, 104), 512),
    "480p-1-layer": (dict(D13, num_layers=1), (21, 16, 60, 104), 512),  # 81 frames at 480p: 32,760 tokens
}

WORKER = r"""
import json, sys, time, gc, os
import torch
job = json.loads(sys.argv[1])
torch.manual_seed(0)
dtype = getattr(torch, job["dtype"])
device = torch.device(job["device"])
if job["impl"] == "oracle":
    from diffusers import AnyFlowTransformer3DModel as M
    model = M.from_pretrained(job["weights"], torch_dtype=dtype).to(device).eval()
else:
    from anyflow import AnyFlowTransformer3DModel as M
    model = M.from_pretrained(job["weights"], dtype=dtype, device=device)
    if job["impl"] == "ours+compile":
        model = torch.compile(model, fullgraph=True)
with torch.no_grad():  # make every weight resident (a lazily mapped one would count as forward RSS)
    for p in model.parameters():
        p.detach().reshape(-1)[::256].float().sum()
from safetensors.torch import load_file
inputs = {k: v.to(device) for k, v in load_file(job["inputs"]).items()}
x, text = inputs["latents"].to(dtype), inputs["text"].to(dtype)
def forward():
    with torch.no_grad():
        out = model(x, inputs["t"], inputs["r"], text).sample
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out
compile_s = None
if job["warmup"]:
    start = time.perf_counter(); forward(); compile_s = time.perf_counter() - start
gc.collect()
""" + RESET_PEAKS + r"""
start = time.perf_counter()
out = forward()
seconds = time.perf_counter() - start
result = {"seconds": seconds, "rss_growth_mb": status("VmHWM") - base, "first_call_s": compile_s}
if device.type == "cuda":
    result["gpu_growth_mb"] = torch.cuda.max_memory_allocated() / 2**20 - base_gpu
torch.save(out.float().cpu(), job["output"])
print(json.dumps(result))
"""


def forward_flops(model_cfg: dict, latent, text_len: int) -> float:
    """Multiply-add FLOPs (x2) of the linear layers and attention of one forward."""
    frames, _, h, w = latent
    tokens = frames * (h // 2) * (w // 2)
    d = model_cfg["num_attention_heads"] * model_cfg["attention_head_dim"]
    per_block = (
        2 * tokens * d * d * 4  # self-attention q, k, v, o
        + 2 * 2 * tokens * tokens * d  # q k^T and attention x v
        + 2 * tokens * d * d * 2 + 2 * text_len * d * d * 2  # cross-attention q, o and k, v
        + 2 * 2 * tokens * text_len * d  # cross-attention scores and values
        + 2 * tokens * d * model_cfg["ffn_dim"] * 2  # feed-forward
    )
    return per_block * model_cfg["num_layers"]


def matmul_gflops(dtype_name: str, device: str) -> float:
    """GFLOP/s of ``F.linear`` (the kernel of every projection) on (4096 x 2048) @ (2048 x 2048)^T."""
    import torch
    import torch.nn.functional as F

    dtype = getattr(torch, dtype_name)
    x = torch.randn(4096, 2048, device=device).to(dtype)
    w = torch.randn(2048, 2048, device=device).to(dtype)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        F.linear(x, w)
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * 4096 * 2048 * 2048 / best / 1e9


def prepare(name: str, workdir: str) -> tuple:
    """Weights (oracle save_pretrained, fp32) and inputs for a config, made once."""
    import torch
    from safetensors.torch import save_file

    model_cfg, latent, text_len = CONFIGS[name]
    weights = os.path.join(workdir, f"{name}-weights")
    inputs = os.path.join(workdir, f"{name}-inputs.safetensors")
    ensure_random_weights(model_cfg, weights)
    if not os.path.exists(inputs):
        gen = torch.Generator().manual_seed(1)
        t = 1000 * torch.rand(1, latent[0], generator=gen)
        save_file({"latents": torch.randn(1, *latent, generator=gen), "t": t, "r": t * 0.5,
                   "text": torch.randn(1, text_len, 4096, generator=gen)}, inputs)
    return weights, inputs


def command_seconds(code: str, repeats: int = 5) -> float:
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(code, shell=True, check=True, capture_output=True, cwd=ROOT)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,mid")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="add a torch.compile(fullgraph=True) row for ours")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cold", action="store_true", help="measure the first forward (no warm-up; compiled ones still warm)")
    parser.add_argument("--workdir", default=os.path.expanduser("~/.cache/anyflow-bench"))
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    import torch

    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))
    rates = {d: matmul_gflops(d, args.device) for d in args.dtypes.split(",")}
    print("F.linear 4096x2048x2048: " + ", ".join(f"{d} {r:.0f} GFLOP/s" for d, r in rates.items())
          + "  (%matmul below is against the rate of the row's dtype)")
    from anyflow import AnyFlowConfig
    from anyflow.runtime.memory import estimate_sampling_memory

    header = (f"{'config':<12} {'dtype':<8} {'impl':<13} {'forward s':>9} {'ratio':>6} {'RSS+ MB':>8} {'ratio':>6} "
              f"{'est MB':>7} {'GFLOP/s':>8} {'%matmul':>7} {'parity':>9}")
    print("\n" + header + "\n" + "-" * len(header))
    for name in args.configs.split(","):
        weights, inputs = prepare(name, args.workdir)
        model_cfg, latent, text_len = CONFIGS[name]
        flops = forward_flops(model_cfg, latent, text_len)
        for dtype in args.dtypes.split(","):
            element_size = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
            estimate = estimate_sampling_memory(AnyFlowConfig(**model_cfg), 0, (1, *latent), text_len, element_size)
            impls = ["ours", "oracle"] + (["ours+compile"] if args.compile else [])
            runs = {impl: [] for impl in impls}
            outputs = {impl: os.path.join(args.workdir, f"out-{name}-{dtype}-{impl}.pt") for impl in impls}
            for _ in range(args.repeats):
                for impl in impls:  # alternate, so drift hits all alike
                    runs[impl].append(run_worker(WORKER, dict(impl=impl, config=name, dtype=dtype, device=args.device,
                                                      weights=weights, inputs=inputs, output=outputs[impl],
                                                      warmup=not args.cold or impl == "ours+compile")))
            ref = torch.load(outputs["oracle"])
            oracle_s = statistics.median(r["seconds"] for r in runs["oracle"])
            oracle_rss = statistics.median(r["rss_growth_mb"] for r in runs["oracle"])
            for impl in impls:
                seconds = statistics.median(r["seconds"] for r in runs[impl])
                rss = statistics.median(r["rss_growth_mb"] for r in runs[impl])
                out = torch.load(outputs[impl])
                parity = ((out - ref).abs().max() / ref.abs().max()).item()
                gflops = flops / seconds / 1e9
                rss_ratio = f"{rss / oracle_rss:6.2f}" if oracle_rss >= 1 else f"{'-':>6}"  # tiny: under 1 MB
                est = f"{estimate.activations / 2**20:7.0f}" if impl == "ours" else f"{'':>7}"
                print(f"{name:<12} {dtype:<8} {impl:<13} {seconds:9.3f} {seconds / oracle_s:6.2f} {rss:8.0f} "
                      f"{rss_ratio} {est} {gflops:8.1f} {100 * gflops / rates[dtype]:6.0f}% "
                      f"{parity if impl != 'oracle' else 0:9.1e}", flush=True)
                if impl == "ours+compile":
                    first = statistics.median(r["first_call_s"] for r in runs[impl])
                    print(f"{'':<12} {'':<8} (first compiled call, compile included: {first:.1f} s)")
            print(f"{'':<12} {'':<8} runs in order, s: "
                  + "; ".join(f"{impl} " + " ".join(f"{r['seconds']:.1f}" for r in runs[impl]) for impl in impls))
            ours_rss = statistics.median(r["rss_growth_mb"] for r in runs["ours"])
            if oracle_rss >= 1:  # (tiny grows by under 1 MB: no ratio)
                ratio = ours_rss / oracle_rss
                print(f"{'':<12} {'':<8} forward memory (peak RSS growth): ours {ours_rss:.0f} MB, diffusers "
                      f"{oracle_rss:.0f} MB, ratio {ratio:.2f}: {'within' if ratio <= RSS_GOAL else 'OVER'} the goal "
                      f"<= {RSS_GOAL}")
    print("\nimport and start-up (median of 5 runs of the command, wall seconds):")
    ours_import = command_seconds(f"{sys.executable} -c 'import anyflow'")
    ours_model = command_seconds(f"{sys.executable} -c 'from anyflow import AnyFlowTransformer3DModel'")
    theirs = command_seconds(f"{sys.executable} -c 'from diffusers import AnyFlowTransformer3DModel'")
    helps = command_seconds(f"{os.path.join(os.path.dirname(sys.executable), 'anyflow')} --help")
    print(f"  python -c 'import anyflow'                                 {ours_import:6.2f}  ratio {ours_import / theirs:.2f}")
    print(f"  python -c 'from anyflow import AnyFlowTransformer3DModel'  {ours_model:6.2f}  ratio {ours_model / theirs:.2f}")
    print(f"  python -c 'from diffusers import AnyFlowTransformer3DModel' {theirs:6.2f}")
    print(f"  anyflow --help                                             {helps:6.2f}")


if __name__ == "__main__":
    main()
