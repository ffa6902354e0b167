"""Memory, time and traffic of one forward over 1 and 2 processes (weights sharded, tokens split, both).

    python scripts/bench_parallel.py [--latent 5x60x104] [--layers 30] [--workdir DIR]

A 1.3B-shaped checkpoint (random bf16 weights, written once) is loaded by one process, and by two
under torchrun (gloo, CPU) with ``--shard-weights``, ``--sequence-parallel`` and both; each process
runs one forward in bf16 and reports its peak RSS (above the interpreter with torch imported), the
forward's wall time, and the bytes it sent: counted at ``all_to_all_single``, ``all_gather_single`` (``all_gather_into_tensor`` before torch 2.13)
and ``reduce_scatter_tensor``, against the formula

    FSDP:     (P - 1) / P * (bytes of the sharded weights)            all-gathered once per forward
    Ulysses:  4 * layers * (P - 1) / P * B * L/P * D * bytes per element   q, k, v and the output, exchanged
    output:   (P - 1) * B * ceil(L/P) * ph*pw*C_out * bytes per element  gathered once at the end
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

from benchlib import ROOT

WORKER = r"""
import json, os, sys, time
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) / 1024
import torch, torch.distributed as dist
base = status("VmRSS")
job = json.loads(sys.argv[1])
from anyflow import AnyFlowTransformer3DModel, load_parallel
sent = {"all_to_all_single": 0, "all_gather_into_tensor": 0, "all_gather_single": 0}
def counting(name, measure):
    real = getattr(dist, name)
    def wrapper(*args, **kwargs):
        sent[name] += measure(*args, **kwargs)
        return real(*args, **kwargs)
    setattr(dist, name, wrapper)
