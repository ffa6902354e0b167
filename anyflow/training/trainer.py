"""The trainer: one loop for AnyFlow's three stages, on one process or several (``torchrun``).

    trainer = Trainer(load_config("stage1.toml"))
    trainer.train()          # or: anyflow train stage1.toml

Per iteration (the authors' ``far/main.py`` loop and ``far/trainers``, NVlabs/AnyFlow):

- ``teacher`` (stage 0): :func:`flow_matching_loss` on a batch.
- ``pretrain`` (stage 1): :class:`FlowMapLoss` on a batch.
- ``onpolicy`` (stage 2): the generator (every ``discriminator_update_ratio``-th iteration) takes a
  batch, rolls out a video from noise (:func:`rollout`, N drawn from ``num_inference_steps_list``,
  the gradient step k uniform in [0, N)), and descends :func:`dmd_loss` against the frozen real
  score and the fake score, plus the stage-1 loss on the whole batch (``cotrain_forward_kl``);
  then the fake score takes a new batch, rolls out without gradients and descends
  :func:`fake_score_loss` on the result. Each has its own AdamW.

Every update: the learning rate of ``constant_with_warmup`` (``lr * k / warmup_iter`` at update k
< warmup_iter, as transformers' schedule the authors use: the first update has lr 0), gradients
clipped to a global norm of ``max_grad_norm``, AdamW, then the EMA of the trained weights
(``ema_decay``; a plain copy for the first ``ema_warmup_step`` updates, as the authors' ShardEMA).
Prompts are replaced by the negative prompt at ``drop_text_ratio`` (stages 0 and 1, and stage 2's
stage-1 term), as the authors drop them.

**Precision** (``mixed_precision``): the weights that train, and their LoRA factors, are held in
float32, which makes them their own master weights: AdamW updates and the EMA are float32. The
forward and backward passes run under ``torch.autocast(bfloat16)``, so the matrix products and
attention run in bf16 while norms, the adaLN modulation and the losses stay in float32 as the
model computes them. The frozen real score, which nothing updates, is held in bf16. Without
``mixed_precision`` everything is float32.

**Random draws** come from one generator seeded with ``manual_seed``, identical on every process:
each process draws the noise, timesteps and text drops of the whole global batch and keeps its
own rows. So a run draws the same numbers on one process or eight (its results differ only by
rounding), and a resumed run draws what the uninterrupted one would have.

**Several processes** (``torchrun --nproc-per-node N -m anyflow train CONFIG``): each process
takes ``batch_size_per_gpu`` samples of the global batch; the models' blocks are sharded with
FSDP2 by :func:`anyflow.parallel.parallelize` (weights only), so gradients are averaged over the
processes as they are made. The stage-1 rescale averages over the global batch
(:func:`~anyflow.training.objectives.flow_map.rescale_to_diffusion_mean`).

**Checkpoints** (every ``save_checkpoint_freq`` iterations) hold what changes: the trained
parameters (each process its own shards), the optimizers' state, the EMA, the iteration, the
batches drawn and the generator's state. They are written into a hidden partial folder, which is
renamed to ``checkpoints/step_NNNNNN`` when every process has written its file; then the file
``checkpoints/latest`` is replaced by one naming it, and older checkpoints beyond
``keep_checkpoints`` are removed. A run whose ``output_dir`` has a checkpoint resumes from it,
exactly: the same process count continues as the uninterrupted run would have.

**Outputs** in ``output_dir``: ``train_log.jsonl`` (one JSON object per iteration: losses, grad
norms, learning rate, seconds), ``loss.png`` (the curves), and at the end the trained weights: with
LoRA ``lora.safetensors`` and ``lora_ema.safetensors`` (diffusers / PEFT adapters, for
``--lora``, ``merge_lora`` and diffusers' ``load_lora_weights``); when weights besides LoRA
factors trained (every weight without ``lora_config``; a FAR model's compressed patch embedding,
which trains whole as the authors train it), the whole model, LoRA merged in, in our layout:
``model/`` and ``model_ema/``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
import zlib
from contextlib import nullcontext
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..runtime.processes import Processes
from .config import ModelOptions, TrainingConfig
from .data import BatchSchedule, LatentDataset
from .lora import inject_lora, merged_state_dict, save_lora_adapter, train_only_lora
from .objectives.velocity import is_far

LOG_FILE, CURVE_FILE, CHECKPOINTS = "train_log.jsonl", "loss.png", "checkpoints"


# ---- parameters that may be sharded (FSDP2 DTensors) or whole ------------------------------------------

def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: the local shard of an FSDP2 DTensor, else the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an FSDP2 DTensor gathered from every process (all must call), else the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def clip_gradients(parameters: Sequence[nn.Parameter], max_norm: float) -> float:
    """Scale the gradients so that their global L2 norm is at most ``max_norm``; the norm before.

    As ``torch.nn.utils.clip_grad_norm_`` (coefficient ``max_norm / (norm + 1e-6)``, at most 1), for
    a mix of FSDP2-sharded gradients (their squares summed over the processes) and whole ones
    (the replicated fp32 islands, the same on every process, counted once).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    sharded = [local(g).float().square().sum() for g in grads if hasattr(g, "to_local")]
    whole_grads = [g.float().square().sum() for g in grads if not hasattr(g, "to_local")]
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.stack(sharded).sum() if sharded else torch.zeros((), device=device)
    if sharded and dist.is_initialized():
        dist.all_reduce(total)
    if whole_grads:
        total = total + torch.stack(whole_grads).sum().to(total.device)
    norm = total.sqrt()
    coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        local(g).mul_(coefficient.to(g.device))
    return norm.item()


