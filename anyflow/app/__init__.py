"""``anyflow app``: a web page (Gradio) to make videos with one released snapshot, usable over HTTP too.

    settings.py    the page's values -> checked Settings; what the page offers (sizes, length, defaults)
    estimates.py   memory (as ``generate`` estimates it) and sampling time of a run, before it starts
    video.py       a video that grows chunk by chunk, playable after each chunk
    progress.py    a run's stage, chunk, step, elapsed time and time left, as one line
    generation.py  one run: Settings -> VideoPipeline -> the growing video
    jobs.py        runs one at a time on the device, each stoppable within seconds
    page.py        the Gradio page and its ``/generate`` endpoint
    server.py      the command: start-up checks, load once, serve, clean up

The web framework is imported only by ``page.py`` and ``server.py``'s launch; the rest is plain Python.
"""

from .server import serve

__all__ = ["serve"]
