"""The Wan2.1 VAE's hyper-parameters, with the names and defaults of diffusers' ``AutoencoderKLWan`` config.

No torch here: ``weights_convert`` reads configs and plans names and shapes from this module alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

# The Wan2.1 VAE's per-channel latent statistics (Wan2.1 ``wan/modules/vae.py``; diffusers' defaults).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)


@dataclass(frozen=True)
class WanVAEConfig:
    """Hyper-parameters of the Wan2.1 causal video VAE (defaults: the released one, 127M parameters).

    Field names are those of diffusers' ``vae/config.json`` (``temperal_downsample`` spelled as
    there). The encoder has ``len(dim_mult)`` levels of ``num_res_blocks`` residual blocks with
    widths ``base_dim * dim_mult``; each level but the last halves height and width, and also time
    where ``temperal_downsample`` says so. The decoder mirrors it with ``num_res_blocks + 1``
    blocks per level, from ``decoder_base_dim`` (``base_dim`` when None).
    """

    base_dim: int = 96
    decoder_base_dim: Optional[int] = None
    z_dim: int = 16
    dim_mult: Tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: Tuple[bool, ...] = (False, True, True)
    in_channels: int = 3
    out_channels: int = 3
    latents_mean: Tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: Tuple[float, ...] = WAN21_LATENTS_STD

    def __post_init__(self) -> None:
        for name in ("dim_mult", "temperal_downsample", "latents_mean", "latents_std"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
        self._validate()

    def _validate(self) -> None:
        for name in ("base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels"):
            _positive_int(name, getattr(self, name))
        if self.decoder_base_dim is not None:
            _positive_int("decoder_base_dim", self.decoder_base_dim)
        if not isinstance(self.dim_mult, tuple) or not self.dim_mult:
            raise ValueError(f"dim_mult must be a non-empty list of positive ints, got {self.dim_mult!r}")
        for m in self.dim_mult:
            _positive_int("dim_mult entries", m)
        levels = len(self.dim_mult)
        if not isinstance(self.temperal_downsample, tuple) or len(self.temperal_downsample) != levels - 1 or not all(
            isinstance(t, bool) for t in self.temperal_downsample
        ):
            raise ValueError(f"temperal_downsample must be {levels - 1} booleans (one per level but the last of "
                             f"dim_mult {list(self.dim_mult)}), got {self.temperal_downsample!r}")
        if sum(self.temperal_downsample) > 2:
            raise ValueError(f"temperal_downsample {list(self.temperal_downsample)} halves time more than twice; the "
                             "Wan VAE encodes 4 frames per latent frame, so at most 2 levels may halve time")
        if self.decoder_dim % 2:
            raise ValueError(f"decoder_base_dim (or base_dim) must be even (each upsampling halves the width), "
                             f"got {self.decoder_dim}")
        for name in ("latents_mean", "latents_std"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or len(value) != self.z_dim or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
            ):
                raise ValueError(f"{name} must be {self.z_dim} numbers (one per latent channel, z_dim), got {value!r}")
        if not all(s > 0 for s in self.latents_std):
            raise ValueError(f"latents_std must be positive, got {list(self.latents_std)}")

    @property
    def decoder_dim(self) -> int:
        """The decoder's base width: ``decoder_base_dim``, or ``base_dim`` when that is None."""
        return self.base_dim if self.decoder_base_dim is None else self.decoder_base_dim

    @property
    def spatial_stride(self) -> int:
        """Pixels per latent along height and width: 2 per level but the last (8 for the released VAE)."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def time_stride(self) -> int:
        """Video frames per latent frame after the first (4 for the released VAE)."""
        return 2 ** sum(self.temperal_downsample)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "WanVAEConfig":
        """A config from a dict of this class's fields (keys starting with ``_`` ignored, any other unknown
        key refused by name). A diffusers ``vae/config.json``, with the keys this model sets aside or
        refuses, is read by ``anyflow.vae.checkpoint.read_vae_config``."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown WanVAEConfig keys: {unknown}; known keys are {sorted(known)}")
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """The config as a plain dict with diffusers' key names (JSON-ready: tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
