"""Checkpoints exactly as the released Hub snapshots are published (the authors' configs, bf16 shards;
bidirectional and FAR), and every other config.json a user holds: read, set aside, or refused by name."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from anyflow import AnyFlowConfig, AnyFlowFARConfig, AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel
from anyflow.cli import main as anyflow_main
from weights_convert import CheckpointError, convert, open_checkpoint
from weights_convert.cli import main as convert_main

from support import (
    RELEASED_FAR_SETTINGS, authors_config, random_inputs, randomize_, require_oracle, small_config,
    write_published_snapshot,
)

pytestmark = pytest.mark.reference  # compares with the oracle: rerun by CI without SIMD kernels

CONFIG = small_config(num_attention_heads=2, attention_head_dim=128, ffn_dim=64)
FP32_BAR = 1e-5
SET_ASIDE = ('added_kv_proj_dim=null, chunk_partition=null, compressed_patch_size=[1, 4, 4], full_chunk_limit=3, '
             'init_far_model=false, init_flowmap_model=true, qk_norm="rms_norm_across_heads"')


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """An AnyFlow-Wan2.1-T2V snapshot as published, and the oracle that wrote its weights (rounded to bf16)."""
    Oracle = require_oracle()
    oracle = Oracle(**CONFIG.to_dict()).eval()
    randomize_(oracle, 21)
    root = write_published_snapshot(tmp_path_factory.mktemp("hub") / "AnyFlow-Wan2.1-T2V-Diffusers", oracle, CONFIG)
    return root


@pytest.fixture(scope="module")
def released_far(tmp_path_factory):
    """An AnyFlow-FAR-Wan2.1 snapshot as published (weights from diffusers' FAR class)."""
    FarOracle = require_oracle("AnyFlowFARTransformer3DModel")
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in RELEASED_FAR_SETTINGS.items()}
    far = FarOracle(**CONFIG.to_dict(), **settings).eval()
    randomize_(far, 22)
    root = write_published_snapshot(tmp_path_factory.mktemp("hub") / "AnyFlow-FAR-Wan2.1-Diffusers", far, CONFIG, far=True)
    return root


def velocity(model, seed=0):
    latents, t, r, text, _ = random_inputs(CONFIG, batch=2, frames=3, seed=seed)
    with torch.no_grad():
        return model(latents.to(model.dtype), t, r, text.to(model.dtype)).sample.float()


def snapshot_bytes(root):
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(root) for f in files}


