"""Shared helpers: the diffusers oracle (required in CI), small configs, random weights."""

from __future__ import annotations

import os

import pytest
import torch

from anyflow import AnyFlowConfig, AnyFlowTransformer3DModel
from weights_convert import convert_state_dict

# Small enough for CPU, with the structure of the released models.
SMALL = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    text_dim=24,
    freq_dim=32,
    ffn_dim=48,
    num_layers=2,
)


def small_config(**overrides) -> AnyFlowConfig:
    return AnyFlowConfig(**{**SMALL, **overrides})


def require_oracle():
    """The diffusers oracle class. Skips locally without diffusers; fails in CI (CI=true)."""
    try:
        from diffusers import AnyFlowTransformer3DModel as Oracle
    except ImportError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the parity oracle diffusers==0.42.1 must be installed in CI: {exc}")
        pytest.skip("diffusers (the parity oracle) is not installed; pip install -e '.[test]'")
    return Oracle


@pytest.fixture
def oracle_cls():
    return require_oracle()


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter so activations are O(1) (the default init is near-identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() >= 2 and "scale_shift_table" not in name and "modulation" not in name:
                fan_in = param[0].numel()
                values = torch.randn(param.shape, generator=gen) / fan_in**0.5
            elif name.endswith("weight") and "norm" in name:
                values = 1 + 0.2 * torch.randn(param.shape, generator=gen)
            elif "scale_shift_table" in name or "modulation" in name:
                values = 0.5 * torch.randn(param.shape, generator=gen)
            else:
                values = 0.2 * torch.randn(param.shape, generator=gen)
            param.copy_(values)


def oracle_and_ours(oracle_cls, config: AnyFlowConfig, seed: int = 0):
    """The oracle with random weights and our model holding the same weights, both fp32 eval."""
    oracle = oracle_cls(**config.to_dict()).eval()
    randomize_(oracle, seed)
    ours = AnyFlowTransformer3DModel(config).eval()
    ours.load_state_dict(convert_state_dict(oracle.state_dict()), strict=True)
    return oracle, ours


def random_inputs(config: AnyFlowConfig, batch=1, frames=3, height=8, width=8, text_len=7, image_len=5, seed=0):
    """Latents, per-frame t > r, text (and image) embeddings for ``config``."""
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, frames, config.in_channels, height, width, generator=gen)
    t = 1000 * torch.rand(batch, frames, generator=gen)
    r = t * torch.rand(batch, frames, generator=gen)
    text = torch.randn(batch, text_len, config.text_dim, generator=gen)
    image = None if config.image_dim is None else torch.randn(batch, image_len, config.image_dim, generator=gen)
    return latents, t, r, text, image
