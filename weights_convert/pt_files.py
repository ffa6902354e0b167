"""Torch ``.pt`` files (the authors' training checkpoints, pickled adapters), read safely.

Every file is loaded with ``weights_only=True``: one that needs pickled code to load is refused
and none of that code runs. A checkpoint of ``anyflow train`` (``checkpoints/step_N/rankK.pt``, the
state a resumed run reads) is no model and no adapter: it is refused with the weights its run
wrote (:class:`TrainerCheckpointError`).
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Mapping, Tuple

from .safetensors_io import CheckpointError, dtype_code

if TYPE_CHECKING:
    import torch

PT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
# the entries of every checkpoint anyflow train writes (anyflow/training/checkpoints.py; "config" since later releases)
TRAINER_CHECKPOINT_KEYS = frozenset({"step", "batches", "processes", "draws", "parameters", "optimizers", "updates", "ema"})
# what a finished run writes in its folder (beside checkpoints/): adapters of a LoRA run, whole models otherwise
RUN_ADAPTERS, RUN_MODELS = ("lora_ema.safetensors", "lora.safetensors"), ("model_ema", "model")


@dataclass(frozen=True)
class InMemoryTensor:
    """A tensor already loaded (from a ``.pt`` file), with the interface of a safetensors record."""

    name: str
    tensor: "torch.Tensor"

    @property
    def dtype(self) -> str:
        """The safetensors code of the tensor's dtype."""
        return dtype_code(self.tensor.dtype)

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def read(self) -> "torch.Tensor":
        return self.tensor

    def read_rows(self, start: int, stop: int) -> "torch.Tensor":
        return self.tensor[start:stop]


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
PICKLE_PROTOCOL = 0x80  # first byte of a pickle of protocol >= 2: torch.save's legacy format


def load_pt(path: str) -> Dict[str, InMemoryTensor]:
    """Tensors of an authors' training ``.pt`` (its ``ema`` entry, or a bare state dict).

    Loaded with ``weights_only=True``: a file that needs pickled code to load is refused and
    none of that code runs. A file that is no torch checkpoint at all, or a damaged one, is
    named as such.
    """
    import torch

    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    is_zip = head == ZIP_MAGIC
    if not is_zip and not (head and head[0] == PICKLE_PROTOCOL):
        what = "an empty file" if not head else f"a file starting with bytes {head.hex(' ')}"
        raise CheckpointError(
            f"{path}: not a torch checkpoint: {what}, neither a zip archive (torch.save) nor a pickle (legacy torch.save)"
        )
    kind = "torch zip archive" if is_zip else "pickle (legacy torch.save format)"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        detail = " ".join(line for line in str(exc).splitlines() if "GLOBAL" in line or "global" in line)
        if detail:
            raise CheckpointError(
                f"{path}: refused: loading it would execute pickled code, which weights_only=True forbids "
                f"(nothing was executed). Detail: {detail.strip()[:300]}"
            ) from None
        raise CheckpointError(f"{path}: corrupt or unsupported {kind}: its pickle does not parse ({_last_line(exc)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError, TypeError,
            IndexError, KeyError, UnicodeDecodeError, struct.error) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated {kind} ({type(exc).__name__}: {_last_line(exc)})") from None
    if isinstance(obj, Mapping) and TRAINER_CHECKPOINT_KEYS <= set(obj):
        raise TrainerCheckpointError(trainer_checkpoint_message(path, obj["step"]))
    if isinstance(obj, Mapping) and "ema" in obj:
        obj = obj["ema"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = sorted(map(str, obj))[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{path}: expected a state dict of tensors or a dict with an 'ema' state dict, found {keys}")
    for k, v in obj.items():
        try:
            dtype_code(v.dtype)
        except ValueError as exc:
            raise CheckpointError(f"{path}: tensor {k!r}: {exc}") from None
    return {str(k): InMemoryTensor(str(k), v) for k, v in obj.items()}


class TrainerCheckpointError(CheckpointError):
    """A checkpoint of ``anyflow train`` given where a model or an adapter is expected."""


def trainer_checkpoint_message(path: str, step: object) -> str:
    """One line: ``path`` (a ``checkpoints/step_N`` file or folder of anyflow train) is the state a resumed
    run reads, and the weights its run wrote (in the folder above ``checkpoints/``) are what to use."""
    what = (f"{path}: a checkpoint of anyflow train (step {step}: the state a resumed run reads), not a model or "
            "an adapter")
    every = f"{' or '.join(RUN_ADAPTERS)} (adapters: --lora), or {'/ or '.join(RUN_MODELS)}/ (whole models)"
    step_folder = os.path.dirname(os.path.abspath(path)) if os.path.isfile(path) else os.path.abspath(path)
    if os.path.basename(os.path.dirname(step_folder)) != "checkpoints":
        return f"{what}; use the weights its run wrote beside its checkpoints/ folder: {every}"
    run = os.path.dirname(os.path.dirname(step_folder))
    adapters = [name for name in RUN_ADAPTERS if os.path.isfile(os.path.join(run, name))]
    models = [f"{name}/" for name in RUN_MODELS if os.path.isdir(os.path.join(run, name))]
    if not adapters and not models:
        return (f"{what}; the run in {run} has written no weights yet: it writes {every} when it finishes (the same "
                "anyflow train command resumes it)")
    found = [f"{' or '.join(names)} ({kind})" for names, kind in ((adapters, "adapters: --lora"),
                                                                  (models, "whole models")) if names]
    return f"{what}; use the weights the run wrote in {run}: {', or '.join(found)}"


# lines of torch.load's messages that say nothing about the file itself
_BOILERPLATE = ("Weights only load failed", "WeightsUnpickler error", "Check the documentation", "Please file an issue")


def _last_line(exc: BaseException) -> str:
    """The first line of an exception's message that describes the file, shortened."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    informative = [line for line in lines if not line.startswith(_BOILERPLATE)]
    return (informative or lines or [type(exc).__name__])[0][:200]
