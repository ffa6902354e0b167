"""``anyflow app`` in a real browser: Debian's headless Chromium, driven by Playwright, on the tiny FAR snapshot.

CI (CI=true) installs Chromium (.ci/run) and Playwright (the test extra) and fails without them; elsewhere
these tests skip with the reason. The screenshot and the measured times are written to tests/artifacts/
(or $ANYFLOW_TEST_ARTIFACTS); docs/app.png is a copy of the screenshot.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from app_fixtures import PROMPT, serve_app
from snapshot_fixtures import make_tiny_snapshot

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # a real browser, and a page that makes videos
ARTIFACTS = Path(os.environ.get("ANYFLOW_TEST_ARTIFACTS", Path(__file__).parent / "artifacts"))
# Chromium on a closed network: no background connections, a fresh profile (Playwright makes one per launch)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--autoplay-policy=no-user-gesture-required"]
BROWSER_TIMEOUT = 300  # seconds for a test that starts a server and a browser
VIDEO = "document.querySelector('#anyflow-video video')"
PLAYABLE = f"() => {{ const v = {VIDEO}; return !!v && !!v.src && v.readyState >= 2 && v.videoWidth > 0 }}"
STATUS = "document.querySelector('#anyflow-status').innerText"  # with Gradio's run timer beside the line


@contextlib.contextmanager
def chromium():
    """A headless Chromium from the system, or a skip (a failure in CI) saying what is missing."""
    missing = [] if shutil.which("chromium") else ["Debian's chromium (apt-get install chromium)"]
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append('playwright (pip install -e ".[test]")')
    if missing:
        reason = f"the browser tests need {' and '.join(missing)}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    pytest.importorskip("gradio", reason='the app extra: pip install -e ".[app]"')
    served = serve_app(make_tiny_snapshot(tmp_path_factory.mktemp("snapshot") / "tiny-far", far=True))
    yield served
    served.close()


def open_page(browser, app):
    """A page of the app in a context of its own (a user of their own); the hosts it asked for, in a set."""
    page = browser.new_context(viewport={"width": 1280, "height": 960}).new_page()
    hosts = set()
    page.on("request", lambda request: hosts.add(request.url.split("/")[2] if "://" in request.url else request.url))
    page.goto(app.url)
    page.get_by_label("Prompt").fill(PROMPT)
    return page, hosts


@pytest.mark.timeout(BROWSER_TIMEOUT)
def test_far_chunks_play_on_the_page_before_the_run_ends(app):
    with chromium() as browser:
        page, hosts = open_page(browser, app)
        page.get_by_label("Steps").click()
        page.get_by_role("option", name="2", exact=True).click()
        assert page.get_by_label("Steps").input_value() == "2"
        started = time.monotonic()
        page.get_by_role("button", name="Generate").click()
        page.wait_for_function(PLAYABLE, timeout=120_000, polling=20)
        first_frames = time.monotonic() - started
        jobs = [job for job in app.studio.jobs.values() if job.state == "running"]
        assert len(jobs) == 1, "the first frames played only once the run had ended"
        job = jobs[0]
        shown = page.evaluate(f"() => {VIDEO}.duration")
        assert 0 < shown < job.settings.frames / 16  # part of the video: the first chunk(s)

        page.wait_for_function(f"() => {STATUS}.includes('Done: ')", timeout=240_000)
        finished = time.monotonic() - started
        page.wait_for_function(PLAYABLE, timeout=30_000)
        assert page.evaluate(f"() => {VIDEO}.duration") == pytest.approx(33 / 16, abs=0.07)
        assert job.settings.steps == 2 and job.settings.frames == 33 and job.settings.chunks == (1, 2, 2, 2, 2)
        assert len(app.studio.pipeline.runs[-1]) == 5

        text = page.inner_text("body")
        assert app.studio.pipeline.snapshot.root not in text and app.folder not in text  # no server path shown
        assert hosts == {app.url.split("/")[2]}  # the page asked nothing of any other host
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.evaluate(f"() => {{ const v = {VIDEO}; v.pause(); v.currentTime = v.duration / 2; }}")
        page.wait_for_timeout(300)
        page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)
        timings = {"generate_to_first_frames_s": round(first_frames, 2), "generate_to_done_s": round(finished, 2),
                   "run": "tiny FAR snapshot, 240p (416 x 224), 33 frames, 5 chunks, 2 steps, CPU"}
        (ARTIFACTS / "app-timings.json").write_text(json.dumps(timings, indent=2) + "\n")
        print(f"\nGenerate to first frames on the page: {first_frames:.2f} s; to the whole video: {finished:.2f} s")


@pytest.mark.timeout(BROWSER_TIMEOUT)
def test_closing_a_page_stops_its_own_run_and_no_one_elses(app):
    watched = app.studio.pipeline
    with chromium() as browser:
        (leaving, _), (staying, _) = open_page(browser, app), open_page(browser, app)
        watched.hold()
        try:
            leaving.get_by_role("button", name="Generate").click()
            assert watched.holding.wait(60), "the first page's run did not start"
            job = next(job for job in app.studio.jobs.values() if job.state == "running")
            staying.get_by_role("button", name="Generate").click()
            staying.get_by_text("Waiting for the device: 1 run ahead in the queue").wait_for(timeout=30_000)
            runs = len(watched.runs)

            leaving.close()
            deadline = time.monotonic() + 15
            while job.state != "stopped" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert job.state == "stopped" and not os.path.exists(job.folder)
        finally:
            watched.release()
        staying.wait_for_function(f"() => {STATUS}.includes('Done: ')", timeout=120_000)
        assert len(watched.runs) == runs + 1


@pytest.mark.timeout(BROWSER_TIMEOUT)
def test_stop_ends_its_own_run_within_seconds_waiting_or_running_and_leaves_nothing(app):
    watched = app.studio.pipeline
    with chromium() as browser:
        (first, _), (second, _) = open_page(browser, app), open_page(browser, app)
        watched.hold()
        runs = len(watched.runs)
        try:
            first.get_by_role("button", name="Generate").click()
            assert watched.holding.wait(60), "the run did not start"
            running = next(job for job in app.studio.jobs.values() if job.state == "running")
            second.get_by_role("button", name="Generate").click()
            second.get_by_text("Waiting for the device: 1 run ahead in the queue").wait_for(timeout=30_000)
            waiting = next(job for job in app.studio.jobs.values() if job.state == "queued")

            second.get_by_role("button", name="Stop").click()  # the waiting run: it never starts
            second.wait_for_function(f"() => {STATUS}.includes('Stopped')", timeout=10_000)
            assert waiting.state == "stopped" and running.state == "running"
            first.wait_for_function(f"() => {STATUS}.startsWith('Sampling')", timeout=30_000)
            first.get_by_role("button", name="Stop").click()  # the running one
            stopped = time.monotonic()
            first.wait_for_function(f"() => {STATUS}.includes('Stopped')", timeout=10_000)
            assert running.state == "stopped" and time.monotonic() - stopped < 5
            for job in (running, waiting):
                assert not os.path.exists(job.folder) and job.id not in app.studio.jobs
            for page in (first, second):
                assert page.evaluate(f"() => !{VIDEO} || !{VIDEO}.src")  # no video of a stopped run is offered
                assert page.get_by_text("Error", exact=True).count() == 0
            assert len(watched.runs) == runs + 1  # only the running one reached the pipeline
        finally:
            watched.release()
