"""The authors' training math, transcribed in their code's structure, run on diffusers' models: the oracle of
tests/test_training_objectives.py.

Transcribed (written here for these tests, not copied) from NVlabs/AnyFlow:
``far/schedulers/scheduling_flowmap_euler_discrete.py`` (the scheduler), ``far/trainers/
trainer_wan_teacher.py`` (stage 0), ``trainer_wan_anyflow_pretrain.py`` and
``trainer_far_wan_anyflow_pretrain.py`` (stage 1), ``trainer_wan_anyflow_onpolicy.py`` (DMD and the
fake score), ``far/pipelines/pipeline_wan_anyflow.py`` and ``pipeline_far_wan_anyflow.py``
(``training_rollout``). Names, order of operations, dtypes and random draws follow theirs. What
differs, each forced by running it here:

- their model takes ``is_causal=False`` for a bidirectional call; diffusers' bidirectional model
  is bidirectional and has no such argument. Every call passes ``return_dict=False`` and takes
  ``[0]`` (theirs does for most calls), so the transcription also runs on our models.
- the draws use the global generator, as theirs do (the tests seed it), but stay on the CPU.
- each ``train_*`` is split where its draws are complete (``*_from_draws``), so that a test can
  give t, r and the noise; the split moves no operation.
- the rescale's ``dist.nn.all_gather`` runs when a process group is initialised, else the local
  tensors are the global batch (one process); ``get_dist_rank`` / ``get_world_size`` likewise.
- the FAR rollout's cache step casts its input to bfloat16 (their training dtype); here the
  models are float32 and the cast is left out.
- diffusers' cached FAR step pads its tokens to a multiple of 128 without a mask (see
  tests/test_far.py); the tests use 128 tokens a frame, where it pads nothing.
"""

from __future__ import annotations

import copy
import random

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _rank_and_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(tensor):
    if dist.is_available() and dist.is_initialized():
        import torch.distributed.nn  # noqa: F401  (dist.nn.all_gather)
        return torch.cat(dist.nn.all_gather(tensor), dim=0)
    return tensor


def _b_to_bf(t, frames):
    return t[:, None].repeat(1, frames).contiguous()  # einops repeat(t, 'b -> b f')


def logit_normal(batch_size):
    """diffusers.training_utils.compute_density_for_timestep_sampling('logit_normal', logit_mean=0, logit_std=1)."""
    return torch.sigmoid(torch.normal(mean=0, std=1.0, size=(batch_size,), device="cpu"))


class FlowMapDiscreteScheduler:
    """far/schedulers/scheduling_flowmap_euler_discrete.py, the parts training uses."""

    def __init__(self, num_train_timesteps=1000, shift=1.0, weight_type="gaussian"):
        self.num_train_timesteps, self.shift, self.weight_type = num_train_timesteps, shift, weight_type
        self.set_timesteps(num_train_timesteps)
        self.set_train_weight(weight_type)

    def set_train_weight(self, weight_type):
        if weight_type == "gaussian":
            x = self.timesteps
            y = torch.exp(-2 * ((x - self.num_train_timesteps / 2) / self.num_train_timesteps) ** 2)
            y_shifted = y - y.min()
            self.linear_timesteps_weights = y_shifted * (self.num_train_timesteps / y_shifted.sum())
        elif weight_type == "beta08":
            t = self.timesteps / self.num_train_timesteps
            y = (t ** 1.0) * ((1 - t) ** 0.5)
            self.linear_timesteps_weights = y * (self.num_train_timesteps / y.sum())
        elif weight_type == "uniform":
            self.linear_timesteps_weights = torch.ones_like(self.timesteps)
        else:
            raise ValueError(weight_type)

    @torch.no_grad()
    def get_train_weight(self, timesteps):
        distance = (self.timesteps.unsqueeze(1) - timesteps.flatten().unsqueeze(0).to(self.timesteps.device)).abs()
        timestep_id = torch.argmin(distance, dim=0).reshape(timesteps.shape)
        return self.linear_timesteps_weights[timestep_id].to(timesteps.device)

    def scale_noise(self, sample, timestep, noise):
        timestep = timestep.to(device=sample.device, dtype=sample.dtype) / self.num_train_timesteps
        timestep = timestep.view(*timestep.shape, *([1] * (noise.ndim - timestep.ndim)))
        return timestep * noise + (1.0 - timestep) * sample

    def apply_shift(self, sigmas):
        if self.shift == 1.0:
            return sigmas
        return self.shift * sigmas / (1 + (self.shift - 1) * sigmas)

    def set_timesteps(self, num_inference_steps, device=None):
        timesteps = torch.linspace(1.0, 0.0, num_inference_steps + 1, dtype=torch.float64, device=device)
        self.timesteps = self.apply_shift(timesteps) * self.num_train_timesteps

    def step(self, model_output, sample, timestep, r_timestep):
        timestep = timestep / self.num_train_timesteps
        r_timestep = r_timestep / self.num_train_timesteps
        timestep = timestep.view(*timestep.shape, *([1] * (model_output.ndim - timestep.ndim)))
        r_timestep = r_timestep.view(*r_timestep.shape, *([1] * (model_output.ndim - r_timestep.ndim)))
        prev_sample = sample - (timestep - r_timestep) * model_output
        return prev_sample.to(model_output.dtype)


