"""The FAR (frame-autoregressive) model against diffusers' AnyFlowFARTransformer3DModel and AnyFlowFARPipeline.

Diffusers' cached step pads q, k and v with zeros to a multiple of 128 tokens and attends without
a mask, so the zero keys enter its softmax; the authors' code, and ours, attend without padding.
Where no padding occurs (chunks of a multiple of 128 tokens) ours equals diffusers as it is;
elsewhere it equals diffusers with the padding taken out (its padding length forced to 0), and
differs from diffusers as it is (shown, not hidden).
"""

from __future__ import annotations

import json
import types
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from anyflow import AnyFlowFARConfig, AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel, sample_far
from weights_convert import CheckpointError, convert, convert_state_dict, open_checkpoint
from weights_convert.cli import main as convert_main
from weights_convert.safetensors_io import write_file

from support import SMALL, randomize_, require_oracle

pytestmark = pytest.mark.reference  # compares with the oracle: rerun by CI without SIMD kernels

FP32_BAR = 1e-5  # max|ours - oracle| <= FP32_BAR * max|oracle|


def far_config(**overrides) -> AnyFlowFARConfig:
    return AnyFlowFARConfig(**{**SMALL, "chunk_partition": (1, 2, 2, 2, 1), **overrides})


def oracle_and_ours(config: AnyFlowFARConfig, seed: int = 0):
    Oracle = require_oracle("AnyFlowFARTransformer3DModel")
    oracle = Oracle(**config.to_dict()).eval()
    randomize_(oracle, seed)
    ours = AnyFlowFARTransformer3DModel(config).eval()
    ours.load_state_dict(convert_state_dict(oracle.state_dict()), strict=True)
    return oracle, ours


def error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


def inputs(config, batch, frames, height, width, seed, image_len=4):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, frames, config.in_channels, height, width, generator=gen)
    t = 1000 * torch.rand(batch, frames, generator=gen)
    r = t * torch.rand(batch, frames, generator=gen)
    text = torch.randn(batch, 5, config.text_dim, generator=gen)
    image = None if config.image_dim is None else torch.randn(batch, image_len, config.image_dim, generator=gen)
    return latents, t, r, text, image


# ---- the rollout without cache (training) ---------------------------------------------------------

ROLLOUTS = {
    "one_chunk": (dict(chunk_partition=(3,)), (8, 8)),
    "compressed_reached": (dict(), (8, 8)),
    "released_split": (dict(chunk_partition=(1, 3, 3, 3, 3, 3, 3, 2)), (8, 8)),
    "limit_1": (dict(chunk_partition=(1, 1, 2), full_chunk_limit=1), (8, 8)),
    "limit_2_non_square": (dict(chunk_partition=(2, 1, 2, 1), full_chunk_limit=2), (8, 16)),
    "t_minus_r_with_image": (dict(deltatime_type="t-r", image_dim=20), (8, 8)),
    "head_dim_64": (dict(num_attention_heads=1, attention_head_dim=64, ffn_dim=40), (8, 8)),
    "compressed_1x2x4": (dict(compressed_patch_size=(1, 2, 4)), (8, 16)),
}


@pytest.mark.parametrize("clean", [False, True], ids=["noisy", "with_clean_copies"])
@pytest.mark.parametrize("case", sorted(ROLLOUTS))
def test_rollout_equals_the_oracle(case, clean):
    overrides, (height, width) = ROLLOUTS[case]
    config = far_config(**overrides)
    oracle, ours = oracle_and_ours(config, seed=len(case))
    frames = sum(config.chunk_partition)
    latents, t, r, text, image = inputs(config, 2, frames, height, width, seed=1)
    kwargs = {}
    full_frames = sum(config.chunk_partition[max(0, len(config.chunk_partition) - config.full_chunk_limit):])
    if clean:
        gen = torch.Generator().manual_seed(2)
        kwargs = dict(clean_hidden_states=torch.randn(2, full_frames, config.in_channels, height, width, generator=gen),
                      clean_timestep=torch.full((2, full_frames), 0.0))
    with torch.no_grad():
        expected = oracle(latents, t, r, text, chunk_partition=list(config.chunk_partition),
                          encoder_hidden_states_image=image, **kwargs).sample
        out = ours(latents, t, r, text, encoder_hidden_states_image=image, **kwargs).sample
    assert out.shape == expected.shape == (2, full_frames, config.in_channels, height, width)
    print(f"FAR rollout {case} {'clean' if clean else 'noisy'}: {error(out, expected):.2e}")
    assert error(out, expected) <= FP32_BAR


