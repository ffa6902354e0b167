"""Finding, recognising and opening every checkpoint layout users hold, as one plan of our tensors.

A :class:`Checkpoint` maps each of *our* parameter names to a lazy tensor (read on demand, one
at a time) and carries the :class:`anyflow.AnyFlowConfig` it implies, with every shape checked.
Safetensors checkpoints are opened from their headers alone, without importing torch.
"""

from __future__ import annotations

import glob
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple, Union

from anyflow.model.config import PRESETS, AnyFlowConfig, AnyFlowFARConfig
from anyflow.model.parameters import parameter_shapes

from .configs import ConfigReading, read_config
from .lora import AdapterFileError, MergedTensor, fold_wrapped_checkpoint, looks_like_adapter, looks_like_wrapped_checkpoint
from .names import FORMATS, WAN_WARM_START_COPIES
from .pt_files import PT_SUFFIXES, InMemoryTensor, TrainerCheckpointError, load_pt, trainer_checkpoint_message
from .safetensors_io import (
    FLOAT_DTYPES, CheckpointError, TensorRecord, read_header, read_json_object, read_sharded,
)
from .scaled_fp8 import ScaledFloat8Tensor, fold_scales
from .state_dict import KeyMismatchError, rename_keys
from .warm_start import COMPRESSED, ResampledPatchKernel, add_far_patch_embedding

FORMAT_DESCRIPTIONS = {
    "anyflow": "anyflow layout",
    "diffusers": "AnyFlow, diffusers layout",
    "wan-diffusers": "Wan2.1 T2V base, diffusers layout (AnyFlow warm start: target-time MLP = copy of source-time MLP)",
    "wan-original": "Wan2.1 T2V base, original layout (AnyFlow warm start: target-time MLP = copy of source-time MLP)",
}
WAN_PREFIX = "model.diffusion_model."


LazyTensor = Union[TensorRecord, InMemoryTensor, ResampledPatchKernel, MergedTensor, ScaledFloat8Tensor]
FAR_WEIGHT = f"{COMPRESSED}.weight"
# the widths D of the released models -> their head counts (D / 128 each): the only widths a config is inferred for
RELEASED_HEADS = {preset.hidden_size: preset.num_attention_heads for preset in PRESETS.values()}
HEAD_DIM = 128  # of every released model
INFERRED = f"inferred from the tensor shapes, heads = D / {HEAD_DIM} as in the released models"


@dataclass
class Checkpoint:
    """A recognised checkpoint: its format, config, and our-named lazy tensors (in a stable order)."""

    path: str
    format: str
    container: str  # "safetensors", "sharded safetensors" or "torch .pt"
    files: List[str]
    config: AnyFlowConfig
    tensors: Dict[str, LazyTensor] = field(default_factory=dict)
    source_names: Dict[str, str] = field(default_factory=dict)  # our name -> name in the file
    config_set_aside: Dict[str, object] = field(default_factory=dict)  # config.json keys that change nothing here
    config_file: Optional[str] = None  # the config.json read, if any (else the config was inferred from shapes)
    far_warm_start: bool = False  # a FAR model made from a bidirectional source
    folded_lora: int = 0  # modules whose LoRA factors were folded in (a PEFT-wrapped training checkpoint)

    @property
    def config_source(self) -> str:
        """Where the config comes from: the config file read, or how it was inferred (:data:`INFERRED`)."""
        return self.config_file or INFERRED

    @property
    def description(self) -> str:
        what = FORMAT_DESCRIPTIONS[self.format]
        if self.far_warm_start:
            what += "; FAR warm start: compressed patch embedding resampled from the full one"
        elif isinstance(self.config, AnyFlowFARConfig):
            what += ", FAR (frame-autoregressive) model"
        if any(isinstance(t, ScaledFloat8Tensor) for t in self.tensors.values()):
            what += "; block linear weights in scaled float8 e4m3 (a float32 scale per row)"
        if self.folded_lora:
            what += f"; PEFT-wrapped training checkpoint: the LoRA of {self.folded_lora} modules merged in (alpha = rank)"
        return f"{what} ({self.container}, {len(self.files)} file(s))"

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors.values())


