"""The one table of the Wan2.1 VAE's parameter names: ours, diffusers' and the original Wan ones.

Each row names one parameter in the three layouts, with the shape a :class:`WanVAEConfig` implies:

- ``ours``: :class:`anyflow.vae.WanVAE`;
- ``diffusers``: ``AutoencoderKLWan`` (``vae/diffusion_pytorch_model.safetensors``);
- ``wan``: Wan2.1's ``wan/modules/vae.py`` (``Wan2.1_VAE.pth``), whose ``nn.Sequential`` indices
  name the layers: in a residual block ``residual.0`` is the first norm, ``.2`` the first conv,
  ``.3`` the second norm, ``.6`` the second conv (1, 4 are SiLUs, 5 a dropout); ``head.0`` is a
  norm, ``head.2`` a conv; a resampler's 2D conv is ``resample.1`` (after its padding or
  upsampling); ``conv1`` and ``conv2`` at the top are diffusers' ``quant_conv`` and
  ``post_quant_conv``.

The encoder's layers are one flat list in Wan (``encoder.downsamples.{i}``), in diffusers
(``encoder.down_blocks.{i}``) and in ours (``encoder.down.{i}``). The decoder's are flat in Wan
(``decoder.upsamples.{i}``) and ours (``decoder.up.{i}``), grouped by level in diffusers
(``decoder.up_blocks.{level}.resnets.{j}`` and ``.upsamplers.0``). Torch-free: it imports only the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Tuple, TypeVar

from .config import WanVAEConfig

LAYOUTS = ("ours", "diffusers", "wan")
Shape = Tuple[int, ...]
T = TypeVar("T")


@dataclass(frozen=True)
class VAEName:
    """One parameter: its name in each layout and its shape."""

    ours: str
    diffusers: str
    wan: str
    shape: Shape

    def name(self, layout: str) -> str:
        """The name in ``layout`` ("ours", "diffusers" or "wan")."""
        return getattr(self, layout)


Prefixes = Tuple[str, str, str]  # (ours, diffusers, wan) module names


def _param(module: Prefixes, suffixes: Tuple[str, str, str], shape: Shape) -> VAEName:
    ours, diffusers, wan = (f"{m}.{s}" for m, s in zip(module, suffixes))
    return VAEName(ours, diffusers, wan, shape)


def _conv(module: Prefixes, out_dim: int, in_dim: int, kernel: Shape) -> Iterator[VAEName]:
    yield _param(module, ("weight",) * 3, (out_dim, in_dim, *kernel))
    yield _param(module, ("bias",) * 3, (out_dim,))


def _norm(module: Prefixes, dim: int, image: bool = False) -> Iterator[VAEName]:
    yield _param(module, ("weight", "gamma", "gamma"), (dim, 1, 1) if image else (dim, 1, 1, 1))


def _child(module: Prefixes, ours: str, diffusers: str, wan: str) -> Prefixes:
    return (f"{module[0]}.{ours}", f"{module[1]}.{diffusers}", f"{module[2]}.{wan}")


def _residual(module: Prefixes, in_dim: int, out_dim: int) -> Iterator[VAEName]:
    yield from _norm(_child(module, "norm1", "norm1", "residual.0"), in_dim)
    yield from _conv(_child(module, "conv1", "conv1", "residual.2"), out_dim, in_dim, (3, 3, 3))
    yield from _norm(_child(module, "norm2", "norm2", "residual.3"), out_dim)
    yield from _conv(_child(module, "conv2", "conv2", "residual.6"), out_dim, out_dim, (3, 3, 3))
    if in_dim != out_dim:
        yield from _conv(_child(module, "shortcut", "conv_shortcut", "shortcut"), out_dim, in_dim, (1, 1, 1))


def _attention(module: Prefixes, dim: int) -> Iterator[VAEName]:
    yield from _norm(_child(module, "norm", "norm", "norm"), dim, image=True)
    yield from _conv(_child(module, "qkv", "to_qkv", "to_qkv"), 3 * dim, dim, (1, 1))
    yield from _conv(_child(module, "proj", "proj", "proj"), dim, dim, (1, 1))


def _resample(module: Prefixes, dim: int, up: bool, temporal: bool) -> Iterator[VAEName]:
    yield from _conv(_child(module, "conv", "resample.1", "resample.1"), dim // 2 if up else dim, dim, (3, 3))
    if temporal:
        yield from _conv(_child(module, "time_conv", "time_conv", "time_conv"), 2 * dim if up else dim, dim, (3, 1, 1))


def _middle(part: str, dim: int) -> Iterator[VAEName]:
    yield from _residual((f"{part}.mid.0", f"{part}.mid_block.resnets.0", f"{part}.middle.0"), dim, dim)
    yield from _attention((f"{part}.mid.1", f"{part}.mid_block.attentions.0", f"{part}.middle.1"), dim)
    yield from _residual((f"{part}.mid.2", f"{part}.mid_block.resnets.1", f"{part}.middle.2"), dim, dim)


def _head(part: str, in_dim: int, out_dim: int) -> Iterator[VAEName]:
    yield from _norm((f"{part}.head.norm", f"{part}.norm_out", f"{part}.head.0"), in_dim)
    yield from _conv((f"{part}.head.conv", f"{part}.conv_out", f"{part}.head.2"), out_dim, in_dim, (3, 3, 3))


def _encoder(config: WanVAEConfig) -> Iterator[VAEName]:
    dims = [config.base_dim * m for m in (1, *config.dim_mult)]
    yield from _conv(("encoder.conv_in", "encoder.conv_in", "encoder.conv1"), dims[0], config.in_channels, (3, 3, 3))
    index = 0
    for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(config.num_res_blocks):
            yield from _residual((f"encoder.down.{index}", f"encoder.down_blocks.{index}",
                                  f"encoder.downsamples.{index}"), in_dim, out_dim)
            in_dim, index = out_dim, index + 1
        if level < len(config.dim_mult) - 1:
            yield from _resample((f"encoder.down.{index}", f"encoder.down_blocks.{index}",
                                  f"encoder.downsamples.{index}"), out_dim, False, config.temperal_downsample[level])
            index += 1
    yield from _middle("encoder", dims[-1])
    yield from _head("encoder", dims[-1], 2 * config.z_dim)


def _decoder(config: WanVAEConfig) -> Iterator[VAEName]:
    mult = config.dim_mult
    dims = [config.decoder_dim * m for m in (mult[-1], *reversed(mult))]
    temporal = tuple(reversed(config.temperal_downsample))
    yield from _conv(("decoder.conv_in", "decoder.conv_in", "decoder.conv1"), dims[0], config.z_dim, (3, 3, 3))
    yield from _middle("decoder", dims[0])
    index = 0
    for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        if level > 0:
            in_dim //= 2
        for j in range(config.num_res_blocks + 1):
            yield from _residual((f"decoder.up.{index}", f"decoder.up_blocks.{level}.resnets.{j}",
                                  f"decoder.upsamples.{index}"), in_dim, out_dim)
            in_dim, index = out_dim, index + 1
        if level < len(mult) - 1:
            yield from _resample((f"decoder.up.{index}", f"decoder.up_blocks.{level}.upsamplers.0",
                                  f"decoder.upsamples.{index}"), out_dim, True, temporal[level])
            index += 1
    yield from _head("decoder", dims[-1], config.out_channels)


def vae_names(config: WanVAEConfig) -> List[VAEName]:
    """Every parameter of the VAE ``config`` describes, in our ``state_dict`` order."""
    z = config.z_dim
    return [
        *_encoder(config),
        *_conv(("moments_proj", "quant_conv", "conv1"), 2 * z, 2 * z, (1, 1, 1)),
        *_conv(("latent_proj", "post_quant_conv", "conv2"), z, z, (1, 1, 1)),
        *_decoder(config),
    ]


def rename(tensors: Mapping[str, T], config: WanVAEConfig, source: str, target: str) -> Dict[str, T]:
    """``tensors`` named in layout ``source`` renamed to layout ``target`` (both in :data:`LAYOUTS`).

    Exactly the config's parameters must be there: a missing or extra name raises a KeyError naming it.
    """
    table = {row.name(source): row.name(target) for row in vae_names(config)}
    missing = [name for name in table if name not in tensors]
    extra = [name for name in tensors if name not in table]
    if missing or extra:
        raise KeyError(f"{source} names do not match the VAE config: missing {missing[:5]}, unexpected {extra[:5]}")
    return {table[name]: value for name, value in tensors.items()}
