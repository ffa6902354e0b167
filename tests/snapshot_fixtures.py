"""Tiny complete pipeline snapshots in the released layout, written without diffusers or transformers.

    root = make_tiny_snapshot(tmp_path / "snapshot", far=False)

``model_index.json``, ``tokenizer/`` (a T5-style Unigram ``tokenizer.json``), ``text_encoder/`` (a tiny
UMT5 encoder), ``transformer/`` (a small AnyFlow or AnyFlow FAR transformer with random weights in the
diffusers layout), ``vae/`` (a tiny Wan VAE) and ``scheduler/``, with the widths wired together: the
transformer's text width is the encoder's, its channels the VAE's latent channels.
``tests/test_pipeline.py`` checks that diffusers' own pipelines load the same folders.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

from anyflow import AnyFlowFARConfig, AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel
from support import SMALL, randomize_, small_config
from vae_fixtures import TINY_VAE, make_tiny_vae
from video_fixtures import TINY_UMT5, make_tiny_tokenizer, make_tiny_umt5
from weights_convert import convert

FAR_PARTITION = (1, 2, 2)  # latent frames of each chunk: 5 latent frames, 17 video frames
SCHEDULER = {"_class_name": "FlowMapEulerDiscreteScheduler", "_diffusers_version": "0.42.1", "num_train_timesteps": 1000,
             "shift": 5.0}


def transformer_config(far: bool, text_dim: int = TINY_UMT5["d_model"], channels: int = TINY_VAE["z_dim"]):
    widths = dict(text_dim=text_dim, in_channels=channels, out_channels=channels)
    if far:
        return AnyFlowFARConfig(**{**SMALL, **widths, "chunk_partition": FAR_PARTITION})
    return small_config(**widths)


def make_tiny_snapshot(root, far: bool = False, seed: int = 0, config=None, text_encoder=None, vae=None,
                       text_dtype: torch.dtype = torch.float32) -> str:
    """Write a complete snapshot at ``root`` (which must not exist); returns its path. Tiny by default;
    ``config`` (the transformer's), ``text_encoder`` and ``vae`` (overrides of the tiny UMT5 and VAE
    configs) make larger ones, e.g. for benchmarks at the released widths."""
    root = str(root)
    os.makedirs(root)
    make_tiny_tokenizer(os.path.join(root, "tokenizer"))
    make_tiny_umt5(os.path.join(root, "text_encoder"), dtype=text_dtype, seed=seed, **(text_encoder or {}))
    make_tiny_vae(os.path.join(root, "vae"), seed=seed, **(vae or {}))
    config = config or transformer_config(far)
    far = isinstance(config, AnyFlowFARConfig)
    torch.manual_seed(seed)
    model = (AnyFlowFARTransformer3DModel if far else AnyFlowTransformer3DModel)(config)
    randomize_(model, seed)
    with tempfile.TemporaryDirectory() as ours:
        model.save_pretrained(os.path.join(ours, "model"))
        convert(os.path.join(ours, "model"), os.path.join(root, "transformer"), to="diffusers", progress=None)
    os.makedirs(os.path.join(root, "scheduler"))
    with open(os.path.join(root, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SCHEDULER, f, indent=2)
    name = "AnyFlowFARPipeline" if far else "AnyFlowPipeline"
    transformer_class = "AnyFlowFARTransformer3DModel" if far else "AnyFlowTransformer3DModel"
    index = {"_class_name": name, "_diffusers_version": "0.42.1", "scheduler": ["diffusers", SCHEDULER["_class_name"]],
             "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
             "transformer": ["diffusers", transformer_class], "vae": ["diffusers", "AutoencoderKLWan"]}
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    return root
