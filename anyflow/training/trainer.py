"""The trainer: one loop for AnyFlow's three stages, on one process or several (``torchrun``).

    trainer = Trainer(load_config("stage1.toml"))
    trainer.train()          # or: anyflow train stage1.toml

Per iteration, as the authors' ``far/main.py`` loop and ``far/trainers`` (NVlabs/AnyFlow): stage 0
(``teacher``) descends :func:`flow_matching_loss`, stage 1 (``pretrain``) :class:`FlowMapLoss`, on a
batch; stage 2 (``onpolicy``) rolls a video out from noise and descends :func:`dmd_loss` (plus the
stage-1 loss with ``cotrain_forward_kl``), then trains the fake score with :func:`fake_score_loss`.
Each update is :mod:`.optim`'s; checkpoints and the exact resume are :mod:`.checkpoints`'; the loss
curve :mod:`.loss_curve`'s. docs/TRAINING.md gives the stages, the precision (float32 weights under
bf16 autocast), the random draws (the whole global batch drawn on every process), the several-process
run (FSDP2 through :func:`anyflow.runtime.parallel.parallelize`) and the files a run writes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..runtime.compute import duration
from ..runtime.processes import Processes
from .checkpoints import Checkpoints, barrier, write_atomically
from .config import ModelOptions, TrainingConfig, flat_config, resume_changes
from .data import BatchSchedule, LatentDataset
from .lora import inject_lora, merged_state_dict, save_lora_adapter, train_only_lora
from .loss_curve import MATPLOTLIB_HINT, can_draw, write_loss_curve
from .objectives.velocity import is_far
from .optim import EMA, TrainedModel, local, mean_over_processes, sharded_like, whole

LOG_FILE, CURVE_FILE = "train_log.jsonl", "loss.png"


class NonFiniteTraining(ValueError):
    """A loss or gradient norm was NaN or infinite more often than ``train.max_nonfinite_steps`` allows."""


def check_output_dir(config: TrainingConfig) -> None:
    """``path.output_dir`` can hold the run: not a file, not the data folder (or inside it), writable; named
    in one line before anything loads."""
    out, data = os.path.realpath(config.path.output_dir), os.path.realpath(config.datasets.train.data_root)
    where = f"{config.source}: path.output_dir {config.path.output_dir}"
    if out == data or out.startswith(data + os.sep):
        raise ValueError(f"{where} is the data folder datasets.train.data_root (or inside it): the run would write "
                         "into the dataset; give another folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{where} is a file; give a folder (it is made if missing)")
    probe = os.path.join(out, f".write-check-{os.getpid()}")
    try:
        os.makedirs(out, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise ValueError(f"{where}: cannot write there ({exc.strerror})") from None


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
        check_output_dir(config)
        self.checkpoints = Checkpoints(self.out, self.rank, self.world, config.logger.keep_checkpoints)
        resumed = self.checkpoints.latest()  # read first: a config the run cannot resume under is refused before loading
        self.config_changes = {}
        if resumed is not None and "config" in resumed[1]:  # (a checkpoint of an earlier release records none)
            self.config_changes = resume_changes(resumed[1]["config"], config, config.source, resumed[0])
        self.step, self.batches = 0, 0  # iterations done, batches drawn
        self.skipped = 0  # iterations whose loss or gradient norm was not finite (no update taken)
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
        self._resume(resumed)

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
            self._check_finite(record)
            if self.step % self.config.logger.print_freq == 0 or self.step == total:
                rate = (time.perf_counter() - started) / (self.step - first)
                values = "  ".join(f"{k} {v:.4g}" for k, v in record.items() if k.endswith(("loss", "grad_norm", "lr")))
                self.say(f"step {self.step}/{total}  {values}  {rate:.2f} s/step  "
                         f"(about {duration(rate * (total - self.step))} left)")
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
        return {"loss": mean_over_processes(loss), "grad_norm": norm, "lr": self._lr(self.generator)}

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
            record["generator_loss"] = mean_over_processes(generator_loss)
            if dmd.cotrain_forward_kl:
                flow_map_loss = self._flow_map_loss(latents, text)
                flow_map_loss.backward()
                record["flow_map_loss"] = mean_over_processes(flow_map_loss)
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
        record["fake_score_loss"] = mean_over_processes(loss)
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
        if math.isfinite(norm):  # a skipped update leaves the average alone too
            self.ema.update(self.step)
        return norm

    def _check_finite(self, record: Dict[str, float]) -> None:
        """Count an iteration whose losses or gradient norms are not finite (its updates were not taken); past
        ``train.max_nonfinite_steps`` of them, stop with one line (the last checkpoint and nothing after it stays)."""
        bad = [k for k, v in record.items() if k.endswith(("loss", "grad_norm")) and not math.isfinite(v)]
        if not bad:
            return
        self.skipped += 1
        allowed = self.config.train.max_nonfinite_steps
        if self.skipped <= allowed:
            self.say(f"step {self.step}: {', '.join(f'{k} {record[k]}' for k in bad)}: no update taken "
                     f"({self.skipped} of the {allowed} train.max_nonfinite_steps allowed)")
            return
        latest = self.checkpoints.latest_name()
        kept = f"the last good checkpoint, {latest}, is kept" if latest else "no checkpoint was written yet"
        raise NonFiniteTraining(
            f"step {self.step}: {', '.join(f'{k} {record[k]}' for k in bad)}: training stopped ({kept}; no weights "
            f"were written). Likely causes: a learning rate too high (train.optim_g.lr = "
            f"{self.config.train.optim_g.lr:g}), or NaN or infinite values in the data "
            f"({self.config.datasets.train.data_root}); train.max_nonfinite_steps lets a run skip such steps")

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
            log = os.path.join(self.out, LOG_FILE)
            if can_draw() and write_loss_curve(log, os.path.join(self.out, CURVE_FILE)):
                written.append(CURVE_FILE)
            self.say(f"wrote {', '.join(os.path.join(self.out, w) for w in written)}")
            if not can_draw():
                self.say(f"the losses are in {log}; to draw them into {CURVE_FILE}: {MATPLOTLIB_HINT}, then run the "
                         "same anyflow train command again (a finished run only writes its outputs)")
        barrier()

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
            "config": flat_config(self.config),  # what a resumed run is compared with
        }

    def save_checkpoint(self) -> None:
        """Write the run's state to ``checkpoints/step_NNNNNN`` (every process its file), atomically."""
        self.checkpoints.save(self.step, self._state())

    def _resume(self, found) -> None:
        """Continue from the checkpoint ``found`` ((folder, state), or None: a new run); either way the run's
        config goes to ``config.toml``, and the settings a resumed run changed are recorded in ``config_changes.jsonl``."""
        if self.rank == 0:
            os.makedirs(self.out, exist_ok=True)
            if os.path.isfile(self.config.source):
                shutil.copyfile(self.config.source, os.path.join(self.out, "config.toml"))
        if found is None:
            if self.rank == 0:
                write_atomically(os.path.join(self.out, LOG_FILE), "")
            barrier()
            return
        folder, state = found
        self.step, self.batches = state["step"], state["batches"]
        self.draws.set_state(state["draws"])
        with torch.no_grad():
            for m in self._trained_models():
                for n, p in m.named.items():
                    local(p).copy_(state["parameters"][f"{m.name}.{n}"])
                m.optimizer.load_state_dict(sharded_like(state["optimizers"][m.name], list(m.named.values())))
                m.updates = state["updates"][m.name]
            for n, shadow in self.ema.shadow.items():
                shadow.copy_(state["ema"][n])
        if self.rank == 0:  # the log keeps the iterations the checkpoint holds
            log = os.path.join(self.out, LOG_FILE)
            lines = open(log).read().splitlines() if os.path.isfile(log) else []
            kept = [line for line in lines if line and json.loads(line)["step"] <= self.step]
            write_atomically(log, "".join(line + "\n" for line in kept))
            if self.config_changes:
                with open(os.path.join(self.out, "config_changes.jsonl"), "a") as f:
                    f.write(json.dumps({"step": self.step, "config": self.config.source,
                                        "changes": self.config_changes}) + "\n")
        changes = "".join(f"; {k} {json.dumps(old)} -> {json.dumps(new)}" for k, (old, new) in self.config_changes.items())
        self.say(f"resuming from {folder} (step {self.step}){changes}")
        barrier()


# ---- helpers ---------------------------------------------------------------------------------------

def _load(options: ModelOptions, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The model a config section names (bidirectional or FAR, from its config), adapters merged in."""
    from weights_convert.sources import open_checkpoint

    from ..model.config import AnyFlowFARConfig
    from ..pretrained import AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel

    far = isinstance(open_checkpoint(options.model_name).config, AnyFlowFARConfig)
    model_class = AnyFlowFARTransformer3DModel if far else AnyFlowTransformer3DModel
    return model_class.from_pretrained(options.model_name, dtype=dtype, device=device, lora=options.merge_lora or None)
