"""Checkpoint conversion between every AnyFlow / Wan2.1 layout and the ``anyflow`` modules.

    from weights_convert import convert_state_dict, export_state_dict, convert

Names are imported on first use, so the ``anyflow-convert`` help does not import torch.
"""

from anyflow.lazy import lazy_exports, report_moved_modules

_EXPORTS = {
    "KeyMismatchError": "state_dict",
    "convert_state_dict": "state_dict",
    "export_state_dict": "state_dict",
    "rename_keys": "state_dict",
    "CheckpointError": "safetensors_io",
    "open_checkpoint": "sources",
    "convert": "conversion",
    "load_checkpoint": "conversion",
    "save_state_dict": "conversion",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
# The VAE's and the text encoder's files are read by their own packages (CHANGELOG.md).
report_moved_modules({"weights_convert.vae_checkpoint": "anyflow.vae.checkpoint", "weights_convert.vae_names": "anyflow.vae.names",
                      "weights_convert.text_encoder_names": "anyflow.text.names"})
