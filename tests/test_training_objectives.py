"""AnyFlow's training objectives (anyflow.training) against the authors' math.

The authors' math is transcribed in tests/authors_objectives.py and runs on diffusers' models; ours
runs on our models holding the same weights. Compared: the loss values, and the gradients of the
model parameters (mapped by name with weights_convert) or of the input that carries them. Diffusers'
FAR model attends with flex attention, which has no backward on CPU: there the loss and rollout
values are compared with diffusers, the gradients with a finite difference (the rollout's with its
caches held, as the authors' cache carries no gradient) and with the transcription run on our model.

Run on 2 gloo processes by ``python -m torch.distributed.run --nproc-per-node 2
tests/test_training_objectives.py OUT`` (see the end), the global rescale is compared on each rank.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import authors_objectives as authors
from anyflow import AnyFlowFARConfig, AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel
from anyflow.training import FlowMapLoss, dmd_loss, fake_score_loss, flow_matching_loss, rollout
from anyflow.training.objectives.flow_map import rescale_to_diffusion_mean
from anyflow.training.objectives.timesteps import LossWeighting, draw_noise, sample_flow_map_timesteps
from support import SMALL, randomize_, require_oracle, small_config
from weights_convert import convert_state_dict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Bars, all fp32 against fp32 (the models agree to ~1e-6 of max|u|, tests/test_parity.py bar 1e-5):
# - a loss is a mean of squares of differences of model outputs; its relative error is of the order
#   of the outputs' relative error, LOSS_BAR = 1e-5 as the forward's;
# - stage 1's target holds (t - r) dF/dt, a difference of two outputs divided by 2 eps = 10 and
#   multiplied by t - r <= 1000: an output error delta becomes up to ~100 delta in the target.
#   FLOW_MAP_BAR = 1e-4 = 100 x 1e-6 (the outputs' typical error).
# - gradients sum products over every token and layer; per parameter, max|ours - theirs| <=
#   GRAD_BAR * max|theirs| (GRAD_BAR = 1e-4; FLOW_MAP_GRAD_BAR = 1e-3 with the amplified target).
# Seen on these tiny models (printed with -s): loss values within 1e-7, gradients within 3e-6.
LOSS_BAR = 1e-5
FLOW_MAP_BAR = 1e-4
GRAD_BAR = 1e-4
FLOW_MAP_GRAD_BAR = 1e-3
FLOWMAP_CFG = dict(diffusion_ratio=0.5, consistency_ratio=0.25, epsilon=5)


# ---- helpers ----------------------------------------------------------------------------------------

def relative(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.double() - reference.double()).abs().max() / reference.double().abs().max()).item()


def pair(seed: int, far: bool = False, **overrides):
    """diffusers' model with random weights and ours holding the same, both fp32."""
    if far:
        config = AnyFlowFARConfig(**{**SMALL, "chunk_partition": (1, 2, 2), "full_chunk_limit": 2, **overrides})
        oracle = require_oracle("AnyFlowFARTransformer3DModel")(**config.to_dict())
        ours = AnyFlowFARTransformer3DModel(config)
    else:
        config = small_config(**overrides)
        oracle = require_oracle()(**config.to_dict())
        ours = AnyFlowTransformer3DModel(config)
    randomize_(oracle, seed)
    ours.load_state_dict(convert_state_dict(oracle.state_dict()), strict=True)
    return oracle, ours


def ours_only(seed: int, far: bool = False, **overrides):
    config = (AnyFlowFARConfig(**{**SMALL, "chunk_partition": (1, 2, 2), "full_chunk_limit": 2, **overrides}) if far
              else small_config(**overrides))
    model = (AnyFlowFARTransformer3DModel if far else AnyFlowTransformer3DModel)(config)
    randomize_(model, seed)
    return model


def gradients(model, diffusers_names: bool = False):
    """{our parameter name: gradient}; a diffusers model's mapped to our names."""
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return convert_state_dict(grads) if diffusers_names else grads


def worst_gradient_error(ours: dict, reference: dict) -> float:
    """max over parameters of max|ours - reference| / max|reference| (parameters with a gradient anywhere)."""
    assert ours.keys() == reference.keys()
    return max(relative(ours[name], reference[name]) for name in reference if reference[name].abs().max() > 0)


