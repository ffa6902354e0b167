"""A video that grows piece by piece, playable after every piece: what the page shows while FAR makes chunks.

Each piece of frames (a FAR chunk as soon as it is decoded) is encoded once, into its own H.264 mp4
segment, without B-frames so that every segment's timestamps run forward from its first frame. After
each piece, a new mp4 of all the pieces so far is joined from the segments by copying their packets
(no re-encoding), and that file is what the page plays: its URL changes with every piece. The frames
pass through memory one piece at a time; the join streams packets from disk.

The last join carries the run's settings as JSON in the mp4's ``comment`` tag.
"""

from __future__ import annotations

import json
import os
from fractions import Fraction
from typing import List, Optional

import numpy as np

ENCODER_OPTIONS = {"crf": "18", "bf": "0"}  # visually lossless; no B-frames, so segments join by copying


class GrowingVideo:
    """Frames appended piece by piece; after each, a new mp4 file in ``folder`` holds every frame so far.

    ``name`` is the final file's stem (``name.mp4``); the intermediate ones are ``name-1.mp4``, ``name-2.mp4``...,
    of which the last two are kept.
    """

    def __init__(self, folder: str, fps: float, name: str):
        self.folder, self.fps, self.name = folder, Fraction(fps), name
        self._segments: List[str] = []

    def append(self, frames: np.ndarray) -> str:
        """Encode ``frames`` (n, H, W, 3) uint8 as the next segment; the path of a new mp4 of all frames so far."""
        segment = os.path.join(self.folder, f".segment-{len(self._segments) + 1}.mp4")
        encode_segment(segment, frames, self.fps)
        self._segments.append(segment)
        path = os.path.join(self.folder, f"{self.name}-{len(self._segments)}.mp4")
        join_segments(self._segments, path)
        # the page now plays this one, or is still loading the one before: older joins go, so that a long
        # video keeps two of them on disk, not one per piece
        older = os.path.join(self.folder, f"{self.name}-{len(self._segments) - 2}.mp4")
        if os.path.exists(older):
            os.remove(older)
        return path

    def finish(self, settings: dict) -> str:
        """The whole video as ``name.mp4``, with ``settings`` as JSON in its comment tag; its path."""
        path = os.path.join(self.folder, f"{self.name}.mp4")
        join_segments(self._segments, path, {"comment": json.dumps(settings, sort_keys=True)})
        return path


def encode_segment(path: str, frames: np.ndarray, fps: Fraction) -> None:
    """Frames (n, H, W, 3) uint8 as an H.264 (yuv420p, no B-frames) mp4 of their own."""
    import av

    with av.open(path, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = dict(ENCODER_OPTIONS)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())


def join_segments(segments: List[str], path: str, metadata: Optional[dict] = None) -> None:
    """The segments' packets one after the other in a new mp4, each segment's timestamps moved past the last's."""
    import av

    with av.open(path, "w", format="mp4") as out:
        out.metadata.update(metadata or {})
        stream, offset = None, 0  # offset: where this segment starts, in the segments' time base
        for segment in segments:
            with av.open(segment) as source:
                video = source.streams.video[0]
                if stream is None:
                    stream = out.add_stream_from_template(video)
                end = offset
                for packet in source.demux(video):
                    if packet.dts is None:  # the demuxer's empty packet at the end of the stream
                        continue
                    packet.pts += offset
                    packet.dts += offset
                    end = max(end, packet.pts + packet.duration)
                    packet.stream = stream
                    out.mux(packet)
                offset = end