@pytest.mark.slow
def test_rollout_bf16_is_no_worse_than_the_oracles_bf16(tmp_path):
    Oracle = require_oracle("AnyFlowFARTransformer3DModel")
    config = far_config(num_attention_heads=2, attention_head_dim=64, ffn_dim=96)
    oracle, ours = oracle_and_ours(config, seed=3)
    oracle.save_pretrained(tmp_path)
    oracle_bf16 = Oracle.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    ours.to_dtype("bfloat16")
    latents, t, r, text, _ = inputs(config, 2, 8, 8, 8, seed=4)
    latents, text = latents.bfloat16(), text.bfloat16()
    partition = list(config.chunk_partition)
    with torch.no_grad():
        expected = oracle(latents.float(), t, r, text.float(), chunk_partition=partition).sample
        theirs = oracle_bf16(latents, t, r, text, chunk_partition=partition).sample
        out = ours(latents, t, r, text).sample
    assert out.dtype == torch.bfloat16
    ours_error = ((out.double() - expected.double()).norm() / expected.double().norm()).item()
    oracle_error = ((theirs.double() - expected.double()).norm() / expected.double().norm()).item()
    print(f"FAR bf16 rel L2: ours {ours_error:.3e}, oracle {oracle_error:.3e}")
    assert ours_error <= 1.1 * oracle_error


def test_rollout_gradients_with_and_without_checkpointing():
    config = far_config()
    ours = AnyFlowFARTransformer3DModel(config).train()
    randomize_(ours, 5)
    latents, t, r, text, _ = inputs(config, 1, 8, 8, 8, seed=5)
    clean = torch.randn(1, 5, 4, 8, 8)

    def gradients():
        ours.zero_grad()
        ours(latents, t, r, text, clean_hidden_states=clean).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters()}

    plain = gradients()
    ours.enable_gradient_checkpointing()
    checkpointed = gradients()
    assert plain["far_patch_embed.proj.weight"].abs().sum() > 0  # the compressed chunks take part
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


# ---- the sampler against AnyFlowFARPipeline ---------------------------------------------------------

def pipeline_latents(oracle, noise, text, partition, *, padding=True, given=None, **kwargs):
    """diffusers' AnyFlowFARPipeline on given latents and embeddings, (B, F, C, H, W); with
    ``padding=False`` its cached step's zero padding is taken out (the padding length forced to 0)."""
    from diffusers import AnyFlowFARPipeline, FlowMapEulerDiscreteScheduler
    import diffusers.models.transformers.transformer_anyflow_far as far_module

    pipe = AnyFlowFARPipeline(tokenizer=None, text_encoder=None, transformer=oracle, vae=None,
                              scheduler=FlowMapEulerDiscreteScheduler(shift=kwargs.pop("shift", 5.0)))
    pipe.set_progress_bar_config(disable=True)
    b, f, c, h, w = noise.shape
    unpadded = types.SimpleNamespace(ceil=lambda value: value)  # ceil(L / 128) * 128 - L == 0
    with torch.no_grad(), mock.patch.object(far_module, "math", far_module.math if padding else unpadded):
        out = pipe(prompt_embeds=text, latents=noise.transpose(1, 2), output_type="latent", height=8 * h, width=8 * w,
                   num_frames=4 * (f - 1) + 1, chunk_partition=list(partition),
                   **({} if given is None else {"video_latents": given}), **kwargs).frames
    return out.transpose(1, 2)