def inputs(seed: int, batch=4, frames=3, height=8, width=8, text_dim=24):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, frames, 4, height, width, generator=gen)
    text = torch.randn(batch, 7, text_dim, generator=gen)
    negative = torch.randn(1, 7, text_dim, generator=gen)
    return latents, text, negative


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- the draws and the weighting table ---------------------------------------------------------------

@pytest.mark.parametrize("kind", ["beta08", "gaussian", "uniform"])
@pytest.mark.parametrize("shift", [5.0, 1.0, 3.0])
def test_weighting_is_the_authors_table_at_the_nearest_grid_timestep(kind, shift):
    ours = LossWeighting(kind, shift)
    theirs = authors.FlowMapDiscreteScheduler(shift=shift, weight_type=kind)
    grid = theirs.timesteps.float()
    t = torch.cat([grid, (grid[1:] + grid[:-1]) / 2, 1000 * torch.rand(200, generator=seeded(0))])  # points, midpoints
    expected = theirs.get_train_weight(t)
    got = ours(t)
    assert got.dtype == torch.float64 and got.shape == t.shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)  # the same float64 table and lookup
    if kind == "beta08":
        assert got[0] == 0 and got[len(grid) - 1] == 0  # w(1000) = w(0) = 0


@pytest.mark.parametrize("batch,world,expected", [
    (4, 1, [["d", "d", "c", "f"]]),
    (3, 1, [["d", "d", "c"]]),  # round(1.5) = 2, round(0.75) = 1
    (2, 2, [["d", "d"], ["c", "f"]]),  # the diffusion samples sit on the first rank
    (1, 4, [["d"], ["d"], ["c"], ["f"]]),
])
def test_sample_kinds_follow_the_global_batch(batch, world, expected):
    for rank, kinds in enumerate(expected):
        t, r, is_diffusion = sample_flow_map_timesteps(batch, rank=rank, world_size=world, generator=seeded(rank))
        got = ["d" if d else "c" if rr == 0 else "f" for d, rr in zip(is_diffusion.tolist(), r.tolist())]
        assert got == kinds
        assert torch.equal(r[is_diffusion], t[is_diffusion]) and (t[~is_diffusion] > r[~is_diffusion]).all()


def test_flow_map_draws_are_the_authors_given_the_same_seed():
    authors.seed_everything(3)
    trainer = authors.PretrainTrainer(None, authors.FlowMapDiscreteScheduler(shift=5.0), FLOWMAP_CFG)
    t, r, is_diffusion = trainer.sample_timestep(6, torch.float32, "cpu")
    expected = trainer.shifted(t, 1)[:, 0], trainer.shifted(r, 1)[:, 0], is_diffusion
    t_ours, r_ours, kinds_ours = sample_flow_map_timesteps(6, generator=seeded(3))
    assert torch.equal(kinds_ours, expected[2])
    for ours, theirs in zip((t_ours, r_ours), expected[:2]):  # the same draws: float32 rounding at most
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-4)


# ---- stage 1: the flow-map loss, bidirectional --------------------------------------------------------

STAGE1 = {
    # name: (FlowMapLoss kwargs, transcription guidance, batch)
    "guided_beta08": (dict(), 3.0, 4),
    "unguided_gaussian": (dict(guidance_scale=None, weighting="gaussian"), None, 4),
    "guided_uniform_batch3": (dict(weighting="uniform", guidance_scale=2.0), 2.0, 3),
}


def run_stage1_authors(oracle, latents, text, negative, guidance, weighting, seed):
    scheduler = authors.FlowMapDiscreteScheduler(shift=5.0, weight_type=weighting)
    trainer = authors.PretrainTrainer(oracle, scheduler, FLOWMAP_CFG, negative, guidance)
    authors.seed_everything(seed)
    return trainer.train_bidirection(latents.transpose(1, 2), text)


@pytest.mark.slow
@pytest.mark.reference
@pytest.mark.parametrize("case", sorted(STAGE1))
def test_stage1_drawn_is_the_authors_loss_and_gradients(case):
    kwargs, guidance, batch = STAGE1[case]
    oracle, ours = pair(seed=1)
    latents, text, negative = inputs(seed=2, batch=batch)
    expected = run_stage1_authors(oracle, latents, text, negative, guidance, kwargs.get("weighting", "beta08"), 5)
    expected.backward()
    loss = FlowMapLoss(**kwargs)(ours, latents, text, negative_encoder_hidden_states=negative, generator=seeded(5))
    loss.backward()
    value_error = abs(loss.item() - expected.item()) / abs(expected.item())
    grad_error = worst_gradient_error(gradients(ours), gradients(oracle, diffusers_names=True))
    print(f"stage 1 {case}: loss {loss.item():.6f} vs {expected.item():.6f}, rel {value_error:.1e}; grads {grad_error:.1e}")
    assert loss.dtype == expected.dtype == torch.float64
    assert value_error <= FLOW_MAP_BAR and grad_error <= FLOW_MAP_GRAD_BAR


