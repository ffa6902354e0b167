"""The model's hyper-parameters, with the names and defaults of the diffusers ``config.json``."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

DELTATIME_TYPES = ("r", "t-r")
TRAIN_TIMESTEPS = 1000  # timesteps are in train units, [0, TRAIN_TIMESTEPS] for sigma in [0, 1]


@dataclass(frozen=True)
class AnyFlowConfig:
    """Hyper-parameters of the AnyFlow transformer.

    Field names and defaults are those of ``diffusers.AnyFlowTransformer3DModel``, so a Hub
    ``transformer/config.json`` reads straight into :meth:`from_dict`. The hidden size is
    ``num_attention_heads * attention_head_dim``.

    ``deltatime_type`` says what the second timestep MLP embeds: ``"r"`` the target timestep,
    ``"t-r"`` the interval. ``gate_value`` is the fixed mixing weight ``g`` of that embedding.
    """

    patch_size: Tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: Optional[int] = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    eps: float = 1e-6
    image_dim: Optional[int] = None
    rope_max_seq_len: int = 1024
    gate_value: float = 0.25
    deltatime_type: str = "r"

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        if self.out_channels is None:  # diffusers treats a missing out_channels as in_channels
            object.__setattr__(self, "out_channels", self.in_channels)
        self._validate()

    def _validate(self) -> None:
        if len(self.patch_size) != 3 or not all(isinstance(p, int) and p >= 1 for p in self.patch_size):
            raise ValueError(f"patch_size must be three positive ints (t, h, w), got {self.patch_size!r}")
        if self.patch_size[0] != 1:
            raise ValueError(
                f"patch_size[0] (the temporal patch) must be 1, got {self.patch_size[0]}: "
                "timesteps are given per latent frame, so every token must belong to exactly one frame"
            )
        for name in ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
                     "freq_dim", "ffn_dim", "num_layers", "rope_max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.image_dim is not None and (not isinstance(self.image_dim, int) or self.image_dim < 1):
            raise ValueError(f"image_dim must be None or a positive int, got {self.image_dim!r}")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim must be even (cos and sin halves), got {self.freq_dim}")
        d = self.attention_head_dim
        if d % 2 or d < 6:
            raise ValueError(
                f"attention_head_dim must be even and at least 6 to split its rotary pairs over "
                f"(frame, row, column), got {d}"
            )
        if self.deltatime_type not in DELTATIME_TYPES:
            raise ValueError(f"deltatime_type must be one of {DELTATIME_TYPES}, got {self.deltatime_type!r}")
        if not (isinstance(self.gate_value, (int, float)) and math.isfinite(self.gate_value)):
            raise ValueError(f"gate_value must be a finite number, got {self.gate_value!r}")
        if not (isinstance(self.eps, (int, float)) and self.eps > 0):
            raise ValueError(f"eps must be a positive number, got {self.eps!r}")

    @property
    def hidden_size(self) -> int:
        """Width D of the token stream: heads times head dim."""
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "AnyFlowConfig":
        """Build a config from a dict of this class's fields, as :meth:`to_dict` writes it.

        Strict: keys starting with ``_`` (``_class_name``, ...) are ignored, any other unknown key
        is an error that names it (a typo). Lists become tuples. A checkpoint's ``config.json``
        written by diffusers or the AnyFlow authors (with their extra keys, ``qk_norm``, ...) is
        read by ``weights_convert.configs.read_config``, which knows which of those keys matter.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(
                f"unknown AnyFlowConfig keys: {unknown}; known keys are {sorted(known)} (a checkpoint's config.json "
                "with diffusers' or the authors' extra keys is read by weights_convert.configs.read_config)"
            )
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """The config as a plain dict, with the diffusers key names (JSON-ready: tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_preset(cls, name: str) -> "AnyFlowConfig":
        """A released model's config by name: one of :data:`PRESETS`."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]


# The chunks (in latent frames) the released FAR checkpoints generate 81 frames (21 latent frames) in.
RELEASED_CHUNK_PARTITION = (1, 3, 3, 3, 3, 3, 3, 2)


