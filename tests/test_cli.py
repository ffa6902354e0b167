"""The `anyflow` command: demo, sample, help without torch; the embedded checkpoint's golden values."""

from __future__ import annotations

import argparse
import json
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from anyflow import AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel, sample, sample_far
from anyflow.cli import main
from anyflow.cli.demo import TINY_CHECKPOINT, TINY_FAR_CHECKPOINT

from support import assert_same_run, require_oracle


def test_help_does_not_import_torch():
    code = (
        "import sys, anyflow.cli as cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported by --help'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "demo" in out and "sample" in out and "inspect" in out


@pytest.mark.reference  # compares with stored diffusers outputs
def test_demo_passes_and_makes_a_video(tmp_path, capsys):
    out = tmp_path / "demo.mp4"
    out.write_bytes(b"kept")  # an existing video is kept: the next free name is taken
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "demo passed" in printed and printed.count("(ok)") == 2 and printed.count(" ok\n") == 7
    assert "FAIL" not in printed and "== FAR ==" in printed
    assert out.read_bytes() == b"kept"
    if importlib.util.find_spec("av") is None or importlib.util.find_spec("tokenizers") is None:
        assert "skipped: the video part needs the video extra" in printed
        return
    from anyflow.pipeline.video_io import read_frames

    made = tmp_path / "demo-1.mp4"
    assert f"the demo video: {made}" in printed and "to make it again: anyflow generate --model " in printed
    assert read_frames(str(made)).shape == (17, 128, 128, 3)


@pytest.mark.slow
@pytest.mark.reference
def test_golden_values_are_the_oracles():
    """The stored outputs are what diffusers computes on the stored weights (so the demo checks something real).

    Not bit for bit: the golden values were computed on one CPU, and another one's kernels (AVX2,
    AVX512, no SIMD) sum in another order; float32 rounding then moves the output by a few 1e-7 of
    its size (3e-7 seen between AVX512 and AVX2). The bar is the fp32 parity bar, 1e-5 of max|ref|:
    30x above that noise, and far below what any wrong operation does (errors of order 1).
    """
    for folder, oracle_name, pipeline_name, extra in [
        (TINY_CHECKPOINT, "AnyFlowTransformer3DModel", "AnyFlowPipeline", {}),
        (TINY_FAR_CHECKPOINT, "AnyFlowFARTransformer3DModel", "AnyFlowFARPipeline", {"chunk_partition": [1, 2, 2, 2]}),
    ]:
        oracle = require_oracle(oracle_name).from_pretrained(os.path.join(folder, "transformer")).eval()
        golden = load_file(os.path.join(folder, "golden.safetensors"))
        noise, text = golden["noise"], golden["prompt_embeds"]
        with torch.no_grad():
            forward = oracle(noise, golden["timestep"], golden["r_timestep"], text, **extra).sample
        assert (forward - golden["forward"]).abs().max() <= 1e-5 * golden["forward"].abs().max()
        pipe = require_oracle(pipeline_name)(tokenizer=None, text_encoder=None, transformer=oracle, vae=None,
                                            scheduler=require_oracle("FlowMapEulerDiscreteScheduler")(shift=5.0))
        pipe.set_progress_bar_config(disable=True)
        b, f, c, h, w = noise.shape
        with torch.no_grad():
            latents = pipe(prompt_embeds=text, latents=noise.transpose(1, 2), num_inference_steps=2, output_type="latent",
                           height=8 * h, width=8 * w, num_frames=4 * (f - 1) + 1).frames.transpose(1, 2)
        assert (latents - golden["sample_2_steps"]).abs().max() <= 1e-5 * golden["sample_2_steps"].abs().max()
        assert os.path.getsize(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors")) < 4e6


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
    assert_same_run(latents, expected.transpose(1, 2))


# ---- anyflow sample: every bad argument is one line, before the model is loaded, with nothing left behind --


@pytest.fixture
def inputs(tmp_path, embeddings):
    """Input files of every kind of bad input, beside the good embeddings and a copy of the tiny model."""
    def embeds(name, tensor, key="prompt_embeds"):
        save_file({key: tensor}, str(tmp_path / name))
        return tmp_path / name

    nan = torch.zeros(1, 6, 4096)
    nan[0, :3, 0] = float("nan")
    inf = torch.zeros(1, 6, 4096)
    inf[0, 2, 7] = float("inf")
    files = dict(
        embeds=embeddings,
        wrong_key=embeds("wrong_key.safetensors", torch.zeros(1, 2, 4096), key="text"),
        nan=embeds("nan.safetensors", nan),
        inf_negative=embeds("inf.safetensors", inf, key="negative_prompt_embeds"),
        no_tokens=embeds("empty.safetensors", torch.zeros(1, 0, 4096)),
        narrow=embeds("narrow.safetensors", torch.zeros(1, 6, 24)),
        model=tmp_path / "model",
        folder=tmp_path / "a_folder",
        read_only=tmp_path / "read_only",
        missing=tmp_path / "nope",
    )
    shutil.copytree(TINY_CHECKPOINT, files["model"])
    files["folder"].mkdir()
    files["read_only"].mkdir()
    files["read_only"].chmod(0o555)
    (tmp_path / "existing.safetensors").write_text("keep")
    return files


def everything_under(folder):
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(folder) for f in names}


NO_CUDA = not torch.cuda.is_available()
SAMPLE_ERRORS = {
    "frames not 4k+1": ({"--frames": "10"}, [], r"--frames must be 4k \+ 1"),
    "height": ({"--height": "72"}, [], r"--height must be a positive multiple of 16"),
    "zero steps": ({"--steps": "0"}, [], r"--steps: num_steps must be an int from 1 to 1000"),
    "steps beyond the timestep grid": ({"--steps": "100000000"}, [], r"--steps: num_steps must be an int from 1 to 1000 "
                                       r"\(the models' timestep grid\), got 100000000"),
    "guidance NaN": ({"--guidance-scale": "nan"}, [], r"--guidance-scale must be a finite number, got nan"),
    "max hours": ({"--max-hours": "-1"}, [], r"--max-hours must be a number of hours >= 0 \(0: no limit\), got -1.0"),
    "out not safetensors": ({"--out": "out.mp4"}, [], r"--out out.mp4: anyflow sample writes latents as a .safetensors "
                            r"file; name it out.safetensors; for a video, use anyflow generate"),
    "FAR compressed patch": ({"--model": TINY_FAR_CHECKPOINT, "--frames": "25", "--height": "48", "--width": "80"}, [],
                             r"--height 48: 6 latent pixels are not divisible by the model's compressed patch "
                             r"\(compressed_patch_size\) 4; use a multiple of 32"),
    "out is the model's config": ({"--model": "{model}/transformer/diffusion_pytorch_model.safetensors",
                                   "--out": "{model}/transformer/config.json"}, ["--force"],
                                  r"--out .*config.json: is the input --model"),
}


@pytest.mark.parametrize("case", sorted(SAMPLE_ERRORS))
def test_sample_errors_are_one_line_name_the_argument_and_leave_nothing(tmp_path, inputs, capsys, monkeypatch, case):
    import errno

    import anyflow.runtime.memory

    change, flags, message = SAMPLE_ERRORS[case]
    values = {"--model": str(TINY_CHECKPOINT), "--prompt-embeds": str(inputs["embeds"]), "--frames": "9",
              "--height": "64", "--width": "64", "--out": str(tmp_path / "o.safetensors"), "--device": "cpu"}
    values.update({k: v.format(tmp=tmp_path, **inputs) for k, v in change.items()})

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(AnyFlowTransformer3DModel, "from_pretrained", must_not_load)
    monkeypatch.setattr(anyflow.runtime.memory, "available_memory", lambda device: 8 * 2**30)
    if os.geteuid() == 0:  # root writes into a 0o555 folder: refuse as a read-only mount would
        real_open = os.open

        def read_only_open(path, flags, *args):
            if os.path.dirname(os.path.abspath(path)) == str(inputs["read_only"]) and flags & os.O_CREAT:
                raise OSError(errno.EROFS, "Read-only file system", path)
            return real_open(path, flags, *args)

        monkeypatch.setattr(os, "open", read_only_open)
    before = everything_under(tmp_path)
    assert main(["sample"] + [x for kv in values.items() for x in kv] + flags) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("anyflow sample: error: "), err
    assert re.search(message, err[0]), err[0]
    assert everything_under(tmp_path) == before


def test_sample_prints_the_estimate_progress_and_counts_the_steps_run(tmp_path, embeddings, capsys):
    out = tmp_path / "o.safetensors"
    args = ["sample", "--model", TINY_CHECKPOINT, "--prompt-embeds", str(embeddings), "--frames", "5", "--height", "32",
            "--width", "32", "--sigmas", "1.0", "0.5", "0.0", "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert re.search(r"memory: about \d+ MiB \(weights \d+ MiB, latents \d+ MiB, text context \d+ MiB, activations \d+ MiB\) "
                     r"needed; [\d.]+ GiB available on cpu", printed), printed
    assert re.search(r"loaded .* \(4.4\de5 parameters, torch.float32, cpu\)", printed)
    assert re.search(r"step 2/2: t = +\d+.\d+ -> r = +0.00 .* \(elapsed [\d.]+ s, about [\d.]+ s left\)", printed)
    assert "step 3/" not in printed and "after 2 step(s)" in printed
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    assert metadata["steps"] == "2" and json.loads(metadata["sigmas"])[-2:] == [0.0, 0.0]
    assert sorted(os.listdir(tmp_path)) == ["embeds.safetensors", "o.safetensors"]


def test_sample_refuses_to_overwrite_without_force(tmp_path, embeddings, capsys):
    out = tmp_path / "o.safetensors"
    out.write_text("keep")
    args = ["sample", "--model", TINY_CHECKPOINT, "--prompt-embeds", str(embeddings), "--frames", "5", "--height", "32",
            "--width", "32", "--steps", "1", "--out", str(out), "--device", "cpu"]
    assert main(args) == 1 and f"--out {out}: already exists; pass --force to replace it" in capsys.readouterr().err
    assert out.read_text() == "keep"
    assert main(args + ["--force"]) == 0 and load_file(str(out))["latents"].shape == (1, 16, 2, 4, 4)


def interrupted_run(cwd, code: str, ready, signum):
    """Run ``code`` in a fresh interpreter, send ``signum`` once ``ready()`` holds; (exit code, stderr lines)."""
    process = subprocess.Popen([sys.executable, "-c", code], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 60
    while not ready() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    return process.returncode, err.strip().splitlines()


@pytest.mark.slow
@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sample_interrupted_says_one_line_and_leaves_nothing(tmp_path, embeddings, signum, code):
    slow = (
        "import sys, time, anyflow, anyflow.sampling\n"
        "anyflow.sampling.sample = lambda *a, **k: time.sleep(60)\n"
        "from anyflow.cli import main\n"
        f"sys.exit(main(['sample', '--model', {TINY_CHECKPOINT!r}, '--prompt-embeds', {str(embeddings)!r}, "
        f"'--frames', '5', '--height', '32', '--width', '32', '--device', 'cpu', '--out', 'o.safetensors']))\n"
    )
    exit_code, err = interrupted_run(tmp_path, slow, lambda: any(".partial-" in n for n in os.listdir(tmp_path)), signum)
    assert exit_code == code and len(err) == 1, err
    assert err[0] == f"anyflow sample: interrupted ({signal.Signals(signum).name}); nothing was written"
    assert os.listdir(tmp_path) == ["embeds.safetensors"]


def test_version_and_help_on_every_option(capsys):
    from anyflow import __version__
    from anyflow.cli import build_parser
    from weights_convert.cli import build_parser as build_convert_parser

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"anyflow {__version__}"
    parsers = [build_parser(), build_convert_parser()]
    parsers += [p for action in parsers[0]._actions if isinstance(action, argparse._SubParsersAction)
                for p in action.choices.values()]
    undocumented = [(p.prog, a.dest) for p in parsers for a in p._actions
                    if not a.help and not isinstance(a, argparse._SubParsersAction)]
    assert not undocumented


def test_inspect_writes_counts_readably(capsys):
    from anyflow.cli.common import format_count as count

    assert [count(n) for n in (12, 443_520, 1_418_996_800, 999_600)] == ["12", "4.44e5", "1.42e9", "1.00e6"]
    assert main(["inspect", TINY_CHECKPOINT]) == 0
    assert re.search(r"parameters: [\d,]+ \(4.4\de5\) in \d+ tensors", capsys.readouterr().out)


def test_memory_estimate_adds_its_parts_and_doubles_with_guidance():
    from anyflow import AnyFlowConfig
    from anyflow.runtime.memory import available_memory, estimate_sampling_memory

    config = AnyFlowConfig.from_preset("anyflow-wan2.1-t2v-1.3b")
    plain = estimate_sampling_memory(config, 5_000_000_000, (1, 21, 16, 60, 104), 512, 2)
    guided = estimate_sampling_memory(config, 5_000_000_000, (1, 21, 16, 60, 104), 512, 2, guided=True)
    assert plain.weights == guided.weights == 5_000_000_000
    assert plain.total == plain.weights + plain.latents + plain.context + plain.activations
    assert guided.context == 2 * plain.context and 1.9 * plain.activations < guided.activations < 2.1 * plain.activations
    # 81 frames at 480p, 1.3B widths in bf16: 24 bytes per token and unit (measured: 19), one FFN chunk, RoPE
    assert 1.4 * 2**30 < plain.activations < 1.5 * 2**30
    assert available_memory(torch.device("cpu")) > 0


# ---- anyflow sample on a FAR checkpoint --------------------------------------------------------------

FAR_ARGS = ["sample", "--model", TINY_FAR_CHECKPOINT, "--frames", "25", "--height", "128", "--width", "256",
            "--steps", "2", "--seed", "5", "--device", "cpu"]


@pytest.mark.slow
def test_sample_on_a_far_checkpoint_goes_chunk_by_chunk(tmp_path, embeddings, capsys):
    image = torch.randn(1, 16, 1, 16, 32, generator=torch.Generator().manual_seed(6))  # (B, C, K, H, W)
    save_file({"latents": image}, str(tmp_path / "image.safetensors"))
    model = AnyFlowFARTransformer3DModel.from_pretrained(TINY_FAR_CHECKPOINT)
    noise = torch.randn(1, 7, 16, 16, 32, generator=torch.Generator().manual_seed(5))
    text = load_file(str(embeddings))["prompt_embeds"]
    for extra, given, chunks in [([], None, 4), (["--context-latents", str(tmp_path / "image.safetensors")], image, 3)]:
        out = tmp_path / "latents.safetensors"
        assert main(FAR_ARGS + ["--prompt-embeds", str(embeddings), "--out", str(out), "--force"] + extra) == 0
        printed = capsys.readouterr().out
        assert "cache" in printed.splitlines()[0]  # the memory estimate counts the key/value cache
        assert f"chunk 4/4 (2 frames): step {2 * chunks}/{2 * chunks}" in printed
        assert f"after 2 step(s) in each of {chunks} chunk(s)" in printed
        expected = sample_far(model, noise, text, num_steps=2,
                              context_latents=None if given is None else given.transpose(1, 2))
        assert_same_run(load_file(str(out))["latents"], expected.transpose(1, 2))
        with safe_open(str(out), "pt") as f:
            assert f.metadata()["chunk_partition"] == "[1, 2, 2, 2]"


@pytest.mark.parametrize("extra,message", [
    (["--chunk-partition", "1", "2"], r"--chunk-partition \[1, 2\] sums to 3 latent frames, the video has 7 "
                                      r"\(--frames 25\); give a --chunk-partition that sums to 7"),
    (["--frames", "10"], r"--frames must be 4k \+ 1 \(the Wan VAE compresses time by 4\), got 10"),
    (["--context-window", "1"], r"--context-window 1 is smaller than a chunk \(2 latent frames\): a chunk ages into "
                                r"the compressed context whole"),
    (["--context-window", "2", "--sink-frames", "-1"], r"--sink-frames must be an int >= 0 \(the first latent frames "
                                                       r"kept\), got -1"),
    (["--context-window", "2", "--sink-frames", "3"], r"--sink-frames 3 is larger than --context-window 2"),
    (["--sink-frames", "1"], r"--sink-frames 1 needs --context-window: without a window every frame is kept already"),
    (["--guidance-scale", "2"], r"--guidance-scale 2.0: the FAR sampler runs without guidance"),
    (["--context-latents", "{two_frames}"], r"--context-latents .*: context_latents gives 2 frames, which do not fill "
                                            r"whole chunks"),
    (["--context-latents", "{wrong_size}"], r"--context-latents .*: 'latents' is torch.float32 \(1, 16, 1, 8, 8\); "
                                            r"expected floats \(B=1, C=16, K, H=16, W=32\)"),
    (["--context-latents", "{nan}"], r"--context-latents .*: 'latents' has NaN or infinite values"),
    (["--height", "136"], r"--height must be a positive multiple of 16"),
])
def test_far_sample_errors_are_one_line_before_loading(tmp_path, embeddings, capsys, monkeypatch, extra, message):
    files = {"two_frames": torch.zeros(1, 16, 2, 16, 32), "wrong_size": torch.zeros(1, 16, 1, 8, 8),
             "nan": torch.full((1, 16, 1, 16, 32), float("nan"))}
    for name, tensor in files.items():
        save_file({"latents": tensor}, str(tmp_path / f"{name}.safetensors"))
    monkeypatch.setattr(AnyFlowFARTransformer3DModel, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    args = FAR_ARGS + ["--prompt-embeds", str(embeddings), "--out", str(tmp_path / "o.safetensors")]
    args += [a.format(**{k: tmp_path / f"{k}.safetensors" for k in files}) for a in extra]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert not (tmp_path / "o.safetensors").exists()


def test_chunk_partition_on_a_bidirectional_checkpoint_is_refused(tmp_path, embeddings, capsys):
    args = ["sample", "--model", TINY_CHECKPOINT, "--prompt-embeds", str(embeddings), "--frames", "9", "--height", "64",
            "--width", "64", "--chunk-partition", "3", "--out", str(tmp_path / "o.safetensors"), "--device", "cpu"]
    assert main(args) == 1
    assert "--chunk-partition: " in capsys.readouterr().err and not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("seed", ["99999999999999999999999", "-1", "1.5"])
def test_a_seed_torch_cannot_take_is_refused_by_the_parser(capsys, seed):
    with pytest.raises(SystemExit) as exit:
        main(["sample", "--model", TINY_CHECKPOINT, "--prompt-embeds", "e.safetensors", "--seed", seed, "--out", "o.safetensors"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert re.search(r"argument --seed: (.* is outside 0 to 2\^64 - 1|'1.5' is not an integer)", err), err


def test_help_states_the_pixel_multiples_and_the_compute_limit(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "a multiple of 16 (8 x the patch 2) for the bidirectional models, of 32 (8 x the compressed patch 4) for the FAR" in text
    assert "--max-hours HOURS" in text and "number of steps, 1 to 1000" in text


def test_the_compute_cost_is_stated_and_an_absurd_run_refused_before_loading(tmp_path, embeddings, capsys, monkeypatch):
    import anyflow.runtime.compute

    def stop_at_loading(*args, **kwargs):
        raise ValueError("stopped where the model would load")

    monkeypatch.setattr(anyflow.runtime.compute, "measure_matmul_rate", lambda device, dtype, width: 1e9)  # 1 GFLOP/s
    monkeypatch.setattr(AnyFlowTransformer3DModel, "from_pretrained", stop_at_loading)
    args = ["sample", "--model", TINY_CHECKPOINT, "--prompt-embeds", str(embeddings), "--frames", "2001", "--height",
            "512", "--width", "512", "--device", "cpu", "--out", str(tmp_path / "o.safetensors")]
    assert main(args) == 1
    captured = capsys.readouterr()
    config = json.loads(open(os.path.join(TINY_CHECKPOINT, "transformer", "config.json")).read())
    d, f, layers = config["num_attention_heads"] * config["attention_head_dim"], config["ffn_dim"], config["num_layers"]
    tokens, text = 501 * 32 * 32, load_file(str(embeddings))["prompt_embeds"].shape[1]
    # 4 forwards; per block: the linear layers, self-attention over every token, cross-attention, the context K/V
    flops = 4 * layers * (tokens * (2 * (6 * d * d + 2 * d * f) + 4 * tokens * d + 4 * text * d) + 4 * text * d * d)
    hours = f"{flops / 1e9 / 3600:,.1f} h"
    assert f"compute: 513,024 tokens, 4 forward pass(es), about {flops:.1e} FLOPs, about {hours} at the 1 GFLOP/s " \
           "measured here\n" in captured.out, captured.out
    assert captured.err.strip() == (
        f"anyflow sample: error: --frames 2001 --height 512 --width 512 --steps 4: the run needs about {flops:.1e} FLOPs, "
        f"about {hours} on cpu, more than --max-hours 12; use fewer frames, pixels or steps, or raise --max-hours (0 turns "
        "the check off)")
    assert main(args + ["--max-hours", "0"]) == 1
    assert "stopped where the model would load" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["embeds.safetensors"]


@pytest.mark.slow
def test_ctrl_c_ends_a_run_inside_one_long_native_call_within_seconds(tmp_path, embeddings):
    """One attention over 102,400 tokens runs for minutes in one native call; Ctrl-C must not wait for it."""
    log = tmp_path / "log.txt"
    command = [sys.executable, "-m", "anyflow", "sample", "--model", TINY_CHECKPOINT, "--prompt-embeds", str(embeddings),
               "--frames", "97", "--height", "1024", "--width", "1024", "--max-hours", "0", "--device", "cpu",
               "--out", str(tmp_path / "o.safetensors")]
    with open(log, "w") as stdout:
        process = subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while "loaded " not in log.read_text() and time.time() < deadline and process.poll() is None:
            time.sleep(0.05)
        time.sleep(1.0)  # inside the first step's attention
        assert process.poll() is None, log.read_text()
        sent = time.time()
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert time.time() - sent < 15
    assert process.returncode == 130 and err.strip() == "anyflow sample: interrupted (SIGINT); nothing was written", err
    assert sorted(os.listdir(tmp_path)) == ["embeds.safetensors", "log.txt"]


def test_partials_of_dead_processes_are_removed_and_live_or_foreign_ones_kept(tmp_path, embeddings):
    from weights_convert.partials import _host

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "o.safetensors"
    left = {f".o.safetensors.partial-{_host()}-{dead.pid}": "killed: removed",
            f".o.safetensors.partial-{dead.pid}": "an earlier version's name: removed",
            f".o.safetensors.partial-{_host()}-{os.getppid()}": "a live process: kept",
            f".o.safetensors.partial-otherhost-{dead.pid}": "another host sharing the folder: kept"}
    for name in left:
        (tmp_path / name).write_bytes(b"")
    assert main(["sample", "--model", TINY_CHECKPOINT, "--prompt-embeds", str(embeddings), "--frames", "5", "--height",
                 "32", "--width", "32", "--steps", "1", "--device", "cpu", "--out", str(out)]) == 0
    kept = {name for name, why in left.items() if why.endswith("kept")}
    assert set(os.listdir(tmp_path)) == {"embeds.safetensors", "o.safetensors"} | kept


def test_the_file_holds_the_latents_in_the_models_dtype_as_sample_returns_them(tmp_path, embeddings):
    out = tmp_path / "o.safetensors"
    assert main(["sample", "--model", TINY_CHECKPOINT, "--prompt-embeds", str(embeddings), "--frames", "5", "--height",
                 "32", "--width", "32", "--steps", "2", "--dtype", "bfloat16", "--device", "cpu", "--out", str(out)]) == 0
    model = AnyFlowTransformer3DModel.from_pretrained(TINY_CHECKPOINT, dtype="bfloat16")
    noise = torch.randn(1, 2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    expected = sample(model, noise, load_file(str(embeddings))["prompt_embeds"], num_steps=2)
    stored = load_file(str(out))["latents"]
    assert stored.dtype == expected.dtype == torch.bfloat16
    assert_same_run(stored, expected.transpose(1, 2))


def test_a_device_torch_does_not_know_is_named_in_one_line():
    with pytest.raises(ValueError, match=r"^device 'gpu': not a device type torch knows; use 'cpu', 'cuda' or 'cuda:N'$"):
        AnyFlowTransformer3DModel.from_pretrained(TINY_CHECKPOINT, device="gpu")
    with pytest.raises(ValueError, match=r"^device 'xla': xla is not supported; use 'cpu', 'cuda' or 'cuda:N'$"):
        AnyFlowTransformer3DModel.from_pretrained(TINY_CHECKPOINT, device="xla")


def test_compile_compiles_the_blocks_and_writes_what_eager_writes(tmp_path, embeddings, monkeypatch, capsys):
    from anyflow.pretrained import Pretrained

    compiled = []
    plain_compile = Pretrained.compile_blocks

    def compile_blocks(model, **options):  # the eager backend: traced graphs, the same kernels, no C++ build
        compiled.append(type(model).__name__)
        return plain_compile(model, backend="eager")

    monkeypatch.setattr(Pretrained, "compile_blocks", compile_blocks)
    common = ["sample", "--model", TINY_CHECKPOINT, "--prompt-embeds", str(embeddings), "--frames", "5", "--height",
              "32", "--width", "32", "--steps", "2", "--device", "cpu"]
    assert main(common + ["--out", str(tmp_path / "eager.safetensors")]) == 0
    assert main(common + ["--compile", "--out", str(tmp_path / "compiled.safetensors")]) == 0
    assert compiled == ["AnyFlowTransformer3DModel"]
    assert "DiT blocks compiled on first use" in capsys.readouterr().out
    eager, traced = (load_file(str(tmp_path / f"{name}.safetensors"))["latents"] for name in ("eager", "compiled"))
    assert torch.equal(eager, traced)  # the eager backend runs the traced graph with the same kernels, in this process