STAGE1_GIVEN = {
    # name: (t, r): the sample kinds by hand
    "diffusion_only": ([900.0, 420.0, 35.0], [900.0, 420.0, 35.0]),
    "all_three_kinds": ([900.0, 700.0, 400.0], [900.0, 0.0, 150.0]),
    "two_diffusion_one_consistency": ([980.0, 500.0, 820.0], [980.0, 500.0, 0.0]),
}


@pytest.mark.slow
@pytest.mark.reference
@pytest.mark.parametrize("case", sorted(STAGE1_GIVEN))
def test_stage1_with_given_timesteps_and_noise_is_the_authors(case):
    t, r = (torch.tensor(v) for v in STAGE1_GIVEN[case])
    oracle, ours = pair(seed=3)
    latents, text, negative = inputs(seed=4, batch=3)
    noise = torch.randn(latents.shape, generator=seeded(6))
    trainer = authors.PretrainTrainer(oracle, authors.FlowMapDiscreteScheduler(shift=5.0, weight_type="beta08"),
                                      FLOWMAP_CFG, negative, 3.0)
    frames = latents.shape[1]
    expected = trainer.train_bidirection_from_draws(latents, noise, t[:, None].repeat(1, frames),
                                                    r[:, None].repeat(1, frames), r == t, text)
    expected.backward()
    loss = FlowMapLoss()(ours, latents, text, t=t, r=r, noise=noise, negative_encoder_hidden_states=negative)
    loss.backward()
    value_error = abs(loss.item() - expected.item()) / abs(expected.item())
    grad_error = worst_gradient_error(gradients(ours), gradients(oracle, diffusers_names=True))
    print(f"stage 1 given {case}: rel {value_error:.1e}; grads {grad_error:.1e}")
    assert value_error <= FLOW_MAP_BAR and grad_error <= FLOW_MAP_GRAD_BAR


def test_rescale_sets_non_diffusion_losses_to_the_diffusion_mean():
    loss = torch.tensor([2.0, 4.0, 10.0, 0.5], dtype=torch.float64, requires_grad=True)
    is_diffusion = torch.tensor([True, True, False, False])
    scaled = rescale_to_diffusion_mean(loss, is_diffusion)
    mean = 3.0
    torch.testing.assert_close(scaled.detach(), torch.tensor([2.0, 4.0, mean * 10 / (10 + 1e-5), mean * 0.5 / (0.5 + 1e-5)],
                                                             dtype=torch.float64), rtol=1e-15, atol=0)
    scaled.sum().backward()  # the factor carries no gradient: d/dl_i = m / (l_i + 1e-5)
    torch.testing.assert_close(loss.grad, torch.tensor([1.0, 1.0, mean / (10 + 1e-5), mean / (0.5 + 1e-5)],
                                                       dtype=torch.float64), rtol=1e-15, atol=0)
    # no diffusion sample anywhere: nothing to rescale to (the authors' code divides by an empty mean)
    assert torch.equal(rescale_to_diffusion_mean(loss.detach(), torch.zeros(4, dtype=torch.bool)), loss.detach())


# ---- stage 1 on the FAR model -------------------------------------------------------------------------

FAR_CASES = {
    # name: (config overrides, frames): context = frames before the last full_chunk_limit chunks
    "compressed_context": (dict(chunk_partition=(1, 2, 2, 1), full_chunk_limit=2), 6),
    "no_context": (dict(chunk_partition=(2, 1), full_chunk_limit=3), 3),
}