SAMPLES = {
    # name: (sample_far kwargs, pipeline kwargs, chunk_partition, given frames)
    "1_step": (dict(num_steps=1), dict(num_inference_steps=1), (1, 2, 2, 2, 1), 0),
    "2_steps": (dict(num_steps=2), dict(num_inference_steps=2), (1, 2, 2, 2, 1), 0),
    "4_steps": (dict(num_steps=4), dict(num_inference_steps=4), (1, 2, 2, 2, 1), 0),
    "custom_sigmas": (dict(sigmas=[1.0, 0.7, 0.3]), dict(sigmas=[1.0, 0.7, 0.3]), (1, 2, 2, 2, 1), 0),
    "raw_euler": (dict(num_steps=3, use_mean_velocity=False), dict(num_inference_steps=3, use_mean_velocity=False),
                  (1, 2, 2, 2, 1), 0),
    "image_to_video": (dict(num_steps=2), dict(num_inference_steps=2), (1, 2, 2, 2, 1), 1),
    "video_continuation": (dict(num_steps=2), dict(num_inference_steps=2), (1, 2, 2, 2, 1), 3),
    "two_chunks": (dict(num_steps=2), dict(num_inference_steps=2), (2, 1), 0),
}


def sampler_case(case, height, width):
    ours_kwargs, pipe_kwargs, partition, given = SAMPLES[case]
    config = far_config(chunk_partition=partition)
    oracle, ours = oracle_and_ours(config, seed=7)
    gen = torch.Generator().manual_seed(8)
    noise = torch.randn(1, sum(partition), config.in_channels, height, width, generator=gen)
    text = torch.randn(1, 5, config.text_dim, generator=gen)
    frames = torch.randn(1, given, config.in_channels, height, width, generator=gen) if given else None
    out = sample_far(ours, noise, text, context_latents=frames, **ours_kwargs)
    return oracle, noise, text, partition, frames, pipe_kwargs, out


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(SAMPLES))
def test_sampler_equals_the_pipeline_where_it_pads_nothing(case):
    """16 x 32 latents: 128 tokens a frame, so every chunk is a multiple of 128 tokens and diffusers pads nothing."""
    oracle, noise, text, partition, given, pipe_kwargs, out = sampler_case(case, 16, 32)
    expected = pipeline_latents(oracle, noise, text, partition, given=given, **pipe_kwargs)
    print(f"FAR sampler {case} (no padding): {error(out, expected):.2e}")
    assert error(out, expected) <= FP32_BAR
    if given is not None:
        assert torch.equal(out[:, :given.shape[1]], given)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["2_steps", "image_to_video", "video_continuation"])
def test_sampler_equals_the_pipeline_without_its_padding(case):
    """8 x 8 latents: 16 tokens a frame. Diffusers' cached step pads to 128 tokens and its zero keys
    enter the softmax; with that padding taken out it equals ours, as it is it does not."""
    oracle, noise, text, partition, given, pipe_kwargs, out = sampler_case(case, 8, 8)
    unpadded = pipeline_latents(oracle, noise, text, partition, padding=False, given=given, **pipe_kwargs)
    padded = pipeline_latents(oracle, noise, text, partition, given=given, **pipe_kwargs)
    print(f"FAR sampler {case}: vs unpadded {error(out, unpadded):.2e}, vs padded {error(out, padded):.2e}")
    assert error(out, unpadded) <= FP32_BAR
    assert error(out, padded) > 1e-3  # the deviation is real at this size (see the README for 480p)


