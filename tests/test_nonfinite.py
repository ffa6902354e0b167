"""A result that is not finite is an error, never a success: the samplers, ``anyflow sample``,
``anyflow generate`` and VideoPipeline stop with one line naming where the values went wrong and the
likely cause (a damaged checkpoint, inputs far outside the trained range, a float16 overflow), and
write nothing."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from anyflow import AnyFlowFARConfig, AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel, sample, sample_far
from anyflow.cli import main
from anyflow.cli.demo import TINY_CHECKPOINT
from anyflow.sampling.checks import NonFiniteLatents
from support import SMALL, randomize_, small_config

VIDEO_EXTRA = importlib.util.find_spec("av") is not None and importlib.util.find_spec("tokenizers") is not None


def model_with_a_nan_weight(model):
    with torch.no_grad():
        model.blocks[1].ffn.fc_in.weight[3, 5] = float("nan")
    return model


def inputs(frames=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, frames, 4, 8, 8, generator=gen), torch.randn(1, 5, 24, generator=gen)


def test_a_nan_weight_stops_sample_naming_the_step_and_the_weight():
    model = AnyFlowTransformer3DModel(small_config()).eval()
    randomize_(model, 0)
    model_with_a_nan_weight(model)
    noise, text = inputs()
    with pytest.raises(NonFiniteLatents, match=r"^the latents became NaN or infinite at step 1 of 2 \(t = 1000.0 -> r = "
                                               r"833.3\): the model's weights hold NaN or infinite values \(blocks.1.ffn."
                                               r"fc_in.weight\): the checkpoint is damaged$"):
        sample(model, noise, text, num_steps=2)


def test_huge_embeddings_are_named_as_the_cause():
    model = AnyFlowTransformer3DModel(small_config()).eval()
    randomize_(model, 1)
    noise, text = inputs()
    with pytest.raises(NonFiniteLatents, match=r"inputs far outside the range the model was trained on "
                                               r"\(encoder_hidden_states up to \|3.1e\+30\|"):
        sample(model, noise, text * 1e30, num_steps=2)


def test_a_float16_overflow_says_to_use_bfloat16():
    model = AnyFlowTransformer3DModel(small_config()).eval()
    randomize_(model, 2)
    with torch.no_grad():
        model.blocks[0].ffn.fc_out.weight.mul_(3e4)  # finite in float16, its products are not
    model.to_dtype("float16")
    noise, text = inputs()
    with pytest.raises(NonFiniteLatents, match=r"likely a float16 overflow: run in bfloat16"):
        sample(model, noise, text, num_steps=1)


def test_sample_far_stops_at_the_chunk_before_handing_it_on():
    config = AnyFlowFARConfig(**SMALL, chunk_partition=(1, 2, 2))
    model = AnyFlowFARTransformer3DModel(config).eval()
    randomize_(model, 3)
    noise, text = inputs(frames=5)
    handed = []
    with torch.no_grad():
        model.blocks[0].cross_attn.o.bias[0] = float("inf")
    with pytest.raises(NonFiniteLatents, match=r"at chunk 1 of 3, step 1 of 2 .*weights hold NaN or infinite values "
                                               r"\(blocks.0.cross_attn.o.bias\)"):
        sample_far(model, noise, text, num_steps=2, chunk_callback=lambda i, z: handed.append(i))
    assert handed == []


@pytest.fixture
def damaged_checkpoint(tmp_path):
    """The tiny checkpoint (diffusers layout, as published) with one NaN weight."""
    root = tmp_path / "damaged"
    shutil.copytree(TINY_CHECKPOINT, root)
    path = root / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    state["blocks.0.ffn.net.0.proj.weight"][0, 0] = float("nan")
    save_file(state, str(path))
    return root


def test_anyflow_sample_exits_1_with_one_line_and_writes_nothing(tmp_path, damaged_checkpoint, capsys):
    embeddings = tmp_path / "embeds.safetensors"
    save_file({"prompt_embeds": torch.randn(1, 6, 4096, generator=torch.Generator().manual_seed(0))}, str(embeddings))
    out = tmp_path / "latents.safetensors"
    args = ["sample", "--model", str(damaged_checkpoint), "--prompt-embeds", str(embeddings), "--steps", "2", "--frames",
            "5", "--height", "32", "--width", "32", "--device", "cpu", "--out", str(out)]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("anyflow sample: error: the latents became NaN or infinite at step 1 of 2")
    assert "blocks.0.ffn.fc_in.weight" in err[0]
    assert sorted(os.listdir(tmp_path)) == ["damaged", "embeds.safetensors"]
    huge = tmp_path / "huge.safetensors"
    save_file({"prompt_embeds": torch.full((1, 6, 4096), 1e30)}, str(huge))
    assert main(["sample", "--model", TINY_CHECKPOINT, "--prompt-embeds", str(huge), "--steps", "1", "--frames", "5",
                 "--height", "32", "--width", "32", "--device", "cpu", "--out", str(out)]) == 1
    assert "encoder_hidden_states up to |1.0e+30|" in capsys.readouterr().err and not out.exists()


@pytest.mark.skipif(not VIDEO_EXTRA, reason="generate and VideoPipeline need the video extra (av, tokenizers)")
@pytest.mark.parametrize("far", [False, True], ids=["bidirectional", "FAR"])
def test_generate_and_the_pipeline_refuse_nan_latents_and_write_nothing(tmp_path, capsys, far):
    from anyflow import VideoPipeline
    from snapshot_fixtures import make_tiny_snapshot

    snapshot = make_tiny_snapshot(tmp_path / "snapshot", far=far)
    path = os.path.join(snapshot, "transformer", "diffusion_pytorch_model.safetensors")
    state = load_file(path)
    state["blocks.1.attn1.to_v.weight"][2, 2] = float("nan")
    save_file(state, path)
    frames = 17 if far else 9  # the tiny FAR snapshot's chunks 1 2 2: 5 latent frames
    size = ["--frames", str(frames), "--height", "64" if far else "32", "--width", "64" if far else "32"]
    out = tmp_path / "v.mp4"
    assert main(["generate", "--model", snapshot, "--prompt", "a fox", "--steps", "1", "--device", "cpu",
                 "--out", str(out), "--save-latents", str(tmp_path / "l.safetensors")] + size) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the latents became NaN or infinite" in err[0] and "blocks.1.self_attn.v.weight" in err[0]
    assert sorted(os.listdir(tmp_path)) == ["snapshot"]
    pipe = VideoPipeline.from_pretrained(snapshot)
    for output in ("float", "uint8", "latents"):
        with pytest.raises(NonFiniteLatents):
            pipe("a fox", num_frames=frames, height=64 if far else 32, width=64 if far else 32, num_steps=1, seed=0,
                 output=output)
