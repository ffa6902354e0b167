"""Scaled float8 weights (anyflow.runtime.fp8) side by side with plain per-row quantisation and with bfloat16.

    python scripts/bench_fp8.py [--workdir DIR] [--layers 2] [--seeds 0 1] [--repeats 3]

At the 1.3B widths (D = 1536, 12 heads, FFN 8960) with --layers blocks, random weights drawn as the
parity tests draw them (diffusers' AnyFlowTransformer3DModel as the fp32 oracle; needs the test extra):

1. error: the output's relative L2 and max error against the fp32 oracle, for the oracle whose block
   linear weights are replaced by plain per-row absmax round-to-nearest e4m3 (quantised and
   dequantised), for ours holding float8 weights computing in float32 and in bfloat16, and for ours
   in plain bfloat16; the ratios ours / plain are the bar of docs/FP8.md (<= 1.25);
2. bytes: what the loaded models hold (block linears with their scales, the rest), bf16 against
   ``weight_dtype="float8_e4m3fn"``, with each load's wall time and peak RSS in a fresh process
   (from a bf16 checkpoint in our layout, and from the one ``anyflow-convert --dtype float8_e4m3fn``
   writes), and the sizes of the whole 1.3B and 14B models (shapes only, on the meta device);
3. time: one forward pass of ours in float32 and bfloat16 with and without float8 weights (medians
   of --repeats), and for the largest layer (the FFN's 1536 -> 8960) its dequantisation against its
   matrix product at 192 and 7,800 tokens (5 x 60 x 104 latents): the float8 layers pay their
   dequantisation once per layer and forward, whatever the number of tokens.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

from benchlib import probe

PRESET_1_3B = "anyflow-wan2.1-t2v-1.3b"
LATENTS = (1, 3, 16, 16, 16)  # (B, F, C, H, W): 3 x 8 x 8 = 192 tokens
TEXT_TOKENS = 64


def redraw_(module, seed: int) -> None:
    """O(1) activations, as tests/conftest.py randomize_ draws them: matrices N(0, 1/fan_in), norm
    weights 1 + N(0, 0.2^2), modulation tables N(0, 0.5^2), the rest N(0, 0.2^2)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() >= 2 and "scale_shift_table" not in name:
                values = torch.randn(param.shape, generator=gen) / param[0].numel() ** 0.5
            elif name.endswith("weight") and "norm" in name:
                values = 1 + 0.2 * torch.randn(param.shape, generator=gen)
            elif "scale_shift_table" in name:
                values = 0.5 * torch.randn(param.shape, generator=gen)
            else:
                values = 0.2 * torch.randn(param.shape, generator=gen)
            param.copy_(values)


def plain_per_row(weight):
    """Plain per-row absmax round-to-nearest e4m3, quantised and dequantised (float32)."""
    import torch

    w = weight.float()
    scale = w.abs().amax(dim=1, keepdim=True) / 448
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale


def errors(out, reference) -> tuple:
    out, reference = out.double(), reference.double()
    difference = out - reference
    return (difference.norm() / reference.norm()).item(), (difference.abs().max() / reference.abs().max()).item()


def error_rows(config, seed: int) -> dict:
    """Relative (L2, max) errors against the fp32 oracle of each variant, for one seed."""
    import re

    import torch
    from diffusers import AnyFlowTransformer3DModel as Oracle

    from anyflow import AnyFlowTransformer3DModel
    from anyflow.runtime.fp8 import quantise_block_linears
    from weights_convert import convert_state_dict

    oracle = Oracle(**config.to_dict()).eval()
    redraw_(oracle, seed)
    plain = copy.deepcopy(oracle)
    block_linear = re.compile(r"blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ffn\.net\.(0\.proj|2))\.weight")
    with torch.no_grad():
        for name, param in plain.named_parameters():
            if block_linear.fullmatch(name):
                param.copy_(plain_per_row(param))
    ours = AnyFlowTransformer3DModel(config).eval()
    ours.load_state_dict(convert_state_dict(oracle.state_dict()))
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(LATENTS, generator=gen)
    t = 1000 * torch.rand(1, LATENTS[1], generator=gen)
    r = t * torch.rand(1, LATENTS[1], generator=gen)
    text = torch.randn(1, TEXT_TOKENS, config.text_dim, generator=gen)
    rows = {}
    with torch.no_grad():
        exact = oracle(latents, t, r, text).sample
        rows["plain per-row e4m3 (oracle, fp32)"] = errors(plain(latents, t, r, text).sample, exact)
        del plain, oracle
        bf16 = copy.deepcopy(ours).to_dtype("bfloat16")
        rows["ours bf16 (no float8)"] = errors(bf16(latents.bfloat16(), t, r, text.bfloat16()).sample, exact)
        del bf16
        quantise_block_linears(ours)
        rows["ours float8, computing in fp32"] = errors(ours(latents, t, r, text).sample, exact)
        ours.to_dtype("bfloat16")
        rows["ours float8, computing in bf16"] = errors(ours(latents.bfloat16(), t, r, text.bfloat16()).sample, exact)
    return rows


def held_bytes(model) -> dict:
    from anyflow.model.parameters import is_float8_weight

    state = model.state_dict()
    linears = sum(t.numel() * t.element_size() for k, t in state.items() if is_float8_weight(k.removesuffix("_scale")))
    return {"block linears": linears, "rest": sum(t.numel() * t.element_size() for t in state.values()) - linears}