@dataclass(frozen=True)
class AnyFlowFARConfig(AnyFlowConfig):
    """Hyper-parameters of the frame-autoregressive (FAR) AnyFlow transformer: the bidirectional
    model's, plus how the video is split and how older frames are compressed.

    Frames are generated in chunks of ``chunk_partition`` latent frames (the default; it must
    sum to the video's latent frames). The ``full_chunk_limit`` most recent chunks are seen at
    full resolution, older ones through a second patch embedding with the larger
    ``compressed_patch_size`` (4x fewer tokens with the released (1, 4, 4)).
    """

    compressed_patch_size: Tuple[int, int, int] = (1, 4, 4)
    full_chunk_limit: int = 3
    chunk_partition: Tuple[int, ...] = RELEASED_CHUNK_PARTITION

    def __post_init__(self) -> None:
        object.__setattr__(self, "compressed_patch_size", tuple(self.compressed_patch_size))
        object.__setattr__(self, "chunk_partition", tuple(self.chunk_partition))
        super().__post_init__()

    def _validate(self) -> None:
        super()._validate()
        c, p = self.compressed_patch_size, self.patch_size
        if len(c) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in c):
            raise ValueError(f"compressed_patch_size must be three positive ints (t, h, w), got {c!r}")
        if c[0] != 1 or c[1] % p[1] or c[2] % p[2]:
            raise ValueError(
                f"compressed_patch_size {c} must have a temporal patch of 1 and a spatial patch that is a multiple "
                f"of patch_size {p} (each compressed token covers whole full-resolution patches)"
            )
        if not isinstance(self.full_chunk_limit, int) or isinstance(self.full_chunk_limit, bool) or self.full_chunk_limit < 1:
            raise ValueError(f"full_chunk_limit must be a positive int, got {self.full_chunk_limit!r}")
        check_chunk_partition(self.chunk_partition)

    @property
    def trained_frames(self) -> int:
        """The latent frames ``chunk_partition`` covers: the length the checkpoint was trained on (21, 81 video
        frames, for the released ones)."""
        return sum(self.chunk_partition)

    def chunk_partition_for(self, frames: int) -> Tuple[int, ...]:
        """The chunks a video of ``frames`` latent frames is made in, by the checkpoint's own rule.

        Up to :attr:`trained_frames`, ``chunk_partition`` cut so that it sums to ``frames`` (its own at
        its own length). Longer: its first chunk, then its usual chunk (the most common of its later
        chunks, the larger on a tie; 3 for the released 1 3 3 3 3 3 3 2) as often as it fits, and the
        remainder last: 1, 3, ..., 3, 2 for the released ones at any length 3k + 3.
        """
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise ValueError(f"a video has at least one latent frame, got {frames!r}")
        own = self.chunk_partition
        if frames <= sum(own):
            cut, total = [], 0
            for chunk in own:
                cut.append(min(chunk, frames - total))
                total += cut[-1]
                if total == frames:
                    return tuple(cut)
        later = own[1:] or own
        usual = max(set(later), key=lambda size: (later.count(size), size))
        repeats, remainder = divmod(frames - own[0], usual)
        return (own[0],) + (usual,) * repeats + ((remainder,) if remainder else ())


def check_chunk_partition(partition, frames: Optional[int] = None, name: str = "chunk_partition") -> Tuple[int, ...]:
    """A chunk partition as a tuple of positive ints (summing to ``frames`` when given), or a ValueError naming it."""
    try:
        chunks = tuple(partition)
    except TypeError:
        raise ValueError(f"{name} must be a list of positive ints, got {partition!r}") from None
    if not chunks or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in chunks):
        raise ValueError(f"{name} must be a non-empty list of positive ints, got {list(chunks)}")
    if frames is not None and sum(chunks) != frames:
        raise ValueError(f"{name} {list(chunks)} sums to {sum(chunks)} latent frames, the video has {frames}")
    return chunks


PRESETS = {
    # nvidia/AnyFlow-Wan2.1-T2V-1.3B-Diffusers: D = 1536, 1.42e9 parameters.
    "anyflow-wan2.1-t2v-1.3b": AnyFlowConfig(num_attention_heads=12, ffn_dim=8960, num_layers=30),
    # nvidia/AnyFlow-Wan2.1-T2V-14B-Diffusers: D = 5120.
    "anyflow-wan2.1-t2v-14b": AnyFlowConfig(num_attention_heads=40, ffn_dim=13824, num_layers=40),
    # nvidia/AnyFlow-FAR-Wan2.1-1.3B-Diffusers and -14B-Diffusers: the same bodies, plus the FAR patch embedding.
    "anyflow-far-wan2.1-1.3b": AnyFlowFARConfig(num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "anyflow-far-wan2.1-14b": AnyFlowFARConfig(num_attention_heads=40, ffn_dim=13824, num_layers=40),
}
