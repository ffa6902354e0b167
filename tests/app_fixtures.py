"""The app served in the test process, on a tiny snapshot, with its pipeline watched.

    app = serve_app(snapshot_root)      # a RunningApp on a free port of 127.0.0.1
    app.studio.pipeline.runs            # the frames each run yielded, before encoding
    app.studio.pipeline.hold()          # keep runs going at their steps until release()

Gradio keeps its files in GRADIO_TEMP_DIR, one value per process: serve one app at a time.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from typing import List

import av
import numpy as np
import torch

from anyflow import VideoPipeline
from anyflow.app.server import check_startup, launch

PROMPT = "A red fox trots through fresh snow at dawn"


class WatchedPipeline:
    """A :class:`VideoPipeline` that records each run: the frames its stream yields (float, before the app
    encodes them) and when it started and ended; and that can hold runs at their steps until released."""

    def __init__(self, pipeline: VideoPipeline):
        self.pipeline = pipeline
        self.runs: List[List[torch.Tensor]] = []
        self.arguments: List[dict] = []  # the keyword arguments of each run
        self.times: List[List[float]] = []  # [start, end] of each run (end missing while it runs or if it stopped)
        self.holding = threading.Event()  # a run waits at a step
        self._hold = False
        self._release = threading.Event()

    def __getattr__(self, name):
        return getattr(self.pipeline, name)

    def hold(self) -> None:
        self._hold = True
        self._release.clear()
        self.holding.clear()

    def release(self) -> None:
        self._hold = False
        self._release.set()

    def stream(self, *args, callback, **kwargs):
        frames: List[torch.Tensor] = []
        self.runs.append(frames)
        self.arguments.append(kwargs)
        self.times.append([time.monotonic()])

        def step(*report) -> None:
            callback(*report)
            while self._hold:  # a line of Python every 50 ms: where a stop lands, as it would in a forward pass
                self.holding.set()
                self._release.wait(0.05)

        for piece in self.pipeline.stream(*args, callback=step, **kwargs):
            frames.append(piece.clone())
            yield piece
        self.times[-1].append(time.monotonic())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_app(snapshot: str):
    """The app for ``snapshot`` on the CPU in float32, its pipeline a :class:`WatchedPipeline`."""
    args = argparse.Namespace(snapshot=snapshot, host="127.0.0.1", port=free_port(), dtype="auto", weight_dtype=None,
                              offload=None, device="cpu")
    startup = check_startup(args)
    pipeline = VideoPipeline.from_pretrained(snapshot, dtype=startup.dtype, device=startup.device)
    return launch(WatchedPipeline(pipeline), startup, args.host, args.port)


def decoded(path: str) -> np.ndarray:
    """The frames (F, H, W, 3) uint8 of an mp4."""
    with av.open(path) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def comment(path: str) -> str:
    with av.open(path) as container:
        return container.metadata.get("comment", "")
