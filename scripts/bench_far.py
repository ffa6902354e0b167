"""FAR generation, ours against diffusers' AnyFlowFARPipeline, side by side in one run.

    python scripts/bench_far.py [--layers 2] [--latent 60x104] [--partition 1 3 3 3] [--steps 4]
                                [--dtype bfloat16] [--repeats 1] [--deviation] [--workdir DIR]
    python scripts/bench_far.py --step-scaling [--cache-frames 3 12 24 48] [--chunk-frames 3]
                                [--layers 2] [--latent 32x56] [--dtype float32] [--code DIR]
    python scripts/bench_far.py --length-scaling [--lengths 8 32 128 512] [--window 2] [--sink 1]
                                [--layers 2] [--latent 16x16] [--steps 2] [--window-only]
    python scripts/bench_far.py --cache-bytes [--window 12] [--sink 1]

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

``--step-scaling``: the cost of one cached step against the length of the cache (ours alone, no
diffusers; random weights and a cache of random keys and values, all frames at full resolution,
with room for the chunk). For each cache length: the step's time, its time with the attention
kernel replaced by zeros of its output's shape (everything else as it is: this is where a copy of
the cache shows, attention's own cost aside), and the bytes the step allocates with that kernel
left out (torch.profiler, the sum of every op's own allocations). Times are CPU seconds of one
thread (``torch.set_num_threads(1)``, ``time.process_time``), each the least of --repeats runs after
a warm-up, the two alternating: on a shared machine others' load moves wall times by tens of
percent, and only adds time. ``--code
DIR`` runs another checkout's ``anyflow`` (for example an older commit in a ``git worktree``) on
the same measurement, to compare before and after.

``--length-scaling``: the cost of a chunk against the length of the video, with a context window
(``--window``, ``--sink``) and without (ours alone; random weights at small widths, single-frame
chunks, a seed's noise drawn chunk by chunk: :func:`anyflow.sample_far_chunks`). For each length, a
fresh process makes the whole video and reports the CPU seconds of one thread per chunk (its steps
and the cache refresh before it; the median over the chunks made with the window full, the last
quarter without one; a video shorter than 32 latent frames is made again until it gives as many), the
peak RSS growth of the run, and the cache's allocated bytes.
``--cache-bytes`` prints the cache of the released models at 480p, unbounded and windowed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from benchlib import ROOT, run_worker, save_random_weights

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


STEP_WORKER = r"""
import dataclasses, json, sys, time
job = json.loads(sys.argv[1])
sys.path.insert(0, job["code"])
import torch
import anyflow.model.attention as attention
from anyflow import AnyFlowFARConfig, AnyFlowFARTransformer3DModel, FarKVCache
dtype = getattr(torch, job["dtype"])
torch.set_num_threads(1)  # timed in CPU seconds of this one thread: what others' load on the machine moves least
h, w = job["latent"]
config = AnyFlowFARConfig(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=job["layers"],
                          full_chunk_limit=10**6)  # every cached frame at full resolution
