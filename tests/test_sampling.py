"""The any-step sampler against diffusers' AnyFlowPipeline (FlowMapEulerDiscreteScheduler), and its checks."""

from __future__ import annotations

import pytest
import torch

from anyflow import flow_map_sigmas, sample, sample_far
from anyflow.sampling import steps_to_run

from support import oracle_and_ours, randomize_, small_config

pytestmark = pytest.mark.reference  # compares with the oracle: rerun by CI without SIMD kernels

BAR = 1e-5  # max|ours - pipeline| <= BAR * max|pipeline|


def pipeline_latents(oracle, noise, text, *, shift=5.0, **kwargs):
    """Run the real AnyFlowPipeline on given latents and embeddings; (B, F, C, H, W) out."""
    from diffusers import AnyFlowPipeline, FlowMapEulerDiscreteScheduler

    pipe = AnyFlowPipeline(tokenizer=None, text_encoder=None, transformer=oracle, vae=None,
                           scheduler=FlowMapEulerDiscreteScheduler(shift=shift))
    pipe.set_progress_bar_config(disable=True)
    b, f, c, h, w = noise.shape
    with torch.no_grad():
        out = pipe(prompt_embeds=text, latents=noise.transpose(1, 2), output_type="latent",
                   height=8 * h, width=8 * w, num_frames=4 * (f - 1) + 1, **kwargs).frames
    return out.transpose(1, 2)


CASES = {
    "1_step": (dict(num_steps=1), dict(num_inference_steps=1)),
    "2_steps": (dict(num_steps=2), dict(num_inference_steps=2)),
    "4_steps": (dict(num_steps=4), dict(num_inference_steps=4)),
    "7_steps": (dict(num_steps=7), dict(num_inference_steps=7)),
    "custom_sigmas": (dict(sigmas=[1.0, 0.8, 0.35, 0.1]), dict(sigmas=[1.0, 0.8, 0.35, 0.1])),
    "shift_1": (dict(num_steps=3, shift=1.0), dict(num_inference_steps=3, shift=1.0)),
    "raw_euler": (dict(num_steps=4, use_mean_velocity=False), dict(num_inference_steps=4, use_mean_velocity=False)),
    "guidance_3": (dict(num_steps=2, guidance_scale=3.0, negative=True),
                   dict(num_inference_steps=2, guidance_scale=3.0, negative=True)),
    "context_frame": (dict(num_steps=3, context=1), dict(num_inference_steps=3, context=1)),
    # (the pipeline itself fails on context frames together with guidance: it writes B context
    # latents into the 2B guided batch, so that combination has no reference)
    "context_raw_euler": (dict(num_steps=2, context=2, use_mean_velocity=False),
                          dict(num_inference_steps=2, context=2, use_mean_velocity=False)),
}


