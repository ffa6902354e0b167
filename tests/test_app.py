"""``anyflow app`` through its HTTP client (gradio_client), on tiny complete snapshots.

The server runs in this process, so a run's frames are checked twice: the float frames the pipeline handed
to the job (before any encoding) equal ``VideoPipeline``'s for the same seed within float32 rounding (the
same computation, but on the job's thread, whose OpenMP team may split reductions otherwise: 1e-5 on
frames in [0, 1], the float32 bar), and the mp4 the page serves decodes to exactly what the app's encoder
makes of those frames (H.264 is lossy, 20+ levels on these random-weight frames, but deterministic).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch

from anyflow.app.settings import (
    FAR_MAX_FRAMES, MAX_IMAGE_BYTES, Preset, chunks_for, far_window, fitting_presets, frames_for, make_choices,
    parse_seed, read_image,
)
from anyflow.app.server import bind_warning
from anyflow.app.video import GrowingVideo, encode_segment
from anyflow.cli import main
from anyflow.model.config import RELEASED_CHUNK_PARTITION
from app_fixtures import PROMPT, comment, decoded, free_port, serve_app
from snapshot_fixtures import make_tiny_snapshot

gradio_client = pytest.importorskip("gradio_client", reason='the app extra: pip install -e ".[app]"')
pytest.importorskip("gradio", reason='the app extra: pip install -e ".[app]"')

RUN = dict(prompt=PROMPT, negative_prompt="", steps=2, seed="7", guidance_scale=1.0, length=17, length_unit="frames",
           width=64, height=64, image=None)
SERVER_TIMEOUT = 180  # seconds for a test that starts a server


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    root = tmp_path_factory.mktemp("snapshots")
    return {far: make_tiny_snapshot(root / ("far" if far else "bidirectional"), far=far) for far in (False, True)}


@pytest.fixture(scope="module")
def served(snapshots):
    """``served(far)``: the app of that snapshot kind; one at a time (Gradio's folder is per process)."""
    current = {}

    def serve(far: bool):
        if current.get("far") is not far:
            if current:
                current.pop("app").close()
            current.update(far=far, app=serve_app(snapshots[far]))
        app = current["app"]
        app.studio.pipeline.release()
        return app

    yield serve
    if "app" in current:
        current["app"].close()


def client_of(app, tmp_path):
    return gradio_client.Client(app.url, verbose=False, download_files=str(tmp_path))


def statuses(job):
    """The status lines a client's job has received so far."""
    return [out[1] for out in job.outputs() if isinstance(out[1], str)]


def wait_for(condition, seconds: float = 20.0, what: str = "the condition"):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {seconds} s")
        time.sleep(0.02)


# ---- the settings alone ------------------------------------------------------------------------------------------

def test_length_in_seconds_rounds_to_4k_plus_1_frames():
    assert frames_for(5, "seconds", 81) == 81 and frames_for(2, "seconds", 81) == 33
    assert frames_for(0.1, "seconds", 81) == 1 and frames_for(17, "frames", 81) == 17


def test_far_runs_any_length_in_the_checkpoints_chunks_with_a_bounded_window():
    from anyflow import AnyFlowConfig, AnyFlowFARConfig

    far = AnyFlowFARConfig(num_attention_heads=2, attention_head_dim=16, num_layers=1,
                           chunk_partition=RELEASED_CHUNK_PARTITION)
    choices = make_choices("m", far, fitting_presets(far), on_gpu=True)
    assert chunks_for(choices, 81) == RELEASED_CHUNK_PARTITION and chunks_for(choices, 33) == (1, 3, 3, 2)
    assert chunks_for(choices, 1921) == far.chunk_partition_for(481) == (1,) + (3,) * 160
    assert choices.max_frames == FAR_MAX_FRAMES == 1921 and frames_for(120, "seconds", choices.max_frames) == 1921
    assert "1921 frames (120 s)" in choices.note and "past 81 frames" in choices.note
    assert far_window(chunks_for(choices, 1921)) == (12, 1) and far_window(None) == (None, 0)
    assert far_window((1, 16, 16)) == (16, 1)  # the window holds a whole chunk
    bidirectional = AnyFlowConfig(num_attention_heads=2, attention_head_dim=16, num_layers=1)
    plain = make_choices("m", bidirectional, fitting_presets(bidirectional), on_gpu=True)
    assert plain.max_frames == 81 and chunks_for(plain, 81) is None and plain.note == ""


def test_presets_snap_to_the_pixel_grid_and_cpu_defaults_are_small(snapshots):
    from anyflow import AnyFlowFARConfig

    far = AnyFlowFARConfig(num_attention_heads=2, attention_head_dim=16, num_layers=1)
    presets = fitting_presets(far)
    assert all(p.width % 32 == 0 and p.height % 32 == 0 for p in presets)
    assert Preset("240p", 416, 224) in presets  # 240 is off the FAR grid of 32
    cpu, gpu = make_choices("m", far, presets, on_gpu=False), make_choices("m", far, presets, on_gpu=True)
    assert (cpu.default_preset.name, cpu.default_frames) == ("240p", 33) and "CPU" in cpu.note
    assert (gpu.default_preset.name, gpu.default_frames) == ("480p", 81) and "CPU" not in gpu.note


def test_a_growing_video_keeps_two_joins_on_disk_and_every_frame(tmp_path):
    video = GrowingVideo(str(tmp_path), 16, "clip")
    pieces = [np.full((n, 32, 32, 3), 40 * i, dtype=np.uint8) for i, n in enumerate((1, 4, 4, 4, 4))]
    made = 0
    for piece in pieces:
        shown = video.append(piece)
        made += len(piece)
        assert len(decoded(shown)) == made  # every frame so far, playable after each piece
    assert sorted(p.name for p in tmp_path.glob("clip*.mp4")) == ["clip-4.mp4", "clip-5.mp4"]
    final = video.finish({"seed": 1})
    frames = decoded(final)
    assert len(frames) == 17 and json.loads(comment(final)) == {"seed": 1}
    means = [frames[k].mean() for k in (0, 1, 16)]  # the pieces in order; flat greys through yuv420p, crf 18
    assert all(abs(mean - grey) <= 2 for mean, grey in zip(means, (0, 40, 160))), means


def test_random_seeds_stay_exact_in_a_browser():
    assert all(0 <= parse_seed("") < 2**53 for _ in range(20))
    assert parse_seed(" 18446744073709551615 ") == 2**64 - 1


def test_uploads_are_checked_for_size_type_and_pixels(tmp_path):
    from PIL import Image

    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (MAX_IMAGE_BYTES + 1))
    gif, huge, text = tmp_path / "a.gif", tmp_path / "huge.png", tmp_path / "text.png"
    Image.new("RGB", (8, 8)).save(gif)
    Image.new("1", (8000, 6000)).save(huge)
    text.write_text("not an image")
    for path, message in ((big, "20.0 MiB, more than 20 MiB"), (gif, "a GIF file"), (huge, "48 megapixels"),
                          (text, "not a PNG, JPEG, WebP image")):
        with pytest.raises(ValueError, match=f"^Image: .*{re.escape(message)}"):
            read_image(str(path), 64, 64)
    wide = tmp_path / "wide.png"
    Image.fromarray(np.tile(np.arange(200, dtype=np.uint8)[None, :, None], (100, 1, 3))).save(wide)
    fitted = read_image(str(wide), 64, 64)  # the middle 100 x 100, resized
    assert fitted.shape == (64, 64, 3) and 90 < fitted[:, 32].mean() < 110


