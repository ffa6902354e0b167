"""Video and image files through PyAV (FFmpeg): frames in, frames out, appended as they are made.

Frames are uint8 arrays (F, H, W, 3) in RGB. The container is chosen by the file's extension:

| extension | written as |
| --- | --- |
| `.mp4` | H.264 (libx264, yuv420p), the format every player takes |
| `.gif` | GIF (an 8-bit palette per frame) |
| `.png` | animated PNG (lossless; one frame is a plain PNG) |
| `.webp` | animated WebP |

PyAV is the optional ``video`` extra (``pip install -e ".[video]"``); without it, every function
here raises one line saying so.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

# extension -> (container format, codec, pixel format)
FORMATS = {
    ".mp4": ("mp4", "libx264", "yuv420p"),
    ".gif": ("gif", "gif", "rgb8"),
    ".png": ("apng", "apng", "rgb24"),
    ".webp": ("webp", "libwebp_anim", "yuv420p"),
}
INSTALL = 'pip install av (or the video extra: pip install -e ".[video]")'
MAX_FPS = 240.0  # above, no player shows the frames
MAX_GIF_FPS = 50.0  # GIF frame delays are whole hundredths of a second, and players slow delays under 2 to 10


def _av():
    try:
        import av
    except ImportError:
        raise ImportError(f"reading and writing videos needs PyAV: {INSTALL}") from None
    return av


def video_format(path: str):
    """(container, codec, pixel format) for ``path``'s extension, or a ValueError naming the ones known."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in FORMATS:
        raise ValueError(f"{path}: unknown video extension {extension or '(none)'!r}; use one of {', '.join(FORMATS)}")
    return FORMATS[extension]


def check_fps(fps: float, path: str, argument: str = "fps") -> None:
    """A frame rate the file at ``path`` can hold: finite, above 0 and at most :data:`MAX_FPS` (a GIF:
    :data:`MAX_GIF_FPS`); a ValueError naming ``argument`` otherwise."""
    limit = MAX_GIF_FPS if path.lower().endswith(".gif") else MAX_FPS
    if not (isinstance(fps, (int, float)) and 0 < fps <= limit):
        kind = "a GIF's frame delays are whole hundredths of a second" if limit == MAX_GIF_FPS else "no player shows more"
        raise ValueError(f"{argument} {fps}: frames per second must be above 0 and at most {limit:g} for {path} ({kind})")


class VideoWriter:
    """Frames appended to a video file as they come: ``write(frames)`` any number of times, then ``close()``.

    ``path`` is written as given (the caller picks a partial name and renames it when complete);
    ``extension_of`` names the file whose extension picks the format, when ``path`` has another.
    """

    def __init__(self, path: str, width: int, height: int, fps: float = 16, extension_of: Optional[str] = None):
        av = _av()
        container, codec, pixel_format = video_format(extension_of or path)
        check_fps(fps, extension_of or path)
        if codec == "libx264" and (width % 2 or height % 2):
            raise ValueError(f"{extension_of or path}: H.264 needs an even width and height, got {width}x{height}")
        self.frames = 0
        self._container = av.open(path, "w", format=container)
        self._stream = self._container.add_stream(codec, rate=_rational(fps))
        self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, pixel_format
        if codec == "libx264":
            self._stream.options = {"crf": "18"}  # visually lossless for a reference output

    def write(self, frames: np.ndarray) -> None:
        """Append frames (F, H, W, 3) uint8."""
        av = _av()
        for frame in frames:
            for packet in self._stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                self._container.mux(packet)
            self.frames += 1

    def close(self) -> None:
        """Flush the encoder and close the file."""
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()


def write_video(path: str, frames: np.ndarray, fps: float = 16) -> None:
    """Write frames (F, H, W, 3) uint8 to ``path`` in the format its extension names."""
    writer = VideoWriter(path, frames.shape[2], frames.shape[1], fps)
    try:
        writer.write(frames)
    finally:
        writer.close()


def read_frames(path: str, limit: Optional[int] = None) -> np.ndarray:
    """The frames (F, H, W, 3) uint8 RGB of a video or image file (the first ``limit`` of them)."""
    av = _av()
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    try:
        with av.open(path) as container:
            frames = []
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
                if limit is not None and len(frames) == limit:
                    break
    except (av.error.FFmpegError, IndexError) as exc:  # IndexError: no video stream
        raise ValueError(f"{path}: not an image or video FFmpeg can read ({exc})") from None
    if not frames:
        raise ValueError(f"{path}: holds no frames")
    return np.stack(frames)


def to_uint8(frames) -> np.ndarray:
    """Float frames in [0, 1] (a tensor or an array) -> uint8, rounded to nearest as diffusers' PIL output is."""
    array = frames.float().cpu().numpy() if hasattr(frames, "cpu") else np.asarray(frames, dtype=np.float32)
    return (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _rational(fps: float):
    from fractions import Fraction

    return Fraction(fps).limit_denominator(1001)

