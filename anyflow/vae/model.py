"""The Wan2.1 VAE: a causal 3D convolutional encoder and decoder around a 16-channel latent.

    video (B, 3, 1 + 4k, H, W) in [-1, 1]  -> encode ->  latents (B, 16, 1 + k, H/8, W/8), normalised
    latents                                -> decode ->  video, clamped to [-1, 1]

Every layer is causal in time, so both directions run one frame at a time (:mod:`.cache`): the
first frame alone, then each latent frame from 4 video frames and back. Memory is bounded by one
frame per resolution plus each causal conv's last two input frames, whatever the video's length.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from ..runtime.devices import resolve_device
from .cache import TemporalCache, run_frames
from .config import WanVAEConfig
from .layers import AttentionBlock, CausalConv3d, Downsample, Head, ResidualBlock, Upsample
from .ops import as_frame, conv_frames

Tile = Union[bool, Tuple[int, int]]


def middle(dim: int) -> List[nn.Module]:
    """The middle of the encoder and of the decoder: residual block, attention, residual block."""
    return [ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim)]


class Encoder(nn.Module):
    """Frames (B, C_in, H, W) -> frames (B, 2 z_dim, H/8, W/8): 1 for the first, then 1 for every 4."""

    def __init__(self, config: WanVAEConfig):
        super().__init__()
        dims = [config.base_dim * m for m in (1, *config.dim_mult)]
        self.conv_in = CausalConv3d(config.in_channels, dims[0], (3, 3, 3))
        down: List[nn.Module] = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(config.num_res_blocks):
                down.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if level < len(config.dim_mult) - 1:
                down.append(Downsample(out_dim, temporal=config.temperal_downsample[level]))
        self.down = nn.ModuleList(down)
        self.mid = nn.ModuleList(middle(dims[-1]))
        self.head = Head(dims[-1], 2 * config.z_dim)

    def layers(self) -> List[nn.Module]:
        """Every layer in the order a frame goes through them."""
        return [self.conv_in, *self.down, *self.mid, self.head]


class Decoder(nn.Module):
    """Frames (B, z_dim, h, w) -> frames (B, C_out, 8h, 8w): 1 for the first, then 4 for each."""

    def __init__(self, config: WanVAEConfig):
        super().__init__()
        mult = config.dim_mult
        dims = [config.decoder_dim * m for m in (mult[-1], *reversed(mult))]
        temporal = tuple(reversed(config.temperal_downsample))
        self.conv_in = CausalConv3d(config.z_dim, dims[0], (3, 3, 3))
        self.mid = nn.ModuleList(middle(dims[0]))
        up: List[nn.Module] = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if level > 0:
                in_dim //= 2  # each upsampling conv halves the width
            for _ in range(config.num_res_blocks + 1):
                up.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if level < len(mult) - 1:
                up.append(Upsample(out_dim, temporal=temporal[level]))
        self.up = nn.ModuleList(up)
        self.head = Head(dims[-1], config.out_channels)

    def layers(self) -> List[nn.Module]:
        """Every layer in the order a frame goes through them."""
        return [self.conv_in, *self.mid, *self.up, self.head]


class WanVAE(nn.Module):
    """The Wan2.1 video VAE (``diffusers.AutoencoderKLWan`` with ``is_residual=False``).

    Latents are normalised as the AnyFlow pipelines do it, per channel with the config's
    ``latents_mean`` and ``latents_std``: :meth:`encode` returns ``(mu - mean) / std`` of the
    posterior mean ``mu`` and :meth:`decode` takes them back (see :meth:`normalize`).

    Layouts: videos are (B, C, T, H, W) with T = 4k + 1 frames, as diffusers takes them; latents
    (B, C, F, h, w) with F = k + 1, or (B, F, C, h, w) with ``frames_first=True`` (the layout of
    the AnyFlow transformers). The model computes in its parameters' dtype (:meth:`to`).
    """

    def __init__(self, config: WanVAEConfig):
        super().__init__()
        if not isinstance(config, WanVAEConfig):
            raise TypeError(f"WanVAE takes a WanVAEConfig, got {type(config).__name__}")
        self.config = config
        z = config.z_dim
        self.encoder = Encoder(config)
        self.moments_proj = CausalConv3d(2 * z, 2 * z, (1, 1, 1))  # -> posterior mean and log-variance
        self.latent_proj = CausalConv3d(z, z, (1, 1, 1))
        self.decoder = Decoder(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.latent_proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.latent_proj.weight.device

    # ---- loading ------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str, dtype: Optional[Union[str, torch.dtype]] = None,
                        device: Union[str, torch.device] = "cpu", *,
                        config: Optional[WanVAEConfig] = None) -> "WanVAE":
        """Load a diffusers ``vae/`` folder (``config.json`` and one or sharded safetensors), a pipeline
        snapshot holding one, a single ``.safetensors``, or Wan's original ``Wan2.1_VAE.pth``.

        ``dtype`` (a torch dtype or "float32", "bfloat16", "float16"; None keeps the file's).
        ``config`` is for weights with no ``config.json`` beside them; without it they are taken
        to be the released Wan2.1 VAE, and every shape is checked against it. Safetensors are
        mapped, not read: weights that are never used (the encoder, when only decoding) are never
        read from disk.
        """
        from .checkpoint import load_vae_checkpoint

        device = resolve_device(device)
        config, state_dict = load_vae_checkpoint(path, dtype=dtype, device=device, config=config)
        return cls.from_state_dict(config, state_dict)

    @classmethod
    def from_state_dict(cls, config: WanVAEConfig, state_dict) -> "WanVAE":
        """The VAE of ``config`` holding exactly these tensors (our names; no initialisation, no copy)."""
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state_dict, strict=True, assign=True)
        return model.eval()

    # ---- latent normalisation -----------------------------------------------------------------

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        """Posterior means (B, C, ..., ) -> ``(mu - mean) * (1 / std)`` per channel (dim 1), in float32
        and back to ``mu``'s dtype, as the AnyFlow pipelines' ``encode_video``."""
        mean, inv_std = self._statistics(mu, torch.float32)
        return ((mu.float() - mean) * inv_std).to(mu.dtype)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, ...) -> ``latents / (1 / std) + mean`` in the model's dtype, as the
        AnyFlow pipelines before ``vae.decode``."""
        latents = latents.to(self.device, self.dtype)
        mean, inv_std = self._statistics(latents, self.dtype)
        return latents / inv_std + mean

    def _statistics(self, like: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1 / std) of the config, shaped (C, 1, ...) to broadcast over ``like``'s dim 1."""
        shape = (-1,) + (1,) * (like.dim() - 2)
        mean = torch.tensor(self.config.latents_mean).view(shape).to(like.device, dtype)
        inv_std = (1.0 / torch.tensor(self.config.latents_std)).view(shape).to(like.device, dtype)
        return mean, inv_std

    # ---- encoding -----------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, video: torch.Tensor, frames_first: bool = False) -> torch.Tensor:
        """Video (B, C_in, T, H, W) in [-1, 1], T = 4k + 1, H and W multiples of 8 -> the normalised
        posterior mean (B, z_dim, k + 1, H/8, W/8), or (B, k + 1, z_dim, H/8, W/8) with ``frames_first``.

        The video is cast to the model's dtype; the latents come out in it.
        """
        self._check_video(video)
        b, _, t, h, w = video.shape
        s, z = self.config.spatial_stride, self.config.z_dim
        latents = torch.empty(b, z, 1 + (t - 1) // self.config.time_stride, h // s, w // s,
                              dtype=self.dtype, device=self.device)
        cache, layers, done = TemporalCache(), self.encoder.layers(), 0
        mean_weight, mean_bias = self.moments_proj.weight[:z], self.moments_proj.bias[:z]  # the mean half
        for i in range(t):
            frame = as_frame(video[:, :, i].to(self.device, self.dtype))  # (B, C_in, H, W)
            for moments in run_frames(layers, frame, cache):
                mu = conv_frames([moments], mean_weight, mean_bias, padding=0)  # (B, z, h, w)
                latents[:, :, done] = self.normalize(mu)
                done += 1
        return latents.transpose(1, 2) if frames_first else latents

    def _check_video(self, video: torch.Tensor) -> None:
        c, s, ts = self.config.in_channels, self.config.spatial_stride, self.config.time_stride
        if not isinstance(video, torch.Tensor) or video.dim() != 5:
            what = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"video must be a (B, C, T, H, W) tensor, got {what}")
        b, channels, t, h, w = video.shape
        if channels != c:
            raise ValueError(f"video {tuple(video.shape)} has {channels} channels at dim 1; this VAE takes {c} "
                             "(layout (B, C, T, H, W))")
        if (t - 1) % ts:
            raise ValueError(f"video {tuple(video.shape)} has {t} frames; the VAE takes {ts}k + 1 (1, {1 + ts}, "
                             f"{1 + 2 * ts}, ...)")
        if h % s or w % s or not h or not w:
            raise ValueError(f"video {tuple(video.shape)}: height and width must be positive multiples of {s}")
        if not video.is_floating_point():
            raise ValueError(f"video must be floating point in [-1, 1], got {video.dtype}")

    # ---- decoding -----------------------------------------------------------------------------

    def decoder_stream(self, frames_first: bool = False, tile: Tile = False) -> "VAEDecoderStream":
        """A :class:`VAEDecoderStream`: push latent chunks in order, get their frames back as they are decoded."""
        from .stream import VAEDecoderStream

        return VAEDecoderStream(self, frames_first=frames_first, tile=tile)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, frames_first: bool = False, tile: Tile = False) -> torch.Tensor:
        """Normalised latents (B, z_dim, F, h, w) (or (B, F, z_dim, h, w) with ``frames_first``) -> video
        (B, C_out, 4 (F - 1) + 1, 8h, 8w) in [-1, 1], in the model's dtype.

        ``tile``: decode in overlapping spatial tiles blended as diffusers' ``enable_tiling()`` does
        (True: 256-pixel tiles every 192 pixels, or (tile, stride) in pixels); see :mod:`.tiling`.
        """
        return self.decoder_stream(frames_first, tile).push(latents)

    @torch.no_grad()
    def decode_chunks(self, latents: torch.Tensor, frames_first: bool = False, tile: Tile = False
                      ) -> Iterator[torch.Tensor]:
        """As :meth:`decode`, one latent frame at a time: yields (B, C_out, n, 8h, 8w) with n = 1 for the
        first latent frame and 4 for each later one, as soon as they are decoded."""
        stream = self.decoder_stream(frames_first, tile)
        for chunk in latents.split(1, dim=1 if frames_first else 2):
            yield stream.push(chunk)
