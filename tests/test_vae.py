"""The Wan2.1 VAE (anyflow.vae): diffusers parity, streaming, tiling, every checkpoint layout, bad inputs.

Parity bar: fp32 within 1e-5 * max|diffusers| (seen: encode 1e-6, decode 3.6e-6; our convolutions
sum in another order: one 2D convolution of stacked frames, 2x2 phase kernels for the upsampling).
The decoded video is clamped to [-1, 1] as diffusers does; the fixtures' weights keep ~90% of it
inside. Streaming is bit-exact: a chunk pushed alone runs the same kernels on the same frames as the
whole video.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from anyflow.vae import WanVAE, WanVAEConfig
from weights_convert.safetensors_io import CheckpointError
from anyflow.vae.checkpoint import read_vae_config
from anyflow.vae.names import rename, vae_names

from support import require_oracle
from vae_fixtures import TINY_VAE, diffusers_vae_config, make_tiny_vae, random_vae_weights, write_wan_pth

BAR = 1e-5
# name -> overrides of TINY_VAE: the released structure (z 16, 2 blocks per level), a wider decoder,
# time halved once (2 frames per latent frame)
CONFIGS = {
    "tiny": {},
    "released-shape": dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2),
    "decoder-wider": dict(decoder_base_dim=12),
    "time-stride-2": dict(temperal_downsample=[False, False, True], scale_factor_temporal=2),
}


def our_config(raw: dict) -> WanVAEConfig:
    return read_vae_config(raw, "test").config


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    make_tiny_vae(folder)
    return folder


def oracle(folder):
    return require_oracle("AutoencoderKLWan").from_pretrained(str(folder)).eval()


def oracle_encode(vae, video):
    """The AnyFlow pipelines' encode_video, from the VAE call on: normalised posterior mean (B, C, F, h, w)."""
    with torch.no_grad():
        mu = torch.chunk(vae._encode(video), 2, dim=1)[0]
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    return ((mu.float() - mean) * inv_std).to(mu)


def oracle_decode(vae, latents):
    """The AnyFlow pipelines' decode: denormalise, then vae.decode -> (B, 3, T, H, W) in [-1, 1]."""
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1)
    with torch.no_grad():
        return vae.decode(latents / inv_std + mean, return_dict=False)[0]


def video(frames, height, width, batch=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, height, width, generator=gen) * 2 - 1


def latents(config: WanVAEConfig, frames, h, w, batch=1, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, config.z_dim, frames, h, w, generator=gen)


def assert_close(ours, ref):
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert err <= BAR * scale, f"max |ours - diffusers| = {err:.3g} > {BAR} * {scale:.3g}"


# ---- parity with diffusers ----------------------------------------------------------------------


@pytest.mark.reference
@pytest.mark.parametrize("frames", [1, 5, 9, 13])
@pytest.mark.parametrize("size", [(16, 16), (32, 48)])
def test_encode_and_decode_match_diffusers(tiny_folder, frames, size):
    ref, ours = oracle(tiny_folder), WanVAE.from_pretrained(str(tiny_folder))
    x = video(frames, *size)
    assert_close(ours.encode(x), oracle_encode(ref, x))
    z = latents(ours.config, (frames - 1) // 4 + 1, size[0] // 8, size[1] // 8)
    decoded = ours.decode(z)
    assert decoded.shape == (1, 3, frames, *size)
    assert_close(decoded, oracle_decode(ref, z))


@pytest.mark.slow
@pytest.mark.reference
@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "tiny"])
def test_configs_match_diffusers(tmp_path, name):
    raw = make_tiny_vae(tmp_path, seed=3, **CONFIGS[name])
    ref, ours = oracle(tmp_path), WanVAE.from_pretrained(str(tmp_path))
    x = video(9, 16, 32, batch=2)
    assert_close(ours.encode(x), oracle_encode(ref, x))
    z = latents(ours.config, 3, 2, 4, batch=2)
    assert_close(ours.decode(z), oracle_decode(ref, z))
    assert ours.config == our_config(raw)