def checked_path(path: object, what: str = "the checkpoint") -> str:
    """``path`` as a ``str``: a file or folder path (``str`` or ``os.PathLike``), or a TypeError naming ``what``."""
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a file or folder path (str or os.PathLike), got {type(path).__name__} {path!r}")
    return os.fspath(path)


def locate(path: str) -> Tuple[str, List[str], Optional[str]]:
    """Find the weight files under ``path``: (container, files, config.json path or None)."""
    path = checked_path(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, "transformer")) and (
            os.path.isfile(os.path.join(path, "model_index.json")) or not _weight_files(path)
        ):
            path = os.path.join(path, "transformer")  # a Hub snapshot root
        config = os.path.join(path, "config.json")
        config = config if os.path.isfile(config) else None
        indexes = sorted(glob.glob(os.path.join(path, "*.safetensors.index.json")))
        if len(indexes) > 1:
            raise CheckpointError(f"{path}: several index files {[os.path.basename(i) for i in indexes]}; pass one")
        if indexes:
            return "sharded safetensors", indexes, config
        files = _weight_files(path)
        step = re.fullmatch(r"step_(\d+)", os.path.basename(os.path.normpath(path)))
        if step and files and all(re.fullmatch(r"rank\d+\.pt", os.path.basename(f)) for f in files):
            raise TrainerCheckpointError(trainer_checkpoint_message(path, int(step.group(1))))
        if len(files) != 1:
            found = [os.path.basename(f) for f in files]
            raise CheckpointError(
                f"{path}: expected one .safetensors or .pt weight file (or a *.safetensors.index.json), found {found}"
            )
        return ("torch .pt" if files[0].endswith(PT_SUFFIXES) else "safetensors"), files, config
    config = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    config = config if os.path.isfile(config) else None
    kind = weight_file_kind(path)
    if kind is None:
        raise CheckpointError(f"{path}: not a .safetensors, .safetensors.index.json or .pt/.pth/.ckpt/.bin file")
    return kind, [path], None if kind == "torch .pt" else config


def weight_file_kind(path: str) -> Optional[str]:
    """The container of one weight file, by its name: "sharded safetensors" (an index), "safetensors",
    "torch .pt"; None for any other name."""
    if path.endswith(".safetensors.index.json"):
        return "sharded safetensors"
    if path.endswith(".safetensors"):
        return "safetensors"
    if path.endswith(PT_SUFFIXES):
        return "torch .pt"
    return None


def _weight_files(folder: str) -> List[str]:
    return sorted(
        f for f in glob.glob(os.path.join(folder, "*"))
        if os.path.isfile(f) and (f.endswith(".safetensors") or f.endswith(PT_SUFFIXES))
    )


def read_tensors(container: str, files: List[str]) -> Dict[str, LazyTensor]:
    """Lazy tensors of the located files, by their names in the file."""
    if container == "sharded safetensors":
        return dict(read_sharded(files[0]))
    if container == "safetensors":
        return dict(read_header(files[0])[0])
    return dict(load_pt(files[0]))


def detect_format(keys: List[str], where: str) -> str:
    """Recognise the naming of a checkpoint from its keys; refuse I2V checkpoints (errors name ``where``)."""
    keyset = set(keys)
    i2v = sorted(k for k in keys if re.search(r"(add_[kv]_proj|norm_added_k|\.k_img\.|\.v_img\.|norm_k_img|^img_emb\.)", k))
    if i2v:
        raise CheckpointError(
            f"{where}: this is a Wan2.1 image-to-video checkpoint ({i2v[0]} ...); this model is text-to-video "
            "(AnyFlow) and does not take its separate image key/value projections"
        )
    if "patch_embed.proj.weight" in keyset:
        return "anyflow"
    if "condition_embedder.delta_embedder.linear_1.weight" in keyset:
        return "diffusers"
    if "condition_embedder.time_embedder.linear_1.weight" in keyset:
        return "wan-diffusers"
    if "time_embedding.0.weight" in keyset:
        return "wan-original"
    raise CheckpointError(f"{where}: unrecognised checkpoint: no AnyFlow or Wan2.1 keys among {sorted(keys)[:8]}")


