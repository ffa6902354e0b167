"""A pipeline snapshot as published: ``model_index.json`` beside ``tokenizer/``, ``text_encoder/``, ``transformer/``,
``vae/`` and ``scheduler/``; which model it holds, and what its components need, read from configs and headers."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

# model_index.json's class -> FAR: diffusers' names, and the authors' in the released snapshots
PIPELINES = {"AnyFlowPipeline": False, "AnyFlowFARPipeline": True, "WanAnyFlowPipeline": False,
             "FARWanAnyFlowPipeline": True}
COMPONENTS = ("tokenizer", "text_encoder", "transformer", "vae")
DEFAULT_SHIFT = 5.0  # the released snapshots' scheduler shift


@dataclass(frozen=True)
class Snapshot:
    """A pipeline snapshot's folders, checked to be there, its kind and its scheduler's shift."""

    root: str
    far: bool
    shift: float

    def folder(self, component: str) -> str:
        return os.path.join(self.root, component)


def read_snapshot(root: str) -> Snapshot:
    """``model_index.json`` and the component folders of a pipeline snapshot; one line naming what is missing."""
    index_path = os.path.join(root, "model_index.json")
    if not os.path.isfile(index_path):
        raise ValueError(f"{root}: no model_index.json; a pipeline snapshot (AnyFlowPipeline or AnyFlowFARPipeline, "
                         "as downloaded from the Hub) has one beside tokenizer/, text_encoder/, transformer/ and vae/")
    with open(index_path) as f:
        index = json.load(f)
    name = index.get("_class_name")
    if name not in PIPELINES:
        raise ValueError(f"{index_path}: _class_name {name!r} is not one of {sorted(PIPELINES)}")
    missing = [c for c in COMPONENTS if not os.path.isdir(os.path.join(root, c))]
    if missing:
        raise ValueError(f"{root}: the snapshot has no {', '.join(c + '/' for c in missing)} (an {name} needs "
                         f"{', '.join(c + '/' for c in COMPONENTS)})")
    shift = DEFAULT_SHIFT
    scheduler_config = os.path.join(root, "scheduler", "scheduler_config.json")
    if os.path.isfile(scheduler_config):
        with open(scheduler_config) as f:
            shift = float(json.load(f).get("shift", DEFAULT_SHIFT))
    return Snapshot(os.path.abspath(root), PIPELINES[name], shift)


def check_components(snapshot: Snapshot) -> None:
    """The tokenizer loads, and the text encoder's and the VAE's configs read, before anything heavy loads."""
    from ..text.encoder import UMT5Config
    from ..text.tokenizer import load_tokenizer
    from ..vae.checkpoint import open_vae_checkpoint

    load_tokenizer(snapshot.folder("tokenizer"))
    UMT5Config.from_pretrained(snapshot.folder("text_encoder"))
    open_vae_checkpoint(snapshot.folder("vae"))  # headers: every key and shape checked


def component_sizes(snapshot: Snapshot, element_size: int) -> dict:
    """What the memory estimate needs of the text encoder and the VAE, from their configs and headers:
    one encoder block's bytes in the run's dtype, the encoder's widths, the VAE's float32 bytes and width."""
    from weights_convert.safetensors_io import read_header

    def numels(folder: str):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors"):
                yield from ((key, math.prod(r.shape)) for key, r in read_header(os.path.join(folder, name))[0].items())

    def config(folder: str) -> dict:
        with open(os.path.join(folder, "config.json")) as f:
            return json.load(f)

    text, vae = config(snapshot.folder("text_encoder")), config(snapshot.folder("vae"))
    block = sum(n for key, n in numels(snapshot.folder("text_encoder")) if key.startswith("encoder.block.0."))
    return dict(vae_weight_bytes=4 * sum(n for _, n in numels(snapshot.folder("vae"))), vae_base_dim=vae["base_dim"],
                text_block_bytes=block * element_size, text_width=text["d_model"], text_ffn_width=text["d_ff"],
                text_heads=text["num_heads"])
