"""Tiny training runs for tests/test_training.py: a checkpoint, a data folder, a config; and the
two-process case, run under torchrun as ``training_fixtures.py OUT``.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from anyflow import AnyFlowTransformer3DModel  # noqa: E402
from anyflow.training.config import config_from_dict  # noqa: E402
from anyflow.training.data import DatasetWriter  # noqa: E402
from support import randomize_, small_config  # noqa: E402

FRAMES, CHANNELS, SIZE, TOKENS, TEXT_DIM = 2, 4, 4, 3, 24  # latents (2, 4, 4, 4): 4 tokens a frame


def tiny_checkpoint(folder, seed: int = 0, num_layers: int = 1) -> str:
    """A small bidirectional model with O(1) activations, saved in our layout."""
    torch.manual_seed(seed)
    model = AnyFlowTransformer3DModel(small_config(num_layers=num_layers))
    randomize_(model, seed)
    model.save_pretrained(str(folder))
    return str(folder)


def tiny_data(folder, samples: int = 4, seed: int = 1, one_clip: bool = False, shard_size: int = 3,
              frames: int = FRAMES) -> str:
    """A data folder of ``samples`` random latents (``frames``, 4, 4, 4) and prompts, with a negative prompt;
    ``one_clip``: every sample the same latents (a set a model can memorise)."""
    gen = torch.Generator().manual_seed(seed)
    clip = torch.randn(frames, CHANNELS, SIZE, SIZE, generator=gen)
    negative = torch.randn(1, TOKENS, TEXT_DIM, generator=gen)
    with DatasetWriter(str(folder), negative=negative, shard_size=shard_size) as writer:
        for i in range(samples):
            latents = clip if one_clip else torch.randn(frames, CHANNELS, SIZE, SIZE, generator=gen)
            writer.add(latents, torch.randn(TOKENS, TEXT_DIM, generator=gen).to(torch.bfloat16), f"clip {i}")
    return str(folder)


def tiny_config(root, stage: str = "pretrain", **sections) -> dict:
    """A config (nested dicts, as TOML parses) training the checkpoint and data under ``root``; ``sections``
    update its tables (``train={"total_iter": 4}``)."""
    root = str(root)
    lora = {"lora_rank": 4, "lora_alpha": 8}
    raw = {
        "manual_seed": 3,
        "path": {"output_dir": os.path.join(root, "out")},
        "datasets": {"train": {"data_root": os.path.join(root, "data"), "batch_size_per_gpu": 2}},
        "models": {"transformer_cfg": {"model_name": os.path.join(root, "model"), "lora_config": lora},
                   "text_encoder_cfg": {"fuse_guidance_scale": 3.0},
                   "dmd_cfg": {"dmd_batch_size": 2, "real_guidance_scale": 3.0},
                   "rollout_cfg": {"num_inference_steps_list": [1, 2, 4]}},
        "train": {"train_pipeline": stage, "total_iter": 4, "warmup_iter": 2, "ema_warmup_step": 1,
                  "optim_g": {"lr": 1e-3}, "optim_d": {"lr": 1e-3, "betas": [0.0, 0.999]}},
        "logger": {"save_checkpoint_freq": 2, "print_freq": 1},
    }
    if stage == "onpolicy":
        raw["models"]["real_cfg"] = {"model_name": os.path.join(root, "model")}
        raw["models"]["discriminator_cfg"] = {"model_name": os.path.join(root, "model"),
                                              "lora_config": {**lora, "target_module_name": ["attn1", "ffn"]}}
    for section, values in sections.items():
        raw[section] = _merged(raw.get(section, {}), values)
    return raw


def _merged(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def read_log(root) -> list:
    with open(os.path.join(str(root), "out", "train_log.jsonl")) as f:
        return [json.loads(line) for line in f]


def first_step(raw: dict) -> dict:
    """One stage-1 iteration of ``raw``: its record and the whole gradients of the trained parameters."""
    from anyflow.training.trainer import Trainer, whole

    trainer = Trainer(config_from_dict(raw), say=lambda message: None)
    record = trainer.train_step()
    gradients = {name: whole(p.grad).tolist() for name, p in trainer.generator.named.items()}
    return {"record": record, "gradients": gradients}


def main() -> None:
    """Under torchrun: the first iteration on 2 processes of 1 sample each; rank 0 writes OUT/two.json."""
    import torch.distributed as dist

    out = sys.argv[1]
    raw = tiny_config(out, datasets={"train": {"batch_size_per_gpu": 1}},
                      path={"output_dir": os.path.join(out, "two")})
    result = first_step(raw)
    if dist.get_rank() == 0:
        with open(os.path.join(out, "two.json"), "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip the interpreter's teardown (see anyflow.cli.main)


if __name__ == "__main__":
    main()
