"""VideoPipeline and ``anyflow generate``: a prompt to frames and files, against diffusers' own pipelines.

The snapshots are tiny but complete (tests/snapshot_fixtures.py): diffusers' ``AnyFlowPipeline`` and
``AnyFlowFARPipeline`` load them with transformers' tokenizer and UMT5 encoder and diffusers' VAE, and
run the whole path on the same noise. Frames are compared within 2e-5 (absolute, on frames in [0, 1]):
float32 rounding through three networks, the VAE decoder's ~20 convolutions last (measured: up to 3e-6).
"""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest
import torch

from anyflow import VideoPipeline
from anyflow.cli import main
from support import assert_same_run, require_oracle
from snapshot_fixtures import FAR_PARTITION, make_tiny_snapshot

FRAMES_BAR = 2e-5
PROMPT = "A cat walks across a sunny garden &amp; jumps onto the   wall."
# (frames, height, width): the FAR case has 128 tokens a frame, where diffusers' cached step pads nothing
SIZES = {False: (17, 64, 64), True: (17, 128, 256)}


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    root = tmp_path_factory.mktemp("snapshots")
    return {far: make_tiny_snapshot(root / ("far" if far else "bidirectional"), far=far) for far in (False, True)}


def assert_same_frames(written: np.ndarray, here: np.ndarray) -> None:
    """uint8 frames a command wrote (losslessly) against the pipeline called here: the same computation in
    another thread, equal within the float32 bar before rounding (see support.assert_same_run), so a pixel
    may round one level apart."""
    assert written.shape == here.shape and np.abs(written.astype(int) - here.astype(int)).max() <= 1