class EMA:
    """Exponential moving average of the trained parameters, in float32 (this process's shards).

    ``update(k)`` after update k: ``ema <- d * ema + (1 - d) * p`` with d = 0 (a copy) for
    k < ``warmup_steps`` and ``decay`` after, as the authors' ShardEMA.
    """

    def __init__(self, named: Dict[str, nn.Parameter], decay: float, warmup_steps: int):
        self.named, self.decay, self.warmup_steps = named, decay, warmup_steps
        self.shadow = {name: local(p).detach().float().clone() for name, p in named.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = self.decay if step >= self.warmup_steps else 0.0
        for name, p in self.named.items():
            self.shadow[name].mul_(decay).add_(local(p).detach().float(), alpha=1 - decay)

    def whole(self) -> Dict[str, torch.Tensor]:
        """The averages as whole tensors (every process must call: sharded ones are gathered)."""
        out = {}
        for name, p in self.named.items():
            if hasattr(p, "to_local"):
                from torch.distributed.tensor import DTensor

                out[name] = DTensor.from_local(self.shadow[name].to(p.dtype), p.device_mesh, p.placements,
                                               shape=p.shape, stride=p.stride()).full_tensor()
            else:
                out[name] = self.shadow[name]
        return out


class TrainedModel:
    """A model that trains, with its parameters, optimizer and learning rate."""

    def __init__(self, name: str, model: nn.Module, options, lora: bool):
        self.name, self.model, self.options, self.lora = name, model, options, lora
        self.named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.updates = 0  # the learning rate's schedule counts this model's updates
        self.optimizer = torch.optim.AdamW(list(self.named.values()), lr=options.lr, betas=tuple(options.betas),
                                           weight_decay=options.weight_decay)

    def update(self, warmup: int, max_grad_norm: float) -> float:
        """Clip, set the learning rate of this update and take it; the gradient norm before clipping."""
        norm = clip_gradients(list(self.named.values()), max_grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = self.options.lr * (min(1.0, self.updates / warmup) if warmup > 0 else 1.0)
        self.optimizer.step()
        self.updates += 1
        return norm


# ---- the trainer ---------------------------------------------------------------------------------------

class Trainer:
    """Builds a run from a checked :class:`~anyflow.training.config.TrainingConfig` (resuming when
    ``output_dir`` holds a checkpoint) and trains it with :meth:`train`; ``say`` prints rank 0's lines."""

    def __init__(self, config: TrainingConfig, say: Callable[[str], None] = print, processes: Optional[Processes] = None):
        self.config = config
        if processes is None:  # one process, or the ranks torchrun started (the caller tears the group down)
            processes = Processes(None if config.device == "auto" else config.device)
        self.world, self.rank, self.mesh, self.device = processes.count, processes.rank, processes.mesh, processes.device
        self.say = say if self.rank == 0 else (lambda message: None)
        self.out = config.path.output_dir
        self.step, self.batches = 0, 0  # iterations done, batches drawn
        self.draws = torch.Generator().manual_seed(config.manual_seed)
        self._objectives()

        data_options, models = config.datasets.train, config.models
        self.dataset = LatentDataset(data_options.data_root)
        self.schedule = BatchSchedule(self.dataset, data_options.batch_size_per_gpu, config.manual_seed, self.rank,
                                      self.world)
        self.negative = self.dataset.negative_embedding()
        needs_negative = {"models.text_encoder_cfg.drop_text_ratio": models.text_encoder_cfg.drop_text_ratio > 0,
                          "models.text_encoder_cfg.fuse_guidance_scale": models.text_encoder_cfg.fuse_guidance_scale != 1
                          and config.stage != "teacher",
                          "models.dmd_cfg.real_guidance_scale": models.dmd_cfg.real_guidance_scale != 0
                          and config.stage == "onpolicy"}
        for key, needed in needs_negative.items():
            if needed and self.negative is None:
                raise ValueError(f"{config.source}: {key} needs the negative prompt's embedding, and "
                                 f"{data_options.data_root} has none (negative_prompt_embeds.safetensors)")
        if self.negative is not None:
            self.negative = self.negative.to(self.device, torch.float32)

        self.generator = self._trained("generator", models.transformer_cfg, config.train.optim_g)
        self.dataset.check_model(self.generator.model.config, data_options.data_root)
        self.far = is_far(self.generator.model)
        self.ema = EMA(self.generator.named, config.train.ema_decay, config.train.ema_warmup_step)
        self.real_score = self.fake_score = None
        if config.stage == "onpolicy":
            real = _load(models.real_cfg, self.device, torch.bfloat16 if config.mixed_precision else torch.float32)
            self.real_score = self._distribute(real.requires_grad_(False).eval())
            self.fake_score = self._trained("fake_score", models.discriminator_cfg, config.train.optim_d)
        self._resume()

    # -- building ---------------------------------------------------------------------------------

    def _trained(self, name: str, options: ModelOptions, optimizer_options) -> TrainedModel:
        model = _load(options, self.device, torch.float32)
        if options.lora_config is not None:
            lora = options.lora_config
            inject_lora(model, lora.target_module_name, lora.lora_rank, lora.lora_alpha,
                        generator=torch.Generator().manual_seed(self.config.manual_seed))  # alike on every process
            train_only_lora(model)
            if is_far(model):  # the compressed patch embedding is new to FAR: it trains whole, as the authors train it
                model.far_patch_embed.requires_grad_(True)
        else:
            model.requires_grad_(True)
        if options.enable_gradient_checkpoint:
            model.enable_gradient_checkpointing()
        return TrainedModel(name, self._distribute(model.train()), optimizer_options, options.lora_config is not None)

    def _distribute(self, model: nn.Module) -> nn.Module:
        if self.world == 1:
            return model
        from ..runtime.parallel import parallelize

        return parallelize(model, self.mesh, shard_weights=True, sequence_parallel=False)

    def _objectives(self) -> None:
        from . import FlowMapLoss

        models = self.config.models
        flowmap, scheduler = models.flowmap_cfg, models.scheduler_cfg
        self.flow_map_loss = FlowMapLoss(shift=scheduler.shift, epsilon=flowmap.epsilon, weighting=scheduler.weight_type,
                                         guidance_scale=models.text_encoder_cfg.fuse_guidance_scale,
                                         diffusion_ratio=flowmap.diffusion_ratio,
                                         consistency_ratio=flowmap.consistency_ratio)

    def _autocast(self):
        """bf16 autocast with ``mixed_precision``, else nothing."""
        if self.config.mixed_precision:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # -- the loop ---------------------------------------------------------------------------------

    def train(self) -> None:
        """Run until ``total_iter`` iterations, checkpointing, logging and printing on the way; then
        write the trained weights and the loss curve."""
        total = self.config.train.total_iter
        if self.step >= total:
            self.say(f"{self.out}: already trained to step {self.step} of {total}")
        started, first = time.perf_counter(), self.step
        while self.step < total:
            record = self.train_step()
            self._log(record)
            if self.step % self.config.logger.print_freq == 0 or self.step == total:
                rate = (time.perf_counter() - started) / (self.step - first)
                values = "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k.endswith(("loss", "grad_norm", "lr")))
                self.say(f"step {self.step}/{total}  {values}  {rate:.2f} s/step  "
                         f"(about {_duration(rate * (total - self.step))} left)")
            if self.step % self.config.logger.save_checkpoint_freq == 0 or self.step == total:
                self.save_checkpoint()
        self.finish()

    def train_step(self) -> Dict[str, float]:
        """One iteration of the configured stage; its record (losses averaged over the processes)."""
        started = time.perf_counter()
        stage = self.config.stage
        record = self._onpolicy_step() if stage == "onpolicy" else self._forward_kl_step(stage)
        self.step += 1
        return {"step": self.step, **record, "seconds": time.perf_counter() - started}

    def _forward_kl_step(self, stage: str) -> Dict[str, float]:
        """Stage 0 or 1 on one batch: the loss, its gradients, one update of the generator."""
        latents, text = self._batch()
        self.generator.optimizer.zero_grad(set_to_none=True)
        loss = self._teacher_loss(latents, text) if stage == "teacher" else self._flow_map_loss(latents, text)
        loss.backward()
        norm = self._update_generator()
        return {"loss": _mean_over_processes(loss), "grad_norm": norm, "lr": self._lr(self.generator)}

    def _onpolicy_step(self) -> Dict[str, float]:
        """Stage 2: the generator's update (every ``discriminator_update_ratio``-th iteration), then the fake score's."""
        from . import dmd_loss, fake_score_loss, rollout
        from .objectives.timesteps import sample_logit_normal_timesteps, sample_uniform_timesteps

        models, record = self.config.models, {}
        dmd, shift = models.dmd_cfg, models.scheduler_cfg.shift
        if self.step % self.config.train.discriminator_update_ratio == 0:
            latents, text = self._batch()
            self.generator.optimizer.zero_grad(set_to_none=True)
            noise, dmd_text = self._draw_noise(self._video_frames(latents[: dmd.dmd_batch_size])), text[: dmd.dmd_batch_size]
            with self._autocast():
                video = rollout(self.generator.model, noise, dmd_text, **self._rollout_choice(), shift=shift)
            t = self._rows(sample_uniform_timesteps(self._global(len(video)), shift=shift, generator=self.draws))
            t = t.clamp(dmd.min_timestep, dmd.max_timestep).to(self.device)
            guidance = dmd.real_guidance_scale or None
            with self._autocast():
                generator_loss = dmd.dmd_weight * dmd_loss(
                    video, self.real_score, self.fake_score.model, dmd_text, t=t, noise=self._draw_noise(video),
                    negative_encoder_hidden_states=self.negative if guidance else None, real_guidance_scale=guidance)
            generator_loss.backward()
            record["generator_loss"] = _mean_over_processes(generator_loss)
            if dmd.cotrain_forward_kl:
                flow_map_loss = self._flow_map_loss(latents, text)
                flow_map_loss.backward()
                record["flow_map_loss"] = _mean_over_processes(flow_map_loss)
            record["grad_norm"] = self._update_generator()
            record["lr"] = self._lr(self.generator)

        latents, text = self._batch()
        latents, text = self._video_frames(latents[: dmd.dmd_batch_size]), text[: dmd.dmd_batch_size]
        self.fake_score.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad(), self._autocast():
            video = rollout(self.generator.model, self._draw_noise(latents), text, **self._rollout_choice(), shift=shift)
        t = self._rows(sample_logit_normal_timesteps(self._global(len(video)), shift=shift, generator=self.draws))
        with self._autocast():
            loss = fake_score_loss(self.fake_score.model, video.float(), text, t=t.to(self.device),
                                   noise=self._draw_noise(video))
        loss.backward()
        record["fake_score_loss"] = _mean_over_processes(loss)
        record["fake_score_grad_norm"] = self.fake_score.update(self.config.train.warmup_iter,
                                                                self.config.train.max_grad_norm)
        return record

    def _teacher_loss(self, latents: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        from . import flow_matching_loss
        from .objectives.timesteps import sample_logit_normal_timesteps

        shift = self.config.models.scheduler_cfg.shift
        noise = self._draw_noise(latents)
        t = self._rows(sample_logit_normal_timesteps(self._global(len(latents)), shift=shift, generator=self.draws))
        text = self._drop_text(text)
        with self._autocast():
            return flow_matching_loss(self.generator.model, latents, text, t=t.to(self.device), noise=noise, shift=shift)

    def _flow_map_loss(self, latents: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Stage 1's loss on a batch, with this process's rows of the global batch's draws."""
        from .objectives.timesteps import sample_flow_map_timesteps

        flowmap, partition = self.config.models.flowmap_cfg, None
        noised = latents
        if self.far:  # the authors' sample_latents: the first k chunks, the last full_chunk_limit of them noised
            partition = self._far_chunks()
            latents = latents[:, : sum(partition)]
            noised = latents[:, sum(partition[: -self.generator.model.config.full_chunk_limit]):]
        noise = self._draw_noise(noised)
        t, r, is_diffusion = (self._rows(x) for x in sample_flow_map_timesteps(
            self._global(len(noised)), shift=self.config.models.scheduler_cfg.shift,
            diffusion_ratio=flowmap.diffusion_ratio, consistency_ratio=flowmap.consistency_ratio,
            generator=self.draws, rank=0, world_size=1))
        text = self._drop_text(text)
        with self._autocast():
            return self.flow_map_loss(self.generator.model, latents, text, t=t.to(self.device), r=r.to(self.device),
                                      noise=noise, is_diffusion=is_diffusion.to(self.device),
                                      negative_encoder_hidden_states=self.negative, chunk_partition=partition)

    def _update_generator(self) -> float:
        train = self.config.train
        norm = self.generator.update(train.warmup_iter, train.max_grad_norm)
        self.ema.update(self.step)
        return norm

    # -- the draws, identical on every process: each keeps its rows of the global batch -------------------

    def _global(self, rows: int) -> int:
        return rows * self.world

    def _rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """This process's rows of a global-batch tensor."""
        rows = len(tensor) // self.world
        return tensor[self.rank * rows : (self.rank + 1) * rows]

    def _draw_noise(self, like: torch.Tensor) -> torch.Tensor:
        noise = torch.randn((self._global(len(like)), *like.shape[1:]), generator=self.draws)
        return self._rows(noise).to(like.device, like.dtype)

    def _drop_text(self, text: torch.Tensor) -> torch.Tensor:
        """Prompts replaced by the negative one at ``drop_text_ratio``."""
        ratio = self.config.models.text_encoder_cfg.drop_text_ratio
        if ratio == 0:
            return text
        dropped = self._rows(torch.rand(self._global(len(text)), generator=self.draws) < ratio).to(text.device)
        return torch.where(dropped[:, None, None], self.negative.expand_as(text), text)

    def _far_chunks(self) -> List[int]:
        """A FAR stage-1 sample's chunks: the first ``full_chunk_limit`` of the model's, or (at
        ``long_context_training_ratio``) the first k, k uniform from ``full_chunk_limit`` to all."""
        config = self.generator.model.config
        chunks, limit = list(config.chunk_partition), config.full_chunk_limit
        ratio = self.config.models.transformer_cfg.far_config.long_context_training_ratio
        long = float(torch.rand((), generator=self.draws)) < ratio
        count = int(torch.randint(limit, len(chunks) + 1, (), generator=self.draws)) if long else limit
        return chunks[: min(count, len(chunks))]

    def _video_frames(self, latents: torch.Tensor) -> torch.Tensor:
        """The frames a rollout makes: all, or a FAR model's ``chunk_partition`` of them."""
        return latents[:, : sum(self.generator.model.config.chunk_partition)] if self.far else latents

    def _rollout_choice(self) -> Dict[str, int]:
        """The rollout's N (from ``num_inference_steps_list``) and gradient step k (uniform in [0, N))."""
        choices = self.config.models.rollout_cfg.num_inference_steps_list
        num_steps = choices[int(torch.randint(len(choices), (1,), generator=self.draws))]
        return {"num_steps": num_steps, "grad_step": int(torch.randint(num_steps, (1,), generator=self.draws))}

    def _batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        latents, text = self.schedule.batch(self.batches)
        self.batches += 1
        return latents.to(self.device, torch.float32), text.to(self.device, torch.float32)

    def _lr(self, trained: TrainedModel) -> float:
        return trained.optimizer.param_groups[0]["lr"]

    def _trained_models(self) -> List[TrainedModel]:
        return [m for m in (self.generator, self.fake_score) if m is not None]

    # -- records ----------------------------------------------------------------------------------

    def _log(self, record: Dict[str, float]) -> None:
        if self.rank == 0:
            with open(os.path.join(self.out, LOG_FILE), "a") as f:
                f.write(json.dumps(record) + "\n")

    def finish(self) -> None:
        """Write the trained weights (live and EMA) and the loss curve.

        A LoRA run writes its adapters; a run that trained other weights too (a FAR model's compressed
        patch embedding, or every weight) writes the whole model, LoRA merged in, in our layout.
        """
        from weights_convert import save_state_dict

        live = {name: whole(p.detach()) for name, p in self.generator.named.items()}
        averaged = self.ema.whole()
        model, written = self.generator.model, []
        lora_only = self.generator.lora and all(".lora_A." in n or ".lora_B." in n for n in live)
        for suffix, values in (("", live), ("_ema", averaged)):
            if self.generator.lora and self.rank == 0:
                save_lora_adapter(model, os.path.join(self.out, f"lora{suffix}.safetensors"), values)
                written.append(f"lora{suffix}.safetensors")
            if not lora_only:
                state = merged_state_dict(model, values)  # every process gathers its shards
                if self.rank == 0:
                    save_state_dict(model.config, state, os.path.join(self.out, f"model{suffix}"), force=True)
                    written.append(f"model{suffix}/")
        if self.rank == 0:
            if write_loss_curve(os.path.join(self.out, LOG_FILE), os.path.join(self.out, CURVE_FILE)):
                written.append(CURVE_FILE)
            self.say(f"wrote {', '.join(os.path.join(self.out, w) for w in written)}")
        _barrier()

    # -- checkpoints ------------------------------------------------------------------------------

    def _state(self) -> dict:
        """This process's part of the run's state."""

        def optimizer_state(optimizer):
            state = optimizer.state_dict()
            state["state"] = {i: {k: local(v) for k, v in s.items()} for i, s in state["state"].items()}
            return state

        return {
            "step": self.step, "batches": self.batches, "processes": self.world, "draws": self.draws.get_state(),
            "parameters": {f"{m.name}.{n}": local(p.detach()) for m in self._trained_models() for n, p in m.named.items()},
            "optimizers": {m.name: optimizer_state(m.optimizer) for m in self._trained_models()},
            "updates": {m.name: m.updates for m in self._trained_models()},
            "ema": self.ema.shadow,
        }

    def save_checkpoint(self) -> None:
        """Write the run's state to ``checkpoints/step_NNNNNN`` (every process its file), atomically."""
        from weights_convert.partials import discard, partial_path

        folder = os.path.join(self.out, CHECKPOINTS)
        name = f"step_{self.step:06d}"
        partial = [partial_path(os.path.join(folder, name)) if self.rank == 0 else None]
        if self.world > 1:
            dist.broadcast_object_list(partial, src=0)
        partial = partial[0]
        try:
            if self.rank == 0:
                os.makedirs(partial)
            _barrier()
            torch.save(self._state(), os.path.join(partial, f"rank{self.rank}.pt"))
            _barrier()
            if self.rank == 0:
                target = os.path.join(folder, name)
                shutil.rmtree(target, ignore_errors=True)  # a leftover of an earlier run past this step
                os.rename(partial, target)
                _write_atomically(os.path.join(folder, "latest"), name + "\n")
                kept = sorted(e for e in os.listdir(folder) if e.startswith("step_"))
                for old in kept[: -self.config.logger.keep_checkpoints]:
                    shutil.rmtree(os.path.join(folder, old), ignore_errors=True)
        finally:
            if self.rank == 0:
                discard(partial)
        _barrier()

    def _resume(self) -> None:
        """Continue from ``checkpoints/latest`` when there is one; else start the output folder."""
        latest = os.path.join(self.out, CHECKPOINTS, "latest")
        if not os.path.isfile(latest):
            if self.rank == 0:
                os.makedirs(self.out, exist_ok=True)
                if os.path.isfile(self.config.source):
                    shutil.copyfile(self.config.source, os.path.join(self.out, "config.toml"))
                _write_atomically(os.path.join(self.out, LOG_FILE), "")
            _barrier()
            return
        with open(latest) as f:
            name = f.read().strip()
        path = os.path.join(self.out, CHECKPOINTS, name, f"rank{self.rank}.pt")
        if not os.path.isfile(path):
            raise ValueError(f"{latest} names {name}, which has no {os.path.basename(path)}: a checkpoint of fewer "
                             "processes? Resume with the number of processes that wrote it")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["processes"] != self.world:
            raise ValueError(f"{os.path.dirname(path)} was written by {state['processes']} processes, this run has "
                             f"{self.world}: resume with {state['processes']} (the shards and the draws depend on it)")
        self.step, self.batches = state["step"], state["batches"]
        self.draws.set_state(state["draws"])
        with torch.no_grad():
            for m in self._trained_models():
                for n, p in m.named.items():
                    local(p).copy_(state["parameters"][f"{m.name}.{n}"])
                m.optimizer.load_state_dict(_sharded_like(state["optimizers"][m.name], list(m.named.values())))
                m.updates = state["updates"][m.name]
            for n, shadow in self.ema.shadow.items():
                shadow.copy_(state["ema"][n])
        if self.rank == 0:  # the log keeps the iterations the checkpoint holds
            log = os.path.join(self.out, LOG_FILE)
            lines = open(log).read().splitlines() if os.path.isfile(log) else []
            kept = [line for line in lines if line and json.loads(line)["step"] <= self.step]
            _write_atomically(log, "".join(line + "\n" for line in kept))
        self.say(f"resuming from {os.path.dirname(path)} (step {self.step})")
        _barrier()


# ---- helpers ---------------------------------------------------------------------------------------

def _load(options: ModelOptions, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The model a config section names (bidirectional or FAR, from its config), adapters merged in."""
    from weights_convert.sources import open_checkpoint

    from ..model.config import AnyFlowFARConfig
    from ..pretrained import AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel

    far = isinstance(open_checkpoint(options.model_name).config, AnyFlowFARConfig)
    model_class = AnyFlowFARTransformer3DModel if far else AnyFlowTransformer3DModel
    return model_class.from_pretrained(options.model_name, dtype=dtype, device=device, lora=options.merge_lora or None)


def _sharded_like(state: dict, parameters: List[nn.Parameter]) -> dict:
    """An optimizer state of local shards, its tensors made DTensors again where the parameters are."""
    from torch.distributed.tensor import DTensor

    for index, values in state["state"].items():
        p = parameters[index]
        if hasattr(p, "to_local"):
            for key, value in values.items():
                if value.dim() > 0:  # exp_avg, exp_avg_sq (step is a scalar)
                    values[key] = DTensor.from_local(value, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    return state


def _mean_over_processes(loss: torch.Tensor) -> float:
    value = loss.detach().float().reshape(1)
    if dist.is_initialized():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value.item()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_atomically(path: str, text: str) -> None:
    partial = f"{path}.partial-{os.getpid()}"
    with open(partial, "w") as f:
        f.write(text)
    os.replace(partial, path)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


# ---- the loss curve: a PNG from numpy and zlib alone --------------------------------------------------

# A 3 x 5 pixel font: five rows per glyph, each an octal digit whose bits 4, 2, 1 are the left,
# middle and right pixels.
GLYPHS = {
    "0": "75557", "1": "26227", "2": "71747", "3": "71317", "4": "55711", "5": "74717", "6": "74757", "7": "71111",
    "8": "75757", "9": "75717", ".": "00002", "-": "00700", "+": "02720", "_": "00007", " ": "00000", ":": "02020",
    "a": "25755", "b": "65656", "c": "34443", "d": "65556", "e": "74647", "f": "74644", "g": "34553", "h": "55755",
    "i": "72227", "j": "11152", "k": "55655", "l": "44447", "m": "57755", "n": "65555", "o": "25552", "p": "65644",
    "q": "25563", "r": "65655", "s": "34216", "t": "72222", "u": "55557", "v": "55552", "w": "55775", "x": "55255",
    "y": "55222", "z": "71247",
}
SERIES_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def write_loss_curve(log_path: str, png_path: str, width: int = 800, panel_height: int = 200) -> bool:
    """Draw every ``*loss`` series of a ``train_log.jsonl`` into ``png_path``, one panel each (the
    values faint, their moving average solid, the range on the left, the steps below); False when
    the log has no iterations."""
    records = [json.loads(line) for line in open(log_path) if line.strip()]
    names = [k for k in records[0] if k.endswith("loss")] if records else []
    if not names:
        return False
    image = np.full((panel_height * len(names), width, 3), 255, dtype=np.uint8)
    left, right, top, bottom = 80, width - 20, 24, panel_height - 24
    for index, name in enumerate(names):
        y0 = index * panel_height
        steps = np.array([r["step"] for r in records if name in r], dtype=np.float64)
        values = np.array([r[name] for r in records if name in r], dtype=np.float64)
        finite = np.isfinite(values)
        steps, values = steps[finite], values[finite]
        low, high = (values.min(), values.max()) if len(values) else (0.0, 1.0)
        high = high if high > low else low + 1.0
        span = max(steps.max() - steps.min(), 1.0) if len(steps) else 1.0
        xs = left + (steps - (steps.min() if len(steps) else 0)) / span * (right - left)
        ys = y0 + bottom - (values - low) / (high - low) * (bottom - top)
        colour = SERIES_COLOURS[index % len(SERIES_COLOURS)]
        _polyline(image, xs, ys, tuple(255 - (255 - c) // 3 for c in colour))
        window = max(1, len(values) // 50)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid") if len(values) >= window else values
        _polyline(image, xs[window - 1:], y0 + bottom - (smooth - low) / (high - low) * (bottom - top), colour, thick=True)
        _polyline(image, np.array([left, left, right]), np.array([y0 + top, y0 + bottom, y0 + bottom]), (0, 0, 0))
        _text(image, name, left, y0 + 6, colour)
        _text(image, f"{high:.3g}", 4, y0 + top, (0, 0, 0))
        _text(image, f"{low:.3g}", 4, y0 + bottom - 10, (0, 0, 0))
        if len(steps):
            _text(image, f"step {int(steps.min())}", left, y0 + bottom + 4, (0, 0, 0))
            label = f"{int(steps.max())}"
            _text(image, label, right - 8 * len(label), y0 + bottom + 4, (0, 0, 0))
    partial = f"{png_path}.partial-{os.getpid()}"
    with open(partial, "wb") as f:
        f.write(png_bytes(image))
    os.replace(partial, png_path)
    return True


def png_bytes(image: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 RGB image as a PNG file: signature, IHDR, one zlib IDAT (filter 0 per row), IEND."""
    height, width, _ = image.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = np.concatenate([np.zeros((height, 1), dtype=np.uint8), image.reshape(height, -1)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
            + chunk(b"IEND", b""))


def _polyline(image: np.ndarray, xs: np.ndarray, ys: np.ndarray, colour, thick: bool = False) -> None:
    """Straight segments through the points (pixel coordinates), sampled densely enough to leave no gaps."""
    height, width, _ = image.shape
    for (xa, ya), (xb, yb) in zip(zip(xs[:-1], ys[:-1]), zip(xs[1:], ys[1:])):
        count = int(max(abs(xb - xa), abs(yb - ya))) + 2
        px, py = np.linspace(xa, xb, count).round().astype(int), np.linspace(ya, yb, count).round().astype(int)
        for dx, dy in ([(0, 0), (1, 0), (0, 1), (1, 1)] if thick else [(0, 0)]):
            inside = (px + dx >= 0) & (px + dx < width) & (py + dy >= 0) & (py + dy < height)
            image[py[inside] + dy, px[inside] + dx] = colour
    if len(xs) == 1:
        image[int(np.clip(round(ys[0]), 0, height - 1)), int(np.clip(round(xs[0]), 0, width - 1))] = colour


def _text(image: np.ndarray, text: str, x: int, y: int, colour, scale: int = 2) -> None:
    """``text`` in the 3 x 5 font (unknown characters as blanks), its top left corner at (x, y)."""
    for i, char in enumerate(text.lower()):
        rows = GLYPHS.get(char, GLYPHS[" "])
        for row, bits in enumerate(rows):
            for column in range(3):
                if int(bits) >> (2 - column) & 1:
                    top, left = y + row * scale, x + (i * 4 + column) * scale
                    image[top : top + scale, left : left + scale] = colour
