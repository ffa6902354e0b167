"""What a new user meets when a command or a call is given something wrong: one line that names the argument
and says what to do, before anything loads; and the help texts that tell it beforehand."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from anyflow import AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel, VideoPipeline, sample
from anyflow.cli import main
from anyflow.cli.common import Progress
from anyflow.cli.demo import TINY_CHECKPOINT
from support import randomize_, small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIDEO_EXTRA = importlib.util.find_spec("av") is not None and importlib.util.find_spec("tokenizers") is not None
needs_video = pytest.mark.skipif(not VIDEO_EXTRA, reason="generate needs the video extra (av, tokenizers)")


@pytest.fixture
def embeddings(tmp_path):
    path = tmp_path / "embeds.safetensors"
    gen = torch.Generator().manual_seed(0)
    save_file({"prompt_embeds": torch.randn(1, 6, 4096, generator=gen),
               "negative_prompt_embeds": torch.randn(1, 6, 4096, generator=gen)}, str(path))
    return path


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def must_not_load(monkeypatch):
    for cls in (AnyFlowTransformer3DModel, AnyFlowFARTransformer3DModel):
        monkeypatch.setattr(cls, "from_pretrained", lambda *a, **k: pytest.fail("a model loaded before the checks"))


SAMPLE = ["sample", "--model", TINY_CHECKPOINT, "--frames", "5", "--height", "32", "--width", "32", "--steps", "1"]


@pytest.mark.parametrize("extra,message", [
    (["--device", "meta"], r"^anyflow sample: error: --device 'meta': the meta device holds shapes, not values"),
    (["--negative-embeds", "{embeds}"], r"--negative-embeds is used only with --guidance-scale > 1"),
])
def test_sample_refuses_before_loading(tmp_path, embeddings, capsys, monkeypatch, extra, message):
    must_not_load(monkeypatch)
    args = SAMPLE + ["--prompt-embeds", str(embeddings), "--out", str(tmp_path / "o.safetensors")]
    assert main(args + [a.format(embeds=embeddings) for a in extra]) == 1
    assert re.search(message, one_line(capsys))
    assert not (tmp_path / "o.safetensors").exists()


def test_help_texts_say_the_defaults_and_the_rules(capsys):
    for command in (["--help"], ["sample", "--help"], ["generate", "--help"]):
        with pytest.raises(SystemExit):
            main(command)
    text = " ".join(capsys.readouterr().out.split())
    assert "anyflow convert, the same as the anyflow-convert command" in text
    assert text.count("(default: cuda when available, else cpu)") == 2
    assert text.count("they are shifted like the default schedule") == 2
    assert text.count("0 to 2^64 - 1 (default 0)") == 2
    assert text.count("--lora-skip-unknown") >= 4  # in sample's and generate's usage and option lists
    assert "at most 240 (.gif: 50" in text


def test_anyflow_convert_is_anyflow_convert(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    assert capsys.readouterr().out.startswith("usage: anyflow convert")
    assert main(["convert", TINY_CHECKPOINT, str(tmp_path / "out")]) == 0
    assert "wrote anyflow layout" in capsys.readouterr().out
    assert main(["convert", TINY_CHECKPOINT, str(tmp_path / "out")]) == 1
    assert one_line(capsys).startswith("anyflow convert: error: ")


@pytest.mark.parametrize("command", [["inspect", TINY_CHECKPOINT], ["--version"]])
def test_a_reader_that_leaves_ends_the_command_quietly(command):
    read, write = os.pipe()
    os.close(read)  # as head does once it has what it wants
    try:
        done = subprocess.run([sys.executable, "-m", "anyflow", *command], stdout=write, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, timeout=120)
    finally:
        os.close(write)
    assert done.stderr == "" and done.returncode in (0, 141)  # argparse's --version exits before any command
    if command[0] == "inspect":
        assert done.returncode == 141


def test_python_calls_name_what_is_wrong():
    with pytest.raises(TypeError, match=r"^the checkpoint must be a file or folder path \(str or os.PathLike\), got "
                                        r"NoneType None$"):
        AnyFlowTransformer3DModel.from_pretrained(None)
    with pytest.raises(TypeError, match=r"got int 123$"):
        AnyFlowTransformer3DModel.from_pretrained(123)
    with pytest.raises(TypeError, match=r"^the checkpoint must be a file or folder path .* got int 123$"):
        AnyFlowFARTransformer3DModel.from_pretrained(123)
    with pytest.raises(TypeError, match=r"^the snapshot must be a file or folder path .* got NoneType None$"):
        VideoPipeline.from_pretrained(None)
    model = AnyFlowTransformer3DModel(small_config()).eval()
    randomize_(model, 0)
    noise, text = torch.randn(1, 2, 4, 8, 8), torch.randn(1, 5, 24)
    with pytest.raises(ValueError, match=r"^noise must be a floating point tensor, got torch.int64$"):
        sample(model, noise.long(), text)
    with pytest.raises(ValueError, match=r"^encoder_hidden_states must be a floating point tensor, got torch.int32$"):
        sample(model, noise, text.int())
    with pytest.raises(ValueError, match=r"^encoder_hidden_states holds no token \(S = 0\)"):
        sample(model, noise, text[:, :0])


def test_progress_estimates_what_is_left_from_the_steps_after_the_first(monkeypatch):
    import anyflow.cli.common as common

    clock = iter([0.0, 60.0, 61.0, 62.0])  # started, a first step of 60 s (compiling), then 1 s a step
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    lines = []
    progress = Progress(4, lines.append)
    for _ in range(3):
        progress.step("", 1000.0, 500.0)
    assert "left" not in lines[0]
    assert lines[1].endswith("about 2.0 s left)") and lines[2].endswith("about 1.0 s left)")


def test_video_files_take_frame_rates_a_player_shows():
    from anyflow.pipeline.video_io import check_fps

    check_fps(16, "v.mp4")
    check_fps(50, "v.gif")
    for fps, path in ((1e9, "v.mp4"), (0, "v.mp4"), (60, "v.gif"), (float("nan"), "v.webp")):
        with pytest.raises(ValueError, match=r"frames per second must be above 0 and at most"):
            check_fps(fps, path)


@needs_video
def test_generate_refuses_before_loading(tmp_path, capsys, monkeypatch):
    from anyflow.pipeline.video_io import write_video
    from snapshot_fixtures import make_tiny_snapshot

    snapshot = make_tiny_snapshot(tmp_path / "snapshot")
    must_not_load(monkeypatch)
    (tmp_path / "existing.safetensors").write_bytes(b"")
    write_video(str(tmp_path / "clip.png"), torch.zeros(9, 32, 32, 3, dtype=torch.uint8).numpy())
    base = ["generate", "--model", snapshot, "--prompt", "a fox", "--frames", "9", "--height", "32", "--width", "32",
            "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "v.gif")]
    cases = [
        (["--save-latents", str(tmp_path / "existing.safetensors")], r"--save-latents .*existing.safetensors: already "
                                                                      r"exists; pass --force"),
        (["--fps", "1e9"], r"--fps 1000000000.0: frames per second must be above 0 and at most 50 for"),
        (["--negative-prompt", "blurry"], r"--negative-prompt is used only with --guidance-scale > 1"),
        (["--lora-skip-unknown"], r"--lora-skip-unknown: no --lora given"),
        (["--device", "meta"], r"--device 'meta': the meta device holds shapes, not values"),
        (["--video", str(tmp_path / "clip.png")], r"--video .*clip.png: its first 9 frames fill the whole video "
                                                  r"\(--frames 9\): nothing would be generated"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 1, extra
        assert re.search(message, one_line(capsys)), extra
    assert sorted(os.listdir(tmp_path)) == ["clip.png", "existing.safetensors", "snapshot"]


@needs_video
def test_a_snapshot_of_mismatched_or_broken_parts_is_named_before_loading(tmp_path, capsys, monkeypatch):
    from anyflow import VideoPipeline
    from snapshot_fixtures import make_tiny_snapshot

    snapshot = make_tiny_snapshot(tmp_path / "snapshot")
    must_not_load(monkeypatch)
    args = ["generate", "--model", snapshot, "--prompt", "a fox", "--frames", "5", "--height", "32", "--width", "32",
            "--device", "cpu", "--out", str(tmp_path / "v.gif")]
    config = os.path.join(snapshot, "text_encoder", "config.json")
    original = open(config).read()
    with open(config, "w") as f:
        json.dump({**json.loads(original), "d_model": 40}, f)
    assert main(args) == 1
    assert re.search(r"the text encoder makes 40-wide embeddings .* but the transformer takes text_dim=32",
                     one_line(capsys))
    with pytest.raises(ValueError, match=r"the text encoder makes 40-wide embeddings"):
        VideoPipeline.from_pretrained(snapshot)
    with open(config, "w") as f:
        f.write(original)
    scheduler = os.path.join(snapshot, "scheduler", "scheduler_config.json")
    with open(scheduler, "w") as f:
        f.write("{ not json")
    assert main(args) == 1
    assert re.search(rf"{re.escape(scheduler)}: not valid JSON \(", one_line(capsys))
    shutil.rmtree(snapshot)


@needs_video
def test_the_pipeline_names_its_inputs(tmp_path):
    from anyflow import VideoPipeline
    from snapshot_fixtures import make_tiny_snapshot

    pipe = VideoPipeline.from_pretrained(make_tiny_snapshot(tmp_path / "snapshot"))
    with pytest.raises(ValueError, match=r"^prompt must be a string or a non-empty list of strings, got None$"):
        pipe(None)
    with pytest.raises(ValueError, match=r"latents must be floats \(B, F, C=4, h, w\), frames before channels .* got "
                                         r"\(1, 4, 3, 4, 4\)"):
        pipe.decode(torch.zeros(1, 4, 3, 4, 4))  # a file's (B, C, F, h, w), not transposed


@pytest.mark.slow
@needs_video
def test_generate_makes_a_video_per_prompt_and_seed_with_the_model_loaded_once(tmp_path, capsys):
    from anyflow import VideoPipeline
    from anyflow.pipeline.video_io import read_frames
    from snapshot_fixtures import make_tiny_snapshot

    snapshot = make_tiny_snapshot(tmp_path / "snapshot")
    (tmp_path / "prompts.txt").write_text("a red fox\n\n# a comment\na cat on a wall\n")
    assert main(["generate", "--model", snapshot, "--prompts", str(tmp_path / "prompts.txt"), "--seed", "1", "2",
                 "--frames", "5", "--height", "32", "--width", "32", "--steps", "1", "--device", "cpu",
                 "--out", str(tmp_path / "v.png")]) == 0
    printed = capsys.readouterr().out
    assert printed.count("loaded ") == 1 and "for 2 prompt(s)" in printed
    names = ["v-001-seed1.png", "v-001-seed2.png", "v-004-seed1.png", "v-004-seed2.png"]  # prompt line, seed
    assert sorted(os.listdir(tmp_path)) == sorted(names + ["prompts.txt", "snapshot"])
    pipe = VideoPipeline.from_pretrained(snapshot)
    for name, prompt, seed in zip(names, ["a red fox"] * 2 + ["a cat on a wall"] * 2, [1, 2, 1, 2]):
        expected = pipe(prompt, num_frames=5, height=32, width=32, num_steps=1, seed=seed, output="uint8")[0].numpy()
        written = read_frames(str(tmp_path / name))
        assert written.shape == expected.shape and abs(written.astype(int) - expected.astype(int)).max() <= 1, name


@pytest.mark.slow
@needs_video
def test_vae_tiling_from_the_command_and_the_pipeline_is_the_vaes(tmp_path, capsys):
    from anyflow import VideoPipeline
    from anyflow.pipeline.video_io import read_frames
    from snapshot_fixtures import make_tiny_snapshot

    snapshot = make_tiny_snapshot(tmp_path / "snapshot")
    pipe = VideoPipeline.from_pretrained(snapshot)
    run = dict(num_frames=5, height=64, width=64, num_steps=1, seed=3)
    latents = pipe("a fox", output="latents", **run)
    tiled = pipe("a fox", vae_tile=(32, 16), **run)
    assert torch.equal(tiled, pipe.decode(latents, vae_tile=(32, 16)))  # the same computation, in this thread
    assert (tiled - pipe("a fox", **run)).abs().max() > 0  # tiles were used: their seams differ a little
    assert main(["generate", "--model", snapshot, "--prompt", "a fox", "--frames", "5", "--height", "64", "--width",
                 "64", "--steps", "1", "--seed", "3", "--device", "cpu", "--vae-tile", "32", "16",
                 "--out", str(tmp_path / "v.png")]) == 0
    written = read_frames(str(tmp_path / "v.png"))
    expected = (tiled[0] * 255).round().to(torch.uint8).numpy()
    assert abs(written.astype(int) - expected.astype(int)).max() <= 1
    assert main(["generate", "--model", snapshot, "--prompt", "a fox", "--frames", "5", "--height", "64", "--width",
                 "64", "--vae-tile", "30", "--device", "cpu", "--out", str(tmp_path / "w.png")]) == 1
    assert "--vae-tile 30: give it alone" in capsys.readouterr().err


def test_the_memory_estimate_knows_the_tiled_decoder():
    from anyflow.runtime.memory import MemoryEstimate, estimate_generation_memory

    sampling = MemoryEstimate(weights=2**30, latents=0, context=0, activations=2**30)
    sizes = dict(vae_weight_bytes=2**28, vae_base_dim=96, text_block_bytes=2**28, text_width=4096, text_ffn_width=10240,
                 text_heads=64, height=720, width=1280)
    whole, tiled = estimate_generation_memory(sampling, **sizes), estimate_generation_memory(sampling, **sizes, vae_tile=256)
    decoding = {name: dict(e.stages)["decoding"] for name, e in (("whole", whole), ("tiled", tiled))}
    assert decoding["tiled"] < decoding["whole"] / 4