def noise_for(far: bool, seed: int = 3) -> torch.Tensor:
    frames, height, width = SIZES[far]
    return torch.randn(1, (frames - 1) // 4 + 1, 4, height // 8, width // 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
def test_encode_and_decode_invert_the_layouts_and_bound_the_values(snapshots):
    pipe = VideoPipeline.from_pretrained(snapshots[False])
    latents = torch.randn(2, 3, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    frames = pipe.decode(latents)
    assert frames.shape == (2, 9, 32, 48, 3) and frames.dtype == torch.float32
    assert 0 <= frames.min() and frames.max() <= 1
    assert pipe.encode(frames).shape == (2, 3, 4, 4, 6)
    assert pipe.encode((frames * 255).round().to(torch.uint8)).shape == (2, 3, 4, 4, 6)


@pytest.mark.slow
@pytest.mark.reference
@pytest.mark.parametrize("far", [False, True], ids=["bidirectional", "FAR"])
@pytest.mark.parametrize("given", [False, True], ids=["text-to-video", "image-to-video"])
def test_frames_equal_diffusers_pipeline(snapshots, far, given):
    pipeline_class = require_oracle("AnyFlowFARPipeline" if far else "AnyFlowPipeline")
    frames, height, width = SIZES[far]
    noise = noise_for(far)
    image = torch.rand(height, width, 3, generator=torch.Generator().manual_seed(4)) if given else None
    ours = VideoPipeline.from_pretrained(snapshots[far])
    result = ours(PROMPT, num_frames=frames, height=height, width=width, num_steps=2, noise=noise, image=image)

    reference = pipeline_class.from_pretrained(snapshots[far])
    kwargs = dict(chunk_partition=list(FAR_PARTITION)) if far else {}
    if given:
        kwargs["video"] = image.permute(2, 0, 1)[None, None]  # (B, T, C, H, W) in [0, 1]
    expected = torch.from_numpy(reference(PROMPT, num_frames=frames, height=height, width=width, num_inference_steps=2,
                                          latents=noise.transpose(1, 2), output_type="np", **kwargs).frames)
    assert result.shape == expected.shape == (1, frames, height, width, 3)
    assert (result - expected).abs().max().item() <= FRAMES_BAR


@pytest.mark.slow
@pytest.mark.reference
def test_guided_frames_with_a_negative_prompt_equal_diffusers_pipeline(snapshots):
    pipeline_class = require_oracle("AnyFlowPipeline")
    frames, height, width = SIZES[False]
    run = dict(num_frames=frames, height=height, width=width, negative_prompt="blurry, low quality", guidance_scale=3.0)
    result = VideoPipeline.from_pretrained(snapshots[False])(PROMPT, num_steps=2, noise=noise_for(False), **run)
    expected = pipeline_class.from_pretrained(snapshots[False])(PROMPT, num_inference_steps=2, output_type="np",
                                                                 latents=noise_for(False).transpose(1, 2), **run).frames
    assert (result - torch.from_numpy(expected)).abs().max().item() <= FRAMES_BAR


@pytest.mark.slow
@pytest.mark.reference
def test_a_snapshot_that_diffusers_save_pretrained_writes_loads_and_gives_the_same_frames(snapshots, tmp_path):
    pipeline_class = require_oracle("AnyFlowPipeline")
    pipeline_class.from_pretrained(snapshots[False]).save_pretrained(tmp_path / "saved")
    frames, height, width = SIZES[False]
    run = dict(num_frames=frames, height=height, width=width, num_steps=1, noise=noise_for(False))
    saved = VideoPipeline.from_pretrained(str(tmp_path / "saved"))(PROMPT, **run)
    assert torch.equal(saved, VideoPipeline.from_pretrained(snapshots[False])(PROMPT, **run))


@pytest.mark.slow
def test_far_frames_come_out_chunk_by_chunk_and_equal_the_whole_decode(snapshots):
    pipe = VideoPipeline.from_pretrained(snapshots[True])
    frames, height, width = SIZES[True]
    pieces = []
    result = pipe(PROMPT, num_frames=frames, height=height, width=width, num_steps=1, noise=noise_for(True),
                  on_frames=pieces.append)
    assert [p.shape[1] for p in pieces] == [1, 8, 8]  # chunks of 1, 2 and 2 latent frames
    latents = pipe(PROMPT, num_frames=frames, height=height, width=width, num_steps=1, noise=noise_for(True),
                   output="latents")
    whole = pipe.decode(latents)
    assert torch.equal(torch.cat(pieces, dim=1), result)
    assert (result - whole).abs().max().item() <= FRAMES_BAR  # decoded in chunks against all at once


@pytest.mark.slow
def test_the_seed_draws_the_noise_anyflow_sample_draws(snapshots):
    pipe = VideoPipeline.from_pretrained(snapshots[False])
    frames, height, width = SIZES[False]
    latents = pipe(PROMPT, num_frames=frames, height=height, width=width, num_steps=1, seed=7, output="latents")
    noise = torch.randn(1, 5, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    again = pipe(PROMPT, num_frames=frames, height=height, width=width, num_steps=1, noise=noise, output="latents")
    assert torch.equal(latents, again)
    uint8 = pipe(PROMPT, num_frames=frames, height=height, width=width, num_steps=1, noise=noise, output="uint8")
    assert uint8.dtype == torch.uint8 and uint8.shape == (1, frames, height, width, 3)


BAD_CALLS = {
    "frames": (dict(num_frames=16), r"num_frames must be 4k \+ 1"),
    "height": (dict(height=72), r"height must be a positive multiple of 16"),
    "output": (dict(output="pil"), r"output must be 'float', 'uint8' or 'latents', got 'pil'"),
    "noise shape": (dict(noise=torch.zeros(1, 5, 4, 8, 7)), r"noise must be \(B, F, C, h, w\) = \(1, 5, 4, 8, 8\)"),
    "noise and seed": (dict(noise=torch.zeros(1, 5, 4, 8, 8), seed=1), r"give noise or seed, not both"),
    "seed": (dict(seed=-1), r"seed must be an integer from 0 to 2\^64 - 1, got -1"),
    "image size": (dict(image=torch.zeros(32, 64, 3)), r"image is 64 x 32 \(width x height\) but the video is 64 x 64"),
    "image range": (dict(image=torch.full((64, 64, 3), 2.0)), r"image: float frames must lie in \[0, 1\]"),
    "image layout": (dict(image=torch.zeros(3, 64, 64)), r"image must be RGB frames \(H, W, 3\) or \(B, H, W, 3\)"),
    "video frames": (dict(video=torch.zeros(4, 64, 64, 3)), r"video has 4 frames; the Wan VAE takes 4k \+ 1"),
    "image and video": (dict(image=torch.zeros(64, 64, 3), video=torch.zeros(1, 64, 64, 3)), r"give image or video"),
    "guidance without negative": (dict(guidance_scale=3.0), r"guidance_scale 3.0 needs a negative_prompt"),
    "chunks on a bidirectional": (dict(chunk_partition=[1, 4]), r"chunk_partition is for FAR snapshots"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_a_bad_call_is_one_clear_error_before_any_work(snapshots, case, monkeypatch):
    pipe = VideoPipeline.from_pretrained(snapshots[False])
    monkeypatch.setattr(pipe, "encode_prompt", lambda *a: pytest.fail("work started before the checks"))
    kwargs, message = BAD_CALLS[case]
    kwargs = {**dict(num_frames=17, height=64, width=64, num_steps=1), **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe(PROMPT, **kwargs)


def test_a_snapshot_missing_a_component_or_its_index_is_named(snapshots, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(snapshots[False], broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ValueError, match=r"broken: the snapshot has no vae/ \(an AnyFlowPipeline needs tokenizer/, "
                       r"text_encoder/, transformer/, vae/\)"):
        VideoPipeline.from_pretrained(str(broken))
    os.remove(broken / "model_index.json")
    with pytest.raises(ValueError, match=r"broken: no model_index.json"):
        VideoPipeline.from_pretrained(str(broken))


# ---- anyflow generate -------------------------------------------------------------------------------


def generate_args(root, out, *extra):
    frames, height, width = SIZES[False]
    return ["generate", "--model", root, "--prompt", PROMPT, "--frames", str(frames), "--height", str(height),
            "--width", str(width), "--steps", "2", "--device", "cpu", "--out", str(out), *extra]


def read_back(path):
    from anyflow.pipeline.video_io import read_frames

    return read_frames(str(path))


def test_generate_writes_a_playable_mp4_of_the_size_asked(snapshots, tmp_path, capsys):
    out = tmp_path / "video.mp4"
    assert main(generate_args(snapshots[False], out, "--save-latents", str(tmp_path / "latents.safetensors"))) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^memory: about .* at the peak \(.*\): transformer .* held; text encoder \+.*, sampling \+.*, "
                     r"decoding \+", printed, re.M), printed
    assert "text encoder: " in printed and "step 2/2" in printed and "decoded frames 1-17" in printed
    frames = read_back(out)
    assert frames.shape == (17, 64, 64, 3)
    assert sorted(os.listdir(tmp_path)) == ["latents.safetensors", "video.mp4"]


@pytest.mark.slow
def test_generate_png_frames_equal_the_pipelines_and_far_appends_chunks(snapshots, tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "video.png"  # animated PNG: lossless, so the frames compare exactly
    assert main(generate_args(snapshots[False], out, "--seed", "5", "--save-latents", str(tmp_path / "l.safetensors"))) == 0
    pipe = VideoPipeline.from_pretrained(snapshots[False])
    expected = pipe(PROMPT, num_frames=17, height=64, width=64, num_steps=2, seed=5, output="uint8")
    assert_same_frames(read_back(out), expected[0].numpy())
    latents = load_file(str(tmp_path / "l.safetensors"))["latents"]  # diffusers layout
    assert_same_run(latents, pipe(PROMPT, num_frames=17, height=64, width=64, num_steps=2, seed=5,
                                  output="latents").transpose(1, 2))
    capsys.readouterr()
    frames, height, width = SIZES[True]
    far_out = tmp_path / "far.gif"
    assert main(["generate", "--model", snapshots[True], "--prompt", PROMPT, "--frames", str(frames), "--height",
                 str(height), "--width", str(width), "--steps", "1", "--device", "cpu", "--out", str(far_out)]) == 0
    printed = capsys.readouterr().out
    assert [line.split("and")[0].strip() for line in printed.splitlines() if "decoded frames" in line] == \
        ["decoded frames 1-1", "decoded frames 2-9", "decoded frames 10-17"]
    assert read_back(far_out).shape == (17, 128, 256, 3)


@pytest.mark.slow
def test_generate_an_image_to_video_starts_from_the_image_file(snapshots, tmp_path):
    from anyflow.pipeline.video_io import write_video

    image = (np.random.default_rng(0).random((1, 64, 64, 3)) * 255).astype(np.uint8)
    write_video(str(tmp_path / "first.png"), image)
    out = tmp_path / "i2v.png"
    assert main(generate_args(snapshots[False], out, "--image", str(tmp_path / "first.png"), "--seed", "2")) == 0
    pipe = VideoPipeline.from_pretrained(snapshots[False])
    expected = pipe(PROMPT, num_frames=17, height=64, width=64, num_steps=2, seed=2, image=image[0], output="uint8")
    assert_same_frames(read_back(out), expected[0].numpy())


def broken_tokenizer(root, tmp_path):
    copy = tmp_path / "no-tokenizer"
    shutil.copytree(root, copy)
    for name in os.listdir(copy / "tokenizer"):
        os.remove(copy / "tokenizer" / name)
    return str(copy)


GENERATE_ERRORS = {
    "extension": ({"--out": "{tmp}/v.avi"}, r"--out .*v.avi: a video file ends in one of .mp4, .gif, .png, .webp"),
    "out exists": ({"--out": "{tmp}/existing.mp4"}, r"--out .*existing.mp4: already exists; pass --force"),
    "out folder": ({"--out": "{tmp}/missing/v.mp4"}, r"--out .*missing/v.mp4: the folder .*missing does not exist"),
    "out is the image": ({"--out": "{tmp}/image.png", "--image": "{tmp}/image.png"}, r"is the input --image"),
    "image size": ({"--image": "{tmp}/small.png"}, r"--image .*small.png: 32x16 pixels \(width x height\), but the video "
                   r"is --width 64 --height 64; resize it first"),
    "unreadable image": ({"--image": "{tmp}/noise.png"}, r"--image .*noise.png: not an image or video FFmpeg can read"),
    "missing image": ({"--image": "{tmp}/nothing.png"}, r"--image .*nothing.png: no such file"),
    "frames": ({"--frames": "16"}, r"--frames must be 4k \+ 1"),
    "FAR sizes": ({"--model": "{far}", "--height": "48"}, r"--height 48: 6 latent pixels are not divisible by the "
                  r"model's compressed patch \(compressed_patch_size\) 4; use a multiple of 32"),
    "no index": ({"--model": "{tmp}/not-a-snapshot"}, r"not-a-snapshot: no model_index.json"),
    "tokenizer files": ({"--model": "{no_tokenizer}"}, r"tokenizer"),
    "guidance": ({"--guidance-scale": "3"}, r"--guidance-scale 3.0 needs --negative-prompt"),
    "steps": ({"--steps": "0"}, r"--steps: num_steps must be an int from 1 to 1000"),
}


@pytest.mark.parametrize("case", sorted(GENERATE_ERRORS))
def test_generate_errors_are_one_line_before_loading_and_leave_nothing(snapshots, tmp_path, capsys, monkeypatch, case):
    from anyflow.pipeline.video_io import write_video

    monkeypatch.setattr(VideoPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded before the checks"))
    write_video(str(tmp_path / "image.png"), np.zeros((1, 64, 64, 3), np.uint8))
    write_video(str(tmp_path / "small.png"), np.zeros((1, 16, 32, 3), np.uint8))
    (tmp_path / "noise.png").write_bytes(os.urandom(256))
    (tmp_path / "existing.mp4").write_bytes(b"")
    (tmp_path / "not-a-snapshot").mkdir()
    change, message = GENERATE_ERRORS[case]
    fill = dict(tmp=tmp_path, far=snapshots[True], no_tokenizer=broken_tokenizer(snapshots[False], tmp_path / "copy")
                if case == "tokenizer files" else "")
    options = {"--model": snapshots[False], "--prompt": PROMPT, "--frames": "17", "--height": "64", "--width": "64",
               "--steps": "2", "--device": "cpu", "--out": str(tmp_path / "v.mp4")}
    options.update({k: v.format(**fill) for k, v in change.items()})
    args = ["generate"] + [x for pair in options.items() for x in pair]
    before = sorted(os.listdir(tmp_path))
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("anyflow generate: error: "), err
    assert re.search(message, err[0]), err[0]
    assert sorted(os.listdir(tmp_path)) == before


def test_generate_without_the_video_extra_says_what_to_install(snapshots, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "av" else real(name, *a))
    assert main(generate_args(snapshots[False], tmp_path / "v.mp4")) == 1
    assert capsys.readouterr().err.strip() == ('anyflow generate: error: anyflow generate needs av: pip install -e '
                                               '".[video]" (or: pip install tokenizers av)')


def test_inspect_lists_every_component_of_a_snapshot(snapshots, capsys):
    assert main(["inspect", snapshots[False]]) == 0
    lines = capsys.readouterr().out.split("components: 5 folder(s)\n")[1].splitlines()
    names = [line.split()[0] for line in lines]
    assert names == ["scheduler/", "text_encoder/", "tokenizer/", "transformer/", "vae/"]
    assert re.search(r"text_encoder/ +UMT5EncoderModel: 2 file\(s\), [\d.]+ MB; float32 [\d.]+ MB", lines[1]), lines[1]
    assert re.search(r"vae/ +AutoencoderKLWan: 2 file\(s\)", lines[4]), lines[4]
