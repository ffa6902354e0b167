"""What a run asks for, from the page's raw values to checked :class:`Settings`, and what the page offers.

The page (and an HTTP client) sends strings and numbers; :func:`check_settings` turns them into one
:class:`Settings` or raises a ValueError whose message starts with the field's label as the page shows
it ("Steps: ..."), so that every bad value becomes one line on the page. :class:`Choices` holds what
the page offers for the snapshot and device at hand: size presets on the model's pixel grid, the
length limit, the defaults.

Length is a number of frames (4k + 1, at :data:`FPS` frames per second) or of seconds; the FAR model
makes it in chunks, the checkpoint's extended by its own rule (:func:`chunks_for`), and keeps a
bounded context (:func:`far_window`: 12 latent frames and a sink of 1, which changes no bit within
the released models' 81 frames), so a FAR video may run to :data:`FAR_MAX_FRAMES` with flat memory.
"""

from __future__ import annotations

import math
import numbers
import os
import secrets
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from anyflow.runtime.video_shape import VAE_SPACE_STRIDE, VAE_TIME_STRIDE, check_grid

FPS = 16  # Wan's frame rate
MAX_STEPS = 1000  # the models' timestep grid
STEP_CHOICES = (1, 2, 4, 8)
MAX_FRAMES = 81  # the length the released checkpoints were trained for (5 s): the bidirectional models' limit
FAR_MAX_FRAMES = 1921  # 2 minutes; with the window below, a FAR run's memory is the same at any length
CONTEXT_WINDOW, SINK_FRAMES = 12, 1  # the 13 compressed frames the released FAR models saw at most in training
SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes 0 to 2^64 - 1
RANDOM_SEED_LIMIT = 2**53  # random seeds stay exact in a browser's numbers
LENGTH_UNITS = ("seconds", "frames")
IMAGE_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WebP"}  # PIL's name -> the page's
MAX_IMAGE_BYTES = 20 * 2**20
MAX_IMAGE_PIXELS = 40_000_000
# (label, width, height) at 16:9-ish Wan sizes, snapped down to the checkpoint's pixel grid
SIZE_PRESETS = (("480p", 832, 480), ("480p portrait", 480, 832), ("720p", 1280, 720), ("720p portrait", 720, 1280),
                ("240p", 416, 240))
GPU_DEFAULT, SMALL_DEFAULT = "480p", "240p"


@dataclass(frozen=True)
class Settings:
    """One run's checked values: everything needed to make the same video again."""

    prompt: str
    negative_prompt: str
    steps: int
    seed: int
    guidance_scale: float
    frames: int  # 4k + 1
    width: int
    height: int
    chunks: Optional[Tuple[int, ...]] = None  # FAR: latent frames per chunk
    image: Optional[np.ndarray] = field(default=None, repr=False, compare=False)  # (H, W, 3) uint8, the first frame
    context_window: Optional[int] = None  # FAR: latent frames of compressed context kept (far_window)
    sink_frames: int = 0  # FAR: the first latent frames kept besides

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1

    def record(self) -> dict:
        """The settings as plain JSON values (the image as its size and a digest)."""
        values = {k: v for k, v in asdict(self).items() if k != "image"}
        values["chunks"] = list(self.chunks) if self.chunks else None
        values["fps"] = FPS
        if self.image is not None:
            import hashlib

            values["image"] = {"sha256": hashlib.sha256(self.image.tobytes()).hexdigest(),
                               "size": f"{self.width}x{self.height}", "fit": "centre crop, then resize"}
        return values


@dataclass(frozen=True)
class Preset:
    """A video size the page offers."""

    name: str
    width: int
    height: int

    @property
    def label(self) -> str:
        return f"{self.name} ({self.width} x {self.height})"


@dataclass(frozen=True)
class Choices:
    """What the page offers for one snapshot on one device."""

    model: str  # the snapshot's folder name, never its path
    far: bool
    pixel_multiple: int  # width and height must be multiples of it
    max_frames: int
    presets: Tuple[Preset, ...]
    default_preset: Preset
    default_frames: int
    far_config: Optional[object]  # the FAR checkpoint's config (its chunk rule), None for a bidirectional one
    note: str  # what the page says about the device and its defaults


def pixel_multiple(config) -> int:
    """The multiple of pixels a video's width and height must be: 8 x the patch (x the compressed patch, FAR)."""
    _, ph, pw = config.patch_size
    _, ch, cw = getattr(config, "compressed_patch_size", (1, ph, pw))
    return VAE_SPACE_STRIDE * math.lcm(ph, pw, ch, cw)