# ---- the cache ------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("limit", [1, 2, 3])
def test_incremental_cache_equals_the_full_reencode_and_holds_what_is_needed(limit):
    config = far_config(full_chunk_limit=limit, chunk_partition=(1, 2, 1, 2, 2, 1))
    ours = AnyFlowFARTransformer3DModel(config).eval()
    randomize_(ours, 9)
    latents, _, _, text, _ = inputs(config, 2, 9, 8, 16, seed=9)
    partition = config.chunk_partition
    with torch.no_grad():
        context = ours.prepare_context(text)
        cache = None
        for n in range(1, len(partition) + 1):
            frames = sum(partition[:n])
            cache = ours.encode_cache(latents[:, :frames], partition[:n], context, cache)
            full = ours.encode_cache(latents[:, :frames], partition[:n], context)
            num_compressed = max(0, n - (limit - 1))
            assert (cache.num_compressed_chunks, cache.compressed_tokens) == (num_compressed, 8 * sum(partition[:num_compressed]))
            expected_tokens = 8 * sum(partition[:num_compressed]) + 32 * sum(partition[num_compressed:n])
            for (k, v), (k_full, v_full) in zip(cache.layers, full.layers):
                assert k.shape == v.shape == (2, expected_tokens, 2, 16)  # what is needed, no more
                assert error(k, k_full) <= FP32_BAR and error(v, v_full) <= FP32_BAR
    noise = torch.randn(1, 9, 4, 8, 16)
    assert error(sample_far(ours, noise, text[:1], num_steps=2),
                 sample_far(ours, noise, text[:1], num_steps=2, incremental_cache=False)) <= FP32_BAR


def test_step_and_the_rollout_agree_on_the_first_chunk():
    """With no cache the first chunk's step is the rollout of that chunk alone."""
    config = far_config()
    ours = AnyFlowFARTransformer3DModel(config).eval()
    randomize_(ours, 10)
    latents, t, r, text, _ = inputs(config, 1, 2, 8, 8, seed=10)
    with torch.no_grad():
        rollout = ours(latents, t, r, text, chunk_partition=(2,)).sample
        assert error(ours.step(latents, t, r, ours.prepare_context(text), None), rollout) <= FP32_BAR


def test_steps_write_into_the_room_in_place_keep_nothing_and_equal_the_rollout():
    """A step writes its chunk's keys and values into the room after the cached ones (no copy of the
    cache) and keeps nothing there; it equals the rollout of the cached frames at t = r = 0 followed by
    the chunk (the rollout's earlier chunks see only each other, as the cache's did)."""
    config = far_config(chunk_partition=(1, 2, 2, 2))  # the first chunk compressed once three are cached
    ours = AnyFlowFARTransformer3DModel(config).eval()
    randomize_(ours, 12)
    latents, _, _, text, _ = inputs(config, 1, 7, 8, 8, seed=12)
    with torch.no_grad():
        context = ours.prepare_context(text)
        cache = ours.encode_cache(latents[:, :5], (1, 2, 2), context, reserve_frames=2)
        assert cache.capacity == cache.num_tokens + 2 * 16  # room for the two-frame chunk, 16 tokens a frame
        where = [(k.data_ptr(), v.data_ptr()) for k, v in cache.storage]
        cached = [(k.clone(), v.clone()) for k, v in cache.layers]
        for t, r in ((900.0, 600.0), (600.0, 200.0)):
            velocity = ours.step(latents[:, 5:], t, r, context, cache)
            t_frames, r_frames = (torch.tensor([[0.0] * 5 + [value] * 2]) for value in (t, r))
            rollout = ours(latents, t_frames, r_frames, text, chunk_partition=(1, 2, 2, 2)).sample[:, -2:]
            assert error(velocity, rollout) <= FP32_BAR
        assert [(k.data_ptr(), v.data_ptr()) for k, v in cache.storage] == where  # written in place
        # the same memory read back: the steps left the cached keys and values as they were
        assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(cache.layers, cached))


