"""From a prompt (and optionally an image or a clip) to a video: the text encoder, the transformer's
sampler and the Wan VAE of a released snapshot, composed.

A snapshot as published (``nvidia/AnyFlow-Wan2.1-T2V-1.3B-Diffusers`` and its three siblings) holds
``model_index.json``, ``tokenizer/``, ``text_encoder/`` (UMT5-XXL), ``transformer/``, ``vae/`` and
``scheduler/`` (:mod:`.snapshot`). :class:`VideoPipeline` reads each with this project's loaders:

    prompt -> tokens -> UMT5 embeddings (B, 512, 4096)        anyflow.text
    [image or clip -> VAE posterior mean: the given frames]    anyflow.vae
    noise (B, F, C, h, w) -> sample / sample_far -> latents    anyflow.sampling
    latents -> VAE decode, chunk by chunk -> frames (B, F', H, W, 3) in [0, 1]

The text encoder is streamed block by block from its mapped files and nothing of it stays once the
embeddings are made (``keep_text_encoder=True`` keeps it for many prompts). A FAR snapshot decodes
each chunk as soon as it is generated (:meth:`VideoPipeline.stream`), so frames come out while later
chunks are being made, and makes videos of any length within bounded memory (docs/LONG_VIDEO.md).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ..runtime.devices import resolve_device, resolve_dtype
from ..runtime.video_shape import check_grid, latent_shape
from ..sampling.bidirectional import sample
from ..sampling.far import check_context_window, check_prompt_schedule, sample_far_chunks
from ..sampling.noise import SeededNoise
from ..sampling.schedule import flow_map_sigmas, steps_to_run
from .snapshot import Snapshot, check_components, read_snapshot

Tile = Union[bool, Tuple[int, int]]  # as anyflow.vae's decoders take it

Frames = Union[torch.Tensor, "numpy.ndarray"]  # noqa: F821


class VideoPipeline:
    """A released AnyFlow snapshot as one object: prompts in, frames (or latents) out.

    Build it with :meth:`from_pretrained`. ``encode_prompt``, ``encode`` and ``decode`` are its
    three conversions; calling it runs them around the sampler.
    """

    def __init__(self, snapshot: Snapshot, transformer, vae, tokenizer, text_encoder_dtype: Optional[torch.dtype],
                 device: torch.device, keep_text_encoder: bool = False):
        self.snapshot = snapshot
        self.transformer = transformer
        self.vae = vae
        self.tokenizer = tokenizer
        self.device = device
        self.text_encoder_dtype = text_encoder_dtype
        self.keep_text_encoder = keep_text_encoder
        self._text_encoder = None  # loaded on first use when kept

    @classmethod
    def from_pretrained(cls, path: str, dtype: Optional[Union[str, torch.dtype]] = None,
                        device: Union[str, torch.device] = "cpu", *, vae_dtype: Union[str, torch.dtype] = "float32",
                        lora=None, lora_skip_unknown: bool = False, keep_text_encoder: bool = False,
                        offload: Optional[str] = None,
                        weight_dtype: Optional[Union[str, torch.dtype]] = None) -> "VideoPipeline":
        """Load a pipeline snapshot.

        ``dtype`` is the transformer's and the text encoder's (None keeps the files'; the fp32
        islands stay float32); the VAE runs in ``vae_dtype`` (float32 by default, as Wan runs it).
        ``lora`` and ``lora_skip_unknown`` are the transformer's, as in ``from_pretrained``; so is ``offload``
        ("blocks": the transformer's DiT blocks stay in host memory and visit ``device`` one at a time, see
        :mod:`anyflow.runtime.offload`; the text encoder and the VAE are not offloaded), and ``weight_dtype``
        ("float8_e4m3fn": the transformer's block linear weights held in scaled float8, :mod:`anyflow.runtime.fp8`).
        """
        from ..pretrained import AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel
        from ..vae import WanVAE

        from weights_convert.sources import open_checkpoint

        device = resolve_device(device)
        snapshot = read_snapshot(path)
        tokenizer = check_components(snapshot, open_checkpoint(snapshot.folder("transformer")).config)  # headers only
        model_class = AnyFlowFARTransformer3DModel if snapshot.far else AnyFlowTransformer3DModel
        transformer = model_class.from_pretrained(snapshot.folder("transformer"), dtype=dtype, device=device, lora=lora,
                                                  lora_skip_unknown=lora_skip_unknown, offload=offload,
                                                  weight_dtype=weight_dtype)
        vae = WanVAE.from_pretrained(snapshot.folder("vae"), dtype=vae_dtype, device=device)
        text_dtype = resolve_dtype(dtype)
        return cls(snapshot, transformer, vae, tokenizer, text_dtype, device, keep_text_encoder)

    @property
    def far(self) -> bool:
        return self.snapshot.far

    # ---- the three conversions ----------------------------------------------------------------

    def encode_prompt(self, prompts: Union[str, Sequence[str]]) -> torch.Tensor:
        """UMT5 embeddings (B, 512, text_dim) of the prompts, prepared as diffusers' ``encode_prompt`` does
        (cleaned, 512 tokens, positions past each prompt zero), in the text encoder's dtype."""
        from ..text.tokenizer import encode_prompts

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
        return encode_prompts(self.tokenizer, self._encoder(), prompts)

    def _encoder(self):
        """The text encoder: kept in memory when asked, else a streaming one that holds a block at a time."""
        from ..text.encoder import UMT5Encoder

        folder = self.snapshot.folder("text_encoder")
        if not self.keep_text_encoder:
            return UMT5Encoder.streaming(folder, dtype=self.text_encoder_dtype, device=self.device)
        if self._text_encoder is None:
            self._text_encoder = UMT5Encoder.from_pretrained(folder, dtype=self.text_encoder_dtype, device=self.device)
        return self._text_encoder

    def encode(self, frames: Frames) -> torch.Tensor:
        """Frames (B, F', H, W, 3) in [0, 1] (as :meth:`decode` returns them; uint8 is taken too) ->
        the normalised VAE posterior mean (B, F, C, H/8, W/8), F = (F' - 1) / 4 + 1."""
        video = _as_frames(frames, "frames").to(self.device)
        with torch.no_grad():
            return self.vae.encode(video.permute(0, 4, 1, 2, 3) * 2 - 1).transpose(1, 2)  # (B, F, C, h, w)

    def decode(self, latents: torch.Tensor, vae_tile: Tile = False) -> torch.Tensor:
        """Latents (B, F, C, h, w) -> frames (B, 4 (F - 1) + 1, 8 h, 8 w, 3), float in [0, 1]; ``vae_tile`` as in
        :meth:`__call__`."""
        channels = self.vae.config.z_dim
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5 or latents.shape[2] != channels \
                or not latents.is_floating_point() or 0 in latents.shape:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must be floats (B, F, C={channels}, h, w), frames before channels as sample and "
                             f"the pipeline return them (a file's (B, C, F, h, w): .transpose(1, 2)), got {shape}")
        return torch.cat(list(self._decoded_chunks([latents], vae_tile)), dim=1)

    def _decoded_chunks(self, chunks, vae_tile: Tile = False):
        """Frames (B, F', H, W, 3) in [0, 1] for each latent chunk (B, n, C, h, w), decoded causally in order."""
        stream = self.vae.decoder_stream(tile=vae_tile)
        with torch.no_grad():
            for chunk in chunks:
                yield _to_frames(stream.push(chunk.transpose(1, 2).to(self.device)))

    # ---- generation ---------------------------------------------------------------------------

    def __call__(
        self,
        prompt: Optional[Union[str, Sequence[str]]] = None,
        *,
        negative_prompt: Optional[Union[str, Sequence[str]]] = None,
        num_frames: int = 81,
        height: int = 480,
        width: int = 832,
        num_steps: int = 4,
        sigmas: Optional[Sequence[float]] = None,
        shift: Optional[float] = None,
        guidance_scale: float = 1.0,
        seed: Optional[int] = None,
        noise: Optional[torch.Tensor] = None,
        image: Optional[Frames] = None,
        video: Optional[Frames] = None,
        chunk_partition: Optional[Sequence[int]] = None,
        context_window: Optional[int] = None,
        sink_frames: int = 0,
        prompt_schedule: Optional[Sequence[Tuple[int, Union[str, torch.Tensor]]]] = None,
        vae_tile: Tile = False,
        output: str = "float",
        callback: Optional[Callable[[Optional[int], int, float], None]] = None,
        on_frames: Optional[Callable[[torch.Tensor], None]] = None,
        on_latents: Optional[Callable[[torch.Tensor], None]] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Generate videos: the whole of each, as :meth:`stream` makes it.

        Args:
            prompt, negative_prompt: a string or a list (one per video); the negative prompt is used
                with ``guidance_scale`` > 1 (bidirectional snapshots; the FAR weights have guidance built in).
            num_frames, height, width: the video's size (4k + 1 frames, any number of them for FAR snapshots;
                multiples of 16 pixels, of 32 for FAR).
            num_steps, sigmas, shift: the schedule, as in :func:`anyflow.sample`; ``shift`` defaults to
                the snapshot's scheduler config (5 for the released ones).
            seed, noise: the initial noise (B, F, C, h, w): given, or drawn from ``seed`` on the CPU in
                float32 exactly as ``anyflow sample --seed`` draws it (None: a random seed).
            image, video: given frames the video starts with: an image (H, W, 3) or (B, H, W, 3), or a clip
                (F', H, W, 3) or (B, F', H, W, 3), F' = 4k + 1, float in [0, 1] or uint8, of the video's size.
            chunk_partition: FAR snapshots: latent frames per chunk (default the checkpoint's, extended to the
                video by its rule: :meth:`anyflow.AnyFlowFARConfig.chunk_partition_for`).
            context_window, sink_frames: FAR snapshots: bound the cache to the first ``sink_frames`` latent
                frames and the last ``context_window`` of compressed context (:func:`anyflow.sample_far`;
                docs/LONG_VIDEO.md). Default: unbounded, the authors' model.
            prompt_schedule: FAR snapshots, one video: ``[(0, "a fox"), (4, "a fox jumps"), ...]``, the prompt
                from each chunk on (strings, or embeddings (1, 512, text_dim) made by :meth:`encode_prompt`),
                the first at chunk 0, instead of ``prompt``; at each switch the cached frames are encoded
                again under the new text.
            vae_tile: decode in overlapping spatial tiles (True: 256 pixels every 192, as diffusers'
                ``enable_tiling()``; or (tile, stride) in pixels): the decoder's memory is a tile's, not a
                frame's; frames differ slightly where tiles meet (:mod:`anyflow.vae.tiling`).
            output: ``"float"`` frames (B, F', H, W, 3) in [0, 1], ``"uint8"`` the same rounded, or
                ``"latents"`` (B, F, C, h, w) in the transformer's dtype, not decoded.
            callback: progress, called after every sampler step as ``callback(chunk, step_index, t)``
                (``chunk`` None for a bidirectional snapshot; ``step_index`` into the schedule).
            on_frames: called with each decoded piece of the video (B, n, H, W, 3) float in [0, 1] as soon
                as it is ready; FAR snapshots decode chunk by chunk, while later chunks are being made.
            on_latents: called once with the final latents (B, F, C, h, w), before they are decoded (FAR
                snapshots: once every chunk is decoded; :meth:`stream` hands them out chunk by chunk).
            prompt_embeds, negative_prompt_embeds: embeddings made beforehand by :meth:`encode_prompt`
                (then ``prompt`` only gives the batch size and the prompts are not encoded again).
        """
        _check_output(output)
        kept: List[torch.Tensor] = []  # the latents, only when asked for
        keep = on_latents is not None or output == "latents"
        pieces = []
        for piece in self.stream(prompt, negative_prompt=negative_prompt, num_frames=num_frames, height=height,
                                 width=width, num_steps=num_steps, sigmas=sigmas, shift=shift,
                                 guidance_scale=guidance_scale, seed=seed, noise=noise, image=image, video=video,
                                 chunk_partition=chunk_partition, context_window=context_window,
                                 sink_frames=sink_frames, prompt_schedule=prompt_schedule, vae_tile=vae_tile,
                                 output="latents" if output == "latents" else "float", callback=callback,
                                 on_latents=kept.append if keep else None, prompt_embeds=prompt_embeds,
                                 negative_prompt_embeds=negative_prompt_embeds):
            if output != "latents":
                pieces.append(piece)
                if on_frames is not None:
                    on_frames(piece)
        latents = (kept[0] if len(kept) == 1 else torch.cat(kept, dim=1)) if keep else None
        if on_latents is not None:
            on_latents(latents)
        if output == "latents":
            return latents
        frames = torch.cat(pieces, dim=1)
        return (frames * 255).round().to(torch.uint8) if output == "uint8" else frames

    def stream(
        self,
        prompt: Optional[Union[str, Sequence[str]]] = None,
        *,
        negative_prompt: Optional[Union[str, Sequence[str]]] = None,
        num_frames: int = 81,
        height: int = 480,
        width: int = 832,
        num_steps: int = 4,
        sigmas: Optional[Sequence[float]] = None,
        shift: Optional[float] = None,
        guidance_scale: float = 1.0,
        seed: Optional[int] = None,
        noise: Optional[torch.Tensor] = None,
        image: Optional[Frames] = None,
        video: Optional[Frames] = None,
        chunk_partition: Optional[Sequence[int]] = None,
        context_window: Optional[int] = None,
        sink_frames: int = 0,
        prompt_schedule: Optional[Sequence[Tuple[int, Union[str, torch.Tensor]]]] = None,
        vae_tile: Tile = False,
        output: str = "float",
        callback: Optional[Callable[[Optional[int], int, float], None]] = None,
        on_latents: Optional[Callable[[torch.Tensor], None]] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
    ) -> Iterator[torch.Tensor]:
        """Generate videos piece by piece, for real-time use::

            for frames in pipe.stream("a fox in the snow", num_frames=961, context_window=12, sink_frames=1):
                show(frames)  # (B, n, H, W, 3) float in [0, 1]

        The arguments are :meth:`__call__`'s, checked when it is called, before any work. A FAR snapshot
        yields each chunk's frames as soon as the chunk is made and decoded (the first chunk 1 frame, each
        later one 4 per latent frame); a bidirectional one yields the whole video once sampled. Nothing
        keeps the whole video: with a ``context_window`` and a seed the memory is the same at any length.
        ``output``: ``"float"``, ``"uint8"`` frames, or ``"latents"`` (each chunk's latents, not decoded).
        ``on_latents`` is called with each chunk's latents (B, n, C, h, w) before they are decoded.
        """
        prompts, schedule = _prompts(prompt, prompt_schedule, prompt_embeds)
        run = self._check_call(prompts, negative_prompt, num_frames, height, width, num_steps, sigmas, shift,
                               guidance_scale, seed, noise, image, video, chunk_partition, output, context_window,
                               sink_frames, schedule)
        return self._generate(run, prompts, negative_prompt, guidance_scale, num_steps, sigmas, vae_tile, output,
                              callback, on_latents, prompt_embeds, negative_prompt_embeds)

    def _generate(self, run: "CallPlan", prompts: List[str], negative_prompt, guidance_scale: float, num_steps: int,
                  sigmas, vae_tile: Tile, output: str, callback, on_latents, prompt_embeds,
                  negative_prompt_embeds) -> Iterator[torch.Tensor]:
        """The work of :meth:`stream`, its arguments checked."""
        negatives = []
        if run.guided and negative_prompt_embeds is None:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        scheduled = [text for _, text in run.schedule if isinstance(text, str)]
        # one pass of the (streamed) encoder for every prompt not encoded yet, the negative ones included
        wanted = ([] if prompt_embeds is not None else prompts) + scheduled + negatives
        encoded = self.encode_prompt(wanted) if wanted else None
        taken = 0

        def take(count: int) -> torch.Tensor:
            nonlocal taken
            taken += count
            return encoded[taken - count:taken]

        if prompt_embeds is None and prompts:
            prompt_embeds = take(len(prompts))
        scheduled_embeds = take(len(scheduled)) if scheduled else None
        if negatives:
            negative_prompt_embeds = take(len(negatives))
        dtype = self.transformer.dtype
        switches, used = [], 0
        for chunk, entry in run.schedule:
            if isinstance(entry, str):
                entry, used = scheduled_embeds[used:used + 1], used + 1
            switches.append((chunk, entry.to(dtype)))
        if switches:  # the schedule's first prompt is the start's
            (_, text), switches = switches[0], switches[1:]
        else:
            text = prompt_embeds.to(dtype)
        negative = negative_prompt_embeds.to(dtype) if run.guided else None
        given = None if run.given_frames is None else self.encode(run.given_frames)
        common = dict(num_steps=num_steps, sigmas=sigmas, shift=run.shift, context_latents=given)

        def step(chunk, i, t, _=None):
            if callback is not None:
                callback(chunk, i, t)

        if self.far:
            chunks = (latents for _, latents in sample_far_chunks(
                self.transformer, run.noise, text, chunk_partition=run.partition, callback=step,
                context_window=run.context_window, sink_frames=run.sink_frames, prompt_schedule=switches, **common))
        else:
            chunks = iter([sample(self.transformer, run.noise, text, guidance_scale=guidance_scale,
                                  negative_encoder_hidden_states=negative, callback=lambda i, t, z: step(None, i, t),
                                  **common)])
        decoder = self.vae.decoder_stream(tile=vae_tile) if output != "latents" else None
        for latents in chunks:
            if on_latents is not None:
                on_latents(latents)
            if decoder is None:
                yield latents
                continue
            with torch.no_grad():
                frames = _to_frames(decoder.push(latents.transpose(1, 2).to(self.device)))
            yield (frames * 255).round().to(torch.uint8) if output == "uint8" else frames

    def _check_call(self, prompts, negative_prompt, num_frames, height, width, num_steps, sigmas, shift,
                    guidance_scale, seed, noise, image, video, chunk_partition, output, context_window=None,
                    sink_frames=0, prompt_schedule=()) -> "CallPlan":
        """Every argument of a call, checked before any work, and what follows from them."""
        from ..model.config import check_chunk_partition

        _check_output(output)
        config = self.transformer.config
        frames, h, w = latent_shape(num_frames, height, width)
        check_grid(config, num_frames, height, width)
        shift = self.snapshot.shift if shift is None else shift
        steps = steps_to_run(flow_map_sigmas(num_steps, shift, sigmas))
        if not (isinstance(guidance_scale, numbers.Real) and math.isfinite(guidance_scale)):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        guided = guidance_scale > 1
        if guided and self.far:
            raise ValueError(f"guidance_scale {guidance_scale}: the FAR sampler runs without guidance (the released "
                             "FAR weights have it built in)")
        if guided:
            if negative_prompt is None:
                raise ValueError(f"guidance_scale {guidance_scale} needs a negative_prompt")
            if not isinstance(negative_prompt, str) and len(list(negative_prompt)) != len(prompts):
                raise ValueError(f"negative_prompt has {len(list(negative_prompt))} prompts for {len(prompts)} prompts")
        batch = len(prompts) or 1  # (a prompt_schedule makes one video)
        shape = (batch, frames, config.in_channels, h, w)
        if noise is not None:
            if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != shape:
                got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
                raise ValueError(f"noise must be (B, F, C, h, w) = {shape} for {batch} prompt(s) of {num_frames} x "
                                 f"{height} x {width}, got {got}")
            if seed is not None:
                raise ValueError("give noise or seed, not both")
        else:
            if seed is None:
                seed = torch.Generator().seed()
            if not (isinstance(seed, numbers.Integral) and 0 <= seed < 2**64):
                raise ValueError(f"seed must be an integer from 0 to 2^64 - 1, got {seed!r}")
            noise = (SeededNoise(shape, int(seed)) if self.far  # drawn chunk by chunk, the same numbers
                     else torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))))
        if image is not None and video is not None:
            raise ValueError("give image or video, not both")
        given = None
        if image is not None:
            given = _as_frames(image, "image", single=True)
        elif video is not None:
            given = _as_frames(video, "video")
            if (given.shape[1] - 1) % 4:
                raise ValueError(f"video has {given.shape[1]} frames; the Wan VAE takes 4k + 1 (1, 5, 9, ...)")
        if given is not None:
            if tuple(given.shape[2:4]) != (height, width):
                raise ValueError(f"{'image' if image is not None else 'video'} is {given.shape[3]} x {given.shape[2]} "
                                 f"(width x height) but the video is {width} x {height}; resize it first")
            if given.shape[0] not in (1, batch):
                raise ValueError(f"{'image' if image is not None else 'video'} has a batch of {given.shape[0]} for "
                                 f"{batch} prompt(s)")
            given = given.expand(batch, -1, -1, -1, -1)
        given_latent_frames = 0 if given is None else (given.shape[1] - 1) // 4 + 1
        if given_latent_frames >= frames:
            raise ValueError(f"the given frames fill the whole video of {num_frames} frames: nothing to generate")
        partition, window = None, None
        chunks_to_make = 1
        if self.far:
            partition = check_chunk_partition(chunk_partition or config.chunk_partition_for(frames), frames,
                                              "chunk_partition")
            ends = [sum(partition[:i + 1]) for i in range(len(partition))]
            if given_latent_frames and given_latent_frames not in ends:
                raise ValueError(f"the given frames make {given_latent_frames} latent frames, which do not end a chunk "
                                 f"(chunks end after {ends[:-1]})")
            chunks_to_make = sum(end > given_latent_frames for end in ends)
            window = check_context_window(config, partition, context_window, sink_frames)
            check_prompt_schedule(prompt_schedule[1:], len(partition))
        else:
            for name, value in (("chunk_partition", chunk_partition), ("context_window", context_window),
                                ("sink_frames", sink_frames or None), ("prompt_schedule", prompt_schedule or None)):
                if value is not None:
                    raise ValueError(f"{name} is for FAR snapshots; this one is bidirectional")
        return CallPlan(noise, given, partition, steps, shift, guided, chunks_to_make,
                        None if window is None else window.frames, sink_frames, tuple(prompt_schedule))


@dataclass
class CallPlan:
    """What a checked call will do."""

    noise: Union[torch.Tensor, SeededNoise]  # (B, F, C, h, w) float32
    given_frames: Optional[torch.Tensor]  # (B, F', H, W, 3) float in [0, 1]
    partition: Optional[Tuple[int, ...]]
    steps: List[int]
    shift: float
    guided: bool
    chunks_to_make: int
    context_window: Optional[int] = None
    sink_frames: int = 0
    schedule: Tuple[Tuple[int, Union[str, torch.Tensor]], ...] = ()  # the prompts from their chunks on, chunk 0 first


def _check_output(output: str) -> None:
    if output not in ("float", "uint8", "latents"):
        raise ValueError(f"output must be 'float', 'uint8' or 'latents', got {output!r}")


def _prompts(prompt, prompt_schedule, prompt_embeds) -> Tuple[List[str], List[Tuple[int, Union[str, torch.Tensor]]]]:
    """The prompts of a call (one per video) and its prompt schedule, checked: a prompt, or a schedule from chunk 0."""
    if prompt_schedule is None:
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        return list(prompts), []
    if prompt is not None or prompt_embeds is not None:
        raise ValueError("give prompt (or prompt_embeds) or prompt_schedule, not both: the schedule's first prompt, "
                         "at chunk 0, is the start's")
    schedule = list(prompt_schedule) if isinstance(prompt_schedule, (list, tuple)) else None
    if not schedule or not all(isinstance(e, (list, tuple)) and len(e) == 2 for e in schedule):
        raise ValueError(f"prompt_schedule must be a non-empty list of (chunk, prompt) pairs, got {prompt_schedule!r}")
    for chunk, text in schedule:
        if not isinstance(text, str) and not (isinstance(text, torch.Tensor) and text.dim() == 3 and text.shape[0] == 1):
            raise ValueError(f"prompt_schedule: chunk {chunk!r}: a prompt (a string) or its embeddings (1, S, text_dim) "
                             f"for one video, got {type(text).__name__}")
    if schedule[0][0] != 0:
        raise ValueError(f"prompt_schedule starts at chunk 0 (the start's prompt), got chunk {schedule[0][0]!r} first")
    return [], [tuple(entry) for entry in schedule]


def _to_frames(video: torch.Tensor) -> torch.Tensor:
    """The VAE's output (B, 3, F', H, W) in [-1, 1] -> frames (B, F', H, W, 3) float32 in [0, 1]."""
    return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1)


def _as_frames(frames: Frames, name: str, single: bool = False) -> torch.Tensor:
    """Frames as float (B, F, H, W, 3) in [0, 1]: from uint8 or float, a tensor or an array, with or without
    the batch (and, for an image, the frame) axis."""
    tensor = torch.as_tensor(frames)
    if single and tensor.dim() in (3, 4):
        tensor = tensor.unsqueeze(-4)  # (..., 1, H, W, 3)
    if tensor.dim() == 4:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 5 or tensor.shape[-1] != 3:
        layout = "(H, W, 3) or (B, H, W, 3)" if single else "(F, H, W, 3) or (B, F, H, W, 3)"
        raise ValueError(f"{name} must be RGB frames {layout}, got shape {tuple(torch.as_tensor(frames).shape)}")
    if tensor.dtype == torch.uint8:
        return tensor.float() / 255
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be uint8 or float in [0, 1], got {tensor.dtype}")
    tensor = tensor.float()
    if not torch.isfinite(tensor).all() or tensor.min() < 0 or tensor.max() > 1:
        raise ValueError(f"{name}: float frames must lie in [0, 1] (uint8 frames are taken as 0..255)")
    return tensor
