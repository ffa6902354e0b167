"""Where a run is, as one line for the page: its stage, chunk and step, the time elapsed, and an estimate of the
time left (from the compute estimate until a step is measured, then from the measured steps).

The run's thread writes it and the page's thread reads it; each write replaces a whole value.
"""

from __future__ import annotations

import time
from typing import Optional


class Progress:
    """A run of ``steps`` steps per chunk, expected to sample in ``estimate`` seconds. A FAR run has
    ``total_chunks`` chunks and makes those from ``first_chunk`` on (1 when an image fills chunk 0); a
    bidirectional run (``total_chunks`` None) is one chunk."""

    def __init__(self, steps: int, estimate: float, total_chunks: Optional[int] = None, first_chunk: int = 0):
        self.steps, self.estimate = steps, estimate
        self.far, self.total_chunks, self.first_chunk = total_chunks is not None, total_chunks or 1, first_chunk
        self.stage = "waiting for the device"
        self.done = 0  # steps done, all chunks together
        self.started: Optional[float] = None  # the run
        self.sampling_started: Optional[float] = None
        self.ended = False

    def start(self, stage: str) -> None:
        self.started = time.perf_counter()
        self.stage = stage

    def sampling(self) -> None:
        """The sampler starts: its first step is under way."""
        self.sampling_started = time.perf_counter()
        self.stage = self._sampling_stage(self.first_chunk, 1)

    def step(self, chunk: Optional[int]) -> None:
        """A sampler step of ``chunk`` (None: bidirectional) is done."""
        self.done += 1
        in_chunk = self.done % self.steps
        if in_chunk:
            self.stage = self._sampling_stage(chunk or 0, in_chunk + 1)
        else:
            self.stage = f"decoding chunk {chunk + 1}/{self.total_chunks}" if self.far else "decoding"

    def decoded(self, chunk: int) -> None:
        """The frames of ``chunk`` (0 for a bidirectional model) are decoded and shown."""
        more = self.far and chunk + 1 < self.total_chunks
        self.stage = self._sampling_stage(chunk + 1, 1) if more else "writing the video"

    def finish(self, stage: str) -> None:
        """The run is over: ``stage`` says how, and the line is that alone from now on."""
        self.stage, self.ended = stage, True

    def elapsed(self) -> float:
        return 0.0 if self.started is None else time.perf_counter() - self.started

    def left(self) -> Optional[float]:
        """Seconds of sampling left: the compute estimate less the time spent until a step is done, then the mean
        time of the steps done (decoding included) times the steps left. None before sampling starts."""
        if self.sampling_started is None:
            return None
        spent = time.perf_counter() - self.sampling_started
        if not self.done:
            return max(0.0, self.estimate - spent)
        return spent / self.done * (self.steps * (self.total_chunks - self.first_chunk) - self.done)

    def line(self) -> str:
        """``Sampling chunk 2/5, step 1/2 · 3.1 s elapsed · about 6 s left``."""
        from anyflow.runtime.compute import duration

        parts = [self.stage[0].upper() + self.stage[1:]]
        if self.ended:
            return parts[0]
        if self.started is not None:
            parts.append(f"{self.elapsed():.1f} s elapsed")
        left = self.left()
        if left is not None and self.stage != "writing the video":
            parts.append(f"about {duration(left)} left" + ("" if self.done else " (estimated)"))
        return " · ".join(parts)

    def _sampling_stage(self, chunk: int, step: int) -> str:
        where = f"chunk {chunk + 1}/{self.total_chunks}, " if self.far else ""
        return f"sampling {where}step {step}/{self.steps}"
