"""Make the tiny AnyFlow checkpoints that ship in ``anyflow/assets`` (run once; needs the test extra).

    python scripts/make_tiny_checkpoint.py [--only tiny|tiny_far|tiny_snapshot] [--out DIR] [--force]

They are written as ``DIR/tiny``, ``DIR/tiny_far`` and ``DIR/tiny_snapshot`` (DIR: ``anyflow/assets``
unless ``--out`` says otherwise; it must exist). An existing one is refused unless ``--force`` replaces it.

``tiny``: a random AnyFlow transformer with the real latent and text widths (16 channels, UMT5
width 4096) but a tiny body, saved by the oracle's ``save_pretrained`` in the Hub diffusers
layout, and beside it ``golden.safetensors``: fixed inputs, the oracle's forward output on them
and the real ``AnyFlowPipeline``'s latents for 1, 2 and 4 steps.

``tiny_far``: the same for the FAR model (``AnyFlowFARTransformer3DModel``, chunks (1, 2, 2, 2)
of a 7-frame video): the oracle's rollout, and ``AnyFlowFARPipeline``'s latents for 1, 2 and 4
steps and for 2 steps from one given frame. Its latents are 16 x 32 (128 tokens a frame), so the
pipeline's cached step pads nothing (see the README on that deviation) and its outputs are the
authors' math.

``tiny_snapshot``: a complete FAR pipeline snapshot as published (``model_index.json``, ``tokenizer/``,
``text_encoder/``, ``transformer/``, ``vae/``, ``scheduler/``) with tiny random components wired
together (``tests/snapshot_fixtures.py``), so that ``anyflow demo`` makes a video end to end.

``anyflow demo`` checks against these without needing diffusers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import torch

ASSETS_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "anyflow", "assets")
FAR_SETTINGS = dict(compressed_patch_size=[1, 4, 4], full_chunk_limit=3, chunk_partition=[1, 2, 2, 2])
CONFIG = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
              text_dim=4096, freq_dim=256, ffn_dim=128, num_layers=2, cross_attn_norm=True, eps=1e-6,
              rope_max_seq_len=1024, gate_value=0.25, deltatime_type="r")
STEPS = (1, 2, 4)
SHIFT = 5.0
SEED = 2605


def randomize(model, gen) -> None:
    """O(1) activations instead of the near-identity default init."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "scale_shift_table" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            elif name.endswith("weight") and "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def save_with_golden(folder: str, model, pipeline_class: str, golden: dict) -> None:
    from safetensors.torch import save_file

    model.save_pretrained(os.path.join(folder, "transformer"))
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": pipeline_class, "_diffusers_version": "0.42.1",
                   "transformer": ["diffusers", type(model).__name__]}, f, indent=2)
    save_file({k: v.contiguous() for k, v in golden.items()}, os.path.join(folder, "golden.safetensors"),
              metadata={"shift": str(SHIFT), "steps": ",".join(map(str, STEPS)), "seed": str(SEED)})
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
    print(f"wrote {folder} ({total / 1e6:.2f} MB)")


def make_bidirectional(folder: str) -> None:
    from diffusers import AnyFlowPipeline, AnyFlowTransformer3DModel, FlowMapEulerDiscreteScheduler

    gen = torch.Generator().manual_seed(SEED)
    model = AnyFlowTransformer3DModel(**CONFIG).eval()
    randomize(model, gen)
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
    save_with_golden(folder, model, "AnyFlowPipeline", golden)


def make_far(folder: str) -> None:
    from diffusers import AnyFlowFARPipeline, AnyFlowFARTransformer3DModel, FlowMapEulerDiscreteScheduler

    gen = torch.Generator().manual_seed(SEED + 1)
    model = AnyFlowFARTransformer3DModel(**CONFIG, **FAR_SETTINGS).eval()
    randomize(model, gen)
    # 25 frames of 128 x 256 pixels: 7 latent frames of 16 x 32, chunks (1, 2, 2, 2)
    noise = torch.randn(1, 7, 16, 16, 32, generator=gen)
    text = torch.randn(1, 16, 4096, generator=gen)
    t = torch.linspace(950.0, 350.0, 7)[None]
    r = t * 0.4
    golden = {"noise": noise, "prompt_embeds": text, "timestep": t, "r_timestep": r}
    with torch.no_grad():
        golden["forward"] = model(noise, t, r, text, chunk_partition=FAR_SETTINGS["chunk_partition"]).sample
    pipe = AnyFlowFARPipeline(tokenizer=None, text_encoder=None, transformer=model, vae=None,
                              scheduler=FlowMapEulerDiscreteScheduler(shift=SHIFT))
    pipe.set_progress_bar_config(disable=True)
    image = torch.randn(1, 1, 16, 16, 32, generator=gen)
    golden["given_frame"] = image
    runs = {f"sample_{steps}_steps": (steps, None) for steps in STEPS}
    runs["sample_2_steps_from_given_frame"] = (2, image)
    for name, (steps, given) in runs.items():
        with torch.no_grad():
            out = pipe(prompt_embeds=text, latents=noise.transpose(1, 2), num_inference_steps=steps,
                       output_type="latent", height=128, width=256, num_frames=25,
                       **({} if given is None else {"video_latents": given})).frames
        golden[name] = out.transpose(1, 2).contiguous()  # (B, F, C, H, W)
    save_with_golden(folder, model, "AnyFlowFARPipeline", golden)


def make_snapshot(folder: str) -> None:
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(ASSETS_ROOT), "..", "tests"))
    from snapshot_fixtures import make_tiny_snapshot

    make_tiny_snapshot(folder, far=True, seed=SEED)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
    print(f"wrote {folder} ({total / 1e6:.2f} MB)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="make_tiny_checkpoint.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("tiny", "tiny_far", "tiny_snapshot"), help="make one of them (default: all)")
    parser.add_argument("--out", default=ASSETS_ROOT, metavar="DIR",
                        help="an existing folder to write them into (default: the package's assets)")
    parser.add_argument("--force", action="store_true", help="replace existing checkpoints")
    args = parser.parse_args(argv)
    makers = {"tiny": make_bidirectional, "tiny_far": make_far, "tiny_snapshot": make_snapshot}
    chosen = {name: os.path.join(args.out, name) for name in makers if args.only in (None, name)}
    if not os.path.isdir(args.out):
        raise SystemExit(f"{parser.prog}: error: --out {args.out}: no such folder")
    existing = [folder for folder in chosen.values() if os.path.lexists(folder)]
    if existing and not args.force:  # checked for all before anything is made
        raise SystemExit(f"{parser.prog}: error: --out {args.out}: {existing[0]} exists; pass --force to replace it")
    for name, folder in chosen.items():
        shutil.rmtree(folder, ignore_errors=True)
        makers[name](folder)


if __name__ == "__main__":
    main()