def assert_same_frames(job_frames: torch.Tensor, expected: torch.Tensor) -> None:
    """The frames a job made on its thread against ``VideoPipeline`` called here: float32 rounding apart."""
    torch.testing.assert_close(job_frames, expected, rtol=0, atol=1e-5)


# ---- runs through the client -------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(SERVER_TIMEOUT)
def test_bidirectional_video_equals_the_pipelines_with_guidance(served, tmp_path):
    app = served(False)
    run = dict(RUN, negative_prompt="blurry, low quality", guidance_scale=3.0)
    video, status, record = client_of(app, tmp_path).predict(**run, api_name="/generate")
    raw = torch.cat(app.studio.pipeline.runs[-1], dim=1)  # (1, F, H, W, 3) float, as the job got them

    expected = app.studio.pipeline.pipeline(PROMPT, negative_prompt=run["negative_prompt"], guidance_scale=3.0,
                                            num_frames=17, height=64, width=64, num_steps=2, seed=7)
    assert_same_frames(raw, expected)
    reference = tmp_path / "reference.mp4"
    encode_segment(str(reference), (raw[0] * 255).round().to(torch.uint8).numpy(), 16)
    assert np.array_equal(decoded(video), decoded(str(reference)))
    assert status.startswith("Done: 17 frames of 64 x 64") and record["seed"] == 7 and record["steps"] == 2
    assert json.loads(comment(video)) == record  # the settings travel in the download