# ---- stage 0: WanTeacherTrainer.train_bidirection ---------------------------------------------------

class TeacherTrainer:
    def __init__(self, transformer, scheduler, negative_embedding=None, fuse_guidance_scale=None):
        self.transformer, self.scheduler = transformer, scheduler
        self.negative_embedding, self.fuse_guidance_scale = negative_embedding, fuse_guidance_scale

    def train_bidirection(self, latents, prompt_embeds):
        """latents (B, C, F, H, W), as theirs."""
        batch_size, num_frames = latents.shape[0], latents.shape[2]
        latents = latents.transpose(1, 2)  # b c t h w -> b t c h w
        noise = torch.randn_like(latents)
        t = logit_normal(batch_size)
        t = _b_to_bf(t, num_frames)
        timesteps = (self.scheduler.apply_shift(t) * self.scheduler.num_train_timesteps).to(device=latents.device)
        return self.train_bidirection_from_draws(latents, noise, timesteps, prompt_embeds)

    def train_bidirection_from_draws(self, latents, noise, timesteps, prompt_embeds):
        batch_size = latents.shape[0]
        noisy_latents = self.scheduler.scale_noise(latents, timesteps, noise)
        noise_pred = self.transformer(noisy_latents, timestep=timesteps, r_timestep=timesteps,
                                      encoder_hidden_states=prompt_embeds, return_dict=False)[0]
        target = noise - latents
        if self.fuse_guidance_scale:
            with torch.no_grad():
                guidance = self.fuse_guidance_scale
                noise_pred_uncond = self.transformer(noisy_latents, timestep=timesteps, r_timestep=timesteps,
                                                     encoder_hidden_states=self.negative_embedding, return_dict=False)[0]
            noise_pred = (noise_pred - (1 - guidance) * noise_pred_uncond) / guidance
        loss = torch.mean(((noise_pred.float() - target.float()) ** 2).reshape(batch_size, -1), dim=-1)
        return loss.mean()


# ---- stage 1: Wan_AnyFlow_Pretrain_Trainer and FAR_Wan_AnyFlow_Pretrain_Trainer ----------------------

