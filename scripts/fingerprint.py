"""Outputs of the public API on fixed seeds, written to one file, to show a refactor changed no bit.

    python scripts/fingerprint.py write before.safetensors     # on the old tree
    python scripts/fingerprint.py write after.safetensors      # on the new tree, same machine and threads
    python scripts/fingerprint.py compare before.safetensors after.safetensors

It records, through names importable from ``anyflow`` and ``anyflow.training`` only: a forward pass of
the bidirectional model (float32 and bfloat16, raw embeddings and a prepared context), ``sample`` in
1, 2 and 4 steps (with guidance and a given frame too), the FAR model's rollout ``forward`` with clean
copies, ``sample_far`` (from a given frame too), ``VideoPipeline`` on tiny complete snapshots (both
kinds), and one stage-1 training step (its loss and the LoRA gradients). ``compare`` prints each
tensor's largest difference and exits 1 unless every one is bit-identical. The tiny snapshots and the
training run come from the test helpers (``tests/``), so the test extra must be installed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

SMALL = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=24, freq_dim=32,
             ffn_dim=48, num_layers=2)


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn again so that activations are O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.5 if "modulation" in name else (param[0].numel() ** -0.5 if param.dim() >= 2 else 0.2)
            param.copy_(torch.randn(param.shape, generator=gen) * scale + (1.0 if "norm" in name and
                                                                          name.endswith("weight") else 0.0))
    return model


def draw(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def model_outputs() -> dict:
    from anyflow import AnyFlowConfig, AnyFlowFARConfig, AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel
    from anyflow import sample, sample_far

    out = {}
    model = randomized(AnyFlowTransformer3DModel(AnyFlowConfig(**SMALL)), 0).eval()
    noise, text = draw(1, 5, 4, 8, 12, seed=1), draw(1, 7, 24, seed=2)
    negative = draw(1, 7, 24, seed=3)
    with torch.no_grad():
        out["forward_fp32"] = model(noise, 900.0, 300.0, text).sample
        out["forward_prepared"] = model(noise, torch.tensor([700.0]), 0.0, model.prepare_context(text)).sample
    for steps in (1, 2, 4):
        out[f"sample_{steps}"] = sample(model, noise, text, num_steps=steps)
    out["sample_guided"] = sample(model, noise, text, num_steps=2, guidance_scale=3.0,
                                  negative_encoder_hidden_states=negative)
    out["sample_given"] = sample(model, noise, text, num_steps=2, context_latents=noise[:, :1] * 0.5)
    model.to_dtype("bfloat16")
    with torch.no_grad():
        out["forward_bf16"] = model(noise, 900.0, 300.0, text).sample.float()
    out["sample_bf16"] = sample(model, noise, text, num_steps=2).float()

    far = randomized(AnyFlowFARTransformer3DModel(AnyFlowFARConfig(**SMALL, chunk_partition=(1, 2, 2, 2),
                                                                   full_chunk_limit=2)), 4).eval()
    far_noise = draw(1, 7, 4, 8, 16, seed=5)
    with torch.no_grad():
        out["far_rollout"] = far(far_noise, 800.0, 200.0, text, chunk_partition=(1, 2, 2, 2)).sample
        out["far_rollout_clean"] = far(far_noise, 800.0, 200.0, text, chunk_partition=(1, 2, 2, 2),
                                       clean_hidden_states=far_noise[:, 3:] * 0.3).sample
    for steps in (1, 2, 4):
        out[f"sample_far_{steps}"] = sample_far(far, far_noise, text, num_steps=steps)
    out["sample_far_given"] = sample_far(far, far_noise, text, num_steps=2, context_latents=far_noise[:, :1] * 0.5)
    return out


def pipeline_outputs() -> dict:
    from anyflow import VideoPipeline
    from snapshot_fixtures import make_tiny_snapshot

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for far, size in ((False, (9, 64, 64)), (True, (17, 128, 128))):
            root = make_tiny_snapshot(os.path.join(tmp, "far" if far else "bidirectional"), far=far)
            pipe = VideoPipeline.from_pretrained(root)
            frames, height, width = size
            key = "pipeline_far" if far else "pipeline"
            out[key] = pipe("a red fox in the snow", num_frames=frames, height=height, width=width, num_steps=2, seed=7)
            image = torch.rand(height, width, 3, generator=torch.Generator().manual_seed(8))
            out[f"{key}_image"] = pipe("a fox", num_frames=frames, height=height, width=width, num_steps=1, seed=9,
                                       image=image)
    return out


def training_outputs() -> dict:
    import training_fixtures as fixtures

    with tempfile.TemporaryDirectory() as tmp:
        fixtures.tiny_checkpoint(os.path.join(tmp, "model"))
        fixtures.tiny_data(os.path.join(tmp, "data"))
        step = fixtures.first_step(fixtures.tiny_config(tmp))
    out = {f"train_grad.{name}": torch.tensor(values) for name, values in step["gradients"].items()}
    out["train_loss"] = torch.tensor([value for _, value in sorted(step["record"].items())
                                      if isinstance(value, float) and "second" not in _], dtype=torch.float64)
    return out


def write(path: str) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    tensors = {**model_outputs(), **pipeline_outputs(), **training_outputs()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    print(f"wrote {len(tensors)} tensors to {path} (torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()})")


def compare(before: str, after: str) -> int:
    from safetensors.torch import load_file

    a, b = load_file(before), load_file(after)
    if set(a) != set(b):
        print(f"keys differ: only before {sorted(set(a) - set(b))}, only after {sorted(set(b) - set(a))}")
        return 1
    different = 0
    for key in sorted(a):
        same = torch.equal(a[key], b[key])
        diff = (a[key].double() - b[key].double()).abs().max().item() if a[key].shape == b[key].shape else float("nan")
        different += not same
        print(f"{key:<48} {tuple(a[key].shape)!s:<22} {'identical' if same else f'DIFFERS by {diff:.3e}'}")
    print(f"{len(a) - different} of {len(a)} tensors bit-identical")
    return 1 if different else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("write").add_argument("out")
    check = commands.add_parser("compare")
    check.add_argument("before")
    check.add_argument("after")
    args = parser.parse_args()
    if args.command == "write":
        write(args.out)
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