@pytest.mark.slow
@pytest.mark.reference
def test_tiled_decode_matches_diffusers_tiling(tiny_folder):
    ref, ours = oracle(tiny_folder), WanVAE.from_pretrained(str(tiny_folder))
    ref.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24,
                      tile_sample_stride_width=24)  # 4 x 4 latent tiles every 3: 3 x 4 tiles, ragged at the edges
    z = latents(ours.config, 3, 8, 12)
    assert_close(ours.decode(z, tile=(32, 24)), oracle_decode(ref, z))
    ref.enable_tiling(tile_sample_min_height=96, tile_sample_min_width=96, tile_sample_stride_height=64,
                      tile_sample_stride_width=64)  # the frame fits one tile: decoded whole, as diffusers does
    assert_close(ours.decode(z, tile=(96, 64)), oracle_decode(ref, z))
    assert torch.equal(ours.decode(z, tile=(96, 64)), ours.decode(z))


@pytest.mark.slow
def test_tiled_decode_is_close_to_untiled_on_smooth_latents(tiny_folder):
    """Default tiles (256 px every 192) on a 288 x 288 frame of near-constant latents. With random
    weights the seams are wide: the middle attention is global over the frame and tiles see zeros past
    their edges. Seen: mean 0.008, max 0.2 (the output's rms is ~0.5)."""
    ours = WanVAE.from_pretrained(str(tiny_folder))
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(1, 4, 1, 1, 1, generator=gen)
    z = base + 0.05 * F.interpolate(torch.randn(1, 4, 1, 2, 2, generator=gen), size=(1, 36, 36), mode="trilinear",
                                    align_corners=True)
    gap = (ours.decode(z, tile=True) - ours.decode(z)).abs()
    assert gap.mean() < 0.03 and gap.max() < 0.35, (gap.mean().item(), gap.max().item())


# ---- streaming ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_streamed_decode_is_the_whole_decode_bit_for_bit(tiny_folder):
    ours = WanVAE.from_pretrained(str(tiny_folder))
    z = latents(ours.config, 6, 2, 3)
    whole = ours.decode(z)
    chunks = list(ours.decode_chunks(z))
    assert [c.shape[2] for c in chunks] == [1, 4, 4, 4, 4, 4]
    assert torch.equal(torch.cat(chunks, dim=2), whole)
    stream = ours.decoder_stream(frames_first=True)
    pieces = [stream.push(z[:, :, a:b].transpose(1, 2)) for a, b in ((0, 2), (2, 5), (5, 6))]  # FAR-like chunks
    assert [p.shape[2] for p in pieces] == [5, 12, 4]
    assert torch.equal(torch.cat(pieces, dim=2), whole)
    assert torch.equal(ours.decode(z.transpose(1, 2), frames_first=True), whole)


@pytest.mark.slow
def test_streamed_tiled_decode_is_the_whole_tiled_decode(tiny_folder):
    ours = WanVAE.from_pretrained(str(tiny_folder))
    z = latents(ours.config, 3, 8, 12)
    whole = ours.decode(z, tile=(32, 24))
    assert torch.equal(torch.cat(list(ours.decode_chunks(z, tile=(32, 24))), dim=2), whole)


@pytest.mark.slow
def test_encode_is_causal_and_frames_first_is_a_transpose(tiny_folder):
    ours = WanVAE.from_pretrained(str(tiny_folder))
    x = video(9, 16, 16)
    full = ours.encode(x)
    assert torch.equal(ours.encode(x[:, :, :5]), full[:, :, :2])  # later frames never change earlier latents
    assert torch.equal(ours.encode(x, frames_first=True), full.transpose(1, 2))