def to_our_names(fmt: str, tensors: Dict[str, LazyTensor]) -> Tuple[Dict[str, LazyTensor], Dict[str, str]]:
    """Rename (and for Wan, warm-start) lazy tensors to our names: (ours -> tensor, ours -> source name)."""
    named = dict(tensors)
    origin = {k: k for k in named}
    if fmt == "anyflow":
        rename_keys(named, "to_diffusers")  # checks the set of keys against the table
        return named, origin
    if fmt == "wan-original":
        mapping = rename_keys(named, "wan_original_to_diffusers")
        named = {mapping[k]: v for k, v in named.items()}
        origin = {mapping[k]: k for k in origin}
    if fmt in ("wan-original", "wan-diffusers"):
        present = sorted(k for k in WAN_WARM_START_COPIES if k in named)
        if present:
            raise CheckpointError(f"a Wan2.1 base checkpoint should have no target-time MLP, found {present}")
        for copy, original in WAN_WARM_START_COPIES.items():
            if original in named:
                named[copy] = named[original]
                origin[copy] = origin[original]
    mapping = rename_keys(named, "to_anyflow")
    return {mapping[k]: v for k, v in named.items()}, {mapping[k]: origin[k] for k in named}


def infer_config(shapes: Mapping[str, Tuple[int, ...]]) -> AnyFlowConfig:
    """The config readable from our-named tensor shapes (SPEC section 3); the rest keep defaults.

    The head count is not in the shapes: it is taken as D / 128, the head dim of the released
    models, for their widths only (:data:`RELEASED_HEADS`); any other width raises
    :class:`CheckpointError`, as its heads could be anything (4 x 32 as well as 1 x 128).
    Weights with a compressed patch embedding make an :class:`AnyFlowFARConfig` (chunking as released).
    """
    hidden, in_channels, pt, ph, pw = shapes["patch_embed.proj.weight"]
    if hidden not in RELEASED_HEADS:
        released = ", ".join(f"{d} with {h} heads" for d, h in sorted(RELEASED_HEADS.items()))
        raise CheckpointError(f"width {hidden} is no released model's ({released}), so its head count "
                              "cannot be read off the shapes")
    config = dict(
        patch_size=(pt, ph, pw),
        num_attention_heads=RELEASED_HEADS[hidden],
        attention_head_dim=HEAD_DIM,
        in_channels=in_channels,
        out_channels=shapes["head.proj.weight"][0] // (pt * ph * pw),
        text_dim=shapes["text_proj.fc_in.weight"][1],
        freq_dim=shapes["time_embed.source_time_mlp.fc_in.weight"][1],
        ffn_dim=shapes["blocks.0.ffn.fc_in.weight"][0],
        num_layers=1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")),
        cross_attn_norm="blocks.0.cross_attn_norm.weight" in shapes,
    )
    if "image_proj.norm_in.weight" in shapes:
        config["image_dim"] = shapes["image_proj.norm_in.weight"][0]
    if FAR_WEIGHT in shapes:
        return AnyFlowFARConfig(**config, compressed_patch_size=tuple(shapes[FAR_WEIGHT][2:]))
    return AnyFlowConfig(**config)


def check_shapes(config: AnyFlowConfig, tensors: Mapping[str, LazyTensor], source_names: Mapping[str, str]) -> None:
    """Every tensor's name and shape against the model the config describes, and floating dtypes;
    errors list the keys (and both shapes)."""
    expected = parameter_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise KeyMismatchError(
            f"checkpoint keys do not match the config: missing {[source_names.get(k, k) for k in missing][:20]}, "
            f"unexpected {[source_names[k] for k in unexpected][:20]}"
        )
    wrong = [
        f"{source_names[k]}: checkpoint {list(tensors[k].shape)} vs config {list(expected[k])}"
        for k in expected
        if tuple(tensors[k].shape) != expected[k]
    ]
    if wrong:
        raise KeyMismatchError(f"shape mismatch: {'; '.join(wrong[:10])}" + (f" (and {len(wrong) - 10} more)" if len(wrong) > 10 else ""))
    bad_dtype = [f"{source_names[k]} ({t.dtype})" for k, t in tensors.items() if t.dtype not in FLOAT_DTYPES]
    if bad_dtype:
        raise CheckpointError(f"non-floating-point tensors: {bad_dtype[:10]}")


