"""Checkpoint conversion between the diffusers AnyFlow layout and the ``anyflow`` modules."""

from .state_dict import KeyMismatchError, convert_state_dict, export_state_dict, rename_keys

__all__ = ["KeyMismatchError", "convert_state_dict", "export_state_dict", "rename_keys"]
