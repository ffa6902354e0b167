"""Any-step flow-map sampling: a few calls of the model carry noise to a clean latent.

With the shifted schedule ``sigma_0 = 1 > sigma_1 > ... > sigma_N = 0`` each step jumps from
``t = 1000 sigma_i`` straight to ``r = 1000 sigma_{i+1}`` along the model's mean velocity:

    z <- z - (sigma_i - sigma_{i+1}) * u(z, t, r)

The sampler only calls the model's ``forward``; the text context (and every block's
cross-attention keys and values) is prepared once per call, not once per step.

    schedule.py  the noise levels of an N-step run (shifted), which steps run, the step
    bidirectional.py  sample: the bidirectional model, every step over the whole video (guidance, given frames)
    far.py       sample_far: the FAR model, chunk by chunk, with its cache (any length, a bounded
                 cache, a prompt that changes); sample_far_chunks hands the chunks out as they come
    noise.py     SeededNoise: a seed's noise drawn chunk by chunk
    checks.py    the checks both share

The samplers call only the model's ``forward`` (``step`` and ``encode_cache`` for FAR) and
``prepare_context``; they import nothing of the model but its config and ``PreparedContext``.
"""

from ..lazy import lazy_exports

_EXPORTS = {
    "TRAIN_TIMESTEPS": "schedule",
    "MAX_STEPS": "schedule",
    "flow_map_sigmas": "schedule",
    "steps_to_run": "schedule",
    "flow_map_step": "schedule",
    "sample": "bidirectional",
    "Context": "bidirectional",
    "sample_far": "far",
    "sample_far_chunks": "far",
    "LongVideoWarning": "far",
    "check_given_frames": "far",
    "check_context_window": "far",
    "check_prompt_schedule": "far",
    "SeededNoise": "noise",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