def fitting_presets(config) -> List[Preset]:
    """The size presets snapped down to the model's pixel grid, those its RoPE table covers."""
    multiple, presets = pixel_multiple(config), []
    for name, width, height in SIZE_PRESETS:
        preset = Preset(name, width // multiple * multiple, height // multiple * multiple)
        try:
            check_grid(config, 1, preset.height, preset.width)
        except ValueError:
            continue
        presets.append(preset)
    return presets


def make_choices(model: str, config, presets: Sequence[Preset], on_gpu: bool) -> Choices:
    """The page's offer: ``presets`` (those that fit, from :func:`fitting_presets`), the default size (480p on a
    GPU, the small one elsewhere) and length (5 s on a GPU, 2 s elsewhere)."""
    if not presets:
        raise ValueError(f"{model}: no size preset fits the model's grid")
    by_name = {p.name: p for p in presets}
    wanted = GPU_DEFAULT if on_gpu else SMALL_DEFAULT
    default = by_name.get(wanted, presets[0] if on_gpu else min(presets, key=lambda p: p.width * p.height))
    far = hasattr(config, "chunk_partition")
    # a FAR run re-bases its positions past the RoPE table; a bidirectional one sees every frame at once
    max_frames = FAR_MAX_FRAMES if far else min(MAX_FRAMES, VAE_TIME_STRIDE * (config.rope_max_seq_len - 1) + 1)
    default_frames = min(max_frames, MAX_FRAMES if on_gpu else 2 * FPS + 1)
    notes = [] if on_gpu else [f"Running on the CPU: the default size is {default.label} and the default length "
                               f"{default_frames} frames; larger and longer videos take far longer here."]
    if far:
        trained = VAE_TIME_STRIDE * (config.trained_frames - 1) + 1
        notes.append(f"Videos up to {max_frames} frames ({(max_frames - 1) / FPS:g} s): the model keeps the last "
                     f"{CONTEXT_WINDOW} latent frames of context and the first {SINK_FRAMES}, so memory stays the "
                     f"same at any length; past {trained} frames it runs longer than it was trained for.")
    return Choices(model, far, pixel_multiple(config), max_frames, tuple(presets), default, default_frames,
                   config if far else None, " ".join(notes))


def frames_for(length, unit: str, max_frames: int) -> int:
    """Video frames for a length in ``unit`` ("seconds": rounded to the nearest 4k + 1; "frames": as given)."""
    if unit not in LENGTH_UNITS:
        raise ValueError(f"Length unit: {unit!r} is not one of {', '.join(LENGTH_UNITS)}")
    value = _number("Length", length)
    if unit == "seconds":
        if value <= 0:
            raise ValueError(f"Length: {value:g} seconds; give a positive length")
        frames = VAE_TIME_STRIDE * round(value * FPS / VAE_TIME_STRIDE) + 1
        if frames > max_frames:
            raise ValueError(f"Length: {value:g} seconds is {frames} frames, more than the {max_frames} frames "
                             f"({(max_frames - 1) / FPS:g} s) this page makes")
        return frames
    if value != int(value) or value < 1 or (int(value) - 1) % VAE_TIME_STRIDE:
        raise ValueError(f"Length: {value:g} frames; the Wan VAE takes 4k + 1 frames (1, 5, 9, ..., {max_frames})")
    if value > max_frames:
        raise ValueError(f"Length: {int(value)} frames is more than the {max_frames} this page makes")
    return int(value)


def chunks_for(choices: Choices, frames: int) -> Optional[Tuple[int, ...]]:
    """The chunks a FAR model makes ``frames`` video frames in, by the checkpoint's own rule (None for a
    bidirectional model)."""
    if not choices.far:
        return None
    return choices.far_config.chunk_partition_for((frames - 1) // VAE_TIME_STRIDE + 1)


def far_window(chunks: Optional[Sequence[int]]) -> Tuple[Optional[int], int]:
    """``(context_window, sink_frames)`` of a FAR run in ``chunks``: :data:`CONTEXT_WINDOW` (or the largest chunk,
    which must fit) and :data:`SINK_FRAMES`; ``(None, 0)`` for a bidirectional run."""
    if not chunks:
        return None, 0
    return max(CONTEXT_WINDOW, max(chunks)), SINK_FRAMES


def check_settings(choices: Choices, config, prompt, negative_prompt, steps, seed, guidance_scale, length,
                   length_unit, width, height, image_path: Optional[str]) -> Settings:
    """The page's raw values as :class:`Settings`; a ValueError naming the field for the first bad one."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("Prompt: write what the video should show")
    negative_prompt = negative_prompt or ""
    if not isinstance(negative_prompt, str):
        raise ValueError(f"Negative prompt: expected text, got {type(negative_prompt).__name__}")
    steps = parse_steps(steps)
    seed = parse_seed(seed)
    guidance_scale = _number("Guidance", 1.0 if guidance_scale is None else guidance_scale)
    if guidance_scale < 0:
        raise ValueError(f"Guidance: {guidance_scale:g}; use 1 (off) or more")
    if choices.far and guidance_scale > 1:
        raise ValueError(f"Guidance: {guidance_scale:g}; the FAR model runs without guidance (its weights have it "
                         "built in), use 1")
    if guidance_scale > 1 and not negative_prompt.strip():
        raise ValueError(f"Negative prompt: guidance {guidance_scale:g} needs a negative prompt")
    frames = frames_for(length, length_unit, choices.max_frames)
    width, height = (_size(name, value, choices.pixel_multiple) for name, value in (("Width", width), ("Height", height)))
    check_grid(config, frames, height, width, ("Length", "Height", "Width"))
    chunks = chunks_for(choices, frames)
    image = None
    if image_path:
        if not choices.far:
            raise ValueError("Image: image-to-video needs a FAR snapshot; this one is bidirectional")
        if len(chunks) == 1:
            raise ValueError(f"Length: {frames} frame(s) hold only the image; give at least "
                             f"{VAE_TIME_STRIDE * chunks[0] + 1} frames")
        image = read_image(image_path, width, height)
    window, sink = far_window(chunks)
    return Settings(prompt, negative_prompt, steps, seed, guidance_scale, frames, width, height, chunks, image, window,
                    sink)


def parse_steps(value) -> int:
    """The step count: 1, 2, 4, 8 or any whole number from 1 to 1000 (as a number or text)."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"Steps: {value!r} is not a number; choose 1, 2, 4 or 8, or type 1 to {MAX_STEPS}") from None
    number = _number("Steps", value)
    if number != int(number) or not 1 <= number <= MAX_STEPS:
        raise ValueError(f"Steps: {number:g} is not a whole number from 1 to {MAX_STEPS}")
    return int(number)


def parse_seed(value) -> int:
    """The seed: empty (or None) for a random one, else a whole number from 0 to 2^64 - 1."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return secrets.randbelow(RANDOM_SEED_LIMIT)
    if isinstance(value, str):
        text = value.strip()
        if not text.isdigit():
            raise ValueError(f"Seed: {text!r} is not a whole number from 0 to 2^64 - 1 (leave it empty for a random one)")
        value = int(text)
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise ValueError(f"Seed: {value!r} is not a whole number from 0 to 2^64 - 1")
        value = int(value)
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or not 0 <= value < SEED_LIMIT:
        raise ValueError(f"Seed: {value!r} is not a whole number from 0 to 2^64 - 1")
    return int(value)


def read_image(path: str, width: int, height: int) -> np.ndarray:
    """An uploaded image, checked (size on disk, type, pixel count), centre-cropped to the video's aspect and
    resized to it: (height, width, 3) uint8."""
    from PIL import Image, UnidentifiedImageError

    size = os.path.getsize(path)
    if size > MAX_IMAGE_BYTES:
        raise ValueError(f"Image: {size / 2**20:.1f} MiB, more than {MAX_IMAGE_BYTES // 2**20} MiB")
    try:
        with Image.open(path) as image:
            kind = image.format
            if kind not in IMAGE_FORMATS:
                raise ValueError(f"Image: a {kind or 'unknown'} file; use {', '.join(IMAGE_FORMATS.values())}")
            pixels = image.width * image.height
            if pixels > MAX_IMAGE_PIXELS:
                raise ValueError(f"Image: {image.width} x {image.height} is {pixels / 1e6:.0f} megapixels, more than "
                                 f"{MAX_IMAGE_PIXELS / 1e6:.0f}")
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError):
        raise ValueError(f"Image: not a {', '.join(IMAGE_FORMATS.values())} image that can be read") from None
    scale = max(width / rgb.width, height / rgb.height)
    crop_w, crop_h = min(rgb.width, round(width / scale)), min(rgb.height, round(height / scale))
    left, top = (rgb.width - crop_w) // 2, (rgb.height - crop_h) // 2
    fitted = rgb.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.Resampling.LANCZOS)
    return np.array(fitted, dtype=np.uint8)


def _number(label: str, value) -> float:
    """A finite real number from the page, or a ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{label}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{label}: {value} is not a finite number")
    return float(value)


def _size(label: str, value, multiple: int) -> int:
    """A width or height in pixels: a whole positive multiple of ``multiple``."""
    number = _number(label, value)
    if number != int(number) or number < multiple or int(number) % multiple:
        raise ValueError(f"{label}: {number:g} pixels; the model takes multiples of {multiple} "
                         f"(for example {max(multiple, round(number / multiple) * multiple)})")
    return int(number)