def test_a_cache_without_room_grows_once_and_a_refresh_with_room_writes_in_place():
    config = far_config(chunk_partition=(1, 2, 2))
    ours = AnyFlowFARTransformer3DModel(config).eval()
    randomize_(ours, 13)
    latents, _, _, text, _ = inputs(config, 1, 5, 8, 8, seed=13)
    with torch.no_grad():
        context = ours.prepare_context(text)
        roomy = ours.encode_cache(latents[:, :3], (1, 2), context, reserve_frames=2)
        tight = ours.encode_cache(latents[:, :3], (1, 2), context)
        assert tight.capacity == tight.num_tokens == 3 * 16
        expected = ours.step(latents[:, 3:], 700.0, 100.0, context, roomy)
        assert error(ours.step(latents[:, 3:], 700.0, 100.0, context, tight), expected) <= FP32_BAR
        where = [k.data_ptr() for k, _ in tight.storage]
        assert tight.capacity == 5 * 16  # grown to fit the chunk, once: the next step writes in place
        ours.step(latents[:, 3:], 300.0, 0.0, context, tight)
        assert [k.data_ptr() for k, _ in tight.storage] == where
        first = ours.encode_cache(latents[:, :1], (1,), context, reserve_frames=4)
        where = [k.data_ptr() for k, _ in first.storage]
        refreshed = ours.encode_cache(latents[:, :3], (1, 2), context, first)
        assert [k.data_ptr() for k, _ in refreshed.storage] == where  # the room held the refresh: no new storage
        for (k, v), (k_full, v_full) in zip(refreshed.layers, roomy.layers):
            assert error(k, k_full) <= FP32_BAR and error(v, v_full) <= FP32_BAR


# ---- bad input ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    model = AnyFlowFARTransformer3DModel(far_config()).eval()
    randomize_(model, 11)
    return model


FAR_BAD = {
    "partition sum": (lambda m: m(torch.zeros(1, 7, 4, 8, 8), 500, 250, torch.zeros(1, 3, 24)),
                      r"chunk_partition \[1, 2, 2, 2, 1\] sums to 8 latent frames, the video has 7"),
    "partition zero": (lambda m: m(torch.zeros(1, 3, 4, 8, 8), 500, 250, torch.zeros(1, 3, 24), chunk_partition=[3, 0]),
                       r"chunk_partition must be a non-empty list of positive ints, got \[3, 0\]"),
    "compressed grid": (lambda m: m(torch.zeros(1, 8, 4, 8, 6), 500, 250, torch.zeros(1, 3, 24)),
                        r"8x6 is not divisible by the compressed patch 4x4"),
    "clean shape": (lambda m: m(torch.zeros(1, 8, 4, 8, 8), 500, 250, torch.zeros(1, 3, 24),
                                clean_hidden_states=torch.zeros(1, 8, 4, 8, 8)),
                    r"clean_hidden_states must be \(B, F_full, C, H, W\) = \(1, 5, 4, 8, 8\)"),
    "clean timestep alone": (lambda m: m(torch.zeros(1, 8, 4, 8, 8), 500, 250, torch.zeros(1, 3, 24), clean_timestep=0),
                             r"clean_timestep was given without clean_hidden_states"),
    "sample partition": (lambda m: sample_far(m, torch.zeros(1, 6, 4, 8, 8), torch.zeros(1, 3, 24),
                                              chunk_partition=[1, 2, 2, 2, 1]),
                         r"chunk_partition \[1, 2, 2, 2, 1\] sums to 8 latent frames, the video has 6"),
    "too many given": (lambda m: sample_far(m, torch.zeros(1, 8, 4, 8, 8), torch.zeros(1, 3, 24),
                                            context_latents=torch.zeros(1, 8, 4, 8, 8)),
                       r"context_latents gives 8 frames but the video has 8: nothing would be generated"),
    "given not a chunk": (lambda m: sample_far(m, torch.zeros(1, 8, 4, 8, 8), torch.zeros(1, 3, 24),
                                               context_latents=torch.zeros(1, 2, 4, 8, 8)),
                          r"context_latents gives 2 frames, which do not fill whole chunks \(chunks end after frames "
                          r"\[1, 3, 5, 7\]\)"),
    "given size": (lambda m: sample_far(m, torch.zeros(1, 8, 4, 8, 8), torch.zeros(1, 3, 24),
                                        context_latents=torch.zeros(1, 1, 4, 8, 16)),
                   r"context_latents must be \(B=1, K, C=4, H=8, W=8\), got \(1, 1, 4, 8, 16\)"),
    "cache for other latents": (lambda m: m.step(torch.zeros(1, 2, 4, 8, 16), 500, 250, torch.zeros(1, 3, 24),
                                                 m.encode_cache(torch.zeros(1, 1, 4, 8, 8), [1], torch.zeros(1, 3, 24))),
                                r"the cache was made for batch 1 and latents \(8, 8\), the chunk is batch 1 and \(8, 16\)"),
    "cache of other chunks": (lambda m: m.encode_cache(torch.zeros(1, 3, 4, 8, 8), [2, 1], torch.zeros(1, 3, 24),
                                                       m.encode_cache(torch.zeros(1, 1, 4, 8, 8), [1], torch.zeros(1, 3, 24))),
                              r"the cache holds chunks \[1\], which do not begin chunk_partition \[2, 1\]"),
    "reserve frames": (lambda m: m.encode_cache(torch.zeros(1, 1, 4, 8, 8), [1], torch.zeros(1, 3, 24), reserve_frames=-1),
                       r"reserve_frames must be an int >= 0 \(frames of room after the cached ones\), got -1"),
    "spent cache": (lambda m: refresh_then_step_with_the_old_cache(m),
                    r"this FarKVCache was refreshed by encode_cache, which took its storage over; use the cache that "
                    r"encode_cache returned"),
}


