"""Conversion and loading at the 1.3B shape, ours against `cp` and diffusers, each run in its own process.

    python scripts/bench_convert.py [--workdir DIR] [--repeats 3]

Creates (once, in --workdir) the 1.3B-shaped AnyFlow checkpoint with random weights in the real
names and shapes via the oracle's ``save_pretrained``: bf16 sharded (Hub layout) and fp32 single
file. Then prints, as medians over --repeats runs:
- conversion: peak RSS and MB/s of ``anyflow-convert`` for both sources, next to the peak RSS of
  a bare ``python -c "import torch"`` and the MB/s of ``cp`` on the same bytes;
- loading: ``import`` + ``from_pretrained`` wall time and peak RSS, ours against
  ``diffusers.AnyFlowTransformer3DModel.from_pretrained(..., torch_dtype=torch.bfloat16)``.
Needs the test extra (diffusers, accelerate) only to create the checkpoint and for the oracle rows.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from benchlib import probe

HERE = os.path.dirname(os.path.abspath(__file__))
PRESET_1_3B = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30)


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def ensure_checkpoints(workdir: str) -> tuple:
    hub = os.path.join(workdir, "hub-bf16-sharded")
    fp32 = os.path.join(workdir, "fp32-single")
    if os.path.isdir(hub) and os.path.isdir(fp32):
        return hub, fp32
    import torch
    from diffusers import AnyFlowTransformer3DModel as Oracle

    print("creating the 1.3B-shaped checkpoints (once) ...", flush=True)
    torch.manual_seed(0)
    model = Oracle(**PRESET_1_3B)
    model.save_pretrained(fp32 + ".tmp", max_shard_size="100GB")
    os.rename(fp32 + ".tmp", fp32)
    model.to(torch.bfloat16).save_pretrained(os.path.join(hub + ".tmp", "transformer"), max_shard_size="1GB")
    with open(os.path.join(hub + ".tmp", "model_index.json"), "w") as f:
        json.dump({"_class_name": "AnyFlowPipeline"}, f)
    os.rename(hub + ".tmp", hub)
    return hub, fp32


def median(runs, key):
    return statistics.median(r[key] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.path.expanduser("~/.cache/anyflow-bench"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    hub, fp32 = ensure_checkpoints(args.workdir)
    out = os.path.join(args.workdir, "out")
    ours_dir = os.path.join(args.workdir, "ours-bf16")
    if not os.path.isdir(ours_dir):
        subprocess.run([sys.executable, "-m", "weights_convert", hub, ours_dir], check=True, cwd=os.path.dirname(HERE),
                       capture_output=True)

    torch_rss = median([probe("import torch") for _ in range(args.repeats)], "rss_mb")
    print(f"\nbare `python -c 'import torch'` peak RSS: {torch_rss:.0f} MB; bound = that + 400 MB = {torch_rss + 400:.0f} MB")
    print("\nconversion: MB/s of the convert() call itself, and of the whole command (python start-up and"
          "\nimports included), next to `cp -r` of the same folder; a renaming conversion imports no torch."
          "\nThe cast row reads 5.69 GB and writes 2.85 GB, computing every value (its ratio is not a goal;"
          "\nits peak RSS is: torch is imported there)")
    print(f"{'conversion':<36} {'GB':>5} {'peak RSS MB':>11} {'MB/s':>6} {'cmd MB/s':>9} {'cp MB/s':>8} "
          f"{'ratio':>6} {'cmd ratio':>9}")
    for label, src, dtype in [("bf16 sharded Hub -> anyflow", hub, "keep"), ("fp32 single file -> anyflow", fp32, "keep"),
                              ("fp32 single file -> anyflow bf16", fp32, "bfloat16")]:
        nbytes = folder_bytes(src)
        cp_runs, runs = [], []
        for _ in range(args.repeats):
            shutil.rmtree(out, ignore_errors=True)
            os.sync()  # each run starts with no dirty pages of the previous one to write back
            start = time.perf_counter()
            subprocess.run(["cp", "-r", src, out], check=True)
            cp_runs.append(nbytes / 1e6 / (time.perf_counter() - start))
            shutil.rmtree(out)
            os.sync()
            result = probe(f"from weights_convert import convert\nC = time.perf_counter()\n"
                           f"convert({src!r}, {out!r}, dtype={dtype!r}, progress=None)\nINNER = time.perf_counter() - C")
            runs.append({"rss_mb": result["rss_mb"], "mbps": nbytes / 1e6 / result["inner"],
                         "cmd_mbps": nbytes / 1e6 / result["wall"]})
        shutil.rmtree(out, ignore_errors=True)
        ours, cmd, cp = median(runs, "mbps"), median(runs, "cmd_mbps"), statistics.median(cp_runs)
        print(f"{label:<36} {nbytes / 1e9:5.2f} {median(runs, 'rss_mb'):11.0f} {ours:6.0f} {cmd:9.0f} {cp:8.0f} "
              f"{ours / cp:6.2f} {cmd / cp:9.2f}")

    print(f"\n{'load (import + from_pretrained, bf16)':<52} {'seconds':>8} {'peak RSS MB':>12}")
    # Both loaders map the files lazily; the "+ touch" rows then read one element of every page
    # of every weight, so the whole model is resident, as before a first forward.
    touch = "\nfor p in m.parameters(): p.detach().reshape(-1)[::1024].float().sum()"
    rows = {
        "ours, anyflow layout": f"from anyflow import AnyFlowTransformer3DModel as M\nm = M.from_pretrained({ours_dir!r})",
        "ours, Hub diffusers snapshot": f"from anyflow import AnyFlowTransformer3DModel as M\nm = M.from_pretrained({hub!r})",
        "diffusers (accelerate), Hub snapshot": (
            "import torch\nfrom diffusers import AnyFlowTransformer3DModel as M\n"
            f"m = M.from_pretrained({hub!r}, subfolder='transformer', torch_dtype=torch.bfloat16)"
        ),
    }
    rows.update({f"{name} + touch": body + touch for name, body in list(rows.items())})
    results = {name: [] for name in rows}
    for _ in range(args.repeats):  # alternate, so drift hits every row alike
        for name, body in rows.items():
            results[name].append(probe(body))
    for name, runs in results.items():
        print(f"{name:<52} {median(runs, 'wall'):8.2f} {median(runs, 'rss_mb'):12.0f}")
    for suffix in ("", " + touch"):
        ref = results["diffusers (accelerate), Hub snapshot" + suffix]
        for name in ("ours, anyflow layout", "ours, Hub diffusers snapshot"):
            runs = results[name + suffix]
            print(f"ratio {name + suffix} / diffusers{suffix}: time {median(runs, 'wall') / median(ref, 'wall'):.2f}, "
                  f"peak RSS {median(runs, 'rss_mb') / median(ref, 'rss_mb'):.2f}")


if __name__ == "__main__":
    main()
