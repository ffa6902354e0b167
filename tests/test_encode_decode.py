"""scripts/encode_decode.py on a tiny snapshot: both ends work, and every bad input is one line, exit code 1,
checked before any work, with nothing left behind."""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from snapshot_fixtures import make_tiny_snapshot
from vae_fixtures import TINY_VAE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "encode_decode.py")
pytest.importorskip("av")  # the video extra
pytest.importorskip("tokenizers")
spec = importlib.util.spec_from_file_location("encode_decode", SCRIPT)
encode_decode = importlib.util.module_from_spec(spec)
spec.loader.exec_module(encode_decode)

Z = TINY_VAE["z_dim"]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    return make_tiny_snapshot(tmp_path_factory.mktemp("encode_decode") / "snapshot")


@pytest.fixture
def latents(tmp_path):
    """A latents file as anyflow sample --out writes it: (B, C, F, h, w) under 'latents'."""
    path = str(tmp_path / "latents.safetensors")
    save_file({"latents": torch.randn(1, Z, 3, 8, 8, generator=torch.Generator().manual_seed(0))}, path)
    return path


def run(capsys, *argv):
    """main(argv): (exit code, stdout, stderr)."""
    code = encode_decode.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o644 & ~mask


@pytest.mark.slow
def test_encode_then_decode_write_their_files_whole_with_the_umask(snapshot, latents, tmp_path, capsys):
    from anyflow.pipeline.video_io import read_frames

    embeds, video = tmp_path / "embeds.safetensors", tmp_path / "video.mp4"
    code, out, err = run(capsys, "encode", "--pipeline", snapshot, "--prompt", "a fox", "--negative-prompt", "blurry",
                         "--out", embeds, "--device", "cpu")
    assert (code, err) == (0, "")
    assert out == f"wrote {embeds}: 'prompt_embeds' (1, 512, 32), 'negative_prompt_embeds' (1, 512, 32)\n"
    assert {k: tuple(v.shape) for k, v in load_file(embeds).items()} == {"prompt_embeds": (1, 512, 32),
                                                                         "negative_prompt_embeds": (1, 512, 32)}
    code, out, err = run(capsys, "decode", "--pipeline", snapshot, "--latents", latents, "--out", video,
                         "--device", "cpu")
    assert (code, err, out) == (0, "", f"wrote {video}: 9 frames of 64x64\n")
    assert read_frames(str(video)).shape == (9, 64, 64, 3)
    for path in (embeds, video):
        assert stat.S_IMODE(os.stat(path).st_mode) == umask_mode()
    assert sorted(os.listdir(tmp_path)) == ["embeds.safetensors", "latents.safetensors", "video.mp4"]  # no partial