def refresh_then_step_with_the_old_cache(model):
    text = torch.zeros(1, 3, 24)
    old = model.encode_cache(torch.zeros(1, 1, 4, 8, 8), [1], text)
    model.encode_cache(torch.zeros(1, 3, 4, 8, 8), [1, 2], text, old)
    model.step(torch.zeros(1, 2, 4, 8, 8), 500, 250, text, old)


@pytest.mark.parametrize("case", sorted(FAR_BAD))
def test_bad_input_is_one_clear_error(tiny, case):
    call, message = FAR_BAD[case]
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        call(tiny)


def test_far_config_refuses_what_cannot_work():
    for kwargs, message in [(dict(compressed_patch_size=(2, 4, 4)), r"temporal patch of 1"),
                            (dict(compressed_patch_size=(1, 3, 4)), r"multiple of patch_size \(1, 2, 2\)"),
                            (dict(full_chunk_limit=0), r"full_chunk_limit must be a positive int, got 0"),
                            (dict(chunk_partition=()), r"chunk_partition must be a non-empty list")]:
        with pytest.raises(ValueError, match=message):
            far_config(**kwargs)


# ---- checkpoints ----------------------------------------------------------------------------------

HEAD_128 = dict(num_attention_heads=1, attention_head_dim=128, ffn_dim=48)  # the released head dim


def test_far_checkpoints_convert_both_ways_and_from_an_authors_pt(tmp_path):
    FarOracle = require_oracle("AnyFlowFARTransformer3DModel")
    config = far_config(**HEAD_128)
    oracle, _ = oracle_and_ours(config, seed=12)
    oracle.save_pretrained(tmp_path / "hub", max_shard_size="100KB")
    latents, t, r, text, _ = inputs(config, 1, 8, 8, 8, seed=12)
    with torch.no_grad():
        expected = oracle(latents, t, r, text, chunk_partition=list(config.chunk_partition)).sample
    assert open_checkpoint(str(tmp_path / "hub")).config == config

    convert(str(tmp_path / "hub"), str(tmp_path / "ours"), progress=None)
    convert(str(tmp_path / "ours"), str(tmp_path / "back"), to="diffusers", progress=None)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["_class_name"] == "AnyFlowFARTransformer3DModel"
    with torch.no_grad():
        assert torch.equal(FarOracle.from_pretrained(str(tmp_path / "back")).eval()(
            latents, t, r, text, chunk_partition=list(config.chunk_partition)).sample, expected)

    (tmp_path / "run").mkdir()  # width 128 is no released model's: the .pt needs its config.json beside it
    torch.save({"ema": oracle.state_dict(), "step": 10}, tmp_path / "run" / "far.pt")
    (tmp_path / "run" / "config.json").write_text(json.dumps(config.to_dict()))
    with pytest.raises(CheckpointError, match="width 128 is no released model's"):
        open_checkpoint(str(tmp_path / "run" / "far.pt"))
    assert open_checkpoint(str(tmp_path / "run")).config == config
    model = AnyFlowFARTransformer3DModel.from_pretrained(str(tmp_path / "run"))
    with torch.no_grad():
        assert error(model(latents, t, r, text, chunk_partition=config.chunk_partition).sample, expected) <= FP32_BAR