def open_checkpoint(path: str, fmt: Optional[str] = None, config_path: Optional[str] = None, far: bool = False) -> Checkpoint:
    """Recognise and open any supported checkpoint at ``path`` (file or folder).

    ``fmt`` forces one of :data:`FORMATS`; ``config_path`` (a config JSON) overrides the config
    found beside the weights or inferred from their shapes. ``far`` warm-starts a FAR model from a
    bidirectional AnyFlow or Wan2.1 checkpoint (:mod:`.warm_start`; FAR settings as released
    unless ``config_path`` gives them).
    """
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    path = checked_path(path)
    container, files, found_config = locate(path)
    stored = read_tensors(container, files)
    raw = stored
    if raw and all(k.startswith(WAN_PREFIX) for k in raw):
        raw = {k[len(WAN_PREFIX):]: v for k, v in raw.items()}
    raw = fold_scales(raw, files[0])  # a scaled float8 checkpoint's weight and scale pairs, each one lazy tensor
    folded = 0
    if looks_like_wrapped_checkpoint(list(raw)):
        raw, folded = fold_wrapped_checkpoint(raw, files[0])
    elif looks_like_adapter(list(raw)):
        raise AdapterFileError(f"{files[0]}: a LoRA adapter, not a model: load a base checkpoint and pass this file "
                              "with --lora (lora=[...] in Python)")
    detected = detect_format(list(raw), files[0])
    fmt = fmt or detected
    try:
        tensors, source_names = to_our_names(fmt, raw)
    except KeyMismatchError as exc:
        raise KeyMismatchError(f"{files[0]} ({FORMAT_DESCRIPTIONS[fmt]}): {exc}") from None
    far_weights = FAR_WEIGHT in tensors
    if far and far_weights:
        raise CheckpointError(f"{files[0]}: already an AnyFlow FAR checkpoint (it has far_patch_embedding); "
                              "the FAR warm start takes a bidirectional AnyFlow or Wan2.1 one")
    config_file = config_path if config_path is not None else (
        found_config if fmt in ("anyflow", "diffusers", "wan-diffusers") else None
    )
    if config_file is not None:
        reading = read_config(read_json_object(config_file, "config JSON"), config_file, far_weights)
    else:
        try:
            reading = ConfigReading(infer_config({k: tuple(v.shape) for k, v in tensors.items()}), {})
        except (KeyError, ValueError) as exc:
            reason = f"no tensor {exc}" if isinstance(exc, KeyError) else exc
            raise CheckpointError(f"{files[0]}: cannot infer the config from the tensor shapes: {reason}; "
                                  f"{_how_to_give_a_config(fmt)}") from None
    config = reading.config
    if far:
        if not isinstance(config, AnyFlowFARConfig):
            config = AnyFlowFARConfig.from_dict(config.to_dict())  # the FAR settings as released
        tensors = add_far_patch_embedding(tensors, config.compressed_patch_size)
        source_names.update({k: f"{k} (warm start from patch_embedding)" for k in tensors if k.startswith(COMPRESSED)})
    elif far_weights != isinstance(config, AnyFlowFARConfig):
        raise CheckpointError(
            f"{config_file}: describes the {'bidirectional' if far_weights else 'FAR'} model, but the weights "
            + ("have far_patch_embedding (an AnyFlow FAR checkpoint)" if far_weights else
               "have no far_patch_embedding (a bidirectional checkpoint; warm-start a FAR one with --far)")
        )
    check_shapes(config, tensors, source_names)
    ordered = {k: tensors[k] for k in sorted(tensors, key=_natural_key)}
    if container == "sharded safetensors":
        files = files + sorted({t.path for t in stored.values()})
    return Checkpoint(os.path.abspath(path), fmt, container, files, config, ordered, source_names,
                      reading.set_aside, config_file, far, folded)


def _how_to_give_a_config(fmt: str) -> str:
    """How a user gives the config of weights that have none beside them."""
    beside = ("put its config.json beside the weights and pass their folder, or " if fmt in ("anyflow", "diffusers", "wan-diffusers")
              else "")
    return f"give the config: {beside}pass --config FILE to anyflow-convert (config_path= of convert and load_checkpoint)"


def _natural_key(name: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