@pytest.mark.slow
@pytest.mark.reference
@pytest.mark.parametrize("case", sorted(FAR_CASES))
def test_far_stage1_loss_is_the_authors_on_diffusers_far_model(case):
    overrides, frames = FAR_CASES[case]
    oracle, ours = pair(seed=7, far=True, **overrides)
    latents, text, _ = inputs(seed=8, batch=4, frames=frames)
    negative = torch.randn(4, 7, 24, generator=seeded(9))
    partition = list(overrides["chunk_partition"])
    trainer = authors.PretrainTrainer(oracle, authors.FlowMapDiscreteScheduler(shift=5.0, weight_type="beta08"),
                                      FLOWMAP_CFG, negative, 3.0)
    authors.seed_everything(10)
    with torch.no_grad():
        expected = trainer.train_causal(latents.transpose(1, 2), text, partition, overrides["full_chunk_limit"])
        loss = FlowMapLoss()(ours, latents, text, negative_encoder_hidden_states=negative, chunk_partition=partition,
                             generator=seeded(10))
    error = abs(loss.item() - expected.item()) / abs(expected.item())
    print(f"FAR stage 1 {case}: loss {loss.item():.6f} vs diffusers {expected.item():.6f}: rel {error:.1e}")
    assert error <= FLOW_MAP_BAR


@pytest.mark.slow
def test_far_stage1_gradients_are_the_transcriptions_on_our_model():
    """The same math assembled by the transcription, on our FAR model: the stop-gradients sit where the authors put them."""
    model = ours_only(seed=11, far=True)
    latents, text, _ = inputs(seed=12, batch=4, frames=5)
    negative = torch.randn(4, 7, 24, generator=seeded(13))
    trainer = authors.PretrainTrainer(model, authors.FlowMapDiscreteScheduler(shift=5.0, weight_type="beta08"),
                                      FLOWMAP_CFG, negative, 3.0)
    authors.seed_everything(14)
    expected = trainer.train_causal(latents.transpose(1, 2), text, [1, 2, 2], 2)
    expected.backward()
    reference = gradients(model)
    model.zero_grad()
    loss = FlowMapLoss()(model, latents, text, negative_encoder_hidden_states=negative, generator=seeded(14))
    loss.backward()
    error = worst_gradient_error(gradients(model), reference)
    print(f"FAR stage 1 on our model: loss rel {abs(loss.item() / expected.item() - 1):.1e}, grads {error:.1e}")
    assert abs(loss.item() / expected.item() - 1) <= LOSS_BAR and error <= GRAD_BAR


def float64_model(model):
    """``model`` in float64 but for its two timestep MLPs (the model looks their gate up by their dtype, which
    must be a training dtype); a finite difference moves the float64 parameters only."""
    model.double()
    model.time_embed.source_time_mlp.float()
    model.time_embed.target_time_mlp.float()
    return model


def directional_check(model, loss_fn, seed: int, h: float = 1e-3, richardson: bool = True):
    """(autograd's, a finite difference's) derivative of ``loss_fn()`` along a random direction of the float64
    parameters. The difference is Richardson's, (4 D(h) - D(2h)) / 3 of central differences D, exact to O(h^4)
    (or the central difference D(h) alone)."""
    model.zero_grad()
    loss_fn().backward()
    gen = seeded(seed)
    direction = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) if p.dtype == torch.float64 else None
                 for n, p in model.named_parameters()}
    analytic = sum((p.grad * direction[n]).sum() for n, p in model.named_parameters()
                   if direction[n] is not None and p.grad is not None).item()

    def moved(step):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if direction[n] is not None:
                    p.add_(step * direction[n])
            value = loss_fn().item()
            for n, p in model.named_parameters():
                if direction[n] is not None:
                    p.sub_(step * direction[n])
        return value

    central = [(moved(step) - moved(-step)) / (2 * step) for step in ((h, 2 * h) if richardson else (h,))]
    return analytic, (4 * central[0] - central[1]) / 3 if richardson else central[0]


# Richardson's difference with h = 1e-3 leaves O(h^4) ~ 1e-12 of truncation; what remains is rounding: the
# model keeps its norms, residual adds and head in float32 and the loss squares errors in float32 (as the
# authors'), ~1e-7 of the loss, divided by h: FD_BAR = 1e-4 of the derivative (seen: 4e-6).
FD_BAR = 1e-4