@pytest.mark.parametrize("source", ["anyflow", "wan"])
def test_far_warm_start_resamples_the_patch_embedding_as_the_authors_do(tmp_path, capsys, source):
    Base = require_oracle("AnyFlowTransformer3DModel" if source == "anyflow" else "WanTransformer3DModel")
    config = {**SMALL, **HEAD_128}
    base = Base(**config).eval()
    randomize_(base, 13)
    base.save_pretrained(tmp_path / "base")
    assert convert_main([str(tmp_path / "base"), str(tmp_path / "far"), "--far", "--dtype", "bfloat16"]) == 0
    assert "FAR warm start: compressed patch embedding resampled from the full one" in capsys.readouterr().out
    model = AnyFlowFARTransformer3DModel.from_pretrained(str(tmp_path / "far"))
    assert model.config == AnyFlowFARConfig(**config) and model.dtype == torch.bfloat16
    kernel = base.patch_embedding.weight.detach()  # (D, C, 1, 2, 2): the authors' setup_far_model
    resampled = F.interpolate(kernel.view(-1, 1, 1, 2, 2), size=(1, 4, 4), mode="trilinear", align_corners=False)
    assert torch.equal(model.far_patch_embed.proj.weight, resampled.view(*kernel.shape[:2], 1, 4, 4).bfloat16())
    assert torch.equal(model.far_patch_embed.proj.bias, base.patch_embedding.bias.detach().bfloat16())
    with pytest.raises(ValueError, match="an AnyFlow FAR .*load it with AnyFlowFARTransformer3DModel"):
        AnyFlowTransformer3DModel.from_pretrained(str(tmp_path / "far"))
    assert convert_main([str(tmp_path / "far"), str(tmp_path / "again"), "--far"]) == 1
    assert "already an AnyFlow FAR checkpoint" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"bidirectional checkpoint; load it with AnyFlowTransformer3DModel \(or warm-start"):
        AnyFlowFARTransformer3DModel.from_pretrained(str(tmp_path / "base"))


def test_which_model_a_config_describes(tmp_path):
    """A config that names its class (or sets init_far_model) must agree with the weights; one written
    by hand that says neither is read as the model the weights are."""
    _, ours = oracle_and_ours(far_config(**HEAD_128), seed=14)
    state = {k: v.contiguous() for k, v in ours.state_dict().items()}
    far_config_dict = AnyFlowFARConfig(**{**SMALL, **HEAD_128}).to_dict()

    def checkpoint(name, tensors, config):
        (tmp_path / name).mkdir()
        write_file(str(tmp_path / name / "model.safetensors"), sorted(tensors.items()))
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        return str(tmp_path / name)

    bidirectional = {k: v for k, v in state.items() if not k.startswith("far_patch_embed")}
    assert isinstance(open_checkpoint(checkpoint("far", state, far_config_dict)).config, AnyFlowFARConfig)
    read = open_checkpoint(checkpoint("bi", bidirectional, far_config_dict))
    assert type(read.config).__name__ == "AnyFlowConfig" and read.config_set_aside["full_chunk_limit"] == 3
    with pytest.raises(CheckpointError, match="describes the FAR model, but the weights have no far_patch_embedding"):
        open_checkpoint(checkpoint("bi_named", bidirectional,
                                   {"_class_name": "AnyFlowFARTransformer3DModel", **far_config_dict}))
