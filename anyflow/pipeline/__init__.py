"""From a prompt to video frames and files: a released snapshot's components composed, and video files.

    snapshot.py        a snapshot as published: its kind, components, scheduler shift, component sizes
    video_pipeline.py  VideoPipeline: prompt (and image or clip) -> UMT5 -> sampler -> Wan VAE -> frames
    video_io.py        frames to mp4 / gif / apng / webp files (and back) through PyAV

Names are imported on first use.
"""

from ..lazy import lazy_exports

_EXPORTS = {
    "VideoPipeline": "video_pipeline",
    "Snapshot": "snapshot",
    "read_snapshot": "snapshot",
    "PIPELINES": "snapshot",
    "VideoWriter": "video_io",
    "write_video": "video_io",
    "read_frames": "video_io",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