@pytest.mark.parametrize("deltatime_type", ["r", "t-r"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_sampler_equals_the_pipeline(oracle_cls, case, deltatime_type):
    ours_kwargs, pipe_kwargs = (dict(d) for d in CASES[case])
    config = small_config(deltatime_type=deltatime_type)
    oracle, model = oracle_and_ours(oracle_cls, config, seed=5)
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(2, 4, config.in_channels, 8, 6, generator=gen)
    text = torch.randn(2, 7, config.text_dim, generator=gen)
    negative = torch.randn(2, 7, config.text_dim, generator=gen)
    context = torch.randn(2, 4, config.in_channels, 8, 6, generator=gen)
    if ours_kwargs.pop("negative", False):
        ours_kwargs["negative_encoder_hidden_states"] = negative
        pipe_kwargs.pop("negative")
        pipe_kwargs["negative_prompt_embeds"] = negative
    if "context" in ours_kwargs:
        k = ours_kwargs.pop("context")
        ours_kwargs["context_latents"] = context[:, :k]
        pipe_kwargs.pop("context")
        pipe_kwargs["video_latents"] = context[:, :k]
    ref = pipeline_latents(oracle, noise, text, **pipe_kwargs)
    out = sample(model, noise, text, **ours_kwargs)
    error = ((out - ref).abs().max() / ref.abs().max()).item()
    print(f"sampler parity {case} ({deltatime_type}): {error:.2e}")
    assert error <= BAR
    if "context_latents" in ours_kwargs:
        k = ours_kwargs["context_latents"].shape[1]
        assert torch.equal(out[:, :k], context[:, :k])


def test_schedule_is_shifted_with_a_terminal_zero():
    s = flow_map_sigmas(4, shift=5.0)
    base = torch.tensor([1.0, 0.75, 0.5, 0.25], dtype=torch.float64)
    assert torch.allclose(s, torch.cat([5 * base / (1 + 4 * base), torch.zeros(1, dtype=torch.float64)]))
    assert flow_map_sigmas(sigmas=[0.9, 0.2], shift=1.0).tolist() == [0.9, 0.2, 0.0]


def test_noise_is_not_modified_and_callback_sees_every_step():
    config = small_config()
    from anyflow import AnyFlowTransformer3DModel

    model = AnyFlowTransformer3DModel(config).eval()
    randomize_(model, 0)
    noise = torch.randn(1, 3, config.in_channels, 4, 4)
    before = noise.clone()
    seen = []
    sample(model, noise, torch.randn(1, 5, config.text_dim), num_steps=3, context_latents=torch.zeros(1, 1, 4, 4, 4),
           callback=lambda i, t, z: seen.append((i, round(t, 3), tuple(z.shape))))
    assert torch.equal(noise, before)
    assert [i for i, _, _ in seen] == [0, 1, 2] and seen[0][1] == 1000.0 and seen[0][2] == (1, 3, 4, 4, 4)


@pytest.fixture
def tiny_model():
    from anyflow import AnyFlowTransformer3DModel

    return AnyFlowTransformer3DModel(small_config()).eval()


BAD = {
    "zero steps": (dict(num_steps=0), r"num_steps must be an int from 1 to 1000 \(the models' timestep grid\), got 0"),
    "float steps": (dict(num_steps=2.5), r"num_steps must be an int from 1 to 1000 .*, got 2.5"),
    "too many steps": (dict(num_steps=100_000_000), r"num_steps must be an int from 1 to 1000 .*, got 100000000"),
    "too many sigmas": (dict(sigmas=[1 - i / 2000 for i in range(1001)]), r"sigmas gives 1001 steps; at most 1000"),
    "NaN noise": (dict(noise=torch.full((1, 3, 4, 8, 8), float("nan"))), r"noise has 768 NaN or infinite values"),
    "NaN text": (dict(text=torch.tensor(float("inf")).expand(1, 5, 24)), r"encoder_hidden_states has 120 NaN"),
    "NaN negative": (dict(guidance_scale=3.0, negative_encoder_hidden_states=torch.full((1, 5, 24), float("nan"))),
                     r"negative_encoder_hidden_states has 120 NaN or infinite values"),
    "NaN context latents": (dict(context_latents=torch.full((1, 1, 4, 8, 8), float("nan"))),
                            r"context_latents has 256 NaN or infinite values"),
    "increasing sigmas": (dict(sigmas=[0.5, 0.8]), r"sigmas must be strictly decreasing, got \[0.5, 0.8\]"),
    "repeated sigmas": (dict(sigmas=[0.5, 0.5]), r"strictly decreasing"),
    "sigma above 1": (dict(sigmas=[1.5, 0.2]), r"sigmas must lie in \[0, 1\], got \[1.5, 0.2\]"),
    "negative sigma": (dict(sigmas=[0.5, -0.1]), r"sigmas must lie in \[0, 1\]"),
    "bad shift": (dict(shift=0.0), r"shift must be a positive finite number, got 0.0"),
    "guidance without negative": (dict(guidance_scale=4.0), r"guidance_scale=4.0 needs negative_encoder_hidden_states"),
    "negative shape": (dict(guidance_scale=4.0, negative_encoder_hidden_states=torch.zeros(1, 6, 24)),
                       r"negative_encoder_hidden_states must be like encoder_hidden_states \(a tensor of shape \(1, 5, 24\)\), "
                       r"got a tensor of shape \(1, 6, 24\)"),
    "noise 4-D": (dict(noise=torch.zeros(1, 4, 8, 8)), r"noise must be a 5-D tensor \(B, F, C, H, W\), got \(1, 4, 8, 8\)"),
    "noise channels": (dict(noise=torch.zeros(1, 3, 5, 8, 8)), r"noise of shape \(1, 3, 5, 8, 8\) does not fit the model"),
    "noise odd width": (dict(noise=torch.zeros(1, 3, 4, 8, 7)), r"divisible by the patch 2x2"),
    "text width": (dict(text=torch.zeros(1, 5, 23)),
                   r"encoder_hidden_states must be \(B=1, S, text_dim=24\) or a PreparedContext, got \(1, 5, 23\)"),
    "text batch": (dict(text=torch.zeros(2, 5, 24)),
                   r"encoder_hidden_states must be \(B=1, S, text_dim=24\) or a PreparedContext, got \(2, 5, 24\)"),
    "sigmas without a step": (dict(sigmas=[0.0]), r"sigmas \[0.0\] give no step"),
    "context too long": (dict(context_latents=torch.zeros(1, 4, 4, 8, 8)), r"context_latents must be \(B=1, K, C=4, H=8, W=8\) with 1 <= K <= F=3"),
    "context size": (dict(context_latents=torch.zeros(1, 1, 4, 8, 6)), r"context_latents must be"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_sampling_input_names_the_argument(tiny_model, case):
    kwargs, message = BAD[case]
    kwargs = dict(kwargs)
    noise = kwargs.pop("noise", torch.zeros(1, 3, 4, 8, 8))
    text = kwargs.pop("text", torch.zeros(1, 5, 24))
    with pytest.raises(ValueError, match=message):
        sample(tiny_model, noise, text, **kwargs)


@pytest.mark.slow
def test_a_prepared_context_samples_like_the_embeddings_it_was_made_from(tiny_model):
    randomize_(tiny_model, 3)
    gen = torch.Generator().manual_seed(2)
    noise = torch.randn(2, 3, 4, 8, 8, generator=gen)
    text, negative = torch.randn(2, 5, 24, generator=gen), torch.randn(2, 5, 24, generator=gen)
    with torch.no_grad():
        prepared, prepared_negative = tiny_model.prepare_context(text), tiny_model.prepare_context(negative)
    assert torch.equal(sample(tiny_model, noise, prepared, num_steps=2), sample(tiny_model, noise, text, num_steps=2))
    guided = dict(num_steps=2, guidance_scale=3.0)
    assert torch.equal(sample(tiny_model, noise, prepared, negative_encoder_hidden_states=prepared_negative, **guided),
                       sample(tiny_model, noise, text, negative_encoder_hidden_states=negative, **guided))
    with pytest.raises(ValueError, match=r"must be like encoder_hidden_states \(a PreparedContext of batch 2\), got a tensor"):
        sample(tiny_model, noise, prepared, negative_encoder_hidden_states=negative, **guided)


def test_a_context_prepared_by_another_model_is_refused(tiny_model):
    from anyflow import AnyFlowTransformer3DModel

    noise, text = torch.zeros(1, 3, 4, 8, 8), torch.zeros(1, 5, 24)
    for other_config in (small_config(), small_config(num_layers=3), small_config(num_attention_heads=4)):
        with torch.no_grad():
            foreign = AnyFlowTransformer3DModel(other_config).eval().prepare_context(text)
        with pytest.raises(ValueError, match="a PreparedContext made by another model"):
            tiny_model(noise, 500.0, 250.0, foreign)
        with pytest.raises(ValueError, match="a PreparedContext made by another model"):
            sample(tiny_model, noise, foreign, num_steps=1)
    with torch.no_grad():
        own = tiny_model.prepare_context(text)
    tiny_model.to_dtype("bfloat16")
    with pytest.raises(ValueError, match=r"holds torch.float32 on cpu but the model is now torch.bfloat16 on cpu"):
        tiny_model(noise, 500.0, 250.0, own)


def test_a_last_step_from_zero_to_zero_is_skipped_and_not_counted(tiny_model):
    randomize_(tiny_model, 4)
    schedule = flow_map_sigmas(sigmas=[1.0, 0.5, 0.0])
    assert len(schedule) == 4 and steps_to_run(schedule) == [0, 1]
    seen = []
    noise, text = torch.randn(1, 3, 4, 8, 8), torch.randn(1, 5, 24)
    out = sample(tiny_model, noise, text, sigmas=[1.0, 0.5, 0.0], callback=lambda i, t, z: seen.append(i))
    assert seen == [0, 1]
    assert torch.equal(out, sample(tiny_model, noise, text, sigmas=[1.0, 0.5]))


def test_each_sampler_refuses_the_other_model_kind_in_one_line(tiny_model):
    from anyflow import AnyFlowFARTransformer3DModel
    from anyflow.cli.demo import TINY_FAR_CHECKPOINT

    far = AnyFlowFARTransformer3DModel.from_pretrained(TINY_FAR_CHECKPOINT)
    text = torch.zeros(1, 5, 4096)
    with pytest.raises(ValueError, match=r"^sample runs the bidirectional model; this is an AnyFlow FAR model "
                       r"\(AnyFlowFARTransformer3DModel\): use sample_far$"):
        sample(far, torch.zeros(1, 7, 16, 16, 16), text)
    with pytest.raises(ValueError, match=r"^sample_far runs an AnyFlow FAR model \(AnyFlowFARTransformer3DModel\); "
                       r"this is a bidirectional AnyFlowTransformer3DModel: use sample$"):
        sample_far(tiny_model, torch.zeros(1, 3, 4, 8, 8), torch.zeros(1, 5, 24))
    with pytest.raises(ValueError, match=r"^model must be an AnyFlow transformer, got a Linear$"):
        sample(torch.nn.Linear(2, 2), torch.zeros(1, 3, 4, 8, 8), torch.zeros(1, 5, 24))
    with pytest.raises(ValueError, match=r"^noise has 1 NaN or infinite values \(of 28672\)$"):
        noise = torch.zeros(1, 7, 16, 16, 16)
        noise[0, 3, 2, 1, 1] = float("nan")
        sample_far(far, noise, text)
