"""Videos of any length from the FAR model: the bounded cache, positions past the RoPE table, flat memory, a
prompt that changes.

The windowed cache is checked against a reference built here from explicit masks: every frame of the video so
far in one stream (the older chunks through the compressed patch), absolute positions, and a boolean mask that
lets a token see the sink, the last ``context_window`` compressed frames and the full-resolution chunks, with
dense attention. Different computations: compared within the float32 bar (1e-5 of max|reference|).
"""

from __future__ import annotations

import re
import weakref
from typing import List, Optional, Sequence

import pytest
import torch
import torch.nn.functional as F

from anyflow import AnyFlowFARConfig, AnyFlowFARTransformer3DModel, sample_far, sample_far_chunks
from anyflow.model.attention import TokenPlan
from anyflow.model.embeddings import unpatchify
from anyflow.model.far_cache import ContextWindow
from anyflow.model.rope import rope_rotations
from anyflow.sampling import SeededNoise, flow_map_sigmas, flow_map_step, steps_to_run
from anyflow.sampling.far import LongVideoWarning
from support import FP32_BAR, SMALL, randomize_

pytestmark = pytest.mark.filterwarnings("ignore::anyflow.sampling.far.LongVideoWarning")


def far_model(seed: int = 0, **overrides) -> AnyFlowFARTransformer3DModel:
    model = AnyFlowFARTransformer3DModel(AnyFlowFARConfig(**{**SMALL, "chunk_partition": (1, 2, 2, 2, 1), **overrides}))
    randomize_(model.eval(), seed)
    return model


def error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


