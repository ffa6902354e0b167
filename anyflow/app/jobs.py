"""Runs on the device one at a time, in the order they came, each a :class:`Job` that reports its place in the
queue, then its progress, and can be stopped within seconds, waiting or running.

A job runs in a thread of its own that waits for its turn: the first of the line, which it leaves
only once it has unwound, so that a job submitted while a stopped one unwinds waits for it.
:meth:`Job.stop` uses the command's interrupt machinery
(:mod:`anyflow.runtime.interrupts`): :class:`~anyflow.runtime.interrupts.Stopped` is raised in the job's thread at its
next line of Python (within one transformer block, whatever stage the run is in), the thread unwinds,
and the job's folder is removed: a stopped or failed job leaves nothing behind. A finished job keeps
its folder (the page serves its video from there) until it is older than ``keep_seconds``.

The module knows nothing of the web framework: :meth:`Studio.submit`, then :meth:`Job.updates`.
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from .estimates import Estimates
from .generation import render
from .progress import Progress
from .settings import Settings

KEEP_SECONDS = 3600.0  # how long a finished run's files stay to be played and downloaded
MAX_WAITING = 32  # runs waiting for the device; one more is refused


@dataclass(frozen=True)
class Update:
    """What the page shows of a job at one moment: the status line, and a new video file when one is ready."""

    status: str
    video: Optional[str] = None  # every frame so far (a new file each time)


class JobFailed(Exception):
    """A job ended without its video; the message is one line for the page."""


class Job:
    """One run. ``state``: queued, running, done, failed or stopped; ``video`` the whole mp4 once done."""

    def __init__(self, settings: Settings, folder: str, progress: Progress, record: dict, ahead: Callable[[], int]):
        self.id = os.path.basename(folder)
        self.settings, self.folder, self.progress, self.record = settings, folder, progress, record
        self._ahead = ahead  # runs before this one in the line
        self.state = "queued"
        self.video: Optional[str] = None
        self.error: Optional[str] = None
        self.finished_at: Optional[float] = None
        self._events: "queue.Queue[Optional[Update]]" = queue.Queue()  # None: the job has ended
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None  # set while the run may be interrupted
        self._stop = threading.Event()

    def updates(self, every: float = 1.0) -> Iterator[Update]:
        """Updates until the job ends: each new video, and the status line at least every ``every`` seconds.
        Ends after the last one when the job is done; raises :class:`JobFailed` when it failed or was stopped."""
        while True:
            try:
                update = self._events.get(timeout=every)
            except queue.Empty:
                yield Update(self.status())
                continue
            if update is None:
                break
            yield update
        if self.state != "done":
            raise JobFailed(self.error or "the run was stopped")

    def status(self) -> str:
        """One line: the place in the queue while waiting, then the run's progress."""
        if self.state == "queued" and not self._stop.is_set():
            ahead = self._ahead()
            return f"Waiting for the device: {ahead} run{'s' if ahead != 1 else ''} ahead in the queue"
        return self.progress.line()

    def stop(self) -> None:
        """End the job: a queued one never starts, a running one is interrupted at its next line of Python.
        Does nothing to a job that has ended."""
        from anyflow.runtime.interrupts import Stopped, raise_in

        with self._lock:
            self._stop.set()
            if self._thread is not None:
                raise_in(self._thread, Stopped)
                self._thread = None  # one interruption per job

    def _show(self, video: str) -> None:
        self._events.put(Update(self.progress.line(), video))


