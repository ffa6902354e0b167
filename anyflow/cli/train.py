"""``anyflow train CONFIG``: run the trainer a TOML config describes (see :mod:`anyflow.training.trainer`).

    anyflow train stage1.toml                                     # one process (CPU or one GPU)
    torchrun --nproc-per-node 8 -m anyflow train stage1.toml      # FSDP2 over 8 processes

The config is read and checked whole before anything loads (an unknown key is named with the
nearest valid one); the data folder and the models are checked as they open. A run whose
``path.output_dir`` holds a checkpoint continues from it. Ctrl-C stops within seconds; the last
checkpoint stays and the run resumes from it.
"""

from __future__ import annotations

import argparse


def add_command(commands) -> None:
    """The ``train`` subcommand."""
    train = commands.add_parser(
        "train", help="train AnyFlow (teacher, flow map or on-policy stage) from a TOML config",
        description="Train an AnyFlow model as the config says: train.train_pipeline 'teacher' (stage 0, flow "
        "matching), 'pretrain' (stage 1, the flow map) or 'onpolicy' (stage 2, distribution matching), on a folder "
        "of precomputed latents and prompt embeddings (scripts/prepare_training_data.py). Writes checkpoints, "
        "train_log.jsonl, loss.png and the trained LoRA adapters (or model) into path.output_dir, and resumes from "
        "its last checkpoint. Several processes: torchrun --nproc-per-node N -m anyflow train CONFIG. The keys are "
        "in docs/TRAINING.md.",
    )
    train.add_argument("config", metavar="CONFIG", help="the run's .toml config")
    train.set_defaults(run=run_train, interrupted="the last checkpoint is kept; the same command resumes from it")


def run_train(args: argparse.Namespace) -> int:
    from ..runtime.processes import Processes
    from ..training.config import load_config
    from ..training.trainer import Trainer

    config = load_config(args.config)
    with Processes(None if config.device == "auto" else config.device) as processes:
        trainer = Trainer(config, processes=processes)
        try:
            trainer.train()
        except KeyboardInterrupt:
            trainer.say(f"stopped at step {trainer.step}")
            raise
    return 0
