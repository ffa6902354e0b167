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


def read_json(path: str) -> dict:
    """A JSON object file of a snapshot, or one line naming the file and what is wrong with it."""
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it ({exc.strerror})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: holds a JSON {type(data).__name__}, not an object")
    return data


def read_snapshot(root: str) -> Snapshot:
    """``model_index.json`` and the component folders of a pipeline snapshot; one line naming what is missing."""
    from weights_convert.sources import checked_path

    root = checked_path(root, "the snapshot")
    index_path = os.path.join(root, "model_index.json")
    if not os.path.isfile(index_path):
        raise ValueError(f"{root}: no model_index.json; a pipeline snapshot (AnyFlowPipeline or AnyFlowFARPipeline, "
                         "as downloaded from the Hub) has one beside tokenizer/, text_encoder/, transformer/ and vae/")
    index = read_json(index_path)
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
        shift = read_json(scheduler_config).get("shift", DEFAULT_SHIFT)
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
            raise ValueError(f"{scheduler_config}: shift must be a positive number, got {shift!r}")
    return Snapshot(os.path.abspath(root), PIPELINES[name], float(shift))


def check_components(snapshot: Snapshot, transformer_config):
    """Before anything heavy loads: the tokenizer loads (it is returned), the text encoder's and the VAE's
    configs and headers read, and their widths fit the transformer's (``transformer_config``): the text
    encoder's embeddings its ``text_dim``, the VAE's latent channels its ``in_channels`` and ``out_channels``."""
    from ..text.encoder import UMT5Config
    from ..text.tokenizer import load_tokenizer
    from ..vae.checkpoint import open_vae_checkpoint

    tokenizer = load_tokenizer(snapshot.folder("tokenizer"))
    text = UMT5Config.from_pretrained(snapshot.folder("text_encoder"))
    vae = open_vae_checkpoint(snapshot.folder("vae")).config  # headers: every key and shape checked
    transformer = snapshot.folder("transformer")
    if text.d_model != transformer_config.text_dim:
        raise ValueError(f"{snapshot.root}: the text encoder makes {text.d_model}-wide embeddings (text_encoder/, "
                         f"d_model) but the transformer takes text_dim={transformer_config.text_dim} ({transformer}): "
                         "the components are of different models")
    for key in ("in_channels", "out_channels"):
        if getattr(transformer_config, key) != vae.z_dim:
            raise ValueError(f"{snapshot.root}: the VAE's latents have {vae.z_dim} channels (vae/, z_dim) but the "
                             f"transformer has {key}={getattr(transformer_config, key)} ({transformer}): the "
                             "components are of different models")
    return tokenizer


def component_sizes(snapshot: Snapshot, element_size: int) -> dict:
    """What the memory estimate needs of the text encoder and the VAE, from their configs and headers:
    one encoder block's bytes in the run's dtype, the encoder's widths, the VAE's float32 bytes and width."""
    from weights_convert.safetensors_io import read_header

    def numels(folder: str):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors"):
                yield from ((key, math.prod(r.shape)) for key, r in read_header(os.path.join(folder, name))[0].items())

    def config(folder: str) -> dict:
        return read_json(os.path.join(folder, "config.json"))

    text, vae = config(snapshot.folder("text_encoder")), config(snapshot.folder("vae"))
    block = sum(n for key, n in numels(snapshot.folder("text_encoder")) if key.startswith("encoder.block.0."))
    return dict(vae_weight_bytes=4 * sum(n for _, n in numels(snapshot.folder("vae"))), vae_base_dim=vae["base_dim"],
                text_block_bytes=block * element_size, text_width=text["d_model"], text_ffn_width=text["d_ff"],
                text_heads=text["num_heads"])