@pytest.mark.slow
@pytest.mark.timeout(SERVER_TIMEOUT)
def test_far_streams_each_chunk_and_equals_the_pipeline(served, tmp_path):
    app = served(True)
    job = client_of(app, tmp_path).submit(**dict(RUN, length=33), api_name="/generate")
    video, status, record = job.result(timeout=120)
    shown = [out[0] for out in job.outputs() if isinstance(out[0], str)]
    raw = app.studio.pipeline.runs[-1]

    assert record["chunks"] == [1, 2, 2, 2, 2] and (record["context_window"], record["sink_frames"]) == (12, 1)
    assert [piece.shape[1] for piece in raw] == [1, 8, 8, 8, 8]  # each chunk decoded on its own, in order
    arguments = app.studio.pipeline.arguments[-1]
    assert (arguments["context_window"], arguments["sink_frames"]) == (12, 1)
    expected = app.studio.pipeline.pipeline(PROMPT, num_frames=33, height=64, width=64, num_steps=2, seed=7,
                                            chunk_partition=(1, 2, 2, 2, 2))  # unbounded: a window never filled
    assert_same_frames(torch.cat(raw, dim=1), expected)
    pieces = []
    for i, piece in enumerate(raw):  # what the app's encoder makes of the pipeline's own frames, chunk by chunk
        path = tmp_path / f"expected-{i}.mp4"
        encode_segment(str(path), (piece[0] * 255).round().to(torch.uint8).numpy(), 16)
        pieces.append(decoded(str(path)))
    whole = np.concatenate(pieces)
    assert np.array_equal(decoded(video), whole)
    # the page got a playable video after every chunk, each holding every frame made so far
    assert len(shown) >= 5 and [len(decoded(p)) for p in shown[:5]] == [1, 9, 17, 25, 33]
    for path in shown[:5]:
        frames = decoded(path)
        assert np.array_equal(frames, whole[:len(frames)])


@pytest.mark.slow
@pytest.mark.timeout(SERVER_TIMEOUT)
def test_far_image_to_video_starts_with_the_image(served, tmp_path):
    from PIL import Image

    app = served(True)
    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "start.png")
    run = dict(RUN, image=gradio_client.handle_file(str(tmp_path / "start.png")))
    client_of(app, tmp_path).predict(**run, api_name="/generate")
    raw = torch.cat(app.studio.pipeline.runs[-1], dim=1)
    expected = app.studio.pipeline.pipeline(PROMPT, num_frames=17, height=64, width=64, num_steps=2, seed=7,
                                            image=image, chunk_partition=(1, 2, 2))
    assert_same_frames(raw, expected)


@pytest.mark.timeout(SERVER_TIMEOUT)
def test_one_run_at_a_time_the_second_client_waits_in_the_queue(served, tmp_path):
    app = served(False)
    watched = app.studio.pipeline
    first, second = client_of(app, tmp_path / "1"), client_of(app, tmp_path / "2")
    watched.hold()
    running = first.submit(**RUN, api_name="/generate")
    wait_for(watched.holding.is_set, what="the first run")
    waiting = second.submit(**dict(RUN, seed="8"), api_name="/generate")
    wait_for(lambda: "Waiting for the device: 1 run ahead in the queue" in statuses(waiting),
             what="the second client told its place")
    runs = len(watched.runs)
    watched.release()
    assert running.result(timeout=60)[2]["seed"] == 7 and waiting.result(timeout=60)[2]["seed"] == 8
    first_ended, second_started = watched.times[runs - 1][1], watched.times[runs][0]
    assert first_ended <= second_started  # the device ran them one after the other


