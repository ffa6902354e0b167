"""Cases run by tests/test_parallel.py on 2 processes (gloo, CPU): ``torchrun ... distributed_cases.py OUT CASE...``.

Each case computes on every rank and writes ``OUT/CASE.rank{r}.json``: numbers the test compares
with a single process, or the error the rank raised.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from anyflow import (  # noqa: E402
    AnyFlowFARConfig, AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel, load_parallel, parallelize, sample,
    sample_far,
)
from support import SMALL, random_inputs, randomize_, small_config  # noqa: E402

MODES = {"shard": (True, False), "sequence": (False, True), "both": (True, True)}


def checkpoint(folder: str, model) -> str:
    """The model saved once (by rank 0) for every rank to load."""
    if dist.get_rank() == 0 and not os.path.isdir(folder):
        model.save_pretrained(folder)
    dist.barrier()
    return folder


def reference_model(config=None, seed=0):
    torch.manual_seed(seed)
    model = AnyFlowTransformer3DModel(config or small_config()).eval()
    randomize_(model, seed)
    return model


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def case_forward(work, mesh):
    """Each mode, on an odd token count (3 x 3 x 5 = 45) and an even one, raw and prepared context."""
    reference = reference_model()
    path = checkpoint(os.path.join(work, "bidirectional"), reference)
    errors = {}
    for mode, (shard, sequence) in MODES.items():
        model = load_parallel(AnyFlowTransformer3DModel, path, mesh, shard_weights=shard, sequence_parallel=sequence)
        for height, width in [(6, 10), (8, 8)]:
            latents, t, r, text, _ = random_inputs(reference.config, batch=2, frames=3, height=height, width=width)
            with torch.no_grad():
                expected = reference(latents, t, r, text).sample
                raw = model(latents, t, r, text).sample
                prepared = model(latents, t, r, model.prepare_context(text)).sample
            errors[f"{mode} {height}x{width}"] = max(relative(raw, expected), relative(prepared, expected))
    return errors


def case_sample(work, mesh):
    reference = reference_model(seed=1)
    path = checkpoint(os.path.join(work, "bidirectional-sample"), reference)
    model = load_parallel(AnyFlowTransformer3DModel, path, mesh)
    gen = torch.Generator().manual_seed(2)
    noise, text = torch.randn(1, 3, 4, 6, 6, generator=gen), torch.randn(1, 5, 24, generator=gen)
    return {"error": relative(sample(model, noise, text, num_steps=2), sample(reference, noise, text, num_steps=2))}


def case_gradients(work, mesh):
    """FSDP2 as data parallelism: rank r takes sample r; the averaged gradients are one process's on both."""
    reference = reference_model(seed=3).train()
    path = checkpoint(os.path.join(work, "bidirectional-train"), reference)
    latents, t, r, text, _ = random_inputs(reference.config, batch=2, frames=2, height=6, width=6, seed=3)
    reference.enable_gradient_checkpointing()
    reference(latents, t, r, text).sample.square().mean().backward()
    model = load_parallel(AnyFlowTransformer3DModel, path, mesh, sequence_parallel=False).train()
    model.enable_gradient_checkpointing()
    rank = dist.get_rank()
    mine = slice(rank, rank + 1)
    model(latents[mine], t[mine], r[mine], text[mine]).sample.square().mean().backward()
    errors = {}
    for (name, param), (_, expected) in zip(model.named_parameters(), reference.named_parameters()):
        grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        errors[name] = relative(grad, expected.grad)
    model(latents[mine], t[mine], r[mine], text[mine]).sample.square().mean().backward()  # accumulated: twice
    doubled = max(relative(p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad, 2 * e.grad)
                  for (_, p), (_, e) in zip(model.named_parameters(), reference.named_parameters()))
    return {"worst": max(errors.values()), "checked": len(errors), "bad": sorted(n for n, e in errors.items() if e > 1e-5),
            "accumulated": doubled}


def case_far(work, mesh):
    config = AnyFlowFARConfig(**SMALL, chunk_partition=(1, 2, 2))
    reference = AnyFlowFARTransformer3DModel(config).eval()
    randomize_(reference, 4)
    path = checkpoint(os.path.join(work, "far"), reference)
    model = load_parallel(AnyFlowFARTransformer3DModel, path, mesh, sequence_parallel=False)
    gen = torch.Generator().manual_seed(5)
    noise, text = torch.randn(1, 5, 4, 8, 8, generator=gen), torch.randn(1, 5, 24, generator=gen)
    latents, t, r, _, _ = random_inputs(config, batch=1, frames=5, height=8, width=8, seed=6)
    with torch.no_grad():
        rollout = relative(model(latents, t, r, text).sample, reference(latents, t, r, text).sample)
    result = {"sample": relative(sample_far(model, noise, text, num_steps=2), sample_far(reference, noise, text, num_steps=2)),
              "rollout": rollout}
    try:
        parallelize(AnyFlowFARTransformer3DModel(config), mesh, shard_weights=False)
    except ValueError as exc:
        result["far sequence"] = str(exc)
    return result