torch.manual_seed(0)
model = AnyFlowFARTransformer3DModel(config).eval().to_dtype(dtype)
gen = torch.Generator().manual_seed(1)
chunk = torch.randn(1, job["chunk_frames"], 16, h, w, generator=gen).to(dtype)
t, r = torch.full((1, job["chunk_frames"]), 800.0), torch.full((1, job["chunk_frames"]), 300.0)
per_frame = h * w // 4
with torch.no_grad():
    context = model.prepare_context(torch.randn(1, 512, 4096, generator=gen).to(dtype))
    preallocated = "storage" in {f.name for f in dataclasses.fields(FarKVCache)}
    real_attend = attention.attend
    def stub_attend(q, k, v):  # attention's output shape, none of its work
        return q.new_zeros(q.shape[0], q.shape[1], q.shape[2] * q.shape[3])
    rows = []
    for frames in job["cache_frames"]:
        tokens = frames * per_frame
        room = job["chunk_frames"] * per_frame if preallocated else 0
        kv = [tuple(torch.randn(1, tokens + room, 12, 128, generator=gen).to(dtype) for _ in range(2))
              for _ in range(config.num_layers)]
        cache = (FarKVCache((frames,), 0, 0, (h, w), kv, tokens) if preallocated
                 else FarKVCache((frames,), 0, 0, (h, w), kv))
        def run():
            start = time.process_time()
            model.step(chunk, t, r, context, cache)
            return time.process_time() - start
        run()  # warm-up
        times, stubbed = [], []
        for _ in range(job["repeats"]):  # alternating, so that the machine's moods hit both alike
            times.append(run())
            attention.attend = stub_attend
            try:
                stubbed.append(run())
            finally:
                attention.attend = real_attend
        seconds, without = min(times), min(stubbed)  # others' load on a shared machine only adds time
        attention.attend = stub_attend
        try:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
                model.step(chunk, t, r, context, cache)
        finally:
            attention.attend = real_attend
        allocated = sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages())
        rows.append({"frames": frames, "tokens": tokens, "seconds": seconds, "without_attention": without,
                     "allocated_mb": allocated / 2**20})
        del cache, kv
print(json.dumps({"preallocated": preallocated, "rows": rows}))
"""


LENGTH_WORKER = r"""
import json, statistics, sys, time, warnings
job = json.loads(sys.argv[1])
import torch
from anyflow import AnyFlowFARConfig, AnyFlowFARTransformer3DModel, sample_far_chunks
from anyflow.sampling import SeededNoise
warnings.simplefilter("ignore")  # the length is past the trained one on purpose
torch.set_num_threads(1)  # timed in CPU seconds of this one thread
h, w = job["latent"]
config = AnyFlowFARConfig(num_attention_heads=job["heads"], attention_head_dim=64, ffn_dim=4 * 64 * job["heads"],
                          num_layers=job["layers"], chunk_partition=(1, 1, 1))  # single-frame chunks
torch.manual_seed(0)
model = AnyFlowFARTransformer3DModel(config).eval()
with torch.no_grad():
    context = model.prepare_context(torch.randn(1, 512, 4096, generator=torch.Generator().manual_seed(1)))
caches = []
encode = model.encode_cache
def recording(*args, **kwargs):
    cache = encode(*args, **kwargs)
    caches.append(cache.allocated_bytes)
    return cache
model.encode_cache = recording
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) / 1024
for _ in sample_far_chunks(model, SeededNoise((1, 8, 16, h, w), 3), context, num_steps=job["steps"],
                           context_window=job["window"], sink_frames=job["sink"]):
    pass  # a warm-up: what the first calls allocate once is not the run's