@pytest.mark.slow
@pytest.mark.timeout(SERVER_TIMEOUT)
def test_cancel_stops_only_that_run_and_leaves_nothing(served, tmp_path):
    app = served(True)
    studio, watched = app.studio, app.studio.pipeline
    clients = [client_of(app, tmp_path / str(i)) for i in range(3)]
    watched.hold()
    running = clients[0].submit(**dict(RUN, length=33), api_name="/generate")
    wait_for(lambda: any(job.state == "running" for job in studio.jobs.values()) and watched.holding.is_set(),
             what="the first run")
    job = next(job for job in studio.jobs.values() if job.state == "running")
    assert os.path.isdir(job.folder)
    queued = clients[1].submit(**dict(RUN, seed="8"), api_name="/generate")
    wait_for(lambda: "Waiting for the device: 1 run ahead in the queue" in statuses(queued), what="the second run")
    abandoned = clients[2].submit(**dict(RUN, seed="9"), api_name="/generate")
    wait_for(lambda: "Waiting for the device: 2 runs ahead in the queue" in statuses(abandoned), what="the third run")
    waiting = next(j for j in studio.jobs.values() if j.settings.seed == 9)
    runs = len(watched.runs)

    abandoned.cancel()  # a queued run never starts
    wait_for(lambda: waiting.state == "stopped", seconds=10, what="the queued run's stop")
    assert not os.path.exists(waiting.folder)
    running.cancel()
    started = time.monotonic()
    wait_for(lambda: job.state == "stopped", seconds=10, what="the stop")
    assert time.monotonic() - started < 5
    wait_for(lambda: not os.path.exists(job.folder), seconds=5, what="the stopped run's folder removed")
    assert job.id not in studio.jobs
    assert not [t for t in threading.enumerate() if t.name == f"anyflow-job-{job.id}"]
    watched.release()
    assert queued.result(timeout=60)[2]["seed"] == 8  # the other client's run went on
    assert len(watched.runs) == runs + 1  # the cancelled queued one never ran


BAD_VALUES = {  # name: (far, the values changed, the message's start)
    "empty prompt": (False, dict(prompt="  "), "Prompt: write what the video should show"),
    "frames not 4k + 1": (False, dict(length=16), "Length: 16 frames; the Wan VAE takes 4k + 1"),
    "too many frames": (False, dict(length=85), "Length: 85 frames is more than the 81"),
    "too many seconds": (False, dict(length=10, length_unit="seconds"), "Length: 10 seconds is 161 frames"),
    "no seconds": (False, dict(length=0, length_unit="seconds"), "Length: 0 seconds; give a positive length"),
    "width off the grid": (False, dict(width=72), "Width: 72 pixels; the model takes multiples of 16"),
    "FAR width off its grid": (True, dict(width=48), "Width: 48 pixels; the model takes multiples of 32"),
    "height zero": (False, dict(height=0), "Height: 0 pixels"),
    "fractional width": (False, dict(width=64.5), "Width: 64.5 pixels"),
    "no steps": (False, dict(steps=0), "Steps: 0 is not a whole number from 1 to 1000"),
    "too many steps": (False, dict(steps=1001), "Steps: 1001 is not a whole number"),
    "steps as words": (False, dict(steps="four"), "Steps: 'four' is not a number"),
    "fractional steps": (False, dict(steps="2.5"), "Steps: 2.5 is not a whole number"),
    "negative seed": (False, dict(seed="-1"), "Seed: '-1' is not a whole number from 0 to 2^64 - 1"),
    "seed too large": (False, dict(seed=str(2**64)), "Seed: 18446744073709551616 is not a whole number"),
    "negative guidance": (False, dict(guidance_scale=-1), "Guidance: -1; use 1 (off) or more"),
    "guidance without a negative prompt": (False, dict(guidance_scale=3), "Negative prompt: guidance 3 needs"),
    "guidance on FAR": (True, dict(guidance_scale=2), "Guidance: 2; the FAR model runs without guidance"),
    "image on the bidirectional model": (False, "image", "Image: image-to-video needs a FAR snapshot"),
    "unreadable image": (True, "text", "Image: not a PNG, JPEG, WebP image that can be read"),
    "image of another type": (True, "gif", "Image: a GIF file; use PNG, JPEG, WebP"),
    "image with too many pixels": (True, "huge", "Image: 8000 x 6000 is 48 megapixels, more than 40"),
    "image and one frame": (True, dict(length=1), "Length: 1 frame(s) hold only the image"),
}


def image_file(kind: str, folder) -> str:
    from PIL import Image

    path = folder / f"{kind}.{'gif' if kind == 'gif' else 'png'}"
    if kind == "text":
        path.write_text("<svg>not a raster image</svg>")
    else:
        Image.new("1" if kind == "huge" else "RGB", (8000, 6000) if kind == "huge" else (64, 64)).save(path)
    return str(path)


