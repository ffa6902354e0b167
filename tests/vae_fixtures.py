"""Tiny Wan VAE checkpoints in the released layouts, for tests and for assembling tiny pipeline snapshots.

    from vae_fixtures import make_tiny_vae
    config = make_tiny_vae(snapshot / "vae")          # config.json + diffusion_pytorch_model.safetensors

The files are written with this project's name table, without diffusers; ``tests/test_vae.py``
checks that diffusers' ``AutoencoderKLWan.from_pretrained`` reads them, and that its own
``save_pretrained`` writes the same keys.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional

import torch
from safetensors.torch import save_file

from anyflow.vae.config import WanVAEConfig
from anyflow.vae.names import rename, vae_names

# Small enough for CPU, with the released structure (4 levels: 8x space, 4x time) and O(1) activations.
TINY_VAE = dict(
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
    latents_mean=[0.3, -0.2, 0.1, -0.4],
    latents_std=[1.5, 0.8, 2.0, 1.1],
)

# Every key diffusers 0.42.1's AutoencoderKLWan writes, with its defaults (the Wan2.1 VAE's).
DIFFUSERS_DEFAULTS = dict(
    base_dim=96, decoder_base_dim=None, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True], dropout=0.0, is_residual=False, in_channels=3, out_channels=3,
    patch_size=None, scale_factor_temporal=4, scale_factor_spatial=8,
)


def diffusers_vae_config(**overrides) -> dict:
    """``vae/config.json`` as diffusers writes it for :data:`TINY_VAE` with ``overrides`` (latent statistics
    of the released VAE when z_dim is 16)."""
    config = {**DIFFUSERS_DEFAULTS, **TINY_VAE, **overrides}
    if config["z_dim"] == 16 and "latents_mean" not in overrides:
        released = WanVAEConfig()
        config["latents_mean"], config["latents_std"] = list(released.latents_mean), list(released.latents_std)
    return {"_class_name": "AutoencoderKLWan", "_diffusers_version": "0.42.1", **config}


def random_vae_weights(config: WanVAEConfig, seed: int = 0, layout: str = "diffusers") -> Dict[str, torch.Tensor]:
    """Random float32 weights for ``config``, named in ``layout`` ("ours", "diffusers" or "wan"), drawn so
    activations stay O(1): convs N(0, 1/fan_in), norm scales 1 + N(0, 0.2^2), biases N(0, 0.2^2)."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for row in vae_names(config):
        if row.ours.split(".")[-2].startswith("norm"):
            value = 1 + 0.2 * torch.randn(row.shape, generator=gen)
        elif len(row.shape) > 1:
            fan_in = 1
            for n in row.shape[1:]:
                fan_in *= n
            value = torch.randn(row.shape, generator=gen) / fan_in**0.5
        else:
            value = 0.2 * torch.randn(row.shape, generator=gen)
        weights[row.name(layout)] = value
    return weights


def make_tiny_vae(folder, seed: int = 0, max_shard_bytes: Optional[int] = None, **overrides) -> dict:
    """Write a diffusers ``vae/`` folder (config.json + diffusion_pytorch_model.safetensors, or shards
    of at most ``max_shard_bytes`` with their index) holding random weights; returns the config dict."""
    raw = diffusers_vae_config(**overrides)
    config = WanVAEConfig.from_dict({k: v for k, v in raw.items() if k in WanVAEConfig.__dataclass_fields__})
    weights = random_vae_weights(config, seed)
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(raw, f, indent=2, sort_keys=True)
    if max_shard_bytes is None:
        save_file(weights, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
        return raw
    shards, current, size = [], {}, 0
    for name, tensor in weights.items():
        if current and size + tensor.numel() * 4 > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += tensor.numel() * 4
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, name))
        weight_map.update({key: name for key in shard})
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(t.numel() * 4 for t in weights.values())}, "weight_map": weight_map}, f)
    return raw


def write_wan_pth(path, diffusers_weights: Dict[str, torch.Tensor], config: WanVAEConfig) -> None:
    """Write Wan's original ``Wan2.1_VAE.pth`` layout (a bare state dict, Wan's names) of diffusers-named weights."""
    torch.save(rename(diffusers_weights, config, "diffusers", "wan"), str(path))