@pytest.mark.slow
def test_far_stage1_gradient_matches_a_finite_difference():
    """r = t (diffusion samples: the target n - x_0 holds no model output) and no guidance, so the loss is a
    plain function of the parameters, with the clean context and the clean copies in it."""
    model = float64_model(ours_only(seed=15, far=True))
    latents, text, _ = inputs(seed=16, batch=2, frames=5)
    latents, text = latents.double(), text.double()
    t = torch.tensor([700.0, 300.0], dtype=torch.float64)
    noise = torch.randn(2, 4, 4, 8, 8, generator=seeded(17), dtype=torch.float64)
    loss_fn = FlowMapLoss(guidance_scale=None)
    analytic, numeric = directional_check(model, lambda: loss_fn(model, latents, text, t=t, r=t, noise=noise), 18)
    print(f"FAR stage 1 directional derivative: autograd {analytic:.10f}, finite difference {numeric:.10f}")
    assert abs(analytic - numeric) <= FD_BAR * abs(analytic)


# ---- stage 0 and the fake score ------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.reference
@pytest.mark.parametrize("guidance", [None, 3.0])
def test_stage0_is_the_teachers_loss_and_gradients(guidance):
    oracle, ours = pair(seed=19)
    latents, text, negative = inputs(seed=20)
    teacher = authors.TeacherTrainer(oracle, authors.FlowMapDiscreteScheduler(shift=5.0), negative, guidance)
    authors.seed_everything(21)
    expected = teacher.train_bidirection(latents.transpose(1, 2), text)
    expected.backward()
    loss = flow_matching_loss(ours, latents, text, guidance_scale=guidance, negative_encoder_hidden_states=negative,
                              generator=seeded(21))
    loss.backward()
    value_error = abs(loss.item() - expected.item()) / abs(expected.item())
    grad_error = worst_gradient_error(gradients(ours), gradients(oracle, diffusers_names=True))
    print(f"stage 0 guidance {guidance}: rel {value_error:.1e}; grads {grad_error:.1e}")
    assert value_error <= LOSS_BAR and grad_error <= GRAD_BAR


@pytest.mark.slow
@pytest.mark.reference
@pytest.mark.parametrize("given", [False, True], ids=["drawn", "given"])
def test_fake_score_loss_is_the_authors_discriminator_loss(given):
    oracle, ours = pair(seed=22)
    video, text, _ = inputs(seed=23)
    video.requires_grad_(True)  # the student's samples: the fake score's loss must not reach them
    trainer = authors.OnPolicyTrainer(None, oracle, authors.FlowMapDiscreteScheduler(shift=5.0), dict(dmd_weight=1.0))
    if given:
        t = torch.tensor([950.0, 610.0, 250.0, 12.0])
        noise = torch.randn(video.shape, generator=seeded(24))
        expected = trainer.discriminator_loss_from_draws(video.detach(), noise, t[:, None].repeat(1, 3), text)
        loss = fake_score_loss(ours, video, text, t=t, noise=noise)
    else:
        authors.seed_everything(25)
        expected = trainer.discriminator_loss(video.detach(), text)
        loss = fake_score_loss(ours, video, text, generator=seeded(25))
    expected.backward()
    loss.backward()
    value_error = abs(loss.item() - expected.item()) / abs(expected.item())
    grad_error = worst_gradient_error(gradients(ours), gradients(oracle, diffusers_names=True))
    print(f"fake score ({'given' if given else 'drawn'}): rel {value_error:.1e}; grads {grad_error:.1e}")
    assert value_error <= LOSS_BAR and grad_error <= GRAD_BAR
    assert video.grad is None


# ---- stage 2: distribution matching ---------------------------------------------------------------------

DMD_CASES = {"real_guidance_3": 3.0, "no_real_guidance": None}


@pytest.mark.reference
@pytest.mark.parametrize("given", [False, True], ids=["drawn", "given"])
@pytest.mark.parametrize("case", sorted(DMD_CASES))
def test_dmd_loss_and_its_gradient_in_pred_video_are_the_authors(case, given):
    guidance = DMD_CASES[case]
    real_oracle, real = pair(seed=26)
    fake_oracle, fake = pair(seed=27)
    pred, text, negative = inputs(seed=28)
    trainer = authors.OnPolicyTrainer(real_oracle, fake_oracle, authors.FlowMapDiscreteScheduler(shift=5.0),
                                      dict(dmd_weight=1.0, real_guidance_scale=guidance), negative)
    theirs_pred, ours_pred = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    kwargs = dict(real_guidance_scale=guidance, negative_encoder_hidden_states=negative)
    if given:
        t = torch.tensor([880.0, 505.0, 140.0, 990.0])
        noise = torch.randn(pred.shape, generator=seeded(29))
        expected = trainer.generator_dmd_loss_from_draws(theirs_pred, t, noise, text)
        loss = dmd_loss(ours_pred, real, fake, text, t=t, noise=noise, **kwargs)
    else:
        authors.seed_everything(30)
        expected = trainer.generator_dmd_loss(theirs_pred, text)
        loss = dmd_loss(ours_pred, real, fake, text, t=None, noise=None, generator=seeded(30), **kwargs)
    expected.backward()
    loss.backward()
    value_error = abs(loss.item() - expected.item()) / abs(expected.item())
    grad_error = relative(ours_pred.grad, theirs_pred.grad)
    print(f"DMD {case} ({'given' if given else 'drawn'}): loss {loss.item():.6e} rel {value_error:.1e}; "
          f"d/d pred_video {grad_error:.1e}")
    assert loss.dtype == torch.float64
    assert value_error <= GRAD_BAR and grad_error <= GRAD_BAR  # the loss is a mean of squared score differences
    assert all(p.grad is None for p in [*real.parameters(), *fake.parameters()])  # the scores learn nothing here


