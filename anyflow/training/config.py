"""The training config: a small TOML file whose sections and names follow the authors' options
(NVlabs/AnyFlow ``options/train/anyflow/*.yml``), read into dataclasses and checked whole.

    name = "wan1b_student"
    manual_seed = 0
    mixed_precision = true                 # bf16 autocast over float32 weights (see anyflow.training.trainer)

    [path]
    output_dir = "experiments/wan1b_student"

    [datasets.train]
    data_root = "data/latents"             # made by scripts/prepare_training_data.py (anyflow.training.data)
    batch_size_per_gpu = 2

    [models.transformer_cfg]
    model_name = "Wan2.1-T2V-1.3B-Diffusers"
    [models.transformer_cfg.lora_config]
    lora_rank = 256
    lora_alpha = 256

    [train]
    train_pipeline = "pretrain"            # "teacher" (stage 0), "pretrain" (stage 1), "onpolicy" (stage 2)
    total_iter = 6000
    [train.optim_g]
    lr = 5e-5

Every key is checked: an unknown one is refused with the nearest valid name, a value of the wrong
type with the expected one, and a stage's missing models by name. Names that are ours, not the
authors': ``path.output_dir``, ``datasets.train.data_root``, ``models.*.merge_lora``,
``logger.keep_checkpoints`` and ``device``. The authors' options that steer what this trainer
does not do (evaluation, wandb, data loader workers, ``param_names_to_optimize``: LoRA factors
train when a ``lora_config`` is given, every weight otherwise) are left out.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

# the authors' lora_config.target_module_name: self-attention q, k, v, o, the FFN, both time MLPs
AUTHORS_LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ffn.net.0.proj", "ffn.net.2",
                        "delta_embedder", "time_embedder")
STAGES = {"teacher": "stage 0, flow matching", "pretrain": "stage 1, the flow map",
          "onpolicy": "stage 2, on-policy distillation"}


# What a run may change when it resumes from its checkpoint; every other key must stay as the run began.
RESUMABLE_KEYS = ("name", "device", "path.output_dir", "train.total_iter", "train.optim_g.lr", "train.optim_d.lr",
                  "train.max_grad_norm", "train.max_nonfinite_steps", "logger.print_freq", "logger.save_checkpoint_freq",
                  "logger.keep_checkpoints", "models.transformer_cfg.enable_gradient_checkpoint",
                  "models.real_cfg.enable_gradient_checkpoint", "models.discriminator_cfg.enable_gradient_checkpoint")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


@dataclass
class LoraOptions:
    """``models.*.lora_config``: LoRA on the modules whose names contain a target (diffusers' names or ours)."""

    lora_rank: int = 256
    lora_alpha: float = 256.0
    target_module_name: List[str] = field(default_factory=lambda: list(AUTHORS_LORA_TARGETS))


@dataclass
class FarOptions:
    """``models.transformer_cfg.far_config``, for a FAR model (its chunks are the checkpoint's ``chunk_partition``):
    a stage-1 sample holds the first ``full_chunk_limit`` chunks, or at this rate a uniform number of chunks
    from ``full_chunk_limit`` to all of them."""

    long_context_training_ratio: float = 0.5


@dataclass
class ModelOptions:
    """``models.transformer_cfg`` (the model trained), ``real_cfg`` (stage 2's frozen teacher),
    ``discriminator_cfg`` (stage 2's fake score)."""

    model_name: str = ""  # any checkpoint from_pretrained reads
    merge_lora: List[str] = field(default_factory=list)  # adapters merged as it loads (a stage-1 result, say)
    enable_gradient_checkpoint: bool = True
    lora_config: Optional[LoraOptions] = None  # None: every weight trains (a FAR model's far_patch_embed always does)
    far_config: FarOptions = field(default_factory=FarOptions)


@dataclass
class TrainDataOptions:
    """``datasets.train``."""

    data_root: str = ""
    batch_size_per_gpu: int = 1


@dataclass
class DatasetsOptions:
    train: TrainDataOptions = field(default_factory=TrainDataOptions)


@dataclass
class TextEncoderOptions:
    """``models.text_encoder_cfg``: prompts replaced by the negative one at this rate; guidance fused at this scale
    (1, the default, as the authors' code without the key: none; their student configs set 3)."""

    drop_text_ratio: float = 0.1
    fuse_guidance_scale: float = 1.0


@dataclass
class SchedulerOptions:
    shift: float = 5.0
    weight_type: str = "beta08"


@dataclass
class FlowmapOptions:
    diffusion_ratio: float = 0.5
    consistency_ratio: float = 0.25
    epsilon: float = 5.0


@dataclass
class RolloutOptions:
    num_inference_steps_list: List[int] = field(default_factory=lambda: [2, 4, 8, 16, 50])


@dataclass
class DmdOptions:
    dmd_weight: float = 1.0
    dmd_batch_size: int = 2
    real_guidance_scale: float = 0.0  # 0, as the authors' code without the key: none (their configs set 3)
    min_timestep: float = 0.0
    max_timestep: float = 1000.0
    cotrain_forward_kl: bool = True  # stage 2 adds the stage-1 loss to the generator's, as the authors do


@dataclass
class ModelsOptions:
    transformer_cfg: ModelOptions = field(default_factory=ModelOptions)
    real_cfg: Optional[ModelOptions] = None
    discriminator_cfg: Optional[ModelOptions] = None
    text_encoder_cfg: TextEncoderOptions = field(default_factory=TextEncoderOptions)
    scheduler_cfg: SchedulerOptions = field(default_factory=SchedulerOptions)
    flowmap_cfg: FlowmapOptions = field(default_factory=FlowmapOptions)
    rollout_cfg: RolloutOptions = field(default_factory=RolloutOptions)
    dmd_cfg: DmdOptions = field(default_factory=DmdOptions)


@dataclass
class OptimizerOptions:
    """``train.optim_g`` / ``train.optim_d``: AdamW."""

    type: str = "AdamW"
    lr: float = 5e-5
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.95)


