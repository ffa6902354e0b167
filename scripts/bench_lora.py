"""Merging a rank-64 LoRA into the 1.3B-shaped model: ours against diffusers, each run in its own process.

    python scripts/bench_lora.py [--workdir DIR] [--rank 64] [--dtype bfloat16] [--repeats 3]

Creates once, in --workdir: the 1.3B-shaped AnyFlow checkpoint with random bf16 weights (fp32 islands) in our layout
(and in diffusers' layout, converted with anyflow-convert), and a Wan2.1-layout (ComfyUI) adapter of
--rank on every block's self- and cross-attention projections and FFN (lora_down / lora_up / alpha,
bf16), the coverage of a typical Wan style LoRA. Then prints medians over --repeats runs of wall
time and peak RSS (VmHWM) of:

- ours: ``from_pretrained`` without and with ``lora=[adapter]`` (the merge is the difference),
  ``from_pretrained`` then ``merge_lora``, and ``anyflow-convert`` without and with ``--lora``;
- diffusers: ``AnyFlowTransformer3DModel.from_pretrained`` in an ``AnyFlowPipeline``, then
  ``load_lora_weights`` and ``fuse_lora`` (the merge it offers), then ``unload_lora_weights``.

and the ratios ours / diffusers. Needs the test extra (diffusers, peft) for the diffusers rows.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys

from benchlib import probe

PRESET_1_3B = "anyflow-wan2.1-t2v-1.3b"
WAN_MODULES = [f"{attn}.{p}" for attn in ("self_attn", "cross_attn") for p in "qkvo"] + ["ffn.0", "ffn.2"]


def ensure_inputs(workdir: str, rank: int) -> tuple:
    """(our-layout checkpoint, diffusers-layout checkpoint, adapter file), created once."""
    import torch
    from safetensors.torch import save_file

    from anyflow import AnyFlowConfig, AnyFlowTransformer3DModel

    config = AnyFlowConfig.from_preset(PRESET_1_3B)
    ours = os.path.join(workdir, "lora-base-1.3b-bf16")
    if not os.path.isdir(ours):
        print("creating the 1.3B-shaped checkpoint (once) ...", flush=True)
        torch.manual_seed(0)
        model = AnyFlowTransformer3DModel(config).to_dtype("bfloat16")  # as released
        model.save_pretrained(ours)
        del model
    theirs = os.path.join(workdir, "lora-base-1.3b-bf16-diffusers")
    if not os.path.isdir(theirs):
        from weights_convert import convert

        convert(ours, theirs, to="diffusers", progress=None)
    adapter = os.path.join(workdir, f"wan-lora-rank{rank}.safetensors")
    if not os.path.isfile(adapter):
        from weights_convert import open_checkpoint
        from weights_convert.state_dict import rename_key

        shapes = {k: v.shape for k, v in open_checkpoint(ours).tensors.items()}
        gen = torch.Generator().manual_seed(1)
        tensors = {}
        for block in range(config.num_layers):
            for module in WAN_MODULES:
                wan = f"blocks.{block}.{module}"
                fan_out, fan_in = shapes[rename_key(rename_key(f"{wan}.weight", "wan_original_to_diffusers"))]
                name = f"diffusion_model.{wan}"
                tensors[f"{name}.lora_down.weight"] = (torch.randn(rank, fan_in, generator=gen) / fan_in**0.5).bfloat16()
                tensors[f"{name}.lora_up.weight"] = (torch.randn(fan_out, rank, generator=gen) / rank**0.5).bfloat16()
                tensors[f"{name}.alpha"] = torch.tensor(float(rank // 2))
        save_file(tensors, adapter + ".tmp")
        os.rename(adapter + ".tmp", adapter)
    return ours, theirs, adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.path.expanduser("~/.cache/anyflow-bench"))
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    ours, theirs, adapter = ensure_inputs(args.workdir, args.rank)
    out = os.path.join(args.workdir, "lora-converted")
    load = f"from anyflow import AnyFlowTransformer3DModel as M\nm = M.from_pretrained({ours!r}, dtype={args.dtype!r}"
    convert = ("from weights_convert import convert\n"
               f"convert({ours!r}, {out!r}, dtype={args.dtype!r}, force=True, progress=None")
    diffusers = ("import torch\nfrom diffusers import AnyFlowPipeline, AnyFlowTransformer3DModel as O\n"
                 f"t = O.from_pretrained({theirs!r}, torch_dtype=torch.{args.dtype})\n"
                 "p = AnyFlowPipeline(tokenizer=None, text_encoder=None, transformer=t, vae=None, scheduler=None)\n")
    rows = {
        "ours: from_pretrained": load + ")",
        "ours: from_pretrained(lora=[adapter])": load + f", lora=[{adapter!r}])",
        "ours: from_pretrained + merge_lora": load + f").merge_lora({adapter!r})",
        "ours: anyflow-convert": convert + ")",
        "ours: anyflow-convert --lora": convert + f", lora=[{adapter!r}])",
        "diffusers: from_pretrained": diffusers,
        "diffusers: from_pretrained + load_lora_weights + fuse_lora": diffusers
        + f"p.load_lora_weights({adapter!r})\np.fuse_lora()\np.unload_lora_weights()",
    }
    results = {}
    for name, body in rows.items():
        runs = []
        for _ in range(args.repeats):
            runs.append(probe(body))
        results[name] = {k: statistics.median(r[k] for r in runs) for k in ("seconds", "rss_mb")}
        print(f"{name:60s} {results[name]['seconds']:7.2f} s  {results[name]['rss_mb']:8.0f} MB", flush=True)
    shutil.rmtree(out, ignore_errors=True)

    def merge(a, b, key):
        return results[a][key] - results[b][key]

    adapter_mb = os.path.getsize(adapter) / 1e6
    model_mb = sum(os.path.getsize(os.path.join(ours, f)) for f in os.listdir(ours) if f.endswith(".safetensors")) / 2**20
    print(f"\nrank-{args.rank} Wan-layout adapter, {adapter_mb:.0f} MB on disk; model held in {args.dtype} "
          f"({model_mb:,.0f} MB); medians of {args.repeats} runs. Loading alone maps the file and reads no "
          "weight, so a merge's peak is compared with the model's own size.")
    print("| | merge time | peak RSS | peak RSS over the model's size |\n|---|---|---|---|")
    for label, with_lora, alone in [
        ("ours, merged as loaded (`from_pretrained(lora=...)`)", "ours: from_pretrained(lora=[adapter])", "ours: from_pretrained"),
        ("ours, merged in place (`merge_lora`)", "ours: from_pretrained + merge_lora", "ours: from_pretrained"),
        ("ours, baked in by `anyflow-convert --lora`", "ours: anyflow-convert --lora", "ours: anyflow-convert"),
        ("diffusers, `load_lora_weights` + `fuse_lora`", "diffusers: from_pretrained + load_lora_weights + fuse_lora",
         "diffusers: from_pretrained"),
    ]:
        rss = results[with_lora]["rss_mb"]
        over = f"{rss - model_mb:,.0f} MB" if "convert" not in with_lora else "(streams; holds no model)"
        print(f"| {label} | {merge(with_lora, alone, 'seconds'):.2f} s | {rss:,.0f} MB | {over} |")
    theirs_row = "diffusers: from_pretrained + load_lora_weights + fuse_lora"
    for row in ("ours: from_pretrained(lora=[adapter])", "ours: from_pretrained + merge_lora"):
        print(f"ratio {row} / diffusers: time {results[row]['seconds'] / results[theirs_row]['seconds']:.2f}, "
              f"peak RSS {results[row]['rss_mb'] / results[theirs_row]['rss_mb']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
