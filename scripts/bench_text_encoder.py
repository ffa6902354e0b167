"""The UMT5 text encoder at UMT5-XXL widths: ours (streaming and in memory) against transformers, side by side.

    python scripts/bench_text_encoder.py [--workdir DIR] [--layers 6] [--prompt-tokens 120] [--repeats 2]

Writes once, in --workdir, a UMT5-XXL-shaped ``text_encoder/`` folder with --layers blocks (d_model
4096, d_ff 10240, 64 heads, the full 256,384-token embedding) of random bf16 weights, in
transformers' names, one safetensors file (2.1 GB of embedding + 0.39 GB a block; the released
encoder has 24 blocks, 11.4 GB). Then runs, each in a fresh process and alternating, for two inputs:

- "512 tokens": one prompt that fills all 512 tokens (the same work for everyone);
- "N of 512": one prompt of --prompt-tokens tokens padded to 512, as the pipelines pad it.
  Transformers encodes all 512 positions; ``encode_prompts`` runs ours over the prompt's tokens only.

Rows: ours streaming (``UMT5Encoder.streaming``: one block at a time, embedding rows of the tokens
used), ours in memory (``UMT5Encoder.from_pretrained``), transformers
(``UMT5EncoderModel.from_pretrained(..., torch_dtype=torch.bfloat16)``). Columns: seconds from after
the imports to the output (loading included: the streaming encoder loads as it runs), the process's
wall time (interpreter start-up and imports included), its peak RSS, ratios to transformers, and
each output's error over the real tokens against float32 (ours streaming in float32, which the
tests hold to transformers' float32 within 1e-5): largest and mean absolute difference, relative
to the largest value. Needs transformers for its rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics

import torch
from benchlib import probe

from anyflow.text.encoder import UMT5_XXL

XXL = {k: v for k, v in dataclasses.asdict(UMT5_XXL).items() if k != "num_layers"}


def ensure_checkpoint(workdir: str, layers: int) -> str:
    """The XXL-shaped folder with ``layers`` blocks, written once, tensor by tensor (the embedding in slices)."""
    folder = os.path.join(workdir, f"umt5-xxl-{layers}-blocks-bf16")
    if os.path.isdir(folder):
        return folder
    from weights_convert.safetensors_io import header_bytes, tensor_bytes

    print(f"writing {folder} (once) ...", flush=True)
    d, ff, inner, h = XXL["d_model"], XXL["d_ff"], XXL["num_heads"] * XXL["d_kv"], XXL["num_heads"]
    shapes = {"shared.weight": (XXL["vocab_size"], d)}
    for i in range(layers):
        p = f"encoder.block.{i}.layer."
        shapes.update({p + f"0.SelfAttention.{n}.weight": (inner, d) for n in "qkv"})
        shapes.update({p + "0.SelfAttention.o.weight": (d, inner),
                       p + "0.SelfAttention.relative_attention_bias.weight": (XXL["relative_attention_num_buckets"], h),
                       p + "0.layer_norm.weight": (d,), p + "1.DenseReluDense.wi_0.weight": (ff, d),
                       p + "1.DenseReluDense.wi_1.weight": (ff, d), p + "1.DenseReluDense.wo.weight": (d, ff),
                       p + "1.layer_norm.weight": (d,)})
    shapes["encoder.final_layer_norm.weight"] = (d,)
    gen = torch.Generator().manual_seed(0)
    tmp = folder + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    with open(os.path.join(tmp, "model.safetensors"), "wb") as f:
        f.write(header_bytes([(name, "BF16", shape) for name, shape in shapes.items()], {"format": "pt"}))
        for name, shape in shapes.items():
            # O(1) activations; q also carries T5's folded 1/sqrt(d_kv), so attention logits are O(1) too
            scale = 1.0 if name == "shared.weight" or "relative" in name else shape[-1] ** -0.5
            scale = scale / XXL["d_kv"] ** 0.5 if name.endswith(".q.weight") else scale
            for start in range(0, shape[0], 16384):  # slices of rows: never the whole fp32 embedding at once
                rows = (min(16384, shape[0] - start), *shape[1:])
                values = torch.randn(rows, generator=gen)
                values = 1 + 0.2 * values if len(shape) == 1 else values * scale
                f.write(tensor_bytes(values.to(torch.bfloat16)))
    config = {"architectures": ["UMT5EncoderModel"], "model_type": "umt5", "num_layers": layers,
              "is_encoder_decoder": True, "dtype": "bfloat16", **XXL}
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    os.rename(tmp, folder)
    return folder


INPUTS = """
import torch
gen = torch.Generator().manual_seed(1)
ids = torch.randint(3, {vocab}, (1, 512), generator=gen)
ids[0, {n} - 1] = 1  # </s>
ids[0, {n}:] = 0
mask = (torch.arange(512) < {n}).long()[None]
"""
BODIES = {
    "ours, streaming": "from anyflow.text.encoder import UMT5Encoder\n{inputs}\nL0 = time.perf_counter()\n"
                       "out = UMT5Encoder.streaming({folder!r}, dtype='bfloat16')(ids[:, :{n}], mask[:, :{n}])",
    "ours, in memory": "from anyflow.text.encoder import UMT5Encoder\n{inputs}\nL0 = time.perf_counter()\n"
                       "with torch.no_grad():\n    out = UMT5Encoder.from_pretrained({folder!r}, dtype='bfloat16')"
                       "(ids[:, :{n}], mask[:, :{n}])",
    "transformers": "from transformers import UMT5EncoderModel\n{inputs}\nL0 = time.perf_counter()\n"
                    "with torch.no_grad():\n"
                    "    model = UMT5EncoderModel.from_pretrained({folder!r}, torch_dtype=torch.bfloat16)\n"
                    "    out = model(input_ids=ids, attention_mask=mask).last_hidden_state",
}
TRUTH = BODIES["ours, streaming"].replace("'bfloat16'", "'float32'")
TAIL = "INNER = time.perf_counter() - L0\ntorch.save(out[0, :{n}].float().clone(), {out!r})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.path.expanduser("~/.cache/anyflow-bench"))
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--prompt-tokens", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    folder = ensure_checkpoint(args.workdir, args.layers)
    base = {"import torch + ours": probe("import torch\nimport anyflow.text.encoder"),
            "import torch + transformers": probe("import torch\nfrom transformers import UMT5EncoderModel")}
    print(f"\nUMT5-XXL widths, {args.layers} blocks, bf16, batch 1, {os.cpu_count()} CPUs; medians of {args.repeats} "
          f"fresh processes.\nBaseline peak RSS: " + ", ".join(f"{k} {v['rss_mb']:.0f} MB" for k, v in base.items()))
    print(f"\n{'input':<12} {'encoder':<16} {'encode s':>9} {'process s':>10} {'peak RSS MB':>12} {'time ratio':>11} "
          f"{'RSS ratio':>10} {'max err':>9} {'mean err':>9}")
    for n in (512, args.prompt_tokens):
        label = "512 tokens" if n == 512 else f"{n} of 512"
        inputs = INPUTS.format(vocab=XXL["vocab_size"], n=n)
        truth_file = os.path.join(args.workdir, "text-encoder-truth.pt")
        probe((TRUTH + "\n" + TAIL).format(inputs=inputs, folder=folder, n=n, out=truth_file))
        truth = torch.load(truth_file)
        runs = {name: [] for name in BODIES}
        for _ in range(args.repeats):  # alternating, so drift hits every row alike
            for row, (name, body) in enumerate(BODIES.items()):
                out = os.path.join(args.workdir, f"text-encoder-out-{row}.pt")
                runs[name].append({**probe((body + "\n" + TAIL).format(inputs=inputs, folder=folder, n=n, out=out)),
                                   "error": (torch.load(out) - truth).abs() / truth.abs().max()})
        ref_seconds = statistics.median(r["inner"] for r in runs["transformers"])
        ref_rss = statistics.median(r["rss_mb"] for r in runs["transformers"])
        for name, rs in runs.items():
            seconds, wall = statistics.median(r["inner"] for r in rs), statistics.median(r["wall"] for r in rs)
            rss = statistics.median(r["rss_mb"] for r in rs)
            error = rs[-1]["error"]
            print(f"{label:<12} {name:<16} {seconds:9.2f} {wall:10.2f} {rss:12.0f} {seconds / ref_seconds:11.2f} "
                  f"{rss / ref_rss:10.2f} {error.max().item():9.2g} {error.mean().item():9.2g}")


if __name__ == "__main__":
    main()
