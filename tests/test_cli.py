"""The `anyflow` command: demo, sample, help without torch; the embedded checkpoint's golden values."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from anyflow import AnyFlowTransformer3DModel, sample
from anyflow.cli import TINY_CHECKPOINT, main

from conftest import require_oracle


def test_help_does_not_import_torch():
    code = (
        "import sys, anyflow.cli as cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported by --help'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "demo" in out and "sample" in out and "inspect" in out


def test_demo_passes(capsys):
    assert main(["demo"]) == 0
    printed = capsys.readouterr().out
    assert "demo passed" in printed and "(ok)" in printed and printed.count(" ok\n") == 3 and "FAIL" not in printed


def test_golden_values_are_the_oracles():
    """The stored outputs are what diffusers computes on the stored weights (so the demo checks something real)."""
    Oracle = require_oracle()
    oracle = Oracle.from_pretrained(os.path.join(TINY_CHECKPOINT, "transformer")).eval()
    golden = load_file(os.path.join(TINY_CHECKPOINT, "golden.safetensors"))
    with torch.no_grad():
        forward = oracle(golden["noise"], golden["timestep"], golden["r_timestep"], golden["prompt_embeds"]).sample
    assert torch.equal(forward, golden["forward"])
    assert os.path.getsize(os.path.join(TINY_CHECKPOINT, "transformer", "diffusion_pytorch_model.safetensors")) < 4e6


@pytest.fixture
def embeddings(tmp_path):
    gen = torch.Generator().manual_seed(3)
    path = tmp_path / "embeds.safetensors"
    save_file({"prompt_embeds": torch.randn(1, 6, 4096, generator=gen),
               "negative_prompt_embeds": torch.randn(1, 6, 4096, generator=gen)}, str(path))
    return path


@pytest.mark.parametrize("extra,kwargs", [
    ([], dict(num_steps=2)),
    (["--guidance-scale", "3", "--negative-embeds", "{embeds}"], dict(num_steps=2, guidance_scale=3.0, negative=True)),
    (["--sigmas", "1.0", "0.6", "0.2", "--raw-euler"], dict(sigmas=[1.0, 0.6, 0.2], use_mean_velocity=False)),
])
def test_sample_writes_the_samplers_latents_in_diffusers_layout(tmp_path, embeddings, capsys, extra, kwargs):
    out = tmp_path / "latents.safetensors"
    args = ["sample", "--model", TINY_CHECKPOINT, "--prompt-embeds", str(embeddings), "--steps", "2",
            "--frames", "9", "--height", "64", "--width", "48", "--seed", "11", "--device", "cpu", "--out", str(out)]
    assert main(args + [a.replace("{embeds}", str(embeddings)) for a in extra]) == 0
    printed = capsys.readouterr().out
    assert "step 1/" in printed and f"wrote {out}" in printed
    latents = load_file(str(out))["latents"]
    assert latents.shape == (1, 16, 3, 8, 6)  # (B, C, F, H/8, W/8)

    stored = load_file(str(embeddings))
    model = AnyFlowTransformer3DModel.from_pretrained(TINY_CHECKPOINT)
    noise = torch.randn(1, 3, 16, 8, 6, generator=torch.Generator().manual_seed(11))
    if kwargs.pop("negative", False):
        kwargs["negative_encoder_hidden_states"] = stored["negative_prompt_embeds"]
    expected = sample(model, noise, stored["prompt_embeds"], **kwargs)
    assert torch.equal(latents, expected.transpose(1, 2))


@pytest.mark.parametrize("change,message", [
    ({"--frames": "10"}, "--frames must be 4k + 1"),
    ({"--height": "72"}, "--height must be a positive multiple of 16"),
    ({"--steps": "0"}, "num_steps must be an int >= 1"),
    ({"--guidance-scale": "2"}, "needs negative_encoder_hidden_states"),
    ({"--prompt-embeds": "{wrong_key}"}, "no tensor under the key 'prompt_embeds'"),
    ({"--model": "{missing}"}, "no such file or directory"),
])
def test_sample_errors_are_one_line_and_name_the_argument(tmp_path, embeddings, capsys, change, message):
    wrong_key = tmp_path / "wrong.safetensors"
    save_file({"text": torch.zeros(1, 2, 4096)}, str(wrong_key))
    values = {"--model": TINY_CHECKPOINT, "--prompt-embeds": str(embeddings), "--frames": "9", "--height": "64",
              "--width": "64", "--out": str(tmp_path / "o.safetensors"), "--device": "cpu"}
    values.update({k: v.format(wrong_key=wrong_key, missing=tmp_path / "nope") for k, v in change.items()})
    args = ["sample"] + [x for kv in values.items() for x in kv]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "o.safetensors").exists()


def test_sample_refuses_to_overwrite_without_force(tmp_path, embeddings, capsys):
    out = tmp_path / "o.safetensors"
    out.write_text("keep")
    args = ["sample", "--model", TINY_CHECKPOINT, "--prompt-embeds", str(embeddings), "--frames", "5", "--height", "32",
            "--width", "32", "--steps", "1", "--out", str(out), "--device", "cpu"]
    assert main(args) == 1 and "already exists; pass --force" in capsys.readouterr().err
    assert out.read_text() == "keep"
    assert main(args + ["--force"]) == 0 and load_file(str(out))["latents"].shape == (1, 16, 2, 4, 4)