caches.clear()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS")
limit = config.full_chunk_limit
full = job["sink"] + job["window"] + limit if job["window"] else 3 * job["frames"] // 4  # chunk index from which it counts
steady = []
for _ in range(max(1, 32 // job["frames"])):  # a short video made again, for as many counted chunks as a longer one
    seconds, last = [], time.process_time()
    chunks = sample_far_chunks(model, SeededNoise((1, job["frames"], 16, h, w), 2), context, num_steps=job["steps"],
                               context_window=job["window"], sink_frames=job["sink"])
    for index, chunk in chunks:  # a chunk's time: the refresh after the one before it, and its own steps
        now = time.process_time()
        seconds.append(now - last)
        last = now
    steady += seconds[max(1, full):] or seconds[-1:]
print(json.dumps({"chunk_seconds": statistics.median(steady), "counted": len(steady),
                  "peak_rss_mb": status("VmHWM") - base, "cache_mb": max(caches) / 2**20}))
"""


def length_scaling(args) -> None:
    """Print a chunk's CPU time, the peak RSS growth and the cache's bytes against the video's length, with the
    window and without."""
    import torch

    # tensors of 64 KiB and more in their own mappings, given back when freed: the RSS follows what is alive
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))

    h, w = args.latent
    runs = {}
    for _ in range(args.repeats):  # alternating, so that the machine's moods hit every length alike
        for frames in args.lengths:
            for window in (args.window,) if args.window_only else (args.window, None):
                row = run_worker(LENGTH_WORKER, dict(frames=frames, window=window, sink=args.sink if window else 0,
                                                     latent=[h, w], layers=args.layers, heads=args.heads,
                                                     steps=args.steps))
                runs.setdefault((frames, window), []).append(row)
                print(f"  {frames} latent frames, {'window' if window else 'unbounded'}: {json.dumps(row)}", flush=True)
    # the least of the repeats: others' load on a shared machine only adds time
    rows = {key: min(found, key=lambda row: row["chunk_seconds"]) for key, found in runs.items()}
    print(f"machine: {os.cpu_count()} CPUs (1 thread used), torch {torch.__version__}; {args.heads} heads of 64, "
          f"{args.layers} layers, float32, latents {h}x{w} ({h * w // 4} tokens a frame, {h * w // 16} compressed), "
          f"chunks of 1 latent frame, {args.steps} steps; window {args.window} + sink {args.sink} frames")
    header = (f"{'latent frames':>13} | {'window: chunk CPU s':>19} {'peak RSS+ MB':>12} {'cache MB':>9} | "
              f"{'unbounded: chunk CPU s':>22} {'peak RSS+ MB':>12} {'cache MB':>9}")
    print("\n" + header + "\n" + "-" * len(header))
    for frames in args.lengths:
        a, b = rows[frames, args.window], rows.get((frames, None))
        print(f"{frames:13d} | {a['chunk_seconds']:19.4f} {a['peak_rss_mb']:12.1f} {a['cache_mb']:9.2f} | " + (
            f"{b['chunk_seconds']:22.4f} {b['peak_rss_mb']:12.1f} {b['cache_mb']:9.2f}" if b else "not run"))
    windowed = [rows[frames, args.window] for frames in args.lengths]
    for key, what, bar in (("peak_rss_mb", "peak RSS growth", 0.10), ("chunk_seconds", "chunk time", 0.15)):
        values = [row[key] for row in windowed]
        spread = max(values) / min(values) - 1
        print(f"with the window, {what} across lengths: within {100 * spread:.1f}% ({'flat' if spread <= bar else 'NOT flat'}"
              f", bar {100 * bar:.0f}%)")


def cache_bytes(args) -> None:
    """Print the FAR cache of the released models at 480p: per compressed frame, windowed, unbounded by length."""
    from anyflow.model.config import PRESETS, AnyFlowFARConfig
    from anyflow.runtime.memory import far_cache_bytes

    h, w, chunk = 60, 104, 3  # 480 x 832 pixels; the released chunks of 3 latent frames
    print(f"480p (latents {h}x{w}), bfloat16, chunks of {chunk} latent frames; window {args.window} + sink {args.sink}")
    header = (f"{'model':>6} {'per compressed frame':>20} {'per full frame':>14} {'windowed':>9} "
              + " ".join(f"{f'unbounded {n}f':>16}" for n in (81, 241, 961, 1921, 3841)))
    print(header + "\n" + "-" * len(header))
    for name, preset in (("1.3B", "anyflow-wan2.1-t2v-1.3b"), ("14B", "anyflow-wan2.1-t2v-14b")):
        config = AnyFlowFARConfig(**{k: v for k, v in PRESETS[preset].to_dict().items()})
        per_token = 2 * config.num_layers * config.hidden_size * 2
        compressed, full = per_token * (h // 4) * (w // 4), per_token * (h // 2) * (w // 2)
        windowed = far_cache_bytes(config, 1, h, w, 2, args.window, args.sink, chunk)

        def unbounded(video_frames):  # while the last chunk is made: every older chunk compressed but the last few
            partition = config.chunk_partition_for((video_frames - 1) // 4 + 1)
            at_full = partition[-config.full_chunk_limit:]
            return (sum(partition) - sum(at_full)) * compressed + sum(at_full) * full

        print(f"{name:>6} {compressed / 1e6:17.0f} MB {full / 1e6:11.0f} MB {windowed / 1e9:6.2f} GB "
              + " ".join(f"{unbounded(n) / 1e9:13.1f} GB" for n in (81, 241, 961, 1921, 3841)))


def step_scaling(args) -> None:
    """Print one cached step's time, time without attention and allocated bytes against the cache's length."""
    import torch

    h, w = args.latent
    job = dict(code=os.path.abspath(args.code), dtype=args.dtype, latent=[h, w], layers=args.layers,
               chunk_frames=args.chunk_frames, cache_frames=args.cache_frames, repeats=args.repeats)
    result = run_worker(STEP_WORKER, job)
    print(f"machine: {os.cpu_count()} CPUs (1 thread used), torch {torch.__version__}; 1.3B widths, {args.layers} "
          f"layers, {args.dtype}, latents {h}x{w} ({h * w // 4} tokens a frame), a chunk of {args.chunk_frames} frames; "
          f"code {job['code']} ({'preallocated cache' if result['preallocated'] else 'cache concatenated each step'})")
    header = f"{'cached frames':>13} {'cached tokens':>13} {'step CPU s':>10} {'no-attention CPU s':>18} {'allocated MB':>12}"
    print("\n" + header + "\n" + "-" * len(header))
    for row in result["rows"]:
        print(f"{row['frames']:13d} {row['tokens']:13d} {row['seconds']:10.3f} {row['without_attention']:18.3f} "
              f"{row['allocated_mb']:12.0f}")


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
    parser.add_argument("--latent", help="latent H x W (default 60x104: 480 x 832 pixels; --step-scaling 32x56)")
    parser.add_argument("--partition", type=int, nargs="+", default=[1, 3, 3, 3])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dtype", help="default bfloat16 (--step-scaling: float32)")
    parser.add_argument("--repeats", type=int, help="default 1 (--step-scaling: 5)")
    parser.add_argument("--deviation", action="store_true", help="also measure diffusers' padding deviation")
    parser.add_argument("--workdir", default=os.path.expanduser("~/.cache/anyflow-bench"))
    parser.add_argument("--step-scaling", action="store_true", help="one cached step's cost against the cache length")
    parser.add_argument("--cache-frames", type=int, nargs="+", default=[3, 12, 24, 48])
    parser.add_argument("--chunk-frames", type=int, default=3)
    parser.add_argument("--code", default=ROOT, help="the checkout whose anyflow --step-scaling runs")
    parser.add_argument("--length-scaling", action="store_true", help="a chunk's cost against the video's length")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8, 32, 128, 512], help="latent frames")
    parser.add_argument("--window", type=int, help="context window, latent frames (--length-scaling: default 2; "
                        "--cache-bytes: 12)")
    parser.add_argument("--sink", type=int, default=1, help="sink frames (default 1)")
    parser.add_argument("--window-only", action="store_true", help="--length-scaling: the windowed runs alone")
    parser.add_argument("--heads", type=int, default=4, help="--length-scaling: heads of 64 (default 4)")
    parser.add_argument("--cache-bytes", action="store_true", help="the released models' cache at 480p")
    args = parser.parse_args()
    if args.cache_bytes:
        args.window = args.window or 12
        return cache_bytes(args)
    if args.length_scaling:
        args.window = args.window or 2
        args.repeats = args.repeats or 3
        args.steps = args.steps if args.steps != 4 else 2
        args.latent = tuple(int(v) for v in (args.latent or "16x16").lower().split("x"))
        return length_scaling(args)
    if args.step_scaling:
        args.repeats = args.repeats or 5
        args.latent = tuple(int(v) for v in (args.latent or "32x56").lower().split("x"))
        args.dtype = args.dtype or "float32"
        return step_scaling(args)
    args.latent = tuple(int(v) for v in (args.latent or "60x104").lower().split("x"))
    args.dtype = args.dtype or "bfloat16"
    args.repeats = args.repeats or 1
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
