"""Helpers the tests share: the diffusers oracle (required in CI), small configs, random weights, inputs, and
checkpoints in the layouts of the released snapshots. Import them from here (``from support import ...``);
``conftest.py`` keeps only pytest's hooks and fixtures.
"""

from __future__ import annotations

import copy
import importlib
import json
import os

import pytest
import torch
from safetensors.torch import save_file

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


FP32_BAR = 1e-5  # max|ours - reference| <= FP32_BAR * max|reference|: float32 rounding, summed in another order


def assert_same_run(ran: torch.Tensor, here: torch.Tensor) -> None:
    """A command's output against the same call made in the test: equal dtype and shape, values within the
    float32 bar (one ulp of the largest value in half precision). Not bit for bit: a command computes in its
    worker thread (anyflow.runtime.interrupts), and two threads of one process may split a reduction otherwise
    (seen on a 2-core AMD EPYC: 1.4e-6 on O(1) latents; none with OMP_NUM_THREADS=1)."""
    assert ran.dtype == here.dtype and ran.shape == here.shape, (ran.dtype, here.dtype, ran.shape, here.shape)
    bar = FP32_BAR if ran.dtype == torch.float32 else torch.finfo(ran.dtype).eps
    error = (ran.float() - here.float()).abs().max() / here.float().abs().max()
    assert error <= bar, f"max error {error:.2e} of max|reference|, above the bar {bar:.0e}"


def small_config(**overrides) -> AnyFlowConfig:
    return AnyFlowConfig(**{**SMALL, **overrides})


REFERENCE_TESTS = set()  # node ids of the collected tests marked ``reference`` (conftest.py fills it)


def require_oracle(name: str = "AnyFlowTransformer3DModel", package: str = "diffusers"):
    """A class of the oracle (diffusers, or peft for the LoRA tests). Skips locally without it;
    fails in CI (CI=true).

    Only tests marked ``reference`` may use it (see the module docstring).
    """
    current = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    if current and current not in REFERENCE_TESTS:
        pytest.fail(f"{current} uses the oracle but is not marked 'reference' (CI reruns those without SIMD kernels)")
    try:
        return getattr(importlib.import_module(package), name)
    except ImportError as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the parity oracle {package} (pinned in setup.cfg's test extra) must be installed in CI: {exc}")
        pytest.skip(f"{package} (a parity oracle) is not installed; pip install -e '.[test]'")


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


# ---- checkpoints in the layout of the released Hub snapshots ------------------------------------
# The released snapshots (nvidia/AnyFlow-*-Diffusers) were written by the authors' training class,
# FAR_Wan_Transformer3DModel, from diffusers 0.35.1 (NVlabs/AnyFlow,
# scripts/convert_model/convert_anyflow_to_diffusers.py): its config keys, bfloat16 weights in shards,
# and a model_index.json naming the authors' modules.

RELEASED_FAR_SETTINGS = dict(chunk_partition=[1, 3, 3, 3, 3, 3, 3, 2], compressed_patch_size=[1, 4, 4], full_chunk_limit=3)


def authors_config(config: AnyFlowConfig, far: bool = False) -> dict:
    """The transformer/config.json the authors' class writes for ``config``."""
    return {
        "_class_name": "FAR_Wan_Transformer3DModel",
        "_diffusers_version": "0.35.1",
        **config.to_dict(),
        "added_kv_proj_dim": None,
        "chunk_partition": RELEASED_FAR_SETTINGS["chunk_partition"] if far else None,
        "compressed_patch_size": RELEASED_FAR_SETTINGS["compressed_patch_size"],
        "full_chunk_limit": RELEASED_FAR_SETTINGS["full_chunk_limit"],
        "init_far_model": far,
        "init_flowmap_model": True,
        "qk_norm": "rms_norm_across_heads",
    }


def authors_model_index(far: bool = False) -> dict:
    return {
        "_class_name": "FARWanAnyFlowPipeline" if far else "WanAnyFlowPipeline",
        "_diffusers_version": "0.35.1",
        "scheduler": ["far.schedulers.scheduling_flowmap_euler_discrete", "FlowMapDiscreteScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["far.models.transformer_far_wan_model", "FAR_Wan_Transformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }


def write_published_snapshot(root, oracle, config: AnyFlowConfig, far: bool = False, max_shard_size: str = "100KB"):
    """Write ``oracle`` (a diffusers model, left as it is) as a released snapshot: bf16 shards, the
    authors' configs, and the other components' folders beside the transformer."""
    copy.deepcopy(oracle).to(torch.bfloat16).save_pretrained(root / "transformer", max_shard_size=max_shard_size)
    (root / "transformer" / "config.json").write_text(json.dumps(authors_config(config, far), indent=2, sort_keys=True))
    (root / "model_index.json").write_text(json.dumps(authors_model_index(far), indent=2, sort_keys=True))
    components = {"scheduler": ("scheduler_config.json", {"_class_name": "FlowMapDiscreteScheduler", "shift": 5}),
                  "text_encoder": ("config.json", {"architectures": ["UMT5EncoderModel"]}),
                  "tokenizer": ("tokenizer_config.json", {"tokenizer_class": "T5Tokenizer"}),
                  "vae": ("config.json", {"_class_name": "AutoencoderKLWan", "_diffusers_version": "0.35.1"})}
    for folder, (name, content) in components.items():
        (root / folder).mkdir()
        (root / folder / name).write_text(json.dumps(content))
    save_file({"decoder.conv_in.weight": torch.zeros(4, 4)}, str(root / "vae" / "diffusion_pytorch_model.safetensors"))
    return root
