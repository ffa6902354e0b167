"""Make the tiny AnyFlow checkpoint that ships in ``anyflow/assets/tiny`` (run once; needs the test extra).

    python scripts/make_tiny_checkpoint.py [--force]

A random AnyFlow transformer with the real latent and text widths (16 channels, UMT5 width
4096) but a tiny body, saved by the oracle's ``save_pretrained`` in the Hub diffusers layout,
and beside it ``golden.safetensors``: fixed inputs, the oracle's forward output on them and the
real ``AnyFlowPipeline``'s latents for 1, 2 and 4 steps. ``anyflow demo`` checks against these
without needing diffusers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import torch

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "anyflow", "assets", "tiny")
CONFIG = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
              text_dim=4096, freq_dim=256, ffn_dim=128, num_layers=2, cross_attn_norm=True, eps=1e-6,
              rope_max_seq_len=1024, gate_value=0.25, deltatime_type="r")
STEPS = (1, 2, 4)
SHIFT = 5.0
SEED = 2605


def main() -> None:
    from diffusers import AnyFlowPipeline, AnyFlowTransformer3DModel, FlowMapEulerDiscreteScheduler
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="replace an existing checkpoint")
    args = parser.parse_args()
    if os.path.exists(ASSETS) and not args.force:
        raise SystemExit(f"{ASSETS} exists; pass --force to replace it")
    shutil.rmtree(ASSETS, ignore_errors=True)

    gen = torch.Generator().manual_seed(SEED)
    model = AnyFlowTransformer3DModel(**CONFIG).eval()
    with torch.no_grad():  # O(1) activations instead of the near-identity default init
        for name, p in model.named_parameters():
            if "scale_shift_table" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            elif name.endswith("weight") and "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(os.path.join(ASSETS, "transformer"))
    with open(os.path.join(ASSETS, "model_index.json"), "w") as f:
        json.dump({"_class_name": "AnyFlowPipeline", "_diffusers_version": "0.42.1",
                   "transformer": ["diffusers", "AnyFlowTransformer3DModel"]}, f, indent=2)

    # 9 frames of 64 x 64 pixels: 3 latent frames of 8 x 8
    noise = torch.randn(1, 3, 16, 8, 8, generator=gen)
    text = torch.randn(1, 16, 4096, generator=gen)
    t = torch.tensor([[900.0, 700.0, 500.0]])
    r = torch.tensor([[400.0, 300.0, 0.0]])
    golden = {"noise": noise, "prompt_embeds": text, "timestep": t, "r_timestep": r}
    with torch.no_grad():
        golden["forward"] = model(noise, t, r, text).sample
    pipe = AnyFlowPipeline(tokenizer=None, text_encoder=None, transformer=model, vae=None,
                           scheduler=FlowMapEulerDiscreteScheduler(shift=SHIFT))
    pipe.set_progress_bar_config(disable=True)
    for steps in STEPS:
        with torch.no_grad():
            out = pipe(prompt_embeds=text, latents=noise.transpose(1, 2), num_inference_steps=steps,
                       output_type="latent", height=64, width=64, num_frames=9).frames
        golden[f"sample_{steps}_steps"] = out.transpose(1, 2).contiguous()  # (B, F, C, H, W)
    save_file({k: v.contiguous() for k, v in golden.items()}, os.path.join(ASSETS, "golden.safetensors"),
              metadata={"shift": str(SHIFT), "steps": ",".join(map(str, STEPS)), "seed": str(SEED)})
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ASSETS) for f in fs)
    print(f"wrote {ASSETS} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