def test_normalisation_round_trips(tiny_folder):
    ours = WanVAE.from_pretrained(str(tiny_folder))
    mu = torch.randn(2, 4, 3, 2, 2)
    back = ours.denormalize(ours.normalize(mu))
    assert (back - mu).abs().max() < 1e-6
    mean, std = torch.tensor(TINY_VAE["latents_mean"]), torch.tensor(TINY_VAE["latents_std"])
    assert torch.allclose(ours.normalize(mu), (mu - mean.view(-1, 1, 1, 1)) / std.view(-1, 1, 1, 1), atol=1e-6)


def test_bfloat16_decode_is_close_to_float32(tiny_folder):
    fp32, bf16 = WanVAE.from_pretrained(str(tiny_folder)), WanVAE.from_pretrained(str(tiny_folder), dtype="bfloat16")
    z = latents(fp32.config, 2, 2, 2)
    out = bf16.decode(z)
    assert out.dtype == torch.bfloat16 and bf16.encoder.conv_in.weight.dtype == torch.bfloat16
    assert (out.float() - fp32.decode(z)).abs().max() < 0.1


# ---- checkpoint layouts -------------------------------------------------------------------------


@pytest.mark.reference
def test_fixture_is_what_diffusers_writes(tmp_path):
    """make_tiny_vae writes the keys, shapes and config keys diffusers' save_pretrained writes."""
    cls = require_oracle("AutoencoderKLWan")
    raw = diffusers_vae_config()
    theirs = cls(**{k: v for k, v in raw.items() if not k.startswith("_")})
    theirs.save_pretrained(str(tmp_path / "theirs"))
    make_tiny_vae(tmp_path / "ours")
    written = json.loads((tmp_path / "theirs" / "config.json").read_text())
    assert set(written) == set(raw)
    assert {k: v for k, v in written.items() if not k.startswith("_")} == {k: v for k, v in raw.items() if not k.startswith("_")}
    ours = random_vae_weights(our_config(raw))
    assert {k: tuple(v.shape) for k, v in theirs.state_dict().items()} == {k: tuple(v.shape) for k, v in ours.items()}
    loaded, info = cls.from_pretrained(str(tmp_path / "ours"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


@pytest.mark.reference
def test_wan_names_are_what_diffusers_converts_from():
    """diffusers' own converter of the original Wan2.1 VAE (single-file loading) takes our Wan names to
    our diffusers names, for the released structure."""
    convert = require_oracle("convert_wan_vae_to_diffusers", "diffusers.loaders.single_file_utils")
    rows = vae_names(WanVAEConfig(base_dim=8))
    assert convert({row.wan: row.diffusers for row in rows}) == {row.diffusers: row.diffusers for row in rows}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_name_table_is_our_state_dict(name):
    config = our_config(diffusers_vae_config(**CONFIGS[name]))
    model = WanVAE(config)
    assert [(r.ours, r.shape) for r in vae_names(config)] == [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    weights = random_vae_weights(config, layout="ours")
    there = rename(rename(weights, config, "ours", "wan"), config, "wan", "diffusers")
    assert rename(there, config, "diffusers", "ours") == weights


def test_original_pth_loads_as_the_diffusers_folder(tmp_path, tiny_folder):
    from safetensors.torch import load_file

    config = WanVAE.from_pretrained(str(tiny_folder)).config
    write_wan_pth(tmp_path / "Wan2.1_VAE.pth", load_file(str(tiny_folder / "diffusion_pytorch_model.safetensors")), config)
    keys = set(torch.load(str(tmp_path / "Wan2.1_VAE.pth"), weights_only=True))
    assert {"encoder.conv1.weight", "encoder.downsamples.0.residual.2.weight", "encoder.middle.1.to_qkv.weight",
            "encoder.head.0.gamma", "conv1.weight", "conv2.bias", "decoder.upsamples.2.resample.1.weight",
            "decoder.upsamples.2.time_conv.weight", "decoder.head.2.weight"} <= keys
    from_pth = WanVAE.from_pretrained(str(tmp_path / "Wan2.1_VAE.pth"), config=config)
    from_folder = WanVAE.from_pretrained(str(tiny_folder))
    z = latents(config, 2, 2, 2)
    assert torch.equal(from_pth.decode(z), from_folder.decode(z))
    x = video(5, 16, 16)
    assert torch.equal(from_pth.encode(x), from_folder.encode(x))


@pytest.mark.slow
def test_sharded_folder_and_snapshot_root_load(tmp_path, tiny_folder):
    make_tiny_vae(tmp_path / "snapshot" / "vae", max_shard_bytes=20_000)
    (tmp_path / "snapshot" / "model_index.json").write_text(json.dumps({"_class_name": "AnyFlowFARPipeline"}))
    assert len(os.listdir(tmp_path / "snapshot" / "vae")) > 3
    sharded, single = WanVAE.from_pretrained(str(tmp_path / "snapshot")), WanVAE.from_pretrained(str(tiny_folder))
    z = latents(single.config, 2, 2, 2)
    assert torch.equal(sharded.decode(z), single.decode(z))


def test_vae_configs_and_names_read_without_the_model():
    code = ("import sys, anyflow.vae.names, anyflow.vae.checkpoint; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert not any(m.startswith(('anyflow.vae.model', 'anyflow.vae.layers')) for m in sys.modules)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


# ---- refusals: one line each, naming what is wrong -----------------------------------------------


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_missing_unexpected_and_misshapen_keys_are_refused(tmp_path, tiny_folder):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tiny_folder / "diffusion_pytorch_model.safetensors"))
    cases = {
        "missing": ({k: v for k, v in weights.items() if k != "decoder.up_blocks.1.resnets.0.conv2.weight"},
                    r"missing key 'decoder.up_blocks.1.resnets.0.conv2.weight'"),
        "unexpected": ({**weights, "decoder.up_blocks.0.attentions.0.proj.weight": torch.zeros(2, 2)},
                       r"unexpected key 'decoder.up_blocks.0.attentions.0.proj.weight' \[2, 2\]"),
        "misshapen": ({**weights, "post_quant_conv.weight": torch.zeros(4, 4, 1, 1)},
                      r"'post_quant_conv.weight' has shape \[4, 4, 1, 1\], the config implies \[4, 4, 1, 1, 1\]"),
    }
    for name, (tensors, pattern) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text((tiny_folder / "config.json").read_text())
        save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
        with pytest.raises(CheckpointError, match=pattern) as exc:
            WanVAE.from_pretrained(str(folder))
        assert "diffusion_pytorch_model.safetensors" in one_line(exc)
    with pytest.raises(CheckpointError, match=r"nowhere: no such file or directory") as exc:
        WanVAE.from_pretrained(str(tmp_path / "nowhere"))
    one_line(exc)


def test_pth_without_config_is_checked_against_the_released_vae(tmp_path):
    narrow = our_config(diffusers_vae_config(**CONFIGS["released-shape"]))  # the released structure, base_dim 8
    write_wan_pth(tmp_path / "Wan2.1_VAE.pth", random_vae_weights(narrow), narrow)
    with pytest.raises(CheckpointError, match=r"Wan2.1_VAE.pth: 'encoder.conv1.weight' has shape \[8, 3, 3, 3, 3\], "
                                              r"the config implies \[96, 3, 3, 3, 3\] \(base_dim=96") as exc:
        WanVAE.from_pretrained(str(tmp_path / "Wan2.1_VAE.pth"))
    one_line(exc)
    tiny = our_config(diffusers_vae_config())  # one residual block per level: other names
    write_wan_pth(tmp_path / "tiny.pth", random_vae_weights(tiny), tiny)
    with pytest.raises(CheckpointError, match=r"tiny.pth: unexpected key 'decoder.upsamples.2.resample.1.bias' \[8\]: "
                                              r"not a parameter of the Wan VAE with base_dim=96") as exc:
        WanVAE.from_pretrained(str(tmp_path / "tiny.pth"))
    one_line(exc)
    assert WanVAE.from_pretrained(str(tmp_path / "tiny.pth"), config=tiny).config == tiny


def test_pth_that_needs_pickled_code_is_refused(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1), "when": __import__("datetime").date(2025, 1, 1)},
               str(tmp_path / "Wan2.1_VAE.pth"))
    with pytest.raises(CheckpointError, match=r"Wan2.1_VAE.pth: refused: loading it would execute pickled code") as exc:
        WanVAE.from_pretrained(str(tmp_path / "Wan2.1_VAE.pth"))
    one_line(exc)