@pytest.mark.slow
def test_an_embeddings_file_given_as_latents_is_one_line_naming_the_file_and_its_keys(snapshot, tmp_path):
    embeds, video = tmp_path / "embeds.safetensors", tmp_path / "video.mp4"
    save_file({"prompt_embeds": torch.zeros(1, 512, 32), "negative_prompt_embeds": torch.zeros(1, 512, 32)}, embeds)
    done = subprocess.run([sys.executable, SCRIPT, "decode", "--pipeline", snapshot, "--latents", str(embeds),
                           "--out", str(video), "--device", "cpu"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == (
        f"encode_decode.py decode: error: --latents {embeds}: no tensor under the key 'latents' (keys: "
        "['negative_prompt_embeds', 'prompt_embeds']): it holds prompt embeddings, as encode_decode.py encode "
        "writes; decode takes the latents that anyflow sample --out writes\n")
    assert sorted(os.listdir(tmp_path)) == ["embeds.safetensors"]


@pytest.mark.parametrize("shape", [(1, 2 * Z, 3, 8, 8), (Z, 3, 8, 8), (1, Z, 0, 8, 8)])
def test_latents_of_the_wrong_shape_are_named_with_the_files_shape(snapshot, tmp_path, capsys, shape):
    path = tmp_path / "latents.safetensors"
    save_file({"latents": torch.zeros(shape)}, path)
    code, out, err = run(capsys, "decode", "--pipeline", snapshot, "--latents", path, "--out", tmp_path / "v.mp4",
                         "--device", "cpu")
    assert (code, out) == (1, "")
    assert err == (f"encode_decode.py decode: error: --latents {path}: 'latents' is float32 {shape}; expected "
                   f"floats (B, C={Z}, F, h, w), the layout anyflow sample --out writes, with this VAE's {Z} latent "
                   "channels\n")
    assert sorted(os.listdir(tmp_path)) == ["latents.safetensors"]


def test_non_finite_latents_are_refused(snapshot, tmp_path, capsys):
    path = tmp_path / "latents.safetensors"
    save_file({"latents": torch.full((1, Z, 2, 8, 8), float("nan"))}, path)
    code, _, err = run(capsys, "decode", "--pipeline", snapshot, "--latents", path, "--out", tmp_path / "v.mp4",
                       "--device", "cpu")
    assert code == 1
    assert err == f"encode_decode.py decode: error: --latents {path}: 'latents' has 512 NaN or infinite values\n"
    assert sorted(os.listdir(tmp_path)) == ["latents.safetensors"]


@pytest.fixture
def no_loading(monkeypatch):
    """Any model loading fails the test: the checks must come first."""
    from anyflow.text.encoder import UMT5Encoder
    from anyflow.vae import WanVAE

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(WanVAE, "from_pretrained", loaded)
    monkeypatch.setattr(UMT5Encoder, "streaming", loaded)


def test_bad_decode_outputs_are_refused_before_any_work(snapshot, latents, tmp_path, capsys, no_loading):
    folder = tmp_path / "no-such-folder"
    cases = {
        folder / "v.mp4": f"--out {folder / 'v.mp4'}: the folder {folder} does not exist",
        tmp_path / "v.avi": f"--out {tmp_path / 'v.avi'}: unknown video extension '.avi'; use one of .mp4, .gif, "
                            ".png, .webp",
        tmp_path: f"--out {tmp_path}: unknown video extension '(none)'; use one of .mp4, .gif, .png, .webp",
        os.path.join(snapshot, "v.mp4"): f"--out {os.path.join(snapshot, 'v.mp4')}: is inside the input --pipeline "
                                         f"{snapshot}; --force never replaces an input",
    }
    for out, message in cases.items():
        code, stdout, err = run(capsys, "decode", "--pipeline", snapshot, "--latents", latents, "--out", out,
                                "--device", "cpu", "--force")
        assert (code, stdout, err) == (1, "", f"encode_decode.py decode: error: {message}\n")
    assert sorted(os.listdir(tmp_path)) == ["latents.safetensors"]
    assert "v.mp4" not in os.listdir(snapshot)


@pytest.mark.parametrize("argv, message", [
    (["--out", "{tmp}/no-such-folder/e.safetensors"], "--out {tmp}/no-such-folder/e.safetensors: the folder "
                                                      "{tmp}/no-such-folder does not exist"),
    (["--out", "{tmp}/e.pt"], "--out {tmp}/e.pt: embeddings are written as a .safetensors file"),
    (["--out", "{tmp}/existing.safetensors"], "--out {tmp}/existing.safetensors: already exists; pass --force to "
                                              "replace it"),
])
def test_bad_encode_outputs_are_refused_before_any_work(snapshot, tmp_path, capsys, no_loading, argv, message):
    (tmp_path / "existing.safetensors").write_bytes(b"kept")
    argv = [a.format(tmp=tmp_path) for a in argv]
    code, out, err = run(capsys, "encode", "--pipeline", snapshot, "--prompt", "a fox", "--device", "cpu", *argv)
    assert (code, out, err) == (1, "", f"encode_decode.py encode: error: {message.format(tmp=tmp_path)}\n")
    assert sorted(os.listdir(tmp_path)) == ["existing.safetensors"]
    assert (tmp_path / "existing.safetensors").read_bytes() == b"kept"


@pytest.mark.slow
def test_an_existing_video_is_kept_without_force_and_replaced_whole_with_it(snapshot, latents, tmp_path, capsys,
                                                                            monkeypatch):
    from anyflow.vae import WanVAE

    video = tmp_path / "video.mp4"
    video.write_bytes(b"an earlier video")
    argv = ["decode", "--pipeline", snapshot, "--latents", latents, "--out", video, "--device", "cpu"]
    code, out, err = run(capsys, *argv)
    assert (code, out) == (1, "")
    assert err == f"encode_decode.py decode: error: --out {video}: already exists; pass --force to replace it\n"
    assert video.read_bytes() == b"an earlier video"

    push = WanVAE.decoder_stream

    def failing_stream(self, *args, **kwargs):  # decoding fails after the first latent frame was written
        stream, pushed = push(self, *args, **kwargs), []

        class Failing:
            def push(self, chunk):
                if pushed:
                    raise OSError("disk full")
                pushed.append(chunk)
                return stream.push(chunk)
        return Failing()

    monkeypatch.setattr(WanVAE, "decoder_stream", failing_stream)
    code, out, err = run(capsys, *argv, "--force")
    assert (code, out, err) == (1, "", "encode_decode.py decode: error: disk full\n")
    assert video.read_bytes() == b"an earlier video"
    assert sorted(os.listdir(tmp_path)) == ["latents.safetensors", "video.mp4"]  # the partial is gone

    monkeypatch.undo()
    code, out, err = run(capsys, *argv, "--force")
    assert (code, err, out) == (0, "", f"wrote {video}: 9 frames of 64x64\n")
    assert video.read_bytes()[4:8] == b"ftyp"  # an mp4 now


def test_bad_pipelines_and_latents_files_are_one_line(snapshot, latents, tmp_path, capsys, no_loading):
    out = tmp_path / "v.mp4"
    cases = [
        (["--pipeline", tmp_path / "none", "--latents", latents],
         f"--pipeline {tmp_path / 'none'}: not a local folder (nothing is downloaded)"),
        (["--pipeline", os.path.join(snapshot, "tokenizer"), "--latents", latents],
         f"--pipeline {os.path.join(snapshot, 'tokenizer')}: has no vae/ folder, which decode needs"),
        (["--pipeline", snapshot, "--latents", tmp_path / "none.safetensors"],
         f"--latents {tmp_path / 'none.safetensors'}: cannot read: No such file or directory"),
        (["--pipeline", snapshot, "--latents", latents, "--fps", "0"], "--fps must be positive, got 0"),
        (["--pipeline", snapshot, "--latents", latents, "--device", "meta"],
         "--device 'meta': the meta device holds shapes, not values, so nothing can run on it; "
         "use 'cpu', 'cuda' or 'cuda:N'"),
    ]
    for argv, message in cases:
        code, stdout, err = run(capsys, "decode", "--out", out, "--device", "cpu", *argv)
        assert (code, stdout, err) == (1, "", f"encode_decode.py decode: error: {message}\n")
    assert sorted(os.listdir(tmp_path)) == ["latents.safetensors"]
