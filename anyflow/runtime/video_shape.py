"""A video's size in pixels against the latents the Wan VAE makes of it and the grid a model can take.

The Wan VAE compresses time by 4 (the first frame alone, then 4 frames per latent frame: a video
has 4k + 1 frames) and space by 8. The transformer cuts the latents into patches (2 x 2 for the
released models) and a FAR model also into its compressed patches (4 x 4), and its RoPE table
covers ``rope_max_seq_len`` positions per axis. Errors name the argument as the caller calls it
(``names``: the CLI's ``--frames`` or the pipeline's ``num_frames``).
"""

from __future__ import annotations

import math
from typing import Tuple

VAE_TIME_STRIDE, VAE_SPACE_STRIDE = 4, 8
NAMES = ("num_frames", "height", "width")


def latent_shape(frames: int, height: int, width: int, names: Tuple[str, str, str] = NAMES) -> Tuple[int, int, int]:
    """(F, H/8, W/8) of the Wan VAE latents of a video; height and width must be multiples of 16 (8 x the patch 2)."""
    if frames < 1 or (frames - 1) % VAE_TIME_STRIDE:
        raise ValueError(f"{names[0]} must be 4k + 1 (the Wan VAE compresses time by 4), got {frames}")
    for name, value in zip(names[1:], (height, width)):
        if value < 16 or value % 16:
            raise ValueError(f"{name} must be a positive multiple of 16 (VAE stride 8 x patch 2), got {value}")
    return (frames - 1) // VAE_TIME_STRIDE + 1, height // VAE_SPACE_STRIDE, width // VAE_SPACE_STRIDE


def check_grid(config, frames: int, height: int, width: int, names: Tuple[str, str, str] = NAMES) -> None:
    """The patch grid of a video against the model's patches (a FAR model's compressed one too) and its
    RoPE table, naming the argument and the multiple that would fit. A FAR model takes any number of frames
    (its frame positions are re-based past the table, :mod:`anyflow.model.far_cache`)."""
    limit = config.rope_max_seq_len
    _, ph, pw = config.patch_size
    _, ch, cw = getattr(config, "compressed_patch_size", (1, ph, pw))
    latent_frames, h, w = latent_shape(frames, height, width, names)
    for argument, value, size, patch, compressed, most in (
        (names[0], frames, latent_frames, 1, 1, VAE_TIME_STRIDE * (limit - 1) + 1),
        (names[1], height, h, ph, ch, VAE_SPACE_STRIDE * ph * limit),
        (names[2], width, w, pw, cw, VAE_SPACE_STRIDE * pw * limit),
    ):
        for which, p in (("patch", patch), ("compressed patch (compressed_patch_size)", compressed)):
            if size % p:
                raise ValueError(f"{argument} {value}: {size} latent pixels are not divisible by the model's {which} "
                                 f"{p}; use a multiple of {VAE_SPACE_STRIDE * math.lcm(patch, compressed)}")
        if size // patch > limit and not (argument == names[0] and hasattr(config, "chunk_partition")):
            raise ValueError(f"{argument} {value}: {size // patch} positions exceed the model's rope_max_seq_len={limit} "
                             f"(at most {argument} {most})")