def test_the_fixture_is_what_the_authors_class_writes(released):
    config = json.loads((released / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "FAR_Wan_Transformer3DModel" and config["_diffusers_version"] == "0.35.1"
    assert config["init_flowmap_model"] is True and config["init_far_model"] is False and config["chunk_partition"] is None
    index = json.loads((released / "model_index.json").read_text())
    assert index["transformer"] == ["far.models.transformer_far_wan_model", "FAR_Wan_Transformer3DModel"]
    shards = sorted(f for f in os.listdir(released / "transformer") if f.endswith(".safetensors"))
    assert len(shards) > 1 and os.path.isfile(released / "transformer" / "diffusion_pytorch_model.safetensors.index.json")
    checkpoint = open_checkpoint(str(released))
    assert {t.dtype for t in checkpoint.tensors.values()} == {"BF16"}  # the release casts everything, islands too


@pytest.mark.slow
def test_released_t2v_snapshot_loads_and_equals_the_oracle(released):
    """Ours and diffusers' AnyFlowTransformer3DModel, both loading the published snapshot, agree."""
    Oracle = require_oracle()
    oracle = Oracle.from_pretrained(str(released), subfolder="transformer", torch_dtype=torch.float32).eval()
    ours = AnyFlowTransformer3DModel.from_pretrained(str(released), dtype="float32")
    assert ours.config == CONFIG
    expected = velocity(oracle)
    assert (velocity(ours) - expected).abs().max() <= FP32_BAR * expected.abs().max()

    kept = AnyFlowTransformer3DModel.from_pretrained(str(released))  # the checkpoint's dtype: bf16, islands fp32
    assert kept.dtype == torch.bfloat16 and kept.head.modulation.dtype == torch.float32
    oracle_bf16 = Oracle.from_pretrained(str(released), subfolder="transformer", torch_dtype=torch.bfloat16).eval()
    ours_error = ((velocity(kept) - expected).norm() / expected.norm()).item()
    oracle_error = ((velocity(oracle_bf16) - expected).norm() / expected.norm()).item()
    assert ours_error <= 1.1 * oracle_error


def test_released_t2v_snapshot_converts_lists_the_keys_set_aside_and_is_untouched(released, tmp_path, capsys):
    before = snapshot_bytes(released)
    assert convert_main([str(released), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert f"config keys set aside (they do not change this model): {SET_ASIDE}\n" in printed
    converted = AnyFlowTransformer3DModel.from_pretrained(str(tmp_path / "out"))
    assert torch.equal(velocity(converted), velocity(AnyFlowTransformer3DModel.from_pretrained(str(released))))
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["_class_name"] == "AnyFlowTransformer3DModel" and "qk_norm" not in written
    assert snapshot_bytes(released) == before

    assert anyflow_main(["inspect", str(released)]) == 0
    printed = capsys.readouterr().out
    assert "format: AnyFlow, diffusers layout (sharded safetensors" in printed
    assert f"config keys set aside (they do not change this model): {SET_ASIDE}\n" in printed


def test_released_config_serves_as_config_for_an_authors_pt(released, tmp_path):
    """The authors' training .pt (an 'ema' state dict) converted with the published config.json."""
    reference = AnyFlowTransformer3DModel.from_pretrained(str(released))
    Oracle = require_oracle()
    state = Oracle.from_pretrained(str(released), subfolder="transformer", torch_dtype=torch.bfloat16).state_dict()
    torch.save({"ema": state, "step": 4000}, tmp_path / "anyflow.pt")
    checkpoint = open_checkpoint(str(tmp_path / "anyflow.pt"), config_path=str(released / "transformer" / "config.json"))
    assert checkpoint.config == CONFIG and checkpoint.config_set_aside["qk_norm"] == "rms_norm_across_heads"
    convert(str(tmp_path / "anyflow.pt"), str(tmp_path / "out"), config_path=str(released / "transformer" / "config.json"),
            progress=None)
    assert torch.equal(velocity(AnyFlowTransformer3DModel.from_pretrained(str(tmp_path / "out"))), velocity(reference))


@pytest.mark.slow
def test_released_far_snapshot_loads_converts_and_equals_the_oracle(released_far, tmp_path, capsys):
    FarOracle = require_oracle("AnyFlowFARTransformer3DModel")
    oracle = FarOracle.from_pretrained(str(released_far), subfolder="transformer", torch_dtype=torch.float32).eval()
    ours = AnyFlowFARTransformer3DModel.from_pretrained(str(released_far), dtype="float32")
    assert ours.config == AnyFlowFARConfig(**CONFIG.to_dict())  # the released chunking, limit and compressed patch
    latents, t, r, text, _ = random_inputs(CONFIG, batch=1, frames=21, seed=3)
    with torch.no_grad():
        expected = oracle(latents, t, r, text, chunk_partition=list(RELEASED_FAR_SETTINGS["chunk_partition"])).sample
        assert (ours(latents, t, r, text).sample - expected).abs().max() <= FP32_BAR * expected.abs().max()

    assert convert_main([str(released_far), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "FAR (frame-autoregressive) model" in printed
    assert ('config keys set aside (they do not change this model): added_kv_proj_dim=null, init_far_model=true, '
            'init_flowmap_model=true, qk_norm="rms_norm_across_heads"') in printed
    converted = AnyFlowFARTransformer3DModel.from_pretrained(str(tmp_path / "out"), dtype="float32")
    with torch.no_grad():
        assert torch.equal(converted(latents, t, r, text).sample, ours(latents, t, r, text).sample)
    with pytest.raises(ValueError, match="an AnyFlow FAR .* checkpoint; load it with AnyFlowFARTransformer3DModel"):
        AnyFlowTransformer3DModel.from_pretrained(str(released_far))
    assert anyflow_main(["inspect", str(released_far)]) == 0
    printed = capsys.readouterr().out
    assert "format: AnyFlow, diffusers layout, FAR (frame-autoregressive) model (sharded safetensors" in printed
    assert "'chunk_partition': [1, 3, 3, 3, 3, 3, 3, 2]" in printed


REFUSED = {
    "qk_norm per head": ({"qk_norm": "rms_norm"}, r'qk_norm="rms_norm" is refused: this model normalises q and k '
                                                 r"with one RMSNorm across all heads"),
    "no qk_norm": ({"qk_norm": None}, r"qk_norm=null is refused"),
    "image kv projections": ({"added_kv_proj_dim": 5120}, r"added_kv_proj_dim=5120 is refused: .*image-to-video"),
    "no flow map": ({"init_flowmap_model": False}, r"init_flowmap_model=false is refused: .*plain Wan2.1 model"),
    "flow map as 1": ({"init_flowmap_model": 1}, r"init_flowmap_model=1 is refused"),
    "image position embedding": ({"pos_embed_seq_len": 514}, r"pos_embed_seq_len=514 is refused"),
    "far switch": ({"init_far_model": True}, r"describes the FAR model, but the weights have no far_patch_embedding"),
    "far class": ({"_class_name": "AnyFlowFARTransformer3DModel"},
                  r"describes the FAR model, but the weights have no far_patch_embedding"),
    "other class": ({"_class_name": "WanVACETransformer3DModel"},
                    r'_class_name="WanVACETransformer3DModel" is not a config this model reads'),
    "typo": ({"num_layer": 30}, r"unknown config keys \['num_layer'\]: not written by .* \(a typo\?\)"),
    "bad value of ours": ({"deltatime_type": "r-t"}, r"deltatime_type must be one of"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_config_values_that_change_the_math_are_refused_by_key_and_value(released, tmp_path, capsys, case):
    change, message = REFUSED[case]
    snapshot = tmp_path / "snapshot"
    shutil.copytree(released, snapshot)
    config_path = snapshot / "transformer" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
    with pytest.raises(CheckpointError, match=rf"{config_path}: {message}"):
        open_checkpoint(str(snapshot))
    assert convert_main([str(snapshot), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(config_path) in err[0] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("writer", ["AnyFlowTransformer3DModel", "WanTransformer3DModel"])
def test_configs_diffusers_writes_are_read(tmp_path, writer):
    """What diffusers' own save_pretrained writes today (the Wan base as an AnyFlow warm start)."""
    Writer = require_oracle(writer)
    config = CONFIG.to_dict()
    if writer == "WanTransformer3DModel":
        config = {k: v for k, v in config.items() if k not in ("gate_value", "deltatime_type")}
    Writer(**config).save_pretrained(tmp_path / "model")
    checkpoint = open_checkpoint(str(tmp_path / "model"))
    assert checkpoint.config == CONFIG
    expected = {} if writer == "AnyFlowTransformer3DModel" else {
        "added_kv_proj_dim": None, "pos_embed_seq_len": None, "qk_norm": "rms_norm_across_heads"}
    assert checkpoint.config_set_aside == expected


def test_a_config_written_by_hand_is_strict_in_python():
    with pytest.raises(ValueError, match=r"unknown AnyFlowConfig keys: \['qk_norm'\]"):
        AnyFlowConfig.from_dict({**CONFIG.to_dict(), "qk_norm": "rms_norm_across_heads"})
    authors = authors_config(CONFIG)
    with pytest.raises(ValueError, match=r"weights_convert.configs.read_config"):
        AnyFlowConfig.from_dict(authors)


# ---- the tiny checkpoints the package ships, in the Hub layout (scripts/make_tiny_checkpoint.py) ------------

def load_script(name: str):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_make_tiny_checkpoint_writes_where_told_and_replaces_only_with_force(tmp_path):
    from anyflow.cli.demo import TINY_CHECKPOINT
    from weights_convert.safetensors_io import read_header

    require_oracle("AnyFlowPipeline")
    script = load_script("make_tiny_checkpoint")
    script.main(["--only", "tiny", "--out", str(tmp_path)])
    made = tmp_path / "tiny"
    assert sorted(os.listdir(made)) == ["golden.safetensors", "model_index.json", "transformer"]
    assert open_checkpoint(str(made)).config == open_checkpoint(TINY_CHECKPOINT).config
    shipped = {k: r.read() for k, r in read_header(os.path.join(TINY_CHECKPOINT, "golden.safetensors"))[0].items()}
    for name, record in read_header(str(made / "golden.safetensors"))[0].items():
        torch.testing.assert_close(record.read(), shipped[name], rtol=1e-5, atol=1e-5 * shipped[name].abs().max().item())
    (made / "mark").write_text("kept")
    with pytest.raises(SystemExit) as caught:
        script.main(["--out", str(tmp_path)])
    assert str(caught.value) == f"make_tiny_checkpoint.py: error: --out {tmp_path}: {made} exists; pass --force to replace it"
    assert (made / "mark").exists() and not (tmp_path / "tiny_far").exists()
    with pytest.raises(SystemExit) as caught:
        script.main(["--out", str(tmp_path / "nowhere")])
    assert str(caught.value) == f"make_tiny_checkpoint.py: error: --out {tmp_path / 'nowhere'}: no such folder"
    script.main(["--only", "tiny", "--out", str(tmp_path), "--force"])
    assert not (made / "mark").exists() and os.path.isfile(made / "golden.safetensors")
    assert os.path.samefile(script.ASSETS_ROOT, os.path.dirname(TINY_CHECKPOINT))  # the default --out