class PretrainTrainer:
    def __init__(self, transformer, scheduler, flowmap_cfg, negative_embedding=None, fuse_guidance_scale=None,
                 dtype=torch.float32):
        self.transformer, self.scheduler, self.flowmap_cfg = transformer, scheduler, flowmap_cfg
        self.negative_embedding, self.fuse_guidance_scale, self.dtype = negative_embedding, fuse_guidance_scale, dtype

    def sample_timestep(self, batch_size, dtype, device):
        t_1 = torch.rand(batch_size, dtype=dtype, device=device)
        t_2 = torch.rand(batch_size, dtype=dtype, device=device)
        t = torch.maximum(t_1, t_2)
        r = torch.minimum(t_1, t_2)
        rank, world_size = _rank_and_world()
        global_start_idx = rank * batch_size
        total_global_bsz = world_size * batch_size
        n_diffusion = round(self.flowmap_cfg["diffusion_ratio"] * total_global_bsz)
        n_consistency = round(self.flowmap_cfg["consistency_ratio"] * total_global_bsz)
        is_diffusion = torch.zeros(batch_size, dtype=torch.bool, device=device)
        for batch_idx in range(batch_size):
            if global_start_idx + batch_idx < n_diffusion:
                r[batch_idx] = t[batch_idx]
                is_diffusion[batch_idx] = True
            elif global_start_idx + batch_idx < n_diffusion + n_consistency:
                r[batch_idx] = 0
        return t, r, is_diffusion

    def shifted(self, t, num_frames):
        """repeat to (B, F), shift, to the 1000 scale."""
        t = _b_to_bf(t, num_frames)
        return self.scheduler.apply_shift(t) * self.scheduler.num_train_timesteps

    def guidance(self):
        return self.fuse_guidance_scale if self.fuse_guidance_scale else 1.0

    def loss_from_prediction(self, noise_pred, latents, noise, t, r, is_diffusion, dF_dt):
        batch_size, num_frames = latents.shape[:2]
        target = (noise - latents) - (t - r).view(batch_size, num_frames, 1, 1, 1) * dF_dt
        loss = torch.mean(((noise_pred.float() - target.float()) ** 2).reshape(batch_size, -1), dim=-1)
        weight = self.scheduler.get_train_weight(t).to(latents.device)
        loss = (loss.unsqueeze(-1) * weight).mean(-1)
        with torch.no_grad():
            global_loss = _all_gather(loss)
            global_diffusion_mask = _all_gather(is_diffusion)
            scale_weight = global_loss[global_diffusion_mask].mean() / (loss[~is_diffusion] + 1e-5)
        loss[~is_diffusion] = loss[~is_diffusion] * scale_weight
        return loss.mean()

    # -- bidirectional -------------------------------------------------------------------------------
    @torch.no_grad()
    def compute_central_difference(self, noisy_latents, latents, noise, t, r, prompt_embeds, guidance):
        def u_func(noisy_latents, t, r):
            return self.transformer(noisy_latents, timestep=t, r_timestep=r, encoder_hidden_states=prompt_embeds,
                                    return_dict=False)[0]

        eps = self.flowmap_cfg["epsilon"]
        v_pred = noise - latents
        noise_pred_plus = u_func(noisy_latents + v_pred * (eps / self.scheduler.num_train_timesteps), t + eps, r)
        noise_pred_minus = u_func(noisy_latents - v_pred * (eps / self.scheduler.num_train_timesteps), t - eps, r)
        return (noise_pred_plus - noise_pred_minus) / (2 * eps * guidance)

    def train_bidirection(self, latents, prompt_embeds):
        """latents (B, C, F, H, W), as theirs; returns the loss."""
        batch_size, num_frames = latents.shape[0], latents.shape[2]
        latents = latents.transpose(1, 2)
        noise = torch.randn_like(latents)
        t, r, is_diffusion = self.sample_timestep(batch_size, dtype=self.dtype, device=latents.device)
        t, r = self.shifted(t, num_frames), self.shifted(r, num_frames)
        return self.train_bidirection_from_draws(latents, noise, t, r, is_diffusion, prompt_embeds)

    def train_bidirection_from_draws(self, latents, noise, t, r, is_diffusion, prompt_embeds):
        """latents (B, F, C, H, W); t, r (B, F) shifted on the 1000 scale."""
        noisy_latents = self.scheduler.scale_noise(latents, t, noise)
        noise_pred = self.transformer(noisy_latents, timestep=t, r_timestep=r, encoder_hidden_states=prompt_embeds,
                                      return_dict=False)[0]
        guidance = self.guidance()
        if self.fuse_guidance_scale:
            with torch.no_grad():
                noise_pred_uncond = self.transformer(noisy_latents, timestep=t, r_timestep=r,
                                                     encoder_hidden_states=self.negative_embedding, return_dict=False)[0]
            noise_pred = (noise_pred - (1 - guidance) * noise_pred_uncond) / guidance
        dF_dt = self.compute_central_difference(noisy_latents, latents, noise, t, r, prompt_embeds, guidance)
        return self.loss_from_prediction(noise_pred, latents, noise, t, r, is_diffusion, dF_dt)

    # -- FAR, causal ---------------------------------------------------------------------------------
    def far_call(self, noisy_latents, latents, context_latents, context_timestep, t, r, prompt_embeds, chunk_partition):
        return self.transformer(
            torch.cat([context_latents, noisy_latents], dim=1), chunk_partition=chunk_partition,
            timestep=torch.cat([context_timestep, t], dim=1), r_timestep=torch.cat([context_timestep, r], dim=1),
            clean_hidden_states=latents, clean_timestep=torch.zeros_like(t), encoder_hidden_states=prompt_embeds,
            return_dict=False)[0]

    @torch.no_grad()
    def compute_causal_central_difference(self, noisy_latents, latents, noise, context_latents, context_timestep,
                                          t, r, prompt_embeds, guidance, chunk_partition):
        eps = self.flowmap_cfg["epsilon"]
        v_pred = noise - latents
        plus = self.far_call(noisy_latents + v_pred * (eps / self.scheduler.num_train_timesteps), latents,
                             context_latents, context_timestep, t + eps, r, prompt_embeds, chunk_partition)
        minus = self.far_call(noisy_latents - v_pred * (eps / self.scheduler.num_train_timesteps), latents,
                              context_latents, context_timestep, t - eps, r, prompt_embeds, chunk_partition)
        return (plus - minus) / (2 * eps * guidance)

    def train_causal(self, latents, prompt_embeds, chunk_partition, full_chunk_limit):
        """latents (B, C, F, H, W) already cut to ``chunk_partition`` (their ``sample_latents``)."""
        full_chunk_frame_limit = sum(chunk_partition[-full_chunk_limit:])
        context_latents, latents = torch.split(latents, [latents.size(2) - full_chunk_frame_limit,
                                                         full_chunk_frame_limit], dim=2)
        batch_size, num_frames = latents.shape[0], latents.shape[2]
        latents = latents.transpose(1, 2)
        noise = torch.randn_like(latents)
        t, r, is_diffusion = self.sample_timestep(batch_size, dtype=self.dtype, device=latents.device)
        t, r = self.shifted(t, num_frames), self.shifted(r, num_frames)
        return self.train_causal_from_draws(context_latents.transpose(1, 2), latents, noise, t, r, is_diffusion,
                                            prompt_embeds, chunk_partition)

    def train_causal_from_draws(self, context_latents, latents, noise, t, r, is_diffusion, prompt_embeds,
                                chunk_partition):
        """context_latents (B, F_ctx, C, H, W), latents (B, F, C, H, W); t, r (B, F)."""
        batch_size = latents.shape[0]
        noisy_latents = self.scheduler.scale_noise(latents, t, noise)
        context_timestep = torch.zeros((batch_size, context_latents.shape[1]), device=latents.device)
        noise_pred = self.far_call(noisy_latents, latents, context_latents, context_timestep, t, r, prompt_embeds,
                                   chunk_partition)
        guidance = self.guidance()
        if self.fuse_guidance_scale:
            with torch.no_grad():
                noise_pred_uncond = self.far_call(noisy_latents, latents, context_latents, context_timestep, t, r,
                                                  self.negative_embedding, chunk_partition)
            noise_pred = (noise_pred - (1 - guidance) * noise_pred_uncond) / guidance
        dF_dt = self.compute_causal_central_difference(noisy_latents, latents, noise, context_latents,
                                                       context_timestep, t, r, prompt_embeds, guidance, chunk_partition)
        return self.loss_from_prediction(noise_pred, latents, noise, t, r, is_diffusion, dF_dt)


