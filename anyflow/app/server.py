"""``anyflow app``: start-up checks, the model loaded once, the page served until Ctrl-C, nothing left after.

Before anything loads: the app extra installed, the snapshot's components readable, the device and
dtype, the memory each offered size needs (estimated as ``anyflow generate`` does, printed, and the
sizes that cannot fit left out: a snapshot none fits is refused in one line), and the compute of the
default run. The page's files (uploads, Gradio's cache, the runs' videos) live in one temporary folder,
a partial of :mod:`weights_convert.partials`: removed on exit, on an interrupt, and by the next start
when a killed server left it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass

from .estimates import Estimates
from .settings import MAX_IMAGE_BYTES, Choices, chunks_for, fitting_presets, make_choices

LOOPBACK = ("127.0.0.1", "localhost", "::1")
EXTRA = 'pip install -e ".[app]" (or: pip install gradio)'


@dataclass
class Startup:
    """What the checks before loading found: the snapshot, where it runs, what the page offers."""

    snapshot: object  # anyflow.pipeline.Snapshot
    device: object
    dtype: object
    estimates: Estimates
    choices: Choices
    about: dict  # the model, kind, device and dtype, for the page and each run's record


@dataclass
class RunningApp:
    """A launched page: its address, its jobs, and :meth:`close`, which stops them and removes every file."""

    url: str
    studio: object  # anyflow.app.jobs.Studio
    page: object  # gradio.Blocks
    folder: str

    def close(self) -> None:
        from weights_convert.partials import discard

        try:
            self.studio.close()
            self.page.close()
        finally:
            discard(self.folder)


def serve(args: argparse.Namespace) -> int:
    """The ``anyflow app`` command: check, load, serve until interrupted (Ctrl-C stops the server)."""
    startup = check_startup(args)
    pipeline = load(startup, args)
    app = launch(pipeline, startup, args.host, args.port)
    try:
        print(f"serving {startup.choices.model} at {app.url} (Ctrl-C stops the server and removes its files)",
              flush=True)
        while True:
            time.sleep(0.5)
    finally:
        app.close()


def check_startup(args: argparse.Namespace) -> Startup:
    """Every check before the model loads, printing the memory estimate of each size and the default run's compute."""
    import importlib.util

    from anyflow.model.parameters import DTYPE_CHOICES
    from anyflow.pipeline.snapshot import check_components, read_snapshot
    from anyflow.runtime.devices import dtype_warning, resolve_device, resolve_dtype
    from anyflow.runtime.memory import gib

    missing = [name for name in ("gradio", "av", "tokenizers", "PIL") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"anyflow app needs {', '.join(missing)}: {EXTRA}")
    check_address(args.host, args.port)
    snapshot = read_snapshot(args.snapshot)
    device = resolve_device(args.device, "--device")
    dtype = resolve_dtype(args.dtype, DTYPE_CHOICES, argument="--dtype", device=device)
    if dtype_warning(device, dtype):
        print(dtype_warning(device, dtype), flush=True)
    estimates = Estimates(snapshot, device, dtype, args)
    check_components(snapshot, estimates.config)
    config, name = estimates.config, os.path.basename(snapshot.root)
    on_gpu = device.type == "cuda"
    offered = make_choices(name, config, fitting_presets(config), on_gpu)
    frames, free = offered.default_frames, estimates.available()
    kind = "FAR" if estimates.far else "bidirectional"
    print(f"{name}: {kind} transformer, {estimates.checkpoint.num_parameters:,} parameters, on {device} in "
          f"{str(dtype).replace('torch.', '')}; {gib(free) if free is not None else 'unknown memory'} available",
          flush=True)
    fitting, chunks = [], chunks_for(offered, frames)
    for preset in offered.presets:
        memory = estimates.memory(frames, preset.height, preset.width, chunks)
        fits = free is None or memory.peak <= free
        print(f"  memory, {preset.label}, {frames} frames: {memory.describe()}" + ("" if fits else ": left out"),
              flush=True)
        if fits:
            fitting.append(preset)
    if not fitting:
        smallest = min(offered.presets, key=lambda p: p.width * p.height)
        peak = estimates.memory(frames, smallest.height, smallest.width, chunks).peak
        raise ValueError(f"{args.snapshot}: the smallest size, {smallest.label} at {frames} frames, needs about "
                         f"{gib(peak)} at its peak but {device} has {gib(free)} available; try --offload, "
                         "--weight-dtype float8_e4m3fn or a smaller --dtype")
    choices = make_choices(name, config, fitting, on_gpu)
    default = choices.default_preset
    seconds = estimates.sampling_seconds(choices.default_frames, default.height, default.width, 4,
                                         chunks_for(choices, choices.default_frames))
    print(f"  compute, {default.label}, {choices.default_frames} frames, 4 steps: about {seconds:.1f} s of sampling "
          f"at the matmul rate measured here", flush=True)
    about = {"model": name, "kind": kind, "device": str(device), "dtype": str(dtype).replace("torch.", "")}
    return Startup(snapshot, device, dtype, estimates, choices, about)


def load(startup: Startup, args: argparse.Namespace):
    """The pipeline, loaded once for every run."""
    from anyflow import VideoPipeline

    start = time.perf_counter()
    pipeline = VideoPipeline.from_pretrained(startup.snapshot.root, dtype=startup.dtype, device=startup.device,
                                             offload=args.offload, weight_dtype=args.weight_dtype)
    print(f"loaded {startup.choices.model} in {time.perf_counter() - start:.1f} s", flush=True)
    return pipeline


def launch(pipeline, startup: Startup, host: str, port: int) -> RunningApp:
    """Serve the page for ``pipeline`` on ``host:port`` (in background threads); a warning first for a public host."""
    from weights_convert.partials import discard, partial_path, remove_stale

    warning = bind_warning(host)
    if warning:
        print(warning, flush=True)
    target = os.path.join(tempfile.gettempdir(), "anyflow-app")
    remove_stale(target)
    folder = partial_path(target)
    os.makedirs(folder)
    try:
        # Gradio keeps uploads and the files it serves in GRADIO_TEMP_DIR: here, the folder removed on exit.
        os.environ["GRADIO_TEMP_DIR"] = folder
        os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
        from .jobs import Studio
        from .page import build_page

        studio = Studio(pipeline, folder, startup.estimates, startup.about)
        page = build_page(studio, startup.choices, startup.estimates.config, startup.about)
        page.queue()
        page.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False,
                    share=False, inbrowser=False, show_error=False, max_file_size=MAX_IMAGE_BYTES, pwa=False,
                    run_history=False, mcp_server=False, enable_monitoring=False)
    except BaseException:
        discard(folder)
        raise
    return RunningApp(page.local_url, studio, page, folder)


def check_address(host: str, port: int) -> None:
    """``host:port`` free to serve on, checked before the model loads (a ValueError naming both otherwise)."""
    import socket

    if not 0 < port < 65536:
        raise ValueError(f"--port {port}: use a port from 1 to 65535")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise ValueError(f"--host {host} --port {port}: cannot serve there ({exc.strerror or exc}); choose another "
                         "--port, or an address of this machine for --host") from None


def bind_warning(host: str):
    """A line to print before serving on ``host``, when it is reachable from other machines; else None."""
    if host in LOOPBACK:
        return None
    return (f"warning: --host {host} serves the page to every machine that can reach this one, with no login: anyone "
            "there can queue runs on this device")

