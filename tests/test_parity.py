"""Our transformer against diffusers' AnyFlowTransformer3DModel on identical random weights."""

from __future__ import annotations

import pytest
import torch

from anyflow import AnyFlowTransformer3DModel, FP32_ISLANDS
from anyflow.model.parameters import is_fp32_island
from weights_convert import rename_keys

from support import oracle_and_ours, random_inputs, small_config

pytestmark = pytest.mark.reference  # compares with the oracle: rerun by CI without SIMD kernels

FP32_BAR = 1e-5  # max|ours - oracle| <= FP32_BAR * max|oracle|

CASES = {
    "base": (dict(), dict()),
    "non_square": (dict(), dict(height=6, width=10)),
    "one_frame": (dict(), dict(frames=1)),
    "batch3_many_frames": (dict(), dict(batch=3, frames=5, height=4, width=12)),
    "delta_t_minus_r": (dict(deltatime_type="t-r"), dict(batch=2)),
    "gate_0.4": (dict(gate_value=0.4), dict(batch=2)),
    "gate_1_t_minus_r": (dict(gate_value=1.0, deltatime_type="t-r"), dict()),
    "image": (dict(image_dim=20), dict(batch=2)),
    "out_ne_in": (dict(in_channels=4, out_channels=6), dict()),
    "head_dim_8": (dict(attention_head_dim=8, num_attention_heads=3), dict()),
    "head_dim_22": (dict(attention_head_dim=22), dict()),
    "head_dim_64": (dict(attention_head_dim=64), dict(height=4, width=6)),
    "head_dim_128": (dict(attention_head_dim=128, num_attention_heads=1), dict(height=4, width=4)),
    "no_cross_attn_norm": (dict(cross_attn_norm=False), dict(batch=2)),
    "patch_111": (dict(patch_size=(1, 1, 1)), dict(height=3, width=5)),
    "patch_144": (dict(patch_size=(1, 4, 4)), dict(height=8, width=12)),
    "three_layers_eps": (dict(num_layers=3, eps=1e-5), dict(frames=2)),
}


def relative_max_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fp32_parity(oracle_cls, case, seed):
    config_overrides, input_overrides = CASES[case]
    config = small_config(**config_overrides)
    oracle, ours = oracle_and_ours(oracle_cls, config, seed)
    latents, t, r, text, image = random_inputs(config, seed=seed, **input_overrides)
    with torch.no_grad():
        ref = oracle(latents, t, r, text, image).sample
        out = ours(latents, t, r, text, image).sample
    assert out.shape == ref.shape == (*latents.shape[:2], config.out_channels, *latents.shape[3:])
    assert ref.abs().max() > 0.1, "random weights should give O(1) outputs"
    error = relative_max_error(out, ref)
    print(f"fp32 parity {case} seed {seed}: max|ours-oracle|/max|oracle| = {error:.2e}")
    assert error <= FP32_BAR


def relative_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize(
    "case,overrides",
    [
        ("base", dict()),
        ("image_t_minus_r", dict(image_dim=20, deltatime_type="t-r")),
        ("head_dim_128", dict(attention_head_dim=128, num_attention_heads=2, ffn_dim=320, num_layers=3)),
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_error_matches_oracle(oracle_cls, tmp_path, case, overrides, seed):
    """bf16 with fp32 islands: our error against the fp32 oracle is within 1.1x the oracle's own bf16 error."""
    config = small_config(**overrides)
    oracle, ours = oracle_and_ours(oracle_cls, config, seed)
    oracle.save_pretrained(tmp_path)
    oracle_bf16 = oracle_cls.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    ours.to_dtype(torch.bfloat16)

    latents, t, r, text, image = random_inputs(config, batch=2, frames=3, height=8, width=8, seed=seed)
    latents, text = latents.bfloat16(), text.bfloat16()
    image = None if image is None else image.bfloat16()
    with torch.no_grad():
        ref = oracle(latents.float(), t, r, text.float(), None if image is None else image.float()).sample
        theirs = oracle_bf16(latents, t, r, text, image).sample
        out = ours(latents, t, r, text, image).sample
    assert out.dtype == theirs.dtype == torch.bfloat16
    ours_error, oracle_error = relative_l2(out, ref), relative_l2(theirs, ref)
    print(f"bf16 {case} seed {seed}: rel L2 ours {ours_error:.3e}, oracle {oracle_error:.3e}")
    assert ours_error <= 1.1 * oracle_error


def test_to_dtype_keeps_the_oracles_fp32_islands(oracle_cls, tmp_path):
    """The parameters we keep in fp32 are exactly those diffusers keeps in fp32, under our names."""
    config = small_config(image_dim=20)
    oracle, ours = oracle_and_ours(oracle_cls, config)
    oracle.save_pretrained(tmp_path)
    oracle_bf16 = oracle_cls.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    theirs_fp32 = {k for k, v in oracle_bf16.state_dict().items() if v.dtype == torch.float32}
    ours.to_dtype(torch.bfloat16)
    ours_fp32 = {k for k, v in ours.state_dict().items() if v.dtype == torch.float32}
    to_ours = rename_keys(oracle_bf16.state_dict().keys())
    assert ours_fp32 == {to_ours[k] for k in theirs_fp32}
    assert {k for k, v in ours.state_dict().items() if v.dtype == torch.bfloat16} == set(ours.state_dict()) - ours_fp32
    assert all(is_fp32_island(k) for k in ours_fp32) and len(FP32_ISLANDS) == 5


def test_float16_runs_and_stays_close(oracle_cls):
    config = small_config()
    oracle, ours = oracle_and_ours(oracle_cls, config)
    latents, t, r, text, _ = random_inputs(config)
    with torch.no_grad():
        ref = oracle(latents, t, r, text).sample
        out = ours.to_dtype(torch.float16)(latents.half(), t, r, text.half()).sample
    assert out.dtype == torch.float16
    assert relative_l2(out, ref) < 2e-2


def test_roundtrip_through_diffusers_names(oracle_cls):
    """export_state_dict loads back into the oracle and gives the oracle's own output."""
    from weights_convert import export_state_dict

    config = small_config(image_dim=20)
    oracle, ours = oracle_and_ours(oracle_cls, config, seed=3)
    fresh = oracle_cls(**config.to_dict()).eval()
    fresh.load_state_dict(export_state_dict(ours.state_dict()), strict=True)
    latents, t, r, text, image = random_inputs(config, seed=3)
    with torch.no_grad():
        assert torch.equal(fresh(latents, t, r, text, image).sample, oracle(latents, t, r, text, image).sample)


def test_oracle_config_reads_into_ours(oracle_cls, tmp_path):
    import json

    config = small_config(image_dim=20, gate_value=0.3, deltatime_type="t-r")
    oracle_cls(**config.to_dict()).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["_class_name"] == "AnyFlowTransformer3DModel"
    assert type(config).from_dict(saved) == config
    assert isinstance(AnyFlowTransformer3DModel(config), AnyFlowTransformer3DModel)