def to_all(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kw):
    row = input[0].numel() * input.element_size() if input.shape[0] else 0
    splits = input_split_sizes or [input.shape[0] // dist.get_world_size(group)] * dist.get_world_size(group)
    return row * (sum(splits) - splits[dist.get_rank(group)])
counting("all_to_all_single", to_all)
counting("all_gather_into_tensor", lambda output, input, *a, group=None, **k: input.numel() * input.element_size() * (dist.get_world_size(group) - 1))
counting("all_gather_single", lambda output, input, *a, group=None, **k: input.numel() * input.element_size() * (dist.get_world_size(group) - 1))  # FSDP2
latent = job["latent"]
gen = torch.Generator().manual_seed(0)
x = torch.randn(1, latent[0], 16, latent[1], latent[2], generator=gen).bfloat16()
text = torch.randn(1, 512, 4096, generator=gen).bfloat16()
if job["mode"] == "one":
    model = AnyFlowTransformer3DModel.from_pretrained(job["weights"], dtype="bfloat16")
    rank = 0
else:
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = load_parallel(AnyFlowTransformer3DModel, job["weights"], mesh, "bfloat16",
                          shard_weights=job["mode"] in ("shard", "both"), sequence_parallel=job["mode"] in ("sequence", "both"))
with torch.no_grad():
    for p in model.parameters():  # every weight resident (a mapped one would count as the forward's)
        (p.to_local() if hasattr(p, "to_local") else p).detach().reshape(-1)[::256].float().sum()
import gc
gc.collect()
for key in sent:
    sent[key] = 0
weights_mb = status("VmRSS") - base
load_peak_mb = status("VmHWM") - base
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak from here: the forward's, on top of the resident weights
start = time.perf_counter()
with torch.no_grad():
    out = model(x, 900.0, 450.0, text).sample
seconds = time.perf_counter() - start
result = {"rank": rank, "seconds": seconds, "peak_mb": status("VmHWM") - base, "weights_mb": weights_mb,
          "load_peak_mb": load_peak_mb, "sent": sent}
if job["mode"] != "one":
    dist.destroy_process_group()
with open(os.path.join(job["out"], f"{job['mode']}.rank{rank}.json"), "w") as f:
    json.dump(result, f)
"""


def make_weights(folder: str, layers: int) -> None:
    """The 1.3B shapes (12 heads of 128, ffn 8960) with ``layers`` blocks, random bf16 weights, written once."""
    import torch

    from anyflow import AnyFlowConfig, AnyFlowTransformer3DModel
    from anyflow.model.parameters import is_fp32_island, parameter_shapes

    config = AnyFlowConfig(num_attention_heads=12, ffn_dim=8960, num_layers=layers)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in parameter_shapes(config).items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        value = torch.randn(shape, generator=gen) / (fan_in ** 0.5 if len(shape) > 1 and "modulation" not in name else 5)
        tensors[name] = value.to(torch.float32 if is_fp32_island(name) else torch.bfloat16)
    AnyFlowTransformer3DModel.from_state_dict(config, tensors).save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", default="5x60x104", help="latent frames x H x W (5x60x104: 17 frames at 480p)")
    parser.add_argument("--layers", type=int, default=30, help="30: the 1.3B model")
    parser.add_argument("--return-freed-memory", action="store_true",
                        help="run every process with MALLOC_MMAP_THRESHOLD_=65536: glibc returns freed blocks at once, "
                        "so RSS follows the live tensors (slower)")
    parser.add_argument("--modes", default="one,shard,sequence,both", help="which runs (one: a single process)")
    parser.add_argument("--workdir", default=os.path.expanduser("~/.cache/anyflow-bench"))
    args = parser.parse_args()
    latent = [int(v) for v in args.latent.lower().split("x")]
    weights = os.path.join(args.workdir, f"parallel-1.3b-{args.layers}l-bf16")
    if not os.path.isdir(weights):
        make_weights(weights, args.layers)
    out = os.path.join(args.workdir, "parallel-out")
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    if args.return_freed_memory:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    results = {}
    for mode in args.modes.split(","):
        job = json.dumps(dict(mode=mode, weights=weights, latent=latent, out=out))
        if mode == "one":
            command = [sys.executable, "-c", WORKER, job]
        else:
            script = os.path.join(out, "worker.py")
            with open(script, "w") as f:
                f.write(WORKER)
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script, job]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
        ranks = 1 if mode == "one" else 2
        results[mode] = [json.load(open(os.path.join(out, f"{mode}.rank{r}.json"))) for r in range(ranks)]

    import torch

    from anyflow import AnyFlowConfig
    from anyflow.model.parameters import is_fp32_island, parameter_shapes

    config = AnyFlowConfig(num_attention_heads=12, ffn_dim=8960, num_layers=args.layers)
    sharded = sum(math.prod(s) * 2 for n, s in parameter_shapes(config).items() if not is_fp32_island(n))
    tokens = latent[0] * (latent[1] // 2) * (latent[2] // 2)
    p = 2
    formula = {"shard": (p - 1) / p * sharded, "sequence": 4 * args.layers * (p - 1) / p * (tokens / p) * config.hidden_size * 2
               + (p - 1) * math.ceil(tokens / p) * 64 * 2}
    formula["both"] = formula["shard"] + formula["sequence"]
    single = results["one"][0]
    print(f"machine: {os.cpu_count()} CPUs (1 thread a process), torch {torch.__version__}; 1.3B shapes, {args.layers} "
          f"layers, bf16; latent {latent} = {tokens} tokens"
          + ("; glibc returning freed memory" if args.return_freed_memory else "; glibc's default allocator"))
    print(f"\n{'':<10} {'rank':>4} {'load peak MB':>12} {'weights MB':>10} {'forward peak MB':>15} {'ratio':>6} "
          f"{'forward s':>9} {'sent MB':>8} {'formula MB':>10}")
    for mode, ranks in results.items():
        for r in ranks:
            sent = sum(r["sent"].values()) / 1e6
            expected = formula.get(mode, 0) / 1e6
            print(f"{mode:<10} {r['rank']:>4} {r['load_peak_mb']:12.0f} {r['weights_mb']:10.0f} {r['peak_mb']:15.0f} "
                  f"{r['peak_mb'] / single['peak_mb']:6.2f} {r['seconds']:9.1f} {sent:8.1f} {expected:10.1f}")


if __name__ == "__main__":
    main()