def case_lora(work, mesh):
    """Sharded weights with a LoRA merged as each rank reads its own rows, against one process."""
    from safetensors.torch import save_file

    reference = reference_model(seed=3)
    path = checkpoint(os.path.join(work, "bidirectional-lora"), reference)
    adapter = os.path.join(work, "adapter.safetensors")
    if dist.get_rank() == 0:
        gen = torch.Generator().manual_seed(4)
        layers = {}
        for module, (fan_out, fan_in) in {"blocks.0.attn1.to_q": (32, 32), "blocks.1.ffn.net.0.proj": (48, 32),
                                          "condition_embedder.time_embedder.linear_1": (32, 32)}.items():
            layers[f"transformer.{module}.lora_A.weight"] = torch.randn(4, fan_in, generator=gen)
            layers[f"transformer.{module}.lora_B.weight"] = torch.randn(fan_out, 4, generator=gen)
            layers[f"transformer.{module}.lora_B.bias"] = torch.randn(fan_out, generator=gen)
        save_file(layers, adapter)
    dist.barrier()
    expected_model = AnyFlowTransformer3DModel.from_pretrained(path, lora=[(adapter, 0.6)])
    model = load_parallel(AnyFlowTransformer3DModel, path, mesh, lora=[(adapter, 0.6)], sequence_parallel=False)
    latents, t, r, text, _ = random_inputs(reference.config, batch=1, frames=3, height=6, width=6)
    with torch.no_grad():
        expected, plain = expected_model(latents, t, r, text).sample, reference(latents, t, r, text).sample
        return {"error": relative(model(latents, t, r, text).sample, expected), "effect": relative(plain, expected)}


def case_bad_setups(work, mesh):
    """Each bad setup must raise the same clear error on every rank, without a hang."""
    errors = {}
    try:  # 3 heads over 2 ranks
        parallelize(AnyFlowTransformer3DModel(small_config(num_attention_heads=3)), mesh, shard_weights=False)
    except ValueError as exc:
        errors["heads"] = str(exc)
    model = load_parallel(AnyFlowTransformer3DModel, checkpoint(os.path.join(work, "bidirectional-bad"),
                                                                  reference_model()), mesh)
    latents, t, r, text, _ = random_inputs(model.config, batch=1, frames=1, height=2, width=2)  # 1 token, 2 ranks
    try:
        with torch.no_grad():
            model(latents, t, r, text)
    except ValueError as exc:
        errors["tokens"] = str(exc)
    try:
        with torch.enable_grad():
            model(random_inputs(model.config)[0], 500, 250, text)
    except RuntimeError as exc:
        errors["training with sequence parallelism"] = str(exc)
    device = "cpu" if dist.get_rank() == 0 else "meta"  # rank 1 holds its model elsewhere
    with torch.device(device):
        mixed = AnyFlowTransformer3DModel(small_config())
    try:
        parallelize(mixed, mesh)
    except ValueError as exc:
        errors["mixed devices"] = str(exc)
    good = checkpoint(os.path.join(work, "bidirectional-bad"), reference_model())
    path = good if dist.get_rank() == 0 else os.path.join(work, "no-such-checkpoint")  # rank 1 alone fails to open
    try:
        load_parallel(AnyFlowTransformer3DModel, path, mesh)
    except Exception as exc:  # every rank must raise, none wait
        errors[f"bad path on rank 1, seen by rank {dist.get_rank()}"] = f"{type(exc).__name__}: {exc}"
    return errors


def main() -> None:
    out, cases = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    try:
        for case in cases:
            result = globals()[f"case_{case}"](out, mesh)
            with open(os.path.join(out, f"{case}.rank{dist.get_rank()}.json"), "w") as f:
                json.dump(result, f)
        dist.barrier()  # no rank closes its connections while another still uses them
    finally:
        dist.destroy_process_group()
    # skip the interpreter's teardown, which can abort a rank after its work (see anyflow.cli.main)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