# ---- stage 2: the rollout -----------------------------------------------------------------------------

ROLLOUT_STEPS = [(1, 0), (2, 0), (2, 1), (3, 1), (4, 0), (4, 2), (4, 3)]


@pytest.mark.slow
@pytest.mark.reference
@pytest.mark.parametrize("num_steps,grad_step", ROLLOUT_STEPS)
def test_rollout_is_the_authors_training_rollout_with_gradients(num_steps, grad_step):
    oracle, ours = pair(seed=31)
    _, text, _ = inputs(seed=32, batch=2)
    noise = torch.randn(2, 3, 4, 8, 8, generator=seeded(33))
    weights = torch.randn(noise.shape, generator=seeded(34))  # a fixed projection: L = <w, x_0>
    expected = authors.training_rollout(oracle, authors.FlowMapDiscreteScheduler(shift=5.0), noise, text,
                                        num_steps, grad_step)
    (weights * expected).sum().backward()
    out = rollout(ours, noise, text, num_steps=num_steps, grad_step=grad_step)
    (weights * out).sum().backward()
    value_error = relative(out, expected)
    grad_error = worst_gradient_error(gradients(ours), gradients(oracle, diffusers_names=True))
    print(f"rollout N={num_steps} k={grad_step}: {value_error:.1e}; grads {grad_error:.1e}")
    assert out.dtype == torch.float32 and out.shape == noise.shape
    assert value_error <= LOSS_BAR and grad_error <= GRAD_BAR


FAR_ROLLOUTS = [(2, 0), (3, 1)]  # a step then a jump; all three moves


@pytest.mark.slow
@pytest.mark.reference
@pytest.mark.parametrize("num_steps,grad_step", FAR_ROLLOUTS)
def test_far_rollout_is_the_authors_chunk_by_chunk(num_steps, grad_step):
    """16 x 32 latents: 128 tokens a frame, where diffusers' cached step pads nothing (tests/test_far.py)."""
    oracle, ours = pair(seed=35, far=True, chunk_partition=(1, 2, 1), full_chunk_limit=2)
    _, text, _ = inputs(seed=36, batch=1)
    noise = torch.randn(1, 4, 4, 16, 32, generator=seeded(37))
    with torch.no_grad():
        expected = authors.far_training_rollout(oracle, authors.FlowMapDiscreteScheduler(shift=5.0),
                                                noise.transpose(1, 2), text, num_steps, grad_step).transpose(1, 2)
        out = rollout(ours, noise, text, num_steps=num_steps, grad_step=grad_step)
    print(f"FAR rollout N={num_steps} k={grad_step}: {relative(out, expected):.1e}")
    assert relative(out, expected) <= LOSS_BAR