@pytest.mark.parametrize("key, value, pattern", [
    ("is_residual", True, r"is_residual=true is refused: a Wan2.2 VAE"),
    ("patch_size", 2, r"patch_size=2 is refused: a Wan2.2 VAE"),
    ("attn_scales", [0.5], r"attn_scales=\[0.5\] is refused"),
    ("clip_output", False, r"clip_output=false is refused"),
    ("scale_factor_spatial", 16, r"scale_factor_spatial=16 disagrees with the layers, which give 8"),
    ("temperal_downsampel", [False, True, True], r"unknown config keys \['temperal_downsampel'\]"),
    ("_class_name", "AutoencoderKLWan2", r"_class_name=\"AutoencoderKLWan2\""),
    ("latents_std", [1.0, 2.0], r"latents_std must be 4 numbers"),
    ("temperal_downsample", [True, True, True], r"halves time more than twice"),
])
def test_config_keys_that_change_the_math_are_refused(tmp_path, key, value, pattern):
    raw = {**diffusers_vae_config(), key: value}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=pattern) as exc:
        read_vae_config(raw, str(tmp_path / "config.json"))
    assert str(tmp_path / "config.json") in one_line(exc)


def test_harmless_config_keys_are_set_aside():
    reading = read_vae_config({**diffusers_vae_config(), "dropout": 0.1, "clip_output": True}, "config.json")
    assert reading.set_aside["dropout"] == 0.1 and reading.set_aside["clip_output"] is True
    assert reading.config == WanVAEConfig.from_dict(TINY_VAE)