# ---- stage 2: Wan_AnyFlow_OnPolicy_Trainer ------------------------------------------------------------

class OnPolicyTrainer:
    def __init__(self, real_score, discriminator, dmd_scheduler, dmd_cfg, negative_embedding=None):
        self.real_score, self.discriminator, self.dmd_scheduler = real_score, discriminator, dmd_scheduler
        self.dmd_cfg, self.negative_embedding = dmd_cfg, negative_embedding

    def _compute_kl_grad(self, noisy_latent, pred_video, timesteps, prompt_embeds, normalization=True):
        batch_size, num_frames = noisy_latent.shape[0], noisy_latent.shape[1]
        timesteps = _b_to_bf(timesteps, num_frames)
        zeros = torch.zeros_like(timesteps)
        noise_pred_fake_cond = self.discriminator(noisy_latent, timestep=timesteps, r_timestep=timesteps,
                                                  encoder_hidden_states=prompt_embeds, return_dict=False)[0]
        pred_fake_video = self.dmd_scheduler.step(noise_pred_fake_cond, noisy_latent, timesteps, zeros)
        noise_pred_real_cond = self.real_score(noisy_latent, timestep=timesteps, r_timestep=timesteps,
                                               encoder_hidden_states=prompt_embeds, return_dict=False)[0]
        pred_real_video_cond = self.dmd_scheduler.step(noise_pred_real_cond, noisy_latent, timesteps, zeros)
        if self.dmd_cfg.get("real_guidance_scale"):
            noise_pred_real_uncond = self.real_score(noisy_latent, timestep=timesteps, r_timestep=timesteps,
                                                     encoder_hidden_states=self.negative_embedding, return_dict=False)[0]
            pred_real_video_uncond = self.dmd_scheduler.step(noise_pred_real_uncond, noisy_latent, timesteps, zeros)
            pred_real_video = pred_real_video_cond + (
                pred_real_video_cond - pred_real_video_uncond) * self.dmd_cfg["real_guidance_scale"]
        else:
            pred_real_video = pred_real_video_cond
        grad = pred_fake_video - pred_real_video
        if normalization:
            p_real = pred_video - pred_real_video
            normalizer = torch.abs(p_real).mean(dim=[1, 2, 3, 4], keepdim=True)
            grad = grad / normalizer
        return torch.nan_to_num(grad)

    def generator_dmd_loss(self, pred_video, prompt_embeds):
        """The second half of ``generator_loss``: pred_video (B, F, C, H, W) is the rollout's output."""
        with torch.no_grad():
            t = torch.rand(pred_video.shape[0])
            timesteps = (self.dmd_scheduler.apply_shift(t) * self.dmd_scheduler.num_train_timesteps).to(pred_video.device)
            timesteps = timesteps.clamp(self.dmd_cfg.get("min_timestep", 0), self.dmd_cfg.get("max_timestep", 1000))
            noise = torch.randn_like(pred_video)
        return self.generator_dmd_loss_from_draws(pred_video, timesteps, noise, prompt_embeds)

    def generator_dmd_loss_from_draws(self, pred_video, timesteps, noise, prompt_embeds):
        with torch.no_grad():
            noisy_latent = self.dmd_scheduler.scale_noise(pred_video, timesteps, noise).detach()
            grad = self._compute_kl_grad(noisy_latent=noisy_latent, pred_video=pred_video, timesteps=timesteps,
                                         prompt_embeds=prompt_embeds)
        return self.dmd_cfg["dmd_weight"] * F.mse_loss(pred_video.double(), (pred_video.double() - grad.double()).detach(),
                                                       reduction="mean")

    def discriminator_loss(self, pred_video, prompt_embeds):
        """``discriminator_loss`` after its (no-grad) rollout: pred_video (B, F, C, H, W)."""
        latents = pred_video
        batch_size, num_frames = latents.shape[:2]
        noise = torch.randn_like(latents)
        t = _b_to_bf(logit_normal(batch_size), num_frames)
        timesteps = (self.dmd_scheduler.apply_shift(t) * self.dmd_scheduler.num_train_timesteps).to(latents.device)
        timesteps = timesteps.clamp(self.dmd_cfg.get("min_timestep", 0), self.dmd_cfg.get("max_timestep", 1000))
        return self.discriminator_loss_from_draws(latents, noise, timesteps, prompt_embeds)

    def discriminator_loss_from_draws(self, latents, noise, timesteps, prompt_embeds):
        batch_size, num_frames = latents.shape[:2]
        noisy_latents = self.dmd_scheduler.scale_noise(latents, timesteps, noise)
        noise_pred = self.discriminator(noisy_latents, timestep=timesteps, r_timestep=timesteps,
                                        encoder_hidden_states=prompt_embeds, return_dict=False)[0]
        target = noise - latents
        loss = torch.mean(((noise_pred.float() - target.float()) ** 2).reshape(batch_size, num_frames, -1), dim=-1)
        return loss.mean()


