"""The diffusers <-> anyflow name table: complete, invertible, and loud about mismatches."""

from __future__ import annotations

import pytest
import torch

from anyflow import AnyFlowTransformer3DModel
from weights_convert import KeyMismatchError, convert_state_dict, export_state_dict, rename_keys

from support import small_config

pytestmark = pytest.mark.reference  # uses the oracle: rerun by CI without SIMD kernels


def diffusers_keys(oracle_cls, **overrides):
    return oracle_cls(**small_config(**overrides).to_dict()).state_dict()


@pytest.mark.parametrize("overrides", [dict(), dict(image_dim=20), dict(cross_attn_norm=False, num_layers=3)])
def test_every_oracle_key_maps_onto_our_model_and_back(oracle_cls, overrides):
    theirs = diffusers_keys(oracle_cls, **overrides)
    ours = convert_state_dict(theirs)
    model = AnyFlowTransformer3DModel(small_config(**overrides))
    assert set(ours) == set(model.state_dict())
    model.load_state_dict(ours, strict=True)
    back = export_state_dict(ours)
    assert list(back) == list(theirs)
    assert all(back[k] is theirs[k] for k in theirs)


def test_unmapped_keys_are_listed(oracle_cls):
    theirs = dict(diffusers_keys(oracle_cls))
    theirs["rope.freqs"] = torch.zeros(1)
    theirs["blocks.0.attn1.lora_A.weight"] = torch.zeros(1)
    with pytest.raises(KeyMismatchError, match=r"unmapped keys: blocks.0.attn1.lora_A.weight, rope.freqs"):
        convert_state_dict(theirs)
    theirs = {**diffusers_keys(oracle_cls), "far_patch_embedding.weight": torch.zeros(1)}  # the FAR group, half of it
    with pytest.raises(KeyMismatchError, match=r"missing keys: far_patch_embedding.bias"):
        convert_state_dict(theirs)


def test_missing_keys_are_listed(oracle_cls):
    theirs = dict(diffusers_keys(oracle_cls))
    del theirs["blocks.1.ffn.net.2.bias"], theirs["condition_embedder.delta_embedder.linear_1.weight"]
    with pytest.raises(KeyMismatchError, match=r"missing keys: blocks.1.ffn.net.2.bias, condition_embedder.delta_embedder.linear_1.weight"):
        convert_state_dict(theirs)


def test_partial_groups_are_refused(oracle_cls):
    theirs = dict(diffusers_keys(oracle_cls, image_dim=20))
    del theirs["condition_embedder.image_embedder.norm2.bias"]
    with pytest.raises(KeyMismatchError, match=r"missing keys: condition_embedder.image_embedder.norm2.bias"):
        convert_state_dict(theirs)
    theirs = dict(diffusers_keys(oracle_cls))
    del theirs["blocks.1.norm2.weight"], theirs["blocks.1.norm2.bias"]
    with pytest.raises(KeyMismatchError, match=r"blocks \[0\] have cross_attn_norm parameters but blocks \[1\] do not"):
        convert_state_dict(theirs)


def test_gaps_in_block_indices_are_refused(oracle_cls):
    theirs = {k.replace("blocks.1.", "blocks.2."): v for k, v in diffusers_keys(oracle_cls).items()}
    with pytest.raises(KeyMismatchError, match=r"block indices are not 0..N-1: \[0, 2\]"):
        convert_state_dict(theirs)


def test_export_rejects_foreign_names_and_targets():
    with pytest.raises(KeyMismatchError, match="unmapped keys: patch_embedding.weight"):
        export_state_dict({"patch_embedding.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="target must be 'diffusers'"):
        export_state_dict({}, target="wan")
    with pytest.raises(ValueError, match="direction must be"):
        rename_keys([], "sideways")