@dataclass
class TrainOptions:
    train_pipeline: str = "pretrain"
    optim_g: OptimizerOptions = field(default_factory=OptimizerOptions)
    optim_d: OptimizerOptions = field(default_factory=OptimizerOptions)
    discriminator_update_ratio: int = 1  # stage 2: the generator trains on every n-th step, the fake score on all
    ema_decay: float = 0.999
    ema_warmup_step: int = 1000
    lr_scheduler: str = "constant_with_warmup"
    warmup_iter: int = 1000
    total_iter: int = 6000
    max_grad_norm: float = 1.0
    max_nonfinite_steps: int = 0  # iterations whose loss or gradient norm is NaN or infinite that may be skipped


@dataclass
class LoggerOptions:
    print_freq: int = 1
    save_checkpoint_freq: int = 50
    keep_checkpoints: int = 1


@dataclass
class PathOptions:
    output_dir: str = ""


@dataclass
class TrainingConfig:
    """A whole training config; :func:`load_config` reads one from TOML."""

    name: str = "anyflow"
    manual_seed: int = 0
    mixed_precision: bool = False
    device: str = "auto"  # cpu, cuda, cuda:N; auto: cuda when available (torchrun: this rank's GPU)
    path: PathOptions = field(default_factory=PathOptions)
    datasets: DatasetsOptions = field(default_factory=DatasetsOptions)
    models: ModelsOptions = field(default_factory=ModelsOptions)
    train: TrainOptions = field(default_factory=TrainOptions)
    logger: LoggerOptions = field(default_factory=LoggerOptions)
    source: str = field(default="", metadata={"internal": True})  # the file it was read from, for messages

    @property
    def stage(self) -> str:
        return self.train.train_pipeline


def flat_config(config: TrainingConfig) -> Dict[str, Any]:
    """Every key of ``config`` as dotted names (``train.optim_g.lr``) with plain values (lists for tuples)."""
    flat: Dict[str, Any] = {}

    def walk(value: Any, prefix: str) -> None:
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                if not f.metadata.get("internal"):
                    walk(getattr(value, f.name), f"{prefix}{f.name}.")
        else:
            flat[prefix[:-1]] = list(value) if isinstance(value, (list, tuple)) else value

    walk(config, "")
    return flat


def resume_changes(started: Mapping[str, Any], now: TrainingConfig, source: str, checkpoint: str) -> Dict[str, list]:
    """The keys a resumed run changes ({key: [as begun, now]}) when each is one of :data:`RESUMABLE_KEYS`;
    a :class:`ConfigError` listing the others (stage, models, LoRA, data, schedule, seed, ...) otherwise."""
    current = flat_config(now)
    changed = {key: [started.get(key), value] for key, value in current.items() if started.get(key) != value}
    changed.update({key: [value, None] for key, value in started.items() if key not in current})
    fixed = sorted(key for key in changed if key not in RESUMABLE_KEYS)
    if fixed:
        listed = "; ".join(f"{key} {json.dumps(changed[key][0])} -> {json.dumps(changed[key][1])}" for key in fixed)
        raise ConfigError(f"{source}: the run in {checkpoint} began with other settings that cannot change when it "
                          f"resumes: {listed}. Put them back, or start a new run in another path.output_dir "
                          f"(what may change: {', '.join(RESUMABLE_KEYS)})")
    return changed


