"""The oldest torch this project runs on, checked once at import with one clear error.

torch 2.7 is the floor: FSDP2's ``fully_shard(..., ignored_params=...)`` (the fp32 islands kept whole
on every rank, :mod:`anyflow.runtime.parallel`) came with it; ``torch.compiler.is_compiling`` (2.3) and the
public ``torch.distributed.fsdp.fully_shard`` (2.6) are older. APIs newer than the floor are used
only behind a fallback (``tests/test_gpu_paths.py`` keeps the list).
"""

from __future__ import annotations

import re

import torch

TORCH_FLOOR = (2, 7)


def check_torch_version() -> None:
    """Raise ImportError naming the installed torch when it is older than :data:`TORCH_FLOOR`."""
    match = re.match(r"(\d+)\.(\d+)", torch.__version__)
    if match and (int(match.group(1)), int(match.group(2))) < TORCH_FLOOR:
        floor = ".".join(map(str, TORCH_FLOOR))
        raise ImportError(f"anyflow: torch {torch.__version__} is installed but anyflow needs torch >= {floor} "
                          f"(pip install 'torch>={floor}')")
