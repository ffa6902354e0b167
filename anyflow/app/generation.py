"""One run: checked settings through :class:`anyflow.VideoPipeline` to a growing mp4, with progress.

The prompt is encoded as the pipeline encodes it (with the negative prompt in the same pass when guided);
the pipeline then samples and decodes, a FAR model chunk by chunk; every decoded piece is appended to a
:class:`~anyflow.app.video.GrowingVideo` at once, and the new file handed to ``show``.
"""

from __future__ import annotations

from typing import Callable

import torch

from .progress import Progress
from .settings import FPS, Settings
from .video import GrowingVideo


def render(pipeline, settings: Settings, folder: str, progress: Progress, show: Callable[[str], None],
           record: dict) -> str:
    """Make the video ``settings`` ask for in ``folder``; the path of the whole mp4 (``record`` in its metadata)."""
    progress.start("encoding the prompt")
    prompts = [settings.prompt] + ([settings.negative_prompt] if settings.guided else [])
    text = pipeline.encode_prompt(prompts)  # (1 or 2, 512, text_dim)
    text, negative = (text[:1], text[1:]) if settings.guided else (text, None)
    video = GrowingVideo(folder, FPS, f"anyflow-{settings.seed}")
    pieces = []  # the paths shown, one per decoded piece: FAR chunks in order, the given one included

    def on_frames(frames: torch.Tensor) -> None:  # (1, n, H, W, 3) float in [0, 1]
        pieces.append(video.append((frames[0] * 255).round().to(torch.uint8).cpu().numpy()))
        progress.decoded(len(pieces) - 1)
        show(pieces[-1])

    progress.sampling()
    for frames in pipeline.stream(settings.prompt, prompt_embeds=text, negative_prompt_embeds=negative,
                                  negative_prompt=settings.negative_prompt if settings.guided else None,
                                  num_frames=settings.frames, height=settings.height, width=settings.width,
                                  num_steps=settings.steps, seed=settings.seed, guidance_scale=settings.guidance_scale,
                                  image=settings.image, chunk_partition=settings.chunks,
                                  context_window=settings.context_window, sink_frames=settings.sink_frames,
                                  callback=lambda chunk, step, t: progress.step(chunk)):
        on_frames(frames)  # nothing of the video is kept here: each piece goes to disk as it comes
    return video.finish(record)
