"""``anyflow demo``: the tiny checkpoints shipped in the package converted, loaded and checked against diffusers;
then a video made end to end (prompt, text encoder, FAR transformer chunk by chunk, VAE, mp4) from the tiny
complete snapshot shipped beside them."""

from __future__ import annotations

import argparse
import os
import time

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
TINY_CHECKPOINT = os.path.join(ASSETS, "tiny")
TINY_FAR_CHECKPOINT = os.path.join(ASSETS, "tiny_far")
TINY_SNAPSHOT = os.path.join(ASSETS, "tiny_snapshot")  # tokenizer, text encoder, FAR transformer, VAE, scheduler
DEMO_PROMPT = "a red fox walks through the snow"
DEMO_VIDEO = ["--frames", "17", "--height", "128", "--width", "128", "--steps", "2", "--seed", "0"]


def add_command(commands) -> None:
    """The ``demo`` subcommand."""
    demo = commands.add_parser(
        "demo", help="convert, check and sample the tiny checkpoints shipped in the package",
        description="Convert the embedded tiny AnyFlow checkpoints (bidirectional and FAR, Hub diffusers layout) with "
        "the real converter, load them, check a forward pass and 1/2/4-step samples (the FAR one also from a given "
        "frame) against the stored diffusers outputs, and print a table. Then make a short video with anyflow generate "
        "from the tiny complete snapshot in the package (random weights: the frames show noise, made the whole way a "
        "released snapshot makes a video); that part needs the video extra.",
    )
    demo.add_argument("--out", default="anyflow-demo.mp4", metavar="FILE",
                      help="the demo video (default anyflow-demo.mp4; an existing file is kept and the next free name "
                      "anyflow-demo-N.mp4 taken)")
    demo.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    failures = demo_checkpoint("bidirectional", TINY_CHECKPOINT) + demo_checkpoint("FAR", TINY_FAR_CHECKPOINT)
    print("\ndemo passed: converter, loaders, forward passes and samplers agree with diffusers" if not failures
          else f"\ndemo FAILED: {failures} check(s) outside the {DEMO_BAR:.0e} bar")
    if failures:
        return 1
    return demo_video(args.out)


def demo_video(out: str) -> int:
    """``anyflow generate`` on the tiny snapshot into ``out`` (or the next free name), then how to run it again."""
    import importlib.util

    from .generate import EXTRA, add_command

    print("\n== a video from a prompt ==")
    if any(importlib.util.find_spec(name) is None for name in ("tokenizers", "av")):
        print(f"skipped: the video part needs the video extra: {EXTRA}")
        return 0
    stem, extension = os.path.splitext(out)
    candidate, n = out, 1
    while os.path.lexists(candidate):
        candidate, n = f"{stem}-{n}{extension}", n + 1
    command = ["generate", "--model", TINY_SNAPSHOT, "--prompt", DEMO_PROMPT, *DEMO_VIDEO, "--out", candidate]
    parser = argparse.ArgumentParser(prog="anyflow")
    add_command(parser.add_subparsers())
    args = parser.parse_args(command)
    code = args.run(args)
    if code == 0:
        print(f"\nthe demo video: {os.path.abspath(candidate)} (random weights: noise, made the whole way)\n"
              f"to make it again: anyflow {' '.join(_quoted(a) for a in command)}")
    return code


def _quoted(argument: str) -> str:
    return f'"{argument}"' if " " in argument else argument


DEMO_BAR = 1e-5  # the fp32 parity bar: max|ours - diffusers| <= bar * max|diffusers|


def demo_checkpoint(kind: str, folder: str) -> int:
    """Convert, load, and check one embedded checkpoint against its stored diffusers outputs; the failures."""
    import tempfile

    import torch

    from anyflow import AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel, sample, sample_far
    from weights_convert import convert
    from weights_convert.safetensors_io import read_header

    golden = {k: r.read() for k, r in read_header(os.path.join(folder, "golden.safetensors"))[0].items()}
    far = kind == "FAR"

    def error(ours, reference) -> float:
        return ((ours - reference).abs().max() / reference.abs().max()).item()

    print(f"\n== {kind} ==")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "tiny-anyflow")
        start = time.perf_counter()
        report = convert(folder, out, progress=None)
        print(f"converted {report.source.description} -> anyflow layout in {time.perf_counter() - start:.2f} s")
        model = (AnyFlowFARTransformer3DModel if far else AnyFlowTransformer3DModel).from_pretrained(out)
    print(f"loaded: {sum(p.numel() for p in model.parameters()):,} parameters, config {model.config.to_dict()}")
    noise, text = golden["noise"], golden["prompt_embeds"]
    with torch.no_grad():
        velocity = model(noise, golden["timestep"], golden["r_timestep"], text).sample
    failures = 0
    forward_error = error(velocity, golden["forward"])
    failures += forward_error > DEMO_BAR
    print(f"forward pass vs diffusers: max error {forward_error:.1e} of max|ref| "
          f"({'ok' if forward_error <= DEMO_BAR else 'FAIL'})")
    runs = {f"sample_{steps}_steps": (steps, None) for steps in (1, 2, 4)}
    if far:
        runs["sample_2_steps_from_given_frame"] = (2, golden["given_frame"])
    print(f"\n{'run':<32} {'seconds':>8} {'mean':>8} {'std':>7} {'error vs diffusers':>19}")
    for name, (steps, given) in runs.items():
        start = time.perf_counter()
        latents = (sample_far if far else sample)(model, noise, text, num_steps=steps, context_latents=given)
        seconds = time.perf_counter() - start
        e = error(latents, golden[name])
        failures += e > DEMO_BAR
        label = f"{steps} step(s)" + (", 1 given frame" if given is not None else "")
        print(f"{label:<32} {seconds:8.3f} {latents.mean().item():8.4f} {latents.std().item():7.4f} "
              f"{e:15.1e} {'ok' if e <= DEMO_BAR else 'FAIL'}")
    return failures