def draw(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- the reference: one stream of every frame, an explicit mask, dense attention ------------------------------

def masked_velocity(model, frames: torch.Tensor, compressed: Sequence[bool], positions: Sequence[int],
                    allowed: torch.Tensor, t: torch.Tensor, r: torch.Tensor, text: torch.Tensor,
                    out_frames: int) -> torch.Tensor:
    """The velocity of the last ``out_frames`` frames of ``frames`` (B, F, C, H, W): frame i's tokens made through
    the compressed patch when ``compressed[i]``, rotated at frame position ``positions[i]``, embedded at timesteps
    ``t[:, i]``, ``r[:, i]``, and attending to frame j's iff ``allowed[i, j]``."""
    cfg = model.config
    _, ph, pw = cfg.patch_size
    _, ch, cw = cfg.compressed_patch_size
    h, w = frames.shape[-2:]
    tokens, ropes, segments, owner = [], [], [], []
    for i in range(frames.shape[1]):
        small = compressed[i]
        embed = model.far_patch_embed if small else model.patch_embed
        grid = (1, h // ch, w // cw) if small else (1, h // ph, w // pw)
        tokens.append(embed(frames[:, i:i + 1]))
        ropes.append(rope_rotations(grid, cfg.attention_head_dim, model.device, positions[i],
                                    (ch // ph, cw // pw) if small else (1, 1)))
        segments.append((1, grid[1] * grid[2]))
        owner += [i] * (grid[1] * grid[2])
    owner = torch.tensor(owner)
    mask = allowed[owner][:, owner]  # (L, L): token i sees token j

    def attend(q, k, v, visible=None):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2).flatten(2)

    x = torch.cat(tokens, dim=1)
    time_embedding, time_modulation = model.time_embed(t, r, model.dtype)
    plan = TokenPlan(tuple(segments), torch.cat(ropes))
    context = model.prepare_context(text)
    try:
        for i, block in enumerate(model.blocks):
            block.self_attn.attend = attend
            x = block(x, context.kv[i], time_modulation, plan)
    finally:
        for block in model.blocks:
            del block.self_attn.attend
    grid = (out_frames, h // ph, w // pw)
    tail = x[:, -out_frames * grid[1] * grid[2]:]
    return unpatchify(model.head(tail, time_embedding[:, -out_frames:], ((out_frames, grid[1] * grid[2]),)), grid,
                      cfg.patch_size)


def window_mask(partition: Sequence[int], chunk: int, window: Optional[int], sink: int, full_chunk_limit: int):
    """(compressed, allowed) of the frames up to the end of ``chunk`` while it is made: the cached chunks older than
    the last ``full_chunk_limit - 1`` compressed; a compressed chunk sees the compressed frames of the chunks up to
    its own that are in the sink or among the last ``window`` up to its end; a full-resolution one (the chunk made
    included) sees those among the last ``window`` of all compressed frames, and the full-resolution chunks up to
    its own."""
    chunk_of = [i for i, size in enumerate(partition[:chunk + 1]) for _ in range(size)]
    ends = [sum(partition[:i + 1]) for i in range(chunk + 1)]
    num_compressed = max(0, chunk - (full_chunk_limit - 1))
    compressed_frames = ends[num_compressed - 1] if num_compressed else 0
    compressed = [c < num_compressed for c in chunk_of]
    frames = len(chunk_of)
    allowed = torch.zeros(frames, frames, dtype=torch.bool)
    for q in range(frames):
        limit = (ends[chunk_of[q]] if compressed[q] else compressed_frames) - (window if window is not None else 10**9)
        for k in range(frames):
            allowed[q, k] = chunk_of[k] <= chunk_of[q] and (not compressed[k] or k < sink or k >= limit)
    return compressed, allowed


def reference_sample(model, noise, text, partition, num_steps, window=None, sink=0):
    """sample_far recomputed from scratch at every step: every frame so far in one masked stream, absolute positions."""
    schedule = flow_map_sigmas(num_steps, 5.0)
    latents = noise.clone()
    with torch.no_grad():
        for chunk, size in enumerate(partition):
            start = sum(partition[:chunk])
            compressed, allowed = window_mask(partition, chunk, window, sink, model.config.full_chunk_limit)
            z = latents[:, start:start + size]
            for i in steps_to_run(schedule):
                t, r = (torch.zeros(noise.shape[0], start + size) for _ in range(2))
                t[:, start:] = 1000 * schedule[i].item()
                r[:, start:] = 1000 * schedule[i + 1].item()
                frames = torch.cat([latents[:, :start], z], dim=1)
                velocity = masked_velocity(model, frames, compressed, range(start + size), allowed, t, r, text, size)
                z = flow_map_step(z, velocity, schedule, i)
            latents[:, start:start + size] = z
    return latents


@pytest.mark.slow
def test_the_reference_is_the_unbounded_sampler():
    """The masked reference itself, without a window, against sample_far as the authors' model runs."""
    model = far_model(1)
    noise, text = draw(1, 8, 4, 8, 8, seed=1), draw(1, 5, 24, seed=2)
    partition = (1, 2, 2, 2, 1)
    assert error(sample_far(model, noise, text, num_steps=2), reference_sample(model, noise, text, partition, 2)) <= FP32_BAR


WINDOWS = {
    # name: (config overrides, partition, window, sink): windows and sinks that cross chunk edges
    "window of one chunk": (dict(), (1, 2, 2, 2, 2, 2, 1), 2, 0),
    "ring wraps mid-chunk": (dict(chunk_partition=(1, 3, 3, 3)), (1, 3, 3, 3, 3, 3, 2), 4, 1),
    "sink across a chunk edge": (dict(full_chunk_limit=2), (2, 1, 3, 1, 2, 3, 2), 3, 2),
    "every chunk compressed at once": (dict(full_chunk_limit=1), (1, 2, 2, 2, 2, 1), 3, 1),
    "sink as large as the window": (dict(), (1, 2, 1, 2, 2, 2, 2), 2, 2),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(WINDOWS))
def test_a_windowed_cache_equals_the_masked_reference(case):
    overrides, partition, window, sink = WINDOWS[case]
    model = far_model(2, **overrides)
    noise, text = draw(1, sum(partition), 4, 8, 16, seed=3), draw(1, 5, 24, seed=4)
    ours = sample_far(model, noise, text, num_steps=2, chunk_partition=partition, context_window=window,
                      sink_frames=sink)
    expected = reference_sample(model, noise, text, partition, 2, window, sink)
    assert error(ours, expected) <= FP32_BAR
    unbounded = reference_sample(model, noise, text, partition, 2)
    assert error(ours, unbounded) > 1e-3  # the window is crossed: frames left attention


def sample_far_as_it_was(model, noise, text, num_steps, partition):
    """The sampler before bounded caches: every latent kept, the cache refreshed from all the frames made so far."""
    schedule = flow_map_sigmas(num_steps, 5.0)
    latents = noise.to(model.device, model.dtype, copy=True)
    ends = [sum(partition[:i + 1]) for i in range(len(partition))]
    with torch.no_grad():
        context, cache = model.prepare_context(text), None
        for chunk, (start, stop) in enumerate(zip([0] + ends[:-1], ends)):
            z = latents[:, start:stop]
            for i in steps_to_run(schedule):
                t, r = (torch.full(z.shape[:2], 1000 * schedule[j].item()) for j in (i, i + 1))
                z = flow_map_step(z, model.step(z, t, r, context, cache), schedule, i)
            latents[:, start:stop] = z
            if chunk < len(partition) - 1:
                cache = model.encode_cache(latents[:, :stop], partition[:chunk + 1], context, cache,
                                           reserve_frames=partition[chunk + 1])
    return latents


@pytest.mark.slow
def test_unbounded_is_the_sampler_as_it_was_and_a_window_never_filled_changes_no_bit():
    """The same computation in the same thread: bit for bit."""
    model = far_model(3)
    noise, text = draw(1, 9, 4, 8, 8, seed=5), draw(1, 5, 24, seed=6)
    partition = model.config.chunk_partition_for(9)
    unbounded = sample_far(model, noise, text, num_steps=2)
    assert torch.equal(unbounded, sample_far_as_it_was(model, noise, text, 2, partition))
    compressed_at_most = 9 - sum(partition[-model.config.full_chunk_limit:])
    assert torch.equal(unbounded, sample_far(model, noise, text, num_steps=2, context_window=compressed_at_most,
                                             sink_frames=1))


@pytest.mark.slow
def test_chunks_come_out_as_made_and_sample_far_is_their_whole():
    model = far_model(4)
    noise, text = draw(1, 9, 4, 8, 8, seed=7), draw(1, 5, 24, seed=8)
    whole = sample_far(model, noise, text, num_steps=1, context_window=2, sink_frames=1)
    chunks = list(sample_far_chunks(model, noise, text, num_steps=1, context_window=2, sink_frames=1))
    assert [index for index, _ in chunks] == list(range(len(model.config.chunk_partition_for(9))))
    assert torch.equal(torch.cat([latents for _, latents in chunks], dim=1), whole)


# ---- any length -----------------------------------------------------------------------------------------------

def test_the_checkpoints_chunks_extend_by_their_own_rule():
    released = AnyFlowFARConfig()
    assert released.chunk_partition_for(21) == (1, 3, 3, 3, 3, 3, 3, 2)  # its own at its own length
    assert released.chunk_partition_for(9) == (1, 3, 3, 2)  # cut
    assert released.chunk_partition_for(25) == (1,) + (3,) * 8
    assert released.chunk_partition_for(481) == (1,) + (3,) * 160
    assert released.chunk_partition_for(482) == (1,) + (3,) * 160 + (1,)
    assert AnyFlowFARConfig(chunk_partition=(2, 1, 4, 4, 3)).chunk_partition_for(20) == (2, 4, 4, 4, 4, 2)
    assert AnyFlowFARConfig(chunk_partition=(1, 1, 2)).chunk_partition_for(6) == (1, 2, 2, 1)  # a tie: the larger


@pytest.mark.slow
def test_a_run_past_the_trained_frames_warns_once():
    model = far_model(5)
    noise, text = draw(1, 9, 4, 8, 8, seed=9), draw(1, 5, 24, seed=10)
    with pytest.warns(LongVideoWarning, match=r"9 latent frames \(33 video frames\) go past the 8 \(29 video frames\) "
                                              r"this checkpoint was trained on") as caught:
        sample_far(model, noise, text, num_steps=1)
    assert len(caught) == 1


def test_seeded_noise_chunk_by_chunk_is_the_whole_draw():
    for shape, chunks in [((1, 21, 16, 60, 104), (1, 3, 3, 3, 3, 3, 3, 2)), ((1, 9, 4, 4, 8), (2, 1, 3, 3)),
                          ((2, 5, 4, 4, 8), (1, 2, 2))]:
        whole = torch.randn(shape, generator=torch.Generator().manual_seed(11))
        noise, start, pieces = SeededNoise(shape, 11), 0, []
        for size in chunks:
            pieces.append(noise.frames(start, start + size))
            start += size
        assert torch.equal(torch.cat(pieces, dim=1), whole), shape
    noise = SeededNoise((1, 9, 4, 4, 8), 11)
    skipped = noise.frames(3, 5)  # the given frames' noise is drawn and dropped
    assert torch.equal(skipped, torch.randn((1, 9, 4, 4, 8), generator=torch.Generator().manual_seed(11))[:, 3:5])
    with pytest.raises(ValueError, match=r"SeededNoise hands out frames in order: 5 next, of 9; asked for 0..0"):
        noise.frames(0, 1)


# ---- flat memory ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_memory_is_the_caches_bound_at_any_length_and_chunks_are_let_go():
    """The cache's allocated bytes are the same at four lengths once the window is full, in storage allocated
    once; the sampler lets go of every chunk the cache no longer needs."""
    model = far_model(6)
    text = draw(1, 5, 24, seed=12)
    limit = model.config.full_chunk_limit
    allocated = {}
    real = model.encode_cache
    for frames in (8, 16, 32, 64):
        caches = []

        def recording(*args, **kwargs):
            cache = real(*args, **kwargs)
            caches.append((cache.allocated_bytes, cache.storage[0][0].data_ptr()))
            return cache

        model.encode_cache = recording
        alive: List[weakref.ref] = []
        try:
            for index, chunk in sample_far_chunks(model, SeededNoise((1, frames, 4, 8, 8), 13), text, num_steps=1,
                                                  context_window=3, sink_frames=1):
                alive.append(weakref.ref(chunk))
                del chunk  # (no cycles hold a tensor: it goes with its last reference)
                held = [i for i, ref in enumerate(alive) if ref() is not None]
                assert held == list(range(max(0, index - limit + 1), index + 1)), (frames, index, held)
        finally:
            del model.encode_cache
        assert len({ptr for _, ptr in caches}) == 1  # allocated once, written in place
        allocated[frames] = max(nbytes for nbytes, _ in caches)
    assert len(set(allocated.values())) == 1, allocated
    window = ContextWindow(3, 1, 2)
    assert allocated[8] == window.capacity((4, 16), limit) * 2 * 2 * 32 * 4  # layers x (k, v) x width x fp32


# ---- positions past the table ----------------------------------------------------------------------------------

def with_table(model, table: int):
    """The same weights with a RoPE table of ``table`` positions."""
    other = AnyFlowFARTransformer3DModel(AnyFlowFARConfig(**{**model.config.to_dict(), "rope_max_seq_len": table}))
    other.load_state_dict(model.state_dict())
    return other.eval()


@pytest.mark.slow
@pytest.mark.parametrize("window,sink", [(3, 0), (3, 1), (None, 0)], ids=["window", "window_and_sink", "unbounded"])
def test_rebased_positions_equal_absolute_ones(window, sink):
    """A table of 12 positions makes the cache re-base several times over 40 frames; the table of 1024 holds them
    all at their absolute positions. Every token in attention keeps its distances: the same video."""
    model = far_model(7)
    small = with_table(model, 12)
    noise, text = draw(1, 40, 4, 8, 8, seed=14), draw(1, 5, 24, seed=15)
    bases = []
    real = small.encode_cache

    def recording(*args, **kwargs):
        cache = real(*args, **kwargs)
        bases.append(cache.position_base)
        return cache

    small.encode_cache = recording
    rebased = sample_far(small, noise, text, num_steps=2, context_window=window, sink_frames=sink)
    absolute = sample_far(model, noise, text, num_steps=2, context_window=window, sink_frames=sink)
    assert len(set(bases)) >= 3  # re-based at least twice
    assert error(rebased, absolute) <= FP32_BAR


@pytest.mark.slow
def test_a_step_after_a_rebase_sees_the_same_attention():
    """At the level of one step: a cache whose positions were re-based gives the velocity of one that was not."""
    model = far_model(8)
    latents, text = draw(1, 16, 4, 8, 8, seed=16), draw(1, 5, 24, seed=17)
    partition = (1,) + (2,) * 7 + (1,)
    window = ContextWindow(4, 1, 2)
    with torch.no_grad():
        velocities, bases = [], []
        for table in (1024, 14):
            other = with_table(model, table)
            context = other.prepare_context(text)
            cache = windowed_cache(other, latents, partition, len(partition) - 1, context, window)
            bases.append(cache.position_base)
            velocities.append(other.step(latents[:, -1:], 700.0, 300.0, context, cache))
        assert bases[0] == 0 and bases[1] > 0
        assert error(velocities[1], velocities[0]) <= FP32_BAR


@pytest.mark.slow
def test_two_thousand_latent_frames_run():
    """8,000 video frames with a window, at a tiny size: positions re-based past the 1,024 of the table."""
    model = far_model(9, chunk_partition=(1, 3, 3, 3, 3, 3, 3, 2))
    text = draw(1, 5, 24, seed=18)
    last = None
    for index, chunk in sample_far_chunks(model, SeededNoise((1, 2000, 4, 8, 8), 19), text, num_steps=1,
                                          context_window=12, sink_frames=1):
        last = (index, chunk)
    assert last[0] == len(model.config.chunk_partition_for(2000)) - 1 and torch.isfinite(last[1]).all()


# ---- a prompt that changes ------------------------------------------------------------------------------------

def windowed_cache(model, latents, partition, chunks, text, window):
    cache = None
    for n in range(1, chunks + 1):
        cache = model.encode_cache(latents[:, :sum(partition[:n])], partition[:n], text, cache,
                                   reserve_frames=partition[n], window=window if cache is None else None)
    return cache


@pytest.mark.slow
@pytest.mark.parametrize("sink", [0, 1])
def test_a_prompt_switch_equals_a_fresh_encode_under_the_new_prompt(sink):
    """The cache encoded again under the new text: the next step equals the masked reference over the frames the
    cache holds (at their positions, each chunk's kept frames seeing those of the chunks before it), under the new
    text; without a sink those frames are one run, and it equals a fresh unbounded encode of them too."""
    model = far_model(10)
    partition = (1,) + (2,) * 7 + (1,)
    latents, old, new = draw(1, 16, 4, 8, 8, seed=20), draw(1, 5, 24, seed=21), draw(1, 5, 24, seed=22)
    chunks = len(partition) - 1  # the last chunk is made after the switch
    with torch.no_grad():
        cache = windowed_cache(model, latents, partition, chunks, model.prepare_context(old), ContextWindow(3, sink, 2))
        runs = cache.held_frames()
        held = [f for start, stop in runs for f in range(start, stop)]
        assert held[0] == 0 if sink else held[0] > 0
        switched = model.reencode_cache(cache, latents[:, held], new)
        chunk, (t, r) = latents[:, 15:], (800.0, 200.0)
        velocity = model.step(chunk, t, r, new, switched)

        frames = held + [15]
        chunk_of = {f: i for i, size in enumerate(partition) for f in range(sum(partition[:i]), sum(partition[:i + 1]))}
        compressed = [f < cache.compressed_frames for f in frames]
        allowed = torch.tensor([[chunk_of[k] <= chunk_of[q] for k in frames] for q in frames])
        times = [torch.tensor([[0.0] * len(held) + [value]]) for value in (t, r)]
        expected = masked_velocity(model, latents[:, frames], compressed, frames, allowed, *times, new, 1)
        assert error(velocity, expected) <= FP32_BAR
        if not sink:
            first = held[0]
            kept = [min(stop, 15) - max(start, first) for start, stop in
                    ((sum(partition[:i]), sum(partition[:i + 1])) for i in range(chunks)) if stop > first]
            fresh = model.encode_cache(latents[:, first:15], kept, new, reserve_frames=1)
            assert error(model.step(chunk, t, r, new, fresh), expected) <= FP32_BAR


@pytest.mark.slow
def test_a_prompt_schedule_changes_the_video_from_its_chunk_on():
    model = far_model(11)
    noise, old, new = draw(1, 12, 4, 8, 8, seed=23), draw(1, 5, 24, seed=24), draw(1, 5, 24, seed=25)
    plain = sample_far(model, noise, old, num_steps=2, context_window=3, sink_frames=1)
    switched = sample_far(model, noise, old, num_steps=2, context_window=3, sink_frames=1, prompt_schedule=[(3, new)])
    start = sum(model.config.chunk_partition_for(12)[:3])
    assert torch.equal(switched[:, :start], plain[:, :start])  # the same computation up to the switch
    assert error(switched[:, start:], plain[:, start:]) > 1e-2


# ---- bad input ------------------------------------------------------------------------------------------------

BAD = {
    "window smaller than a chunk": (dict(context_window=1), r"context_window 1 is smaller than a chunk \(2 latent "
                                                            r"frames\): a chunk ages into the compressed context whole"),
    "negative sink": (dict(context_window=2, sink_frames=-1), r"sink_frames must be an int >= 0"),
    "sink larger than the window": (dict(context_window=2, sink_frames=3), r"sink_frames 3 is larger than "
                                                                           r"context_window 2"),
    "sink without a window": (dict(sink_frames=1), r"sink_frames 1 needs context_window"),
    "window without incremental refresh": (dict(context_window=2, incremental_cache=False),
                                           r"context_window: a windowed cache is refreshed incrementally"),
    "window past the table": (dict(context_window=1100), r"context_window 1100: with 3 chunks of 2 frames at full "
                                                         r"resolution, attention spans 1106 frames, past rope_max_seq_len"),
    "schedule out of order": (dict(prompt_schedule=[(3, "new"), (2, "new")]), r"prompt_schedule: chunk 2 comes after "
                                                                              r"chunk 3; give the switches in order"),
    "schedule past the end": (dict(prompt_schedule=[(5, "new")]), r"prompt_schedule: chunk 5 is past the end: the video "
                                                                  r"has 5 chunks \(0 to 4\)"),
    "schedule at the start": (dict(prompt_schedule=[(0, "new")]), r"prompt_schedule: chunk 0: switches start at chunk 1"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_long_video_input_is_one_clear_error_before_any_work(case, monkeypatch):
    model = far_model(12)
    kwargs, message = BAD[case]
    new = draw(1, 5, 24, seed=26)
    if "prompt_schedule" in kwargs:
        kwargs = dict(prompt_schedule=[(chunk, new) for chunk, _ in kwargs["prompt_schedule"]])
    monkeypatch.setattr(model, "step", lambda *a, **k: pytest.fail("work started before the checks"))
    with pytest.raises(ValueError, match=message):
        sample_far_chunks(model, draw(1, 8, 4, 8, 8, seed=27), draw(1, 5, 24, seed=28), **kwargs)


# ---- the pipeline and anyflow generate --------------------------------------------------------------------------

PROMPT = "A fox runs through the snow"


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    from snapshot_fixtures import make_tiny_snapshot

    return make_tiny_snapshot(tmp_path_factory.mktemp("far") / "snapshot", far=True)


@pytest.mark.slow
def test_the_pipeline_streams_a_long_video_with_a_prompt_schedule(snapshot):
    from anyflow import VideoPipeline

    pipe = VideoPipeline.from_pretrained(snapshot)
    run = dict(num_frames=29, height=64, width=64, num_steps=1, seed=3, context_window=2, sink_frames=1)
    pieces = list(pipe.stream(PROMPT, **run))
    partition = pipe.transformer.config.chunk_partition_for(8)  # 29 frames: 8 latent frames, 1 2 2 2 1
    assert [p.shape[1] for p in pieces] == [1] + [4 * n for n in partition[1:]]
    whole = pipe(PROMPT, **run)
    assert whole.shape == (1, 29, 64, 64, 3) and torch.equal(torch.cat(pieces, dim=1), whole)
    scheduled = pipe(prompt_schedule=[(0, PROMPT), (3, "A fox jumps over a log")], output="latents", **run)
    plain = pipe(PROMPT, output="latents", **run)
    start = sum(partition[:3])
    assert error(scheduled[:, :start], plain[:, :start]) <= FP32_BAR  # the prompts encoded in one pass: a batch of 2
    assert error(scheduled[:, start:], plain[:, start:]) > 1e-3  # (a tiny random text encoder: a small change)


@pytest.mark.slow
def test_generate_writes_a_long_video_chunk_by_chunk(snapshot, tmp_path, capsys):
    from safetensors.torch import load_file

    from anyflow import VideoPipeline
    from anyflow.cli import main
    from anyflow.pipeline.video_io import read_frames
    from support import assert_same_run

    schedule = tmp_path / "schedule.txt"
    schedule.write_text(f"# a fox\n0: {PROMPT}\n\n4: A fox jumps over a log\n")
    out, latents = tmp_path / "long.mp4", tmp_path / "long.safetensors"
    assert main(["generate", "--model", snapshot, "--prompt-schedule", str(schedule), "--frames", "45", "--height",
                 "128", "--width", "128", "--steps", "1", "--device", "cpu", "--context-window", "2", "--sink-frames",
                 "1", "--seed", "3", "--out", str(out), "--save-latents", str(latents)]) == 0
    printed = capsys.readouterr().out
    assert "--frames 45: 12 latent frames (45 video frames) go past the 5 (17 video frames) this checkpoint was " \
           "trained on" in printed.splitlines()[0]
    assert "decoded frames 42-45" in printed
    assert read_frames(str(out)).shape == (45, 128, 128, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.mp4", "long.safetensors", "schedule.txt"]
    pipe = VideoPipeline.from_pretrained(snapshot)
    expected = pipe(prompt_schedule=[(0, PROMPT), (4, "A fox jumps over a log")], num_frames=45, height=128,
                    width=128, num_steps=1, seed=3, context_window=2, sink_frames=1, output="latents")
    assert_same_run(load_file(str(latents))["latents"], expected.transpose(1, 2))


GENERATE_BAD = {
    "frames": (["--frames", "46"], r"--frames must be 4k \+ 1"),
    "window smaller than a chunk": (["--context-window", "1"], r"--context-window 1 is smaller than a chunk"),
    "negative sink": (["--context-window", "2", "--sink-frames", "-1"], r"--sink-frames must be an int >= 0"),
    "sink larger than the window": (["--context-window", "2", "--sink-frames", "3"],
                                    r"--sink-frames 3 is larger than --context-window 2"),
    "schedule out of order": (["--prompt-schedule", "{tmp}/order.txt"], r"--prompt-schedule .*order.txt line 3: chunk 2 "
                                                                      r"comes after chunk 4; give the chunks in increasing"),
    "schedule past the end": (["--prompt-schedule", "{tmp}/past.txt"], r"--prompt-schedule .*past.txt line 2: chunk 7 is "
                                                                     r"past the end: --frames 45 makes 7 chunks \(0 to 6"),
    "schedule not from 0": (["--prompt-schedule", "{tmp}/late.txt"], r"--prompt-schedule .*late.txt line 1: the first "
                                                                    r"prompt is chunk 0's"),
    "schedule line": (["--prompt-schedule", "{tmp}/line.txt"], r"--prompt-schedule .*line.txt line 1: expected 'CHUNK: "
                                                              r"prompt'"),
}


@pytest.mark.parametrize("case", sorted(GENERATE_BAD))
def test_generate_refuses_bad_long_video_options_in_one_line_before_loading(snapshot, tmp_path, capsys, monkeypatch,
                                                                            case):
    from anyflow import VideoPipeline
    from anyflow.cli import main

    monkeypatch.setattr(VideoPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded before the checks"))
    for name, text in (("order", "0: a\n4: b\n2: c\n"), ("past", "0: a\n7: b\n"), ("late", "1: a\n"),
                       ("line", "a fox\n")):
        (tmp_path / f"{name}.txt").write_text(text)
    extra, message = GENERATE_BAD[case]
    prompt = [] if "--prompt-schedule" in extra else ["--prompt", PROMPT]
    args = ["generate", "--model", snapshot, *prompt, "--frames", "45", "--height", "128", "--width", "128",
            "--device", "cpu", "--out", str(tmp_path / "v.mp4")] + [a.format(tmp=tmp_path) for a in extra]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("anyflow generate: error: ") and re.search(message, err[0]), err
    assert not (tmp_path / "v.mp4").exists()