class Studio:
    """Jobs for one loaded :class:`anyflow.VideoPipeline`, run one at a time on its device, their files under
    ``folder``; ``about`` (the model, device and dtype) joins each run's settings in its record."""

    def __init__(self, pipeline, folder: str, estimates: Estimates, about: dict, keep_seconds: float = KEEP_SECONDS):
        import torch

        self.pipeline, self.estimates, self.about, self.keep_seconds = pipeline, estimates, about, keep_seconds
        self.folder = os.path.join(folder, "runs")
        os.makedirs(self.folder, exist_ok=True)
        self.jobs = {}  # id -> Job, while it has files
        self._line = []  # the jobs waiting or running, in order: the first has the device
        self._turn = threading.Condition()
        self._threads = torch.get_num_threads()  # the command's, kept in each job's thread
        self._closed = False

    def submit(self, settings: Settings) -> Job:
        """Queue a run; a ValueError (naming the field) if the device cannot hold it."""
        if self._closed:
            raise ValueError("the server is shutting down")
        if len(self._line) > MAX_WAITING:
            raise ValueError(f"Queue: {len(self._line) - 1} runs are waiting already; try again later")
        self._remove_old()
        far = settings.chunks is not None
        self.estimates.check_fits("Length and size", settings.frames, settings.height, settings.width, settings.chunks,
                                  settings.guided)
        given = 0 if settings.image is None else 1  # latent frames the image fills: chunk 0
        estimate = self.estimates.sampling_seconds(settings.frames, settings.height, settings.width, settings.steps,
                                                   settings.chunks, given, settings.guided)
        progress = Progress(settings.steps, estimate, len(settings.chunks) if far else None, given)
        folder = os.path.join(self.folder, uuid.uuid4().hex[:12])
        os.makedirs(folder)
        job = Job(settings, folder, progress, {**settings.record(), **self.about}, lambda: self._ahead(job))
        self.jobs[job.id] = job
        with self._turn:
            self._line.append(job)
        threading.Thread(target=self._run, args=(job,), name=f"anyflow-job-{job.id}", daemon=True).start()
        return job

    def close(self) -> None:
        """Stop every job and wait (a few seconds at most) for their threads; no new job is taken."""
        self._closed = True
        for job in list(self.jobs.values()):
            job.stop()
        deadline = time.monotonic() + 5
        while self._line and time.monotonic() < deadline:
            time.sleep(0.05)

    def _run(self, job: Job) -> None:
        """The job's thread: wait for the device, render, and leave nothing behind unless done. The job's state
        changes last, once its files are settled."""
        from anyflow.runtime.interrupts import Stopped

        state, error = "done", None
        try:
            if self._threads:
                import torch

                torch.set_num_threads(self._threads)
            with self._turn:
                while self._line[0] is not job:
                    if job._stop.is_set():
                        raise Stopped
                    self._turn.wait(0.1)
            with job._lock:
                if job._stop.is_set():
                    raise Stopped
                job._thread = threading.current_thread()
                job.state = "running"
            try:
                job.video = render(self.pipeline, job.settings, job.folder, job.progress, job._show, job.record)
            finally:
                with job._lock:  # a stop requested before this line has raised by the end of this block
                    job._thread = None
            job.progress.finish(f"done: {job.settings.frames} frames of {job.settings.width} x {job.settings.height} "
                                f"in {job.progress.elapsed():.1f} s, seed {job.settings.seed}")
        except Stopped:
            state, error = "stopped", "the run was stopped"
        except Exception as exc:  # one line for the page; the traceback for the server's console
            state, error = "failed", f"the run failed: {type(exc).__name__}: {exc}".splitlines()[0]
            traceback.print_exc()
        finally:
            job.finished_at = time.monotonic()
            if state != "done":
                self._discard(job)
            with self._turn:  # the next job's turn, now that this one has unwound
                self._line.remove(job)
                self._turn.notify_all()
            job.state, job.error = state, error
            job._events.put(None)

    def _ahead(self, job: Job) -> int:
        with self._turn:
            return self._line.index(job) if job in self._line else 0

    def _discard(self, job: Job) -> None:
        shutil.rmtree(job.folder, ignore_errors=True)
        self.jobs.pop(job.id, None)

    def _remove_old(self) -> None:
        """The files of finished runs older than ``keep_seconds``."""
        now = time.monotonic()
        for job in list(self.jobs.values()):
            if job.finished_at is not None and now - job.finished_at > self.keep_seconds:
                self._discard(job)