# ---- the rollouts: WanAnyFlowPipeline.training_rollout and FARWanAnyFlowPipeline.training_rollout ------

def training_rollout(transformer, scheduler, latents, prompt_embeds, num_inference_steps, grad_timestep):
    """latents (B, F, C, H, W) noise; guidance_scale 1 (the trainers pass none), use_mean_velocity True."""

    def inference_range(latents, timesteps):
        for i, t in enumerate(timesteps[:-1]):
            r = timesteps[i + 1]
            if t == r:
                continue
            timestep = t.expand(latents.shape[0]).unsqueeze(-1).repeat((1, latents.shape[1]))
            r_timestep = r.expand(latents.shape[0]).unsqueeze(-1).repeat((1, latents.shape[1]))
            noise_pred = transformer(hidden_states=latents, timestep=timestep, r_timestep=r_timestep,
                                     encoder_hidden_states=prompt_embeds, return_dict=False)[0]
            latents = scheduler.step(noise_pred, latents, t, r)
        return latents

    scheduler.set_timesteps(num_inference_steps)
    timesteps = scheduler.timesteps
    latents = inference_range(latents, [timesteps[0], timesteps[grad_timestep]])
    latents = inference_range(latents, [timesteps[grad_timestep], timesteps[grad_timestep + 1]])
    return inference_range(latents, [timesteps[grad_timestep + 1], timesteps[-1]])


