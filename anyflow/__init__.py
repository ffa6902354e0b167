"""AnyFlow: the video flow-map transformer in plain PyTorch.

    from anyflow import AnyFlowConfig, AnyFlowTransformer3DModel

Names are imported on first use, so ``import anyflow`` (and the ``anyflow`` command's help)
does not pay for importing torch. The packages, and what each may import, are mapped in
docs/DEVELOPING.md: ``model`` (the architecture), ``runtime``, ``sampling``, ``text``, ``vae``,
``pipeline``, ``training``, ``cli``, and ``pretrained`` (the transformers as loaded).
"""

from .lazy import lazy_exports, report_moved_modules

__version__ = "0.1.0"

_EXPORTS = {
    "AnyFlowConfig": "model.config",
    "AnyFlowFARConfig": "model.config",
    "PRESETS": "model.config",
    "AnyFlowTransformer3DModel": "pretrained",
    "AnyFlowFARTransformer3DModel": "pretrained",
    "FarKVCache": "model.far_cache",
    "FP32_ISLANDS": "model.parameters",
    "parameter_shapes": "model.parameters",
    "PreparedContext": "model.transformer",
    "Transformer3DOutput": "model.transformer",
    "parallelize": "runtime.parallel",
    "load_parallel": "pretrained",
    "sample": "sampling.bidirectional",
    "sample_far": "sampling.far",
    "sample_far_chunks": "sampling.far",
    "flow_map_sigmas": "sampling.schedule",
    "VideoPipeline": "pipeline",
}

# Module paths of earlier releases, and where their names are now (CHANGELOG.md).
MOVED_MODULES = {
    "anyflow.config": "anyflow.model.config",
    "anyflow.parameters": "anyflow.model.parameters",
    "anyflow.patchify": "anyflow.model.embeddings",
    "anyflow.timestep": "anyflow.model.embeddings",
    "anyflow.context": "anyflow.model.embeddings",
    "anyflow.rope": "anyflow.model.rope",
    "anyflow.attention": "anyflow.model.attention",
    "anyflow.layout": "anyflow.model.attention (TokenPlan) and anyflow.model.far (chunk_causal)",
    "anyflow.block": "anyflow.model.block",
    "anyflow.linear": "anyflow.model.layers",
    "anyflow.norms": "anyflow.model.layers",
    "anyflow.far": "anyflow.model.far (the architecture), anyflow.model.far_cache (FarKVCache) and anyflow "
                   "(AnyFlowFARTransformer3DModel)",
    "anyflow.devices": "anyflow.runtime.devices",
    "anyflow.torch_support": "anyflow.runtime.torch_support",
    "anyflow.fp8": "anyflow.runtime.fp8",
    "anyflow.float8_format": "anyflow.runtime.fp8",
    "anyflow.offload": "anyflow.runtime.offload",
    "anyflow.parallel": "anyflow.runtime.parallel (parallelize) and anyflow (load_parallel)",
    "anyflow.sequence_parallel": "anyflow.runtime.sequence_parallel",
    "anyflow.memory": "anyflow.runtime.memory",
    "anyflow.compute": "anyflow.runtime.compute",
    "anyflow.interrupts": "anyflow.runtime.interrupts",
    "anyflow.video_shape": "anyflow.runtime.video_shape",
    "anyflow.prompts": "anyflow.text.tokenizer",
    "anyflow.text_encoder": "anyflow.text.encoder",
    "anyflow.video_io": "anyflow.pipeline.video_io",
    "anyflow.cli_generate": "anyflow.cli.generate",
    "anyflow.cli_train": "anyflow.cli.train",
    "anyflow.training.objectives.flow_map": "anyflow.training.objectives.flow_map",
    "anyflow.training.objectives.distribution_matching": "anyflow.training.objectives.distribution_matching",
    "anyflow.training.objectives.student_rollout": "anyflow.training.objectives.student_rollout",
    "anyflow.training.objectives.timesteps": "anyflow.training.objectives.timesteps",
    "anyflow.training.objectives.velocity": "anyflow.training.objectives.velocity",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
report_moved_modules(MOVED_MODULES)