@pytest.mark.slow
def test_far_rollout_gradients_match_a_finite_difference_with_the_caches_held():
    """The cache is encoded without gradients (as the authors encode theirs): a chunk's gradient flows through its
    own moves only. So autograd's derivative equals a central difference of the same rollout with every chunk's
    cache held at what the unperturbed rollout made."""
    from anyflow.sampling import flow_map_sigmas
    from anyflow.training.objectives.student_rollout import rollout_moves

    model = float64_model(ours_only(seed=38, far=True, chunk_partition=(1, 2, 1), full_chunk_limit=2))
    _, text, _ = inputs(seed=39, batch=1)
    text = text.double()
    noise = torch.randn(1, 4, 4, 8, 8, generator=seeded(40), dtype=torch.float64)
    weights = torch.randn(noise.shape, generator=seeded(41), dtype=torch.float64)  # L = <w, x_0>
    partition, num_steps, grad_step = model.config.chunk_partition, 3, 1
    with torch.no_grad():
        made = rollout(model, noise, text, num_steps=num_steps, grad_step=grad_step)
        ends = [sum(partition[:k]) for k in range(len(partition))]
        caches = [None] + [model.encode_cache(made[:, :end], partition[:k], text) for k, end in enumerate(ends) if k]
    sigmas = flow_map_sigmas(num_steps, 5.0)

    def held_rollout():
        chunks = []
        for k, (start, frames) in enumerate(zip(ends, partition)):
            z = noise[:, start:start + frames]
            for a, b in rollout_moves(num_steps, grad_step):
                z = z - (sigmas[a] - sigmas[b]) * model.step(z, 1000 * sigmas[a].item(), 1000 * sigmas[b].item(), text,
                                                             caches[k])
            chunks.append(z)
        return (weights * torch.cat(chunks, dim=1)).sum()

    with torch.no_grad():
        # the rollout itself, its caches encoded afresh (equal to the incremental ones but for the float32 islands)
        assert abs(held_rollout().item() / (weights * made).sum().item() - 1) <= 1e-6
    rolled = lambda: (weights * rollout(model, noise, text, num_steps=num_steps, grad_step=grad_step)).sum()  # noqa: E731
    analytic, moving_numeric = directional_check(model, rolled, 42, richardson=False)
    held_numeric = directional_check(model, held_rollout, 42)[1]
    print(f"FAR rollout directional derivative: autograd {analytic:.10f}, finite difference (caches held) "
          f"{held_numeric:.10f}, (caches moving) {moving_numeric:.10f}")
    assert abs(analytic - held_numeric) <= FD_BAR * abs(analytic)
    assert abs(analytic - moving_numeric) > 1e-2 * abs(analytic)  # the caches' own dependence is left out, as theirs


@pytest.mark.slow
@pytest.mark.reference
def test_the_objectives_run_on_diffusers_models_as_on_ours():
    """They call a model by the keywords both have: on diffusers' model they give what they give on ours."""
    oracle, ours = pair(seed=43)
    latents, text, negative = inputs(seed=44, batch=3)
    results = {}
    for name, model in (("oracle", oracle), ("ours", ours)):
        stage1 = FlowMapLoss()(model, latents, text, negative_encoder_hidden_states=negative, generator=seeded(45))
        stage0 = flow_matching_loss(model, latents, text, generator=seeded(46))
        made = rollout(model, latents, text, num_steps=3, grad_step=1)
        dmd = dmd_loss(made, model, model, text, real_guidance_scale=3.0, negative_encoder_hidden_states=negative,
                       generator=seeded(47))
        (stage1 + stage0 + dmd).backward()
        results[name] = [stage1.item(), stage0.item(), dmd.item()], gradients(model, diffusers_names=name == "oracle")
    (theirs, their_grads), (values, grads) = results["oracle"], results["ours"]
    print(f"on diffusers' model: {theirs}, on ours: {values}; grads {worst_gradient_error(grads, their_grads):.1e}")
    for value, expected in zip(values, theirs):
        assert abs(value / expected - 1) <= FLOW_MAP_BAR
    assert worst_gradient_error(grads, their_grads) <= FLOW_MAP_GRAD_BAR


# ---- bad input ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return ours_only(seed=42)


