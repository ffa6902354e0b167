"""What the side-by-side benchmarks share: random oracle weights written once, and fresh-process workers and probes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

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


def ensure_random_weights(model_cfg: dict, folder: str) -> None:
    """diffusers' model of ``model_cfg`` with :func:`save_random_weights`' weights in ``folder``, unless it is there."""
    if os.path.isdir(folder):
        return
    import torch
    from diffusers import AnyFlowTransformer3DModel as Oracle

    torch.manual_seed(0)
    save_random_weights(Oracle(**model_cfg), folder)


def run_worker(code: str, job: dict) -> dict:
    """Run ``code`` in a fresh interpreter with ``job`` (JSON) as argv[1]; the JSON its last line prints."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", code, json.dumps(job)], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{job} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# Worker code (after ``device`` and ``torch`` are defined): ``status(key)`` reads /proc/self/status in MB; the
# peak RSS is reset to the current RSS (``base``) and, on CUDA, the allocator's peak (``base_gpu``), so that
# what follows is measured alone.
RESET_PEAKS = (
    "def status(key):\n"
    "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(key)) / 1024\n"
    "with open('/proc/self/clear_refs', 'w') as f:\n"
    "    f.write('5')  # reset the peak RSS to the current RSS\n"
    "base = status('VmRSS')\n"
    "if device.type == 'cuda':\n"
    "    torch.cuda.reset_peak_memory_stats()\n"
    "    base_gpu = torch.cuda.memory_allocated() / 2**20\n"
)


# Each probe prints one JSON line: its wall time and its own peak RSS (VmHWM: unlike ru_maxrss,
# it is not inherited from the parent across fork and exec).
PROBE_TAIL = (
    "import json, time\n"
    "hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
    "print(json.dumps({'seconds': time.perf_counter() - T0, 'rss_mb': hwm / 1024, 'inner': globals().get('INNER')}))\n"
)


def probe(body: str) -> dict:
    """Run ``body`` in a fresh interpreter: ``seconds`` (after start-up), ``wall`` (with it), ``rss_mb``
    (its peak RSS) and ``inner`` (what ``body`` left in ``INNER``, if anything)."""
    code = "import time\nT0 = time.perf_counter()\n" + body + "\n" + PROBE_TAIL
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT, env=env).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - start  # includes interpreter start-up
    return result
