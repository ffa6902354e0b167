"""Training AnyFlow: the authors' objectives on our modules (docs/TRAINING.md walks through them).

    from anyflow.training import FlowMapLoss, flow_matching_loss, rollout, dmd_loss, fake_score_loss

- the objectives (:mod:`.objectives`): stage 0, the teacher: :func:`flow_matching_loss`; stage 1, the
  student's forward flow-map objective: :class:`FlowMapLoss`; stage 2, on-policy: :func:`rollout`,
  :func:`dmd_loss` and :func:`fake_score_loss`;
- around them, a small trainer: LoRA injection and the PEFT-format adapter (:mod:`.lora`), the data
  folder of precomputed latents and embeddings (:mod:`.data`), the TOML config (:mod:`.config`), the
  loop (:mod:`.trainer`; ``anyflow train CONFIG``).

Names are imported on first use, so importing the package stays cheap.
"""

from ..lazy import lazy_exports

_EXPORTS = {
    "FlowMapLoss": "objectives.flow_map",
    "flow_matching_loss": "objectives.flow_map",
    "rollout": "objectives.student_rollout",
    "dmd_loss": "objectives.distribution_matching",
    "fake_score_loss": "objectives.distribution_matching",
    "Trainer": "trainer",
    "load_config": "config",
    "TrainingConfig": "config",
    "ConfigError": "config",
    "inject_lora": "lora",
    "train_only_lora": "lora",
    "save_lora_adapter": "lora",
    "merged_state_dict": "lora",
    "LatentDataset": "data",
    "DatasetWriter": "data",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