def test_bad_inputs_are_refused(tiny_folder):
    ours = WanVAE.from_pretrained(str(tiny_folder))
    cases = [
        (lambda: ours.encode(video(6, 16, 16)), r"has 6 frames; the VAE takes 4k \+ 1 \(1, 5, 9, ...\)"),
        (lambda: ours.encode(torch.zeros(1, 4, 5, 16, 16)), r"has 4 channels at dim 1; this VAE takes 3"),
        (lambda: ours.encode(torch.zeros(1, 3, 5, 12, 16)), r"height and width must be positive multiples of 8"),
        (lambda: ours.encode(torch.zeros(3, 5, 16, 16)), r"must be a \(B, C, T, H, W\) tensor, got \(3, 5, 16, 16\)"),
        (lambda: ours.decode(torch.zeros(1, 16, 2, 2, 2)), r"have 16 channels; this VAE's latents have 4"),
        (lambda: ours.decode(torch.zeros(1, 4, 2, 2, 2), frames_first=True),
         r"latents \(1, 4, 2, 2, 2\) have 2 channels.*\(B, F, C, h, w\)"),
        (lambda: ours.decode(torch.zeros(1, 4, 1, 2, 2), tile=(30, 20)), r"positive multiples of 8; got tile 30"),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as exc:
            call()
        one_line(exc)
    stream = ours.decoder_stream()
    stream.push(torch.zeros(1, 4, 1, 2, 2))
    with pytest.raises(ValueError, match=r"do not continue the video: its earlier chunks had batch 1 and 2 x 2") as exc:
        stream.push(torch.zeros(1, 4, 1, 2, 3))
    one_line(exc)
