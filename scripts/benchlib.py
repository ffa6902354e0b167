"""What the side-by-side benchmarks share: random oracle weights written once, and fresh-process workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save_random_weights(oracle, folder: str) -> None:
    """Re-draw ``oracle``'s matrices for O(1) activations (as the parity tests do) and save it to ``folder``, atomically."""
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in oracle.named_parameters():
            if p.dim() >= 2 and "scale_shift_table" not in name:
                p.copy_(torch.randn(p.shape) / p[0].numel() ** 0.5)
    oracle.save_pretrained(folder + ".tmp")
    os.rename(folder + ".tmp", folder)


def run_worker(code: str, job: dict) -> dict:
    """Run ``code`` in a fresh interpreter with ``job`` (JSON) as argv[1]; the JSON its last line prints."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", code, json.dumps(job)], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{job} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
