"""AnyFlowConfig: diffusers config dicts in and out, presets, configs that cannot work."""

from __future__ import annotations

import pytest

from anyflow import PRESETS, AnyFlowConfig


def test_defaults_are_the_seeds():
    config = AnyFlowConfig()
    assert config.patch_size == (1, 2, 2)
    assert (config.num_attention_heads, config.attention_head_dim, config.ffn_dim, config.num_layers) == (40, 128, 13824, 40)
    assert (config.in_channels, config.out_channels, config.text_dim, config.freq_dim) == (16, 16, 4096, 256)
    assert config.cross_attn_norm and config.eps == 1e-6 and config.image_dim is None
    assert (config.rope_max_seq_len, config.gate_value, config.deltatime_type) == (1024, 0.25, "r")
    assert config.hidden_size == 5120


def test_from_dict_ignores_private_keys_and_makes_tuples():
    config = AnyFlowConfig.from_dict(
        {"_class_name": "AnyFlowTransformer3DModel", "_diffusers_version": "0.42.1", "patch_size": [1, 2, 2],
         "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30}
    )
    assert config == PRESETS["anyflow-wan2.1-t2v-1.3b"]
    assert isinstance(config.patch_size, tuple)
    assert AnyFlowConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["patch_size"] == [1, 2, 2]


def test_from_dict_names_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown AnyFlowConfig keys: \['dim', 'qk_norm'\]"):
        AnyFlowConfig.from_dict({"dim": 1536, "qk_norm": True, "_x": 1})


def test_preset_lookup():
    assert AnyFlowConfig.from_preset("anyflow-wan2.1-t2v-14b").hidden_size == 5120
    with pytest.raises(ValueError, match="unknown preset '7b'"):
        AnyFlowConfig.from_preset("7b")


def test_out_channels_none_means_in_channels():
    assert AnyFlowConfig(in_channels=8, out_channels=None).out_channels == 8


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(deltatime_type="r-t"), r"deltatime_type must be one of \('r', 't-r'\), got 'r-t'"),
        (dict(patch_size=(2, 2, 2)), r"temporal patch\) must be 1, got 2"),
        (dict(patch_size=(1, 2)), r"patch_size must be three positive ints"),
        (dict(attention_head_dim=4), r"attention_head_dim must be even and at least 6 .* got 4"),
        (dict(attention_head_dim=15), r"attention_head_dim must be even .* got 15"),
        (dict(num_layers=0), r"num_layers must be a positive int, got 0"),
        (dict(freq_dim=255), r"freq_dim must be even"),
        (dict(gate_value=float("nan")), r"gate_value must be a finite number"),
        (dict(image_dim=0), r"image_dim must be None or a positive int"),
        (dict(eps=0), r"eps must be a positive number"),
    ],
)
def test_configs_that_cannot_work_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AnyFlowConfig(**kwargs)