@pytest.mark.timeout(SERVER_TIMEOUT)
@pytest.mark.parametrize("name", list(BAD_VALUES))
def test_each_bad_value_is_one_message_naming_its_field(served, tmp_path, capfd, name):
    far, change, message = BAD_VALUES[name]
    app = served(far)
    if isinstance(change, str) or name == "image and one frame":
        image = image_file("image" if name == "image and one frame" else change, tmp_path)
        change = dict(dict(change) if isinstance(change, dict) else {}, image=gradio_client.handle_file(image))
    client = client_of(app, tmp_path)
    runs = len(app.studio.pipeline.runs)
    with pytest.raises(gradio_client.exceptions.AppError) as error:
        client.predict(**{**RUN, **change}, api_name="/generate")
    assert str(error.value).startswith(message), str(error.value)
    assert len(app.studio.pipeline.runs) == runs  # nothing ran
    assert "Traceback" not in capfd.readouterr().err
    assert client.predict(**RUN, api_name="/generate")[1].startswith("Done")  # the server goes on


@pytest.mark.timeout(SERVER_TIMEOUT)
def test_nan_guidance_over_plain_http_is_one_message(served):
    """JSON clients refuse to send NaN; a hand-written request (JSON's NaN literal) reaches the endpoint."""
    app = served(False)
    values = [RUN[k] for k in ("prompt", "negative_prompt", "steps", "seed")] + [float("nan")] + \
        [RUN[k] for k in ("length", "length_unit", "width", "height", "image")]
    request = urllib.request.Request(app.url + "gradio_api/call/generate", json.dumps({"data": values}).encode(),
                                     {"Content-Type": "application/json"})
    event_id = json.load(urllib.request.urlopen(request, timeout=30))["event_id"]
    stream = urllib.request.urlopen(f"{app.url}gradio_api/call/generate/{event_id}", timeout=60).read().decode()
    assert "event: error" in stream and "Guidance: nan is not a finite number" in stream


@pytest.mark.timeout(SERVER_TIMEOUT)
def test_a_run_the_device_cannot_hold_is_refused_on_the_page(served, tmp_path, monkeypatch):
    import anyflow.runtime.memory

    app = served(False)
    monkeypatch.setattr(anyflow.runtime.memory, "available_memory", lambda device: 2**20)
    with pytest.raises(gradio_client.exceptions.AppError, match=r"^Length and size: 17 frames of 64 x 64 need about"):
        client_of(app, tmp_path).predict(**RUN, api_name="/generate")


# ---- the command -------------------------------------------------------------------------------------------------

def test_a_bad_snapshot_path_is_one_line(tmp_path, capsys):
    assert main(["app", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"anyflow app: error: {tmp_path / 'missing'}: no model_index.json")


def test_a_snapshot_that_cannot_fit_is_refused_before_the_server_starts(snapshots, capsys, monkeypatch):
    import anyflow.runtime.memory

    monkeypatch.setattr(anyflow.runtime.memory, "available_memory", lambda device: 2**20)
    port = free_port()
    assert main(["app", snapshots[False], "--port", str(port)]) == 1
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and re.match(r"anyflow app: error: .*the smallest size, 240p \(416 x 240\) at 33 "
                                             r"frames, needs about .* but cpu has 1 MiB available", err), err
    assert "left out" in out and "serving" not in out


def test_a_port_in_use_is_one_line_before_the_model_loads(snapshots, capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["app", snapshots[True], "--port", str(port)]) == 1
    out, err = capsys.readouterr()
    assert err == f"anyflow app: error: --host 127.0.0.1 --port {port}: cannot serve there (Address already in use); " \
                  "choose another --port, or an address of this machine for --host\n"
    assert out == ""  # nothing estimated or loaded


def test_a_public_host_prints_a_warning():
    assert bind_warning("127.0.0.1") is None and bind_warning("localhost") is None
    assert bind_warning("0.0.0.0").startswith("warning: --host 0.0.0.0 serves the page to every machine")


@pytest.mark.slow
@pytest.mark.timeout(SERVER_TIMEOUT)
def test_the_command_serves_until_interrupted_and_removes_its_files(snapshots):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "anyflow", "app", snapshots[True], "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in server.stdout:
            lines.append(line)
            if line.startswith("serving"):
                break
        assert lines and lines[-1] == f"serving far at http://127.0.0.1:{port}/ (Ctrl-C stops the server and removes " \
                                      "its files)\n", "".join(lines)
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).read().decode()
        assert "<html" in page and snapshots[True] not in page
        folders = [f for f in os.listdir(tempfile.gettempdir()) if f.startswith(".anyflow-app.partial-") and
                   f.endswith(f"-{server.pid}")]
        assert len(folders) == 1
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 130
        assert not os.path.exists(os.path.join(tempfile.gettempdir(), folders[0]))
        assert "Traceback" not in server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()