def far_training_rollout(transformer, scheduler, latents, prompt_embeds, num_inference_steps, grad_timestep):
    """latents (B, C, F, H, W) as theirs; returns (B, C, F, H, W). The chunks are the transformer config's."""
    latents = latents.transpose(1, 2)
    batch_size, _, _, height, width = latents.shape
    init_latents = latents
    config = transformer.config
    chunk_partition = list(config.chunk_partition)
    assert init_latents.shape[1] == sum(chunk_partition)
    full_token_per_frame = (height // config.patch_size[1]) * (width // config.patch_size[2])
    compressed_token_per_frame = (height // config.compressed_patch_size[1]) * (width // config.compressed_patch_size[2])
    kv_cache = {}
    for layer_idx in range(config.num_layers):
        kv_cache[layer_idx] = {
            "full_cache": torch.zeros((2, batch_size, config.num_attention_heads,
                                       config.full_chunk_limit * max(chunk_partition) * full_token_per_frame,
                                       config.attention_head_dim), dtype=init_latents.dtype),
            "compressed_cache": torch.zeros((2, batch_size, config.num_attention_heads,
                                             (len(chunk_partition) - config.full_chunk_limit + 1)
                                             * max(chunk_partition) * compressed_token_per_frame,
                                             config.attention_head_dim), dtype=init_latents.dtype),
        }
    kv_cache_flag = {"num_cached_chunks": 0, "is_cache_step": False}
    output = torch.zeros_like(init_latents)

    def inference(latents, partition):
        def inference_range(latents, timesteps):
            for i, t in enumerate(timesteps[:-1]):
                r = timesteps[i + 1]
                if t == r:
                    continue
                timestep = t.expand(latents.shape[0]).unsqueeze(-1).repeat((1, latents.shape[1]))
                r_timestep = r.expand(latents.shape[0]).unsqueeze(-1).repeat((1, latents.shape[1]))
                noise_pred, _ = transformer(hidden_states=latents, timestep=timestep, r_timestep=r_timestep,
                                            encoder_hidden_states=prompt_embeds, return_dict=False,
                                            chunk_partition=partition, kv_cache=kv_cache,
                                            kv_cache_flag=copy.deepcopy(kv_cache_flag))
                latents = scheduler.step(noise_pred, latents, t, r)
            return latents

        scheduler.set_timesteps(num_inference_steps)
        timesteps = scheduler.timesteps
        latents = inference_range(latents, [timesteps[0], timesteps[grad_timestep]])
        latents = inference_range(latents, [timesteps[grad_timestep], timesteps[grad_timestep + 1]])
        return inference_range(latents, [timesteps[grad_timestep + 1], timesteps[-1]])

    @torch.no_grad()
    def encode_kv_cache(partition):
        kv_cache_flag["is_cache_step"] = True
        latent_model_input = output[:, :sum(partition)]  # their .to(torch.bfloat16) left out (fp32 here)
        timestep = torch.tensor([0]).expand(latent_model_input.shape[0]).unsqueeze(-1)
        timestep = timestep.repeat((1, latent_model_input.shape[1]))
        transformer(hidden_states=latent_model_input, chunk_partition=partition, timestep=timestep,
                    r_timestep=timestep.clone(), encoder_hidden_states=prompt_embeds, return_dict=False,
                    kv_cache=kv_cache, kv_cache_flag=copy.deepcopy(kv_cache_flag))
        kv_cache_flag["num_cached_chunks"] += 1
        kv_cache_flag["is_cache_step"] = False

    for chunk_idx in range(len(chunk_partition)):
        start, stop = sum(chunk_partition[:chunk_idx]), sum(chunk_partition[:chunk_idx + 1])
        output[:, start:stop] = inference(init_latents[:, start:stop], chunk_partition[:chunk_idx + 1])
        if chunk_idx < len(chunk_partition) - 1:
            encode_kv_cache(chunk_partition[:chunk_idx + 1])
    return output.transpose(1, 2)


def seed_everything(seed):
    """The global generators the authors' draws use."""
    random.seed(seed)
    torch.manual_seed(seed)