def load_config(path: str) -> TrainingConfig:
    """Read and check the TOML config at ``path``; a :class:`ConfigError` names the file and the key."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such config file")
    toml = _toml_reader(path)
    with open(path, "rb") as f:
        try:
            raw = toml.load(f)
        except toml.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    return config_from_dict(raw, source=path)


def config_from_dict(raw: Mapping[str, Any], source: str = "config") -> TrainingConfig:
    """The checked :class:`TrainingConfig` of a parsed TOML document (nested dicts)."""
    config = _build(TrainingConfig, raw, source, prefix="")
    config.source = source
    _check_values(config, source)
    return config


def _toml_reader(path: str):
    try:
        import tomllib  # Python 3.11+
    except ImportError:
        try:
            import tomli as tomllib  # the same parser, for Python 3.9 and 3.10
        except ImportError:
            raise ConfigError(f"{path}: reading TOML needs Python 3.11+ or the tomli package (pip install tomli)") from None
    return tomllib


def _build(cls, raw: Any, source: str, prefix: str):
    """An instance of dataclass ``cls`` from dict ``raw``, every key and type checked."""
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: {where} must be a table, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in raw:
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
            hint = f" (did you mean '{prefix}{near[0]}'?)" if near else f" (valid keys: {', '.join(fields)})"
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'{hint}")
    values = {name: _value(hints[name], raw[name], source, f"{prefix}{name}") for name in fields if name in raw}
    return cls(**values)


def _value(kind, value: Any, source: str, key: str):
    """``value`` checked against the type hint ``kind``."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union:  # Optional[X]: TOML has no null, so a given value is an X
        kind = next(a for a in args if a is not type(None))
        return _value(kind, value, source, key)
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, source, prefix=f"{key}.")
    if origin in (list, tuple):
        item = args[0]
        if not isinstance(value, list) or (origin is tuple and len(value) != len(args)):
            size = f"{len(args)} " if origin is tuple else ""
            raise ConfigError(f"{source}: {key} must be a list of {size}{item.__name__}s, got {value!r}")
        items = [_value(item, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: {key} must be {'an' if kind is int else 'a'} {kind.__name__}, got {value!r}")
    return value


def _check_values(config: TrainingConfig, source: str) -> None:
    """What the types allow but training cannot use."""

    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{source}: {key} {message}")

    train, models = config.train, config.models
    if train.train_pipeline not in STAGES:
        fail("train.train_pipeline", f"must be one of {', '.join(repr(s) for s in STAGES)}, got {train.train_pipeline!r}")
    if not config.path.output_dir:
        fail("path.output_dir", "is required (checkpoints, the loss log and the results go there)")
    if not config.datasets.train.data_root:
        fail("datasets.train.data_root", "is required (a folder made by scripts/prepare_training_data.py)")
    needed = {"transformer_cfg": models.transformer_cfg}
    if config.stage == "onpolicy":
        needed.update(real_cfg=models.real_cfg, discriminator_cfg=models.discriminator_cfg)
    for name, options in needed.items():
        if options is None or not options.model_name:
            fail(f"models.{name}.model_name", f"is required for train_pipeline = {config.stage!r} ({STAGES[config.stage]})")
    for name in ("transformer_cfg", "real_cfg", "discriminator_cfg"):
        lora = getattr(models, name) and getattr(models, name).lora_config
        if lora is not None:
            if lora.lora_rank < 1:
                fail(f"models.{name}.lora_config.lora_rank", f"must be at least 1, got {lora.lora_rank}")
            if not lora.target_module_name:
                fail(f"models.{name}.lora_config.target_module_name", "must name at least one module")
    for key, value in (("datasets.train.batch_size_per_gpu", config.datasets.train.batch_size_per_gpu),
                       ("train.total_iter", train.total_iter), ("logger.print_freq", config.logger.print_freq),
                       ("logger.save_checkpoint_freq", config.logger.save_checkpoint_freq),
                       ("logger.keep_checkpoints", config.logger.keep_checkpoints),
                       ("train.discriminator_update_ratio", train.discriminator_update_ratio),
                       ("models.dmd_cfg.dmd_batch_size", models.dmd_cfg.dmd_batch_size)):
        if value < 1:
            fail(key, f"must be at least 1, got {value}")
    for key, value in (("train.warmup_iter", train.warmup_iter), ("train.ema_warmup_step", train.ema_warmup_step),
                       ("train.max_nonfinite_steps", train.max_nonfinite_steps)):
        if value < 0:
            fail(key, f"must be 0 or more, got {value}")
    for group in ("optim_g", "optim_d"):
        optim = getattr(train, group)
        if optim.type != "AdamW":
            fail(f"train.{group}.type", f"must be 'AdamW' (the one optimizer the authors use), got {optim.type!r}")
        if not (optim.lr > 0 and math.isfinite(optim.lr)):
            fail(f"train.{group}.lr", f"must be a positive number, got {optim.lr}")
        if not all(0 <= b < 1 for b in optim.betas):
            fail(f"train.{group}.betas", f"must lie in [0, 1), got {list(optim.betas)}")
    if train.lr_scheduler != "constant_with_warmup":
        fail("train.lr_scheduler", f"must be 'constant_with_warmup' (the authors' one), got {train.lr_scheduler!r}")
    if not 0 <= train.ema_decay < 1:
        fail("train.ema_decay", f"must lie in [0, 1), got {train.ema_decay}")
    if not train.max_grad_norm > 0:
        fail("train.max_grad_norm", f"must be positive, got {train.max_grad_norm}")
    flowmap = models.flowmap_cfg
    if not (0 <= flowmap.diffusion_ratio and 0 <= flowmap.consistency_ratio
            and flowmap.diffusion_ratio + flowmap.consistency_ratio <= 1):
        fail("models.flowmap_cfg.diffusion_ratio", f"and consistency_ratio must be shares of the batch summing to at "
             f"most 1, got {flowmap.diffusion_ratio} and {flowmap.consistency_ratio}")
    uses_flow_map = config.stage == "pretrain" or (config.stage == "onpolicy" and models.dmd_cfg.cotrain_forward_kl)
    if uses_flow_map and flowmap.diffusion_ratio == 0:
        fail("models.flowmap_cfg.diffusion_ratio", "must be positive: the other samples are rescaled to the mean loss "
             "of the diffusion samples")
    ratio = models.transformer_cfg.far_config.long_context_training_ratio
    if not 0 <= ratio <= 1:
        fail("models.transformer_cfg.far_config.long_context_training_ratio", f"must lie in [0, 1], got {ratio}")
    if not 0 <= models.text_encoder_cfg.drop_text_ratio <= 1:
        fail("models.text_encoder_cfg.drop_text_ratio", f"must lie in [0, 1], got {models.text_encoder_cfg.drop_text_ratio}")
    if not models.text_encoder_cfg.fuse_guidance_scale > 0:
        fail("models.text_encoder_cfg.fuse_guidance_scale", f"must be positive (1: none), got "
             f"{models.text_encoder_cfg.fuse_guidance_scale}")
    if not models.scheduler_cfg.shift > 0:
        fail("models.scheduler_cfg.shift", f"must be positive, got {models.scheduler_cfg.shift}")
    from .objectives.timesteps import WEIGHTINGS

    if models.scheduler_cfg.weight_type not in WEIGHTINGS:
        fail("models.scheduler_cfg.weight_type", f"must be one of {', '.join(repr(w) for w in WEIGHTINGS)}, got "
             f"{models.scheduler_cfg.weight_type!r}")
    if not 0 < flowmap.epsilon < 1000:
        fail("models.flowmap_cfg.epsilon", f"must lie in (0, 1000) (the timestep scale), got {flowmap.epsilon}")
    steps = models.rollout_cfg.num_inference_steps_list
    if not steps or min(steps) < 1:
        fail("models.rollout_cfg.num_inference_steps_list", f"must be a non-empty list of positive ints, got {steps}")
    if config.stage == "onpolicy" and models.dmd_cfg.dmd_batch_size > config.datasets.train.batch_size_per_gpu:
        fail("models.dmd_cfg.dmd_batch_size", f"({models.dmd_cfg.dmd_batch_size}) must not exceed "
             f"datasets.train.batch_size_per_gpu ({config.datasets.train.batch_size_per_gpu})")