BAD = {
    "t_without_r": (lambda m, x, c: FlowMapLoss()(m, x, c, t=torch.tensor([5.0, 6.0]), negative_encoder_hidden_states=c),
                    "give both t and r"),
    "guided_without_negative": (lambda m, x, c: FlowMapLoss()(m, x, c), "needs negative_encoder_hidden_states"),
    "t_wrong_shape": (lambda m, x, c: FlowMapLoss(guidance_scale=None)(m, x, c, t=torch.ones(2, 3), r=torch.ones(2, 3)),
                      "t must be a (B,) = (2,) tensor"),
    "noise_wrong_shape": (lambda m, x, c: flow_matching_loss(m, x, c, noise=torch.ones(2, 3)),
                          "noise must have the shape of the noised latents"),
    "latents_4d": (lambda m, x, c: flow_matching_loss(m, x[0], c), "latents must be a 5-D tensor"),
    "chunks_on_bidirectional": (lambda m, x, c: FlowMapLoss(guidance_scale=None)(m, x, c, chunk_partition=[1, 2]),
                                "chunk_partition is for a FAR model"),
    "grad_step_past_the_end": (lambda m, x, c: rollout(m, x, c, num_steps=2, grad_step=2), "grad_step must be in [0, num_steps)"),
    "negative_batch": (lambda m, x, c: dmd_loss(x, m, m, c, real_guidance_scale=3.0,
                                                negative_encoder_hidden_states=torch.ones(3, 7, 24)),
                       "negative_encoder_hidden_states has batch 3"),
    "bad_weighting": (lambda m, x, c: FlowMapLoss(weighting="beta"), "weighting must be one of"),
    "ratios_over_one": (lambda m, x, c: FlowMapLoss(diffusion_ratio=0.8, consistency_ratio=0.5), "at most 1"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_clear_error(tiny, case):
    call, message = BAD[case]
    latents, text, _ = inputs(seed=43, batch=2)
    with pytest.raises(ValueError, match=re.escape(message)):
        call(tiny, latents, text)


# ---- the global rescale on 2 processes (gloo) -------------------------------------------------------------

TIMEOUT = 240  # seconds for the torchrun launch; a hang fails here


@pytest.mark.slow
@pytest.mark.parallel
def test_global_rescale_on_two_processes_is_the_authors(tmp_path):
    """Rank 0 draws the diffusion samples, rank 1 none: rank 1's loss is rescaled to rank 0's diffusion mean
    (rescaled on its own, it would not be: no diffusion sample there)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               os.path.join(HERE, "test_training_objectives.py"), str(tmp_path)]
    run = subprocess.run(command, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT),
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert run.returncode == 0, run.stderr[-4000:]
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        print(f"rank {rank}: {result}")
        assert result["kinds"] == [["d", "d"], ["c", "f"]][rank]
        assert result["loss_error"] <= LOSS_BAR and result["grad_error"] <= GRAD_BAR
        if rank == 0:  # only diffusion samples: nothing rescaled, locally or globally
            assert result["local_over_global"] == pytest.approx(1.0, rel=1e-12)
        else:  # no diffusion sample here: only the global batch gives the mean to rescale to
            assert abs(result["local_over_global"] - 1) > 1e-2


def _rescale_case(out: str) -> None:
    """One rank's stage-1 loss (ours, all-reduce) against the transcription's (all-gather) on our model."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = ours_only(seed=44)
    latents, text, negative = inputs(seed=45, batch=4)
    latents, text, negative = latents[2 * rank:2 * rank + 2], text[2 * rank:2 * rank + 2], negative.expand(2, -1, -1)
    trainer = authors.PretrainTrainer(model, authors.FlowMapDiscreteScheduler(shift=5.0, weight_type="beta08"),
                                      FLOWMAP_CFG, negative, 3.0)
    authors.seed_everything(46 + rank)
    expected = trainer.train_bidirection(latents.transpose(1, 2), text)
    expected.backward()
    reference = gradients(model)
    model.zero_grad()
    loss_fn = FlowMapLoss()
    loss = loss_fn(model, latents, text, negative_encoder_hidden_states=negative, generator=seeded(46 + rank))
    loss.backward()
    gen = seeded(46 + rank)  # the same draws again, in the same order: noise, then t and r
    noise = draw_noise(latents, gen)
    t, r, is_diffusion = sample_flow_map_timesteps(2, generator=gen)
    kinds = ["d" if d else "c" if rr == 0 else "f" for d, rr in zip(is_diffusion.tolist(), r.tolist())]
    with torch.no_grad():  # the same batch with the rescale left to this rank alone
        local = _without_process_group(lambda: loss_fn(model, latents, text, t=t, r=r, noise=noise,
                                                       is_diffusion=is_diffusion, negative_encoder_hidden_states=negative))
    result = dict(kinds=kinds, loss=loss.item(), loss_error=abs(loss.item() / expected.item() - 1),
                  grad_error=worst_gradient_error(gradients(model), reference),
                  local_over_global=local.item() / loss.item())
    with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)
    dist.destroy_process_group()


def _without_process_group(fn):
    from unittest import mock

    with mock.patch("torch.distributed.is_initialized", return_value=False):
        return fn()


if __name__ == "__main__":  # under torchrun, by test_global_rescale_on_two_processes_is_the_authors
    _rescale_case(sys.argv[1])
