"""The page: a Gradio Blocks app over a :class:`~anyflow.app.jobs.Studio`.

One event, ``generate`` (also the HTTP endpoint ``/generate``), checks the page's values (a bad one ends
it with a message naming the field), submits a job to the studio's queue and yields as the job goes: the
status line (its place in the queue, then its stage, at least every second), the video so far (a FAR
model's after each chunk), and the run's settings. Gradio runs every such event at once; the studio runs
the jobs one at a time. Stop stops the job of its own page, which then ends its event with "Stopped"; a
closed page and an HTTP client's cancel close the event's generator, whose ``finally`` stops its job. One
user's stop never touches another's job.
"""

import html  # no `from __future__ import annotations`: Gradio finds the gr.Request parameters by their annotation
import threading

from .jobs import Job, JobFailed, Studio
from .settings import LENGTH_UNITS, MAX_STEPS, STEP_CHOICES, Choices, FPS, check_settings

STATUS_EVERY = 1.0  # seconds between status lines; also how soon a cancelled event lets go of its job


def build_page(studio: Studio, choices: Choices, config, about: dict):
    """The Gradio Blocks of the page (not yet launched). ``about`` describes the model for its header."""
    import gradio as gr

    presets = {preset.label: preset for preset in choices.presets}
    default = choices.default_preset
    seconds = (choices.default_frames - 1) / FPS
    running = {}  # session -> its page's job, while its event goes on
    lock = threading.Lock()

    def generate(prompt, negative_prompt, steps, seed, guidance_scale, length, length_unit, width, height, image,
                 request: gr.Request):
        try:
            settings = check_settings(choices, config, prompt, negative_prompt, steps, seed, guidance_scale, length,
                                      length_unit, width, height, image)
            job = studio.submit(settings)
        except ValueError as exc:
            raise gr.Error(html.escape(str(exc), quote=False), title="Check the settings", print_exception=False) from None
        with lock:
            running[request.session_hash] = job
        try:
            yield None, job.status(), job.record
            for update in job.updates(STATUS_EVERY):
                yield (gr.skip() if update.video is None else update.video), update.status, gr.skip()
            yield job.video, job.progress.line(), job.record
        except JobFailed as exc:
            if job.state != "stopped":
                raise gr.Error(html.escape(str(exc), quote=False), title="The run ended", print_exception=False) from None
            yield None, "Stopped: the run's files are removed", gr.skip()
        finally:
            job.stop()  # the page closed or a client cancelled; nothing when the job has ended
            with lock:
                if running.get(request.session_hash) is job:
                    del running[request.session_hash]

    def stop_run(request: gr.Request) -> None:
        with lock:
            job: Job = running.get(request.session_hash)
        if job is not None:
            job.stop()

    kind = "FAR, chunk by chunk" if choices.far else "bidirectional"
    with gr.Blocks(title=f"AnyFlow: {choices.model}", analytics_enabled=False) as page:
        gr.Markdown(f"# AnyFlow\n**{html.escape(choices.model)}** ({kind}) on {about['device']} in {about['dtype']}")
        if choices.note:
            gr.Markdown(choices.note)
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", lines=3, placeholder="What the video shows")
                with gr.Row():
                    steps = gr.Dropdown(label="Steps", choices=list(STEP_CHOICES), value=4, allow_custom_value=True,
                                        info=f"1, 2, 4 or 8, or type any number from 1 to {MAX_STEPS}")
                    seed = gr.Textbox(label="Seed", placeholder="random", info="empty: a random seed, shown after the run")
                with gr.Row():
                    length = gr.Number(label="Length", value=seconds, minimum=0,
                                       info=f"{FPS} frames per second; frames are 4k + 1, at most {choices.max_frames}")
                    length_unit = gr.Radio(list(LENGTH_UNITS), value=LENGTH_UNITS[0], label="Length in")
                size = gr.Dropdown(label="Size", choices=list(presets), value=default.label)
                with gr.Row():
                    width = gr.Number(label="Width", value=default.width, info=f"a multiple of {choices.pixel_multiple}")
                    height = gr.Number(label="Height", value=default.height,
                                       info=f"a multiple of {choices.pixel_multiple}")
                # no file_types: Gradio would refuse other names itself, with a traceback on the console; the
                # settings check every upload's content instead
                image = gr.File(label="Start image (optional, PNG, JPEG or WebP): the video starts with it",
                                type="filepath", visible=choices.far)
                with gr.Accordion("Guidance", open=False, visible=not choices.far):
                    guidance_scale = gr.Number(label="Guidance", value=1.0, info="1: off (the weights need none)")
                    negative_prompt = gr.Textbox(label="Negative prompt", info="used when guidance is above 1")
                with gr.Row():
                    start = gr.Button("Generate", variant="primary")
                    stop = gr.Button("Stop", variant="stop")
            with gr.Column():
                video = gr.Video(label="Video", autoplay=True, interactive=False, buttons=["download"],
                                 elem_id="anyflow-video")
                status = gr.Markdown(elem_id="anyflow-status")
                record = gr.JSON(label="Settings of the run (also in the mp4's comment tag)")
        size.change(lambda label: (presets[label].width, presets[label].height), size, [width, height], queue=False,
                    api_visibility="private")
        start.click(generate, [prompt, negative_prompt, steps, seed, guidance_scale, length, length_unit, width, height,
                               image], [video, status, record], api_name="generate", concurrency_limit=None,
                    show_progress="minimal")
        stop.click(stop_run, None, None, queue=False, api_visibility="private")
    return page