def whole_model_bytes(preset: str) -> tuple:
    """(bf16 bytes, float8 bytes) of a released model's state, from shapes on the meta device."""
    import torch

    from anyflow import PRESETS, AnyFlowTransformer3DModel
    from anyflow.runtime.fp8 import quantise_block_linears

    with torch.device("meta"):
        model = AnyFlowTransformer3DModel(PRESETS[preset]).to_dtype("bfloat16")
    bf16 = sum(held_bytes(model).values())
    return bf16, sum(held_bytes(quantise_block_linears(model)).values())


def median_seconds(run, repeats: int) -> float:
    """Median wall time of ``run()`` over ``repeats`` calls, after one that warms up."""
    import torch

    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def forward_seconds(model, dtype, repeats: int) -> float:
    import torch

    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(LATENTS, generator=gen).to(dtype)
    text = torch.randn(1, TEXT_TOKENS, model.config.text_dim, generator=gen).to(dtype)
    return median_seconds(lambda: model(latents, 700.0, 300.0, text), repeats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary folder)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    from anyflow import AnyFlowConfig, AnyFlowTransformer3DModel
    from anyflow.runtime.fp8 import dequantise, quantise, quantise_block_linears
    from weights_convert import convert

    config = AnyFlowConfig(**{**AnyFlowConfig.from_preset(PRESET_1_3B).to_dict(), "num_layers": args.layers})
    print(f"1.3B widths, {args.layers} blocks; latents {LATENTS} (B, F, C, H, W), {TEXT_TOKENS} text tokens; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")

    print("1. error against the fp32 oracle (relative L2 / relative max), and ratio of L2 to plain per-row e4m3")
    for seed in args.seeds:
        rows = error_rows(config, seed)
        plain = rows["plain per-row e4m3 (oracle, fp32)"][0]
        for name, (l2, peak) in rows.items():
            print(f"  seed {seed}  {name:36s} {l2:.3e} / {peak:.3e}   ratio {l2 / plain:.3f}")

    print("\n2. bytes held (MB) and loading (fresh process: wall s, peak RSS MB)")
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        source, fp8 = os.path.join(workdir, "bf16"), os.path.join(workdir, "fp8")
        model = AnyFlowTransformer3DModel(config).eval()
        redraw_(model, 0)
        model.to_dtype("bfloat16").save_pretrained(source)
        convert(source, fp8, dtype="float8_e4m3fn", progress=None)
        loads = {
            "bf16": (source, dict(dtype="bfloat16")),
            "float8 quantised on load": (source, dict(dtype="bfloat16", weight_dtype="float8_e4m3fn")),
            "float8 checkpoint (anyflow-convert)": (fp8, dict(dtype="bfloat16")),
        }
        held = {}
        for name, (path, keywords) in loads.items():
            held[name] = held_bytes(AnyFlowTransformer3DModel.from_pretrained(path, **keywords))
            arguments = ", ".join(f"{key}={value!r}" for key, value in keywords.items())
            run = probe("from anyflow import AnyFlowTransformer3DModel as M\n"
                        f"m = M.from_pretrained({path!r}, {arguments})\n"
                        "# read every page (1024 elements: 1 to 4 KB apart), so that mapped weights count as resident\n"
                        "s = sum(float(t.reshape(-1)[::1024].float().sum()) for t in m.state_dict().values())")
            total = sum(held[name].values())
            print(f"  {name:38s} block linears {held[name]['block linears'] / 1e6:8.1f}  "
                  f"rest {held[name]['rest'] / 1e6:6.1f}"
                  f"  total {total / 1e6:8.1f} ({total / sum(held['bf16'].values()):.3f} of bf16)"
                  f"   load {run['seconds']:.2f} s, peak RSS {run['rss_mb']:.0f} MB")
        disk = {name: sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) for name, path in
                (("bf16", source), ("fp8", fp8))}
        print(f"  on disk: bf16 {disk['bf16'] / 1e6:.1f} MB, float8 {disk['fp8'] / 1e6:.1f} MB "
              f"({disk['fp8'] / disk['bf16']:.3f})")
    for preset in (PRESET_1_3B, "anyflow-wan2.1-t2v-14b"):
        bf16, fp8_bytes = whole_model_bytes(preset)
        print(f"  {preset} (all blocks): bf16 {bf16 / 1e9:.2f} GB, float8 {fp8_bytes / 1e9:.2f} GB "
              f"({fp8_bytes / bf16:.3f})")

    print(f"\n3. one forward pass (median of {args.repeats}, s)")
    model = AnyFlowTransformer3DModel(config).eval()
    redraw_(model, 0)
    for dtype in (torch.float32, torch.bfloat16):
        plain_model = copy.deepcopy(model).to_dtype(dtype)
        float8_model = quantise_block_linears(copy.deepcopy(model)).to_dtype(dtype)
        plain_s = forward_seconds(plain_model, dtype, args.repeats)
        float8_s = forward_seconds(float8_model, dtype, args.repeats)
        print(f"  {str(dtype).replace('torch.', ''):9s} plain {plain_s:.3f}   float8 weights {float8_s:.3f}   "
              f"({float8_s / plain_s:.2f}x)")
    layer = model.blocks[0].ffn.fc_in
    quantised, scale = quantise(layer.weight.detach())
    dequantising = median_seconds(lambda: dequantise(quantised, scale), args.repeats)
    for tokens in (192, 7800):
        x = torch.randn(tokens, layer.in_features)
        product = median_seconds(lambda: F.linear(x, layer.weight, layer.bias), args.repeats)
        print(f"  FFN input layer in float32, {tokens:5d} tokens: matrix product {product:.3f} s, dequantising its "
              f"weight {dequantising:.3f} s ({dequantising / product:.2f} of the product)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
