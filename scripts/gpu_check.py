"""The GPU check: what only a GPU can show, measured in one run, and written to docs/GPU.md.

    python scripts/gpu_check.py                             # one H100/H200: about 6 minutes
    python scripts/gpu_check.py --device cpu --small --out /tmp/GPU.md   # the same code on tiny sizes (a test)

Each section prints its rows as it finishes; a failed section is reported and the others still run.
The exit status is 1 when a section failed or a figure missed its bar.

1. smoke: the embedded tiny checkpoints against their stored diffusers outputs, in float32 with TF32
   off (the bar of ``anyflow demo``).
2. parity: ours against diffusers' model with the same random weights, at the mid config (1.3B
   widths, 2 layers, 7,800 tokens) and at the full 1.3B at 480p, 81 frames (30 layers, 32,760
   tokens): the float32 error, each bfloat16 model's error against the float32 oracle and their
   ratio, forward time and peak memory, ours over diffusers'.
3. compile: eager against ``compile_blocks()`` (first call, then steady time).
4. fp8: ``weight_dtype="float8_e4m3fn"`` against bfloat16: error, time, held weight bytes.
5. offload: ``offload="blocks"`` peak memory against the plain model, with and without fp8.
6. sample: the peak of ``sample()`` against ``anyflow.runtime.memory``'s estimate.
7. load: ``from_pretrained(device=...)`` time and host peak RSS (a fresh process).
8. parallel: ``load_parallel`` on one rank (NCCL on CUDA, gloo on the CPU) against ``from_pretrained``.
9. streaming: FAR 1.3B at 480p made chunk by chunk with ``compile_blocks`` and a context window (12
   frames and a sink of 1), at 1, 2 and 4 steps: the first chunk's latency, frames per second with
   and without the VAE decode, and the peak memory at 81 and 961 frames (goal: 16 frames per second
   at 2 steps, Wan's own rate, and the first chunk within 1 s on one H100).

``--sections`` runs some of them (``--sections streaming``, for a short turn on a GPU).

Memory figures are CUDA allocator peaks above what was allocated before; on the CPU they are not
measured ("-"). Needs the test extra (diffusers, the oracle: ``pip install -e ".[test]"``); without it, it
says so in one line and exits 2 before doing anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from anyflow import AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel, sample, sample_far  # noqa: E402
from anyflow.cli.demo import DEMO_BAR  # noqa: E402
from anyflow.model.config import AnyFlowConfig  # noqa: E402
from weights_convert.safetensors_io import read_header  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import ensure_random_weights  # noqa: E402  (the benchmarks' random oracle weights)

D13 = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, text_dim=4096, freq_dim=256)
# name: (config, latents (F, C, H, W), text tokens)
CONFIGS = {
    "mid": (dict(D13, num_layers=2), (5, 16, 60, 104), 512),
    "1.3B 480p 81 frames": (dict(D13, num_layers=30), (21, 16, 60, 104), 512),
}
SMALL_CONFIGS = {
    "small": (dict(num_attention_heads=4, attention_head_dim=32, ffn_dim=256, text_dim=64, freq_dim=32, num_layers=3),
              (5, 16, 8, 16), 32),
}
# name: (transformer config, latents (C, h, w), Wan VAE config, frames for the frame rate, frames for the peaks)
STREAMING = {"FAR 1.3B 480p": (dict(D13, num_layers=30), (16, 60, 104), {}, 241, (81, 961))}
SMALL_STREAMING = {
    "small": (SMALL_CONFIGS["small"][0], (16, 8, 16),
              dict(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1), 41, (21, 81)),
}
STREAM_WINDOW, STREAM_SINK = 12, 1  # what the released models saw in training: 13 compressed frames at most
STREAM_GOAL_FPS, STREAM_GOAL_FIRST_S = 16.0, 1.0  # Wan's frame rate at 2 steps, the first chunk within a second
BF16_RATIO_BAR = 1.25  # our bfloat16 error may be at most this multiple of diffusers' (both against float32 diffusers)
FP8_RATIO_BAR = 1.25  # our fp8 error at most this multiple of diffusers' with the same plainly quantised weights


class Check:
    """Rows of figures per section, printed as they come; failures counted."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sections: List[Tuple[str, List[str], List[List[str]], str]] = []
        self.failures: List[str] = []

    def section(self, title: str, header: List[str], note: str = "") -> List[List[str]]:
        rows: List[List[str]] = []
        self.sections.append((title, header, rows, note))
        print(f"\n== {title} ==\n" + " | ".join(header), flush=True)
        return rows

    def row(self, rows: List[List[str]], *cells) -> None:
        rows.append([str(c) for c in cells])
        print(" | ".join(rows[-1]), flush=True)

    def bar(self, what: str, ok: bool) -> str:
        if not ok:
            self.failures.append(what)
        return "ok" if ok else "FAIL"

    def run(self, name: str, work: Callable[[], None]) -> None:
        start = time.perf_counter()
        try:
            work()
        except Exception:  # one section's failure is reported; the others still run
            self.failures.append(f"{name}: {traceback.format_exc(limit=3).strip().splitlines()[-1]}")
            traceback.print_exc()
        print(f"({name}: {time.perf_counter() - start:.0f} s)", flush=True)

    def markdown(self, args: argparse.Namespace, seconds: float) -> str:
        device = self.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        lines = ["# GPU check", "",
                 f"`python scripts/gpu_check.py{' --small' if args.small else ''} --device {args.device}` on {name}, "
                 f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, {seconds:.0f} s in all. "
                 "Memory: CUDA allocator peak above what was allocated before the measured call.", ""]
        for title, header, rows, note in self.sections:
            lines += [f"## {title}", ""] + ([note, ""] if note else [])
            lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
            lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
        lines += ["## Failures", ""] + ([f"- {f}" for f in self.failures] or ["none"]) + [""]
        return "\n".join(lines)


# --- measuring -------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], torch.Tensor], repeats: int = 2) -> Tuple[torch.Tensor, float, Optional[int]]:
    """fn's output, its median wall time over ``repeats`` after one warm-up, and its peak extra memory (CUDA)."""
    out = fn()
    synchronize(device)
    del out
    times = []
    base = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) - base if base is not None else None
    return out, sorted(times)[len(times) // 2], peak


def mb(nbytes: Optional[int]) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:,.0f}"


def ratio(a: Optional[float], b: Optional[float]) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def random_inputs(config: dict, latent: tuple, text_tokens: int, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, *latent, generator=gen)
    text = torch.randn(1, text_tokens, config["text_dim"], generator=gen)
    return x.to(device), text.to(device)


def load_oracle(folder: str, dtype: torch.dtype, device: torch.device):
    from diffusers import AnyFlowTransformer3DModel as Oracle

    return Oracle.from_pretrained(folder, torch_dtype=dtype).to(device).eval()


def oracle_forward(model, x, text, t=900.0, r=400.0):
    """diffusers' model takes the same (B, F, C, H, W) latents and per-frame timesteps.

    On a CPU whose ATen kernels are forced below AVX512 (CI's ``ATEN_CPU_CAPABILITY=default`` pass),
    torch's half-precision flash attention still packs for AMX and fails ("pack_vnni2"); ours then
    computes in float32 (anyflow/model/layers.py), and diffusers' attention is run on the math kernel.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = model.patch_embedding.weight.dtype  # (its fp32 islands aside)
    grid = torch.full(x.shape[:2], t, device=x.device), torch.full(x.shape[:2], r, device=x.device)
    forced_lower = x.device.type == "cpu" and torch.backends.cpu.get_cpu_capability() != "AVX512"
    math_only = sdpa_kernel(SDPBackend.MATH) if forced_lower and dtype != torch.float32 else contextlib.nullcontext()
    with torch.no_grad(), math_only:
        return model(x.to(dtype), *grid, text.to(dtype)).sample


def float32_reference(folder: str, x: torch.Tensor, text: torch.Tensor, device: torch.device) -> torch.Tensor:
    """diffusers' float32 output on these inputs, its model freed after."""
    oracle = load_oracle(folder, torch.float32, device)
    reference = oracle_forward(oracle, x, text).float()
    del oracle
    free()
    return reference


def our_forward(model, x, text, t=900.0, r=400.0):
    with torch.no_grad():
        return model(x, t, r, text).sample


def free(*_) -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- the sections ----------------------------------------------------------------------------------------

def check_smoke(check: Check) -> None:
    rows = check.section("1. Smoke: the embedded checkpoints against stored diffusers outputs (float32, TF32 off)",
                         ["model", "run", "error / max", "bar"])
    for kind, folder, model_class in (("bidirectional", "tiny", AnyFlowTransformer3DModel),
                                      ("FAR", "tiny_far", AnyFlowFARTransformer3DModel)):
        path = os.path.join(ROOT, "anyflow", "assets", folder)
        golden = {k: r.read() for k, r in read_header(os.path.join(path, "golden.safetensors"))[0].items()}
        model = model_class.from_pretrained(path, dtype="float32", device=check.device)
        noise, text = golden["noise"].to(check.device), golden["prompt_embeds"].to(check.device)
        with torch.no_grad():
            velocity = model(noise, golden["timestep"].to(check.device), golden["r_timestep"].to(check.device), text).sample
        e = relative(velocity.cpu(), golden["forward"])
        check.row(rows, kind, "forward", f"{e:.1e}", check.bar(f"smoke {kind} forward", e <= DEMO_BAR))
        for steps in (1, 2, 4):
            latents = (sample_far if kind == "FAR" else sample)(model, noise, text, num_steps=steps)
            e = relative(latents.cpu(), golden[f"sample_{steps}_steps"])
            check.row(rows, kind, f"sample, {steps} step(s)", f"{e:.1e}", check.bar(f"smoke {kind} {steps}", e <= DEMO_BAR))


def check_parity(check: Check, configs: Dict, workdir: str) -> None:
    rows = check.section(
        "2. Ours against diffusers (same random weights)",
        ["config", "fp32 error", "bf16 error ours", "bf16 error diffusers", "ratio", "bar", "time ours s",
         "time diffusers s", "time ratio", "peak MB ours", "peak MB diffusers", "memory ratio"],
        f"Errors: max |out - fp32 diffusers| / max |fp32 diffusers|. Bar: our bfloat16 error at most "
        f"{BF16_RATIO_BAR}x diffusers'. Times: median forward (bfloat16), after a warm-up.")
    device = check.device
    for name, (config, latent, text_tokens) in configs.items():
        folder = os.path.join(workdir, name.replace(" ", "-"))
        x, text = random_inputs(config, latent, text_tokens, device)
        reference = float32_reference(folder, x, text, device)
        ours = AnyFlowTransformer3DModel.from_pretrained(folder, dtype="float32", device=device)
        fp32_error = relative(our_forward(ours, x, text), reference)
        del ours
        free()
        oracle = load_oracle(folder, torch.bfloat16, device)
        out, oracle_time, oracle_peak = timed(device, lambda: oracle_forward(oracle, x, text))
        oracle_error = relative(out, reference)
        del oracle, out
        free()
        ours = AnyFlowTransformer3DModel.from_pretrained(folder, dtype="bfloat16", device=device)
        out, our_time, our_peak = timed(device, lambda: our_forward(ours, x, text))
        our_error = relative(out, reference)
        del ours, out
        free()
        check.row(rows, name, f"{fp32_error:.1e}", f"{our_error:.2e}", f"{oracle_error:.2e}", ratio(our_error, oracle_error),
                  check.bar(f"parity {name}", fp32_error <= 1e-4 and our_error <= BF16_RATIO_BAR * oracle_error),
                  f"{our_time:.3f}", f"{oracle_time:.3f}", ratio(our_time, oracle_time), mb(our_peak), mb(oracle_peak),
                  ratio(our_peak, oracle_peak))


def check_compile(check: Check, configs: Dict, workdir: str, backend: str) -> None:
    rows = check.section(f"3. Eager against compile_blocks() (backend {backend})",
                         ["config", "eager s", "first compiled call s", "compiled s", "speed-up", "error / max"])
    device = check.device
    for name, (config, latent, text_tokens) in configs.items():
        folder = os.path.join(workdir, name.replace(" ", "-"))
        x, text = random_inputs(config, latent, text_tokens, device)
        model = AnyFlowTransformer3DModel.from_pretrained(folder, dtype="bfloat16", device=device)
        eager, eager_time, _ = timed(device, lambda: our_forward(model, x, text))
        model.compile_blocks(backend=backend)
        start = time.perf_counter()
        our_forward(model, x, text)
        synchronize(device)
        first = time.perf_counter() - start
        compiled, compiled_time, _ = timed(device, lambda: our_forward(model, x, text, t=700.0, r=100.0))
        compiled_same = our_forward(model, x, text)
        check.row(rows, name, f"{eager_time:.3f}", f"{first:.1f}", f"{compiled_time:.3f}", ratio(eager_time, compiled_time),
                  f"{relative(compiled_same, eager):.1e}")
        del model, eager, compiled, compiled_same
        free()


def plainly_quantised_oracle(folder: str, device: torch.device):
    """diffusers' bfloat16 model whose block linear weights are the float32 ones rounded to e4m3 with a
    per-row absmax / 448 scale (round to nearest), dequantised: the plain quantisation the fp8 bar
    compares with."""
    import re

    reference = load_oracle(folder, torch.float32, torch.device("cpu"))
    model = load_oracle(folder, torch.bfloat16, device)
    pattern = re.compile(r"blocks\.\d+\.(attn1|attn2|ffn)\..*weight")
    with torch.no_grad():
        for (name, param), (_, weight) in zip(model.named_parameters(), reference.named_parameters()):
            if param.dim() == 2 and pattern.fullmatch(name):
                scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 448
                rounded = (weight / scale).to(torch.float8_e4m3fn).float() * scale
                param.copy_(rounded.to(param.dtype))
    return model


def check_fp8(check: Check, configs: Dict, workdir: str) -> None:
    rows = check.section("4. fp8 weights (float8 e4m3, a float32 scale per row) against bfloat16",
                         ["config", "bf16 error", "fp8 error", "plain e4m3 error", "fp8 / plain", "bar", "bf16 s",
                          "fp8 s", "weights MB bf16", "weights MB fp8", "bytes ratio"],
                         "Errors against float32 diffusers, as in section 2; plain e4m3: diffusers in bfloat16 with "
                         "its block linear weights rounded per row to e4m3 (absmax / 448 scales). Bar: our fp8 error at "
                         f"most {FP8_RATIO_BAR}x the plain one.")
    device = check.device
    for name, (config, latent, text_tokens) in configs.items():
        folder = os.path.join(workdir, name.replace(" ", "-"))
        x, text = random_inputs(config, latent, text_tokens, device)
        reference = float32_reference(folder, x, text, device)
        plain = plainly_quantised_oracle(folder, device)
        plain_error = relative(oracle_forward(plain, x, text), reference)
        del plain
        free()
        figures = {}
        for label, weight_dtype in (("bf16", None), ("fp8", "float8_e4m3fn")):
            model = AnyFlowTransformer3DModel.from_pretrained(folder, dtype="bfloat16", device=device,
                                                              weight_dtype=weight_dtype)
            out, seconds, _ = timed(device, lambda: our_forward(model, x, text))
            held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            figures[label] = (relative(out, reference), seconds, held)
            del model, out
            free()
        (e16, t16, b16), (e8, t8, b8) = figures["bf16"], figures["fp8"]
        check.row(rows, name, f"{e16:.2e}", f"{e8:.2e}", f"{plain_error:.2e}", ratio(e8, plain_error),
                  check.bar(f"fp8 {name}", e8 <= FP8_RATIO_BAR * plain_error), f"{t16:.3f}", f"{t8:.3f}", mb(b16), mb(b8),
                  ratio(b8, b16))


def check_offload(check: Check, configs: Dict, workdir: str) -> None:
    rows = check.section("5. Block offload: peak memory of a forward (weights included)",
                         ["config", "weights", "plain MB", "offload MB", "offload s", "plain s", "error / max"])
    device = check.device
    for name, (config, latent, text_tokens) in configs.items():
        folder = os.path.join(workdir, name.replace(" ", "-"))
        x, text = random_inputs(config, latent, text_tokens, device)
        for weight_dtype in (None, "float8_e4m3fn"):
            results = {}
            for offload in (None, "blocks"):
                free()
                before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
                model = AnyFlowTransformer3DModel.from_pretrained(folder, dtype="bfloat16", device=device,
                                                                  weight_dtype=weight_dtype, offload=offload)
                out, seconds, peak = timed(device, lambda: our_forward(model, x, text))
                held = (torch.cuda.memory_allocated(device) - before) if device.type == "cuda" else None
                results[offload] = (out.float().cpu(), seconds, None if peak is None else peak + held)
                del model, out
            (plain, plain_s, plain_peak), (offloaded, off_s, off_peak) = results[None], results["blocks"]
            check.row(rows, name, weight_dtype or "bfloat16", mb(plain_peak), mb(off_peak), f"{off_s:.3f}", f"{plain_s:.3f}",
                      f"{relative(offloaded, plain):.1e}")


def check_sample_estimate(check: Check, configs: Dict, workdir: str) -> None:
    from anyflow.runtime.memory import ForwardKernels, estimate_sampling_memory

    rows = check.section("6. sample() peak against anyflow.runtime.memory's estimate (bfloat16, 2 steps)",
                         ["config", "measured MB", "estimate MB", "estimate / measured"])
    device = check.device
    for name, (config, latent, text_tokens) in configs.items():
        folder = os.path.join(workdir, name.replace(" ", "-"))
        x, text = random_inputs(config, latent, text_tokens, device)
        free()
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        model = AnyFlowTransformer3DModel.from_pretrained(folder, dtype="bfloat16", device=device)
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sample(model, x, text.to(torch.bfloat16), num_steps=2)
        measured = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None
        estimate = estimate_sampling_memory(model.config, weights, tuple(x.shape), text.shape[1], 2,
                                            kernels=ForwardKernels.on(device, torch.bfloat16)).total
        check.row(rows, name, mb(measured), mb(estimate), ratio(estimate, measured))
        if measured is not None:
            check.bar(f"sample estimate {name} below the measured peak", estimate >= measured)
        del model
        free()


LOAD_PROBE = r"""
import json, sys, time
import torch
from anyflow import AnyFlowTransformer3DModel
folder, device = sys.argv[1], sys.argv[2]
start = time.perf_counter()
model = AnyFlowTransformer3DModel.from_pretrained(folder, dtype="bfloat16", device=device)
if device.startswith("cuda"):
    torch.cuda.synchronize()
seconds = time.perf_counter() - start
hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))
print(json.dumps({"seconds": seconds, "rss_mb": hwm / 1024,
                  "weights_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}))
"""


def check_load(check: Check, configs: Dict, workdir: str) -> None:
    rows = check.section("7. from_pretrained(dtype='bfloat16', device=...) of a diffusers-layout float32 folder, in a "
                         "fresh process", ["config", "load s", "host peak RSS MB", "weights MB (held)"])
    for name in configs:
        folder = os.path.join(workdir, name.replace(" ", "-"))
        done = subprocess.run([sys.executable, "-c", LOAD_PROBE, folder, str(check.device)], capture_output=True,
                              text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)
        if done.returncode:
            raise RuntimeError(done.stderr[-2000:])
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        check.row(rows, name, f"{figures['seconds']:.1f}", f"{figures['rss_mb']:,.0f}", f"{figures['weights_mb']:,.0f}")


PARALLEL_PROBE = r"""
import json, os, sys
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from anyflow import AnyFlowTransformer3DModel, load_parallel
folder, kind, inputs = sys.argv[1], sys.argv[2], sys.argv[3]
if kind == "cuda":
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group("nccl" if kind == "cuda" else "gloo")
mesh = init_device_mesh(kind, (1,))
model = load_parallel(AnyFlowTransformer3DModel, folder, mesh, dtype="bfloat16")
plain = AnyFlowTransformer3DModel.from_pretrained(folder, dtype="bfloat16", device=model.device)
data = torch.load(inputs, weights_only=True)
x, text = data["x"].to(model.device), data["text"].to(model.device)
with torch.no_grad():
    a = model(x, 900.0, 400.0, text).sample.float()
    b = plain(x, 900.0, 400.0, text).sample.float()
print(json.dumps({"error": ((a - b).abs().max() / b.abs().max()).item(), "device": str(model.device)}))
dist.destroy_process_group()
"""


def check_parallel(check: Check, configs: Dict, workdir: str) -> None:
    rows = check.section("8. load_parallel on one rank (NCCL on CUDA, gloo on the CPU) against from_pretrained",
                         ["config", "device", "error / max", "bar"])
    name, (config, latent, text_tokens) = next(iter(configs.items()))
    folder = os.path.join(workdir, name.replace(" ", "-"))
    x, text = random_inputs(config, latent, text_tokens, torch.device("cpu"))
    inputs = os.path.join(workdir, "parallel-inputs.pt")
    torch.save({"x": x, "text": text}, inputs)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-"]
    script = os.path.join(workdir, "parallel_probe.py")
    with open(script, "w") as f:
        f.write(PARALLEL_PROBE)
    command[-1] = script
    done = subprocess.run(command + [folder, check.device.type, inputs], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    # one rank computes what one process does, with the same kernels: bfloat16 rounding of a different
    # summation order at most (the weights are gathered from one shard)
    check.row(rows, name, figures["device"], f"{figures['error']:.1e}",
              check.bar("load_parallel one rank", figures["error"] <= 1e-2))


def check_streaming(check: Check, configs: Dict, backend: str) -> None:
    from anyflow import AnyFlowFARConfig, sample_far_chunks
    from anyflow.sampling import SeededNoise
    from anyflow.vae import WanVAE
    from anyflow.vae.config import WanVAEConfig

    rows = check.section(
        f"9. Streaming: FAR chunk by chunk, compile_blocks (backend {backend}), context window {STREAM_WINDOW} + sink "
        f"{STREAM_SINK}", ["config", "steps", "frames", "first chunk s", "fps sampling", "fps with VAE decode",
                            "peak MB", "goal"],
        f"bfloat16 transformer, float32 VAE (the pipeline's default), one video. First chunk: from the call to its "
        f"decoded frames (1 frame), after a warm-up that compiled every shape. Frames per second: the video's frames "
        f"over the run's wall time, sampling alone (latents out) and with each chunk decoded as it comes. Goal: "
        f"{STREAM_GOAL_FPS:g} fps with the decode at 2 steps, and the first chunk within {STREAM_GOAL_FIRST_S:g} s.")
    device = check.device
    for name, (config, (channels, h, w), vae_config, rate_frames, peak_frames) in configs.items():
        with torch.device(device):
            model = AnyFlowFARTransformer3DModel(AnyFlowFARConfig(**config)).eval()
            vae = WanVAE(WanVAEConfig(z_dim=channels, **vae_config)).eval()
        model.to_dtype("bfloat16").compile_blocks(backend=backend)
        text = random_inputs(config, (1, channels, h, w), 512 if device.type == "cuda" else 32, device)[1]
        with torch.no_grad():
            context = model.prepare_context(text.to(torch.bfloat16))

        def run(frames: int, steps: int, decode: bool):
            """(seconds to the first chunk's output, seconds in all, peak MB) of one video."""
            latent_frames = (frames - 1) // 4 + 1
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            start, first = time.perf_counter(), None
            decoder = vae.decoder_stream() if decode else None
            for _, latents in sample_far_chunks(model, SeededNoise((1, latent_frames, channels, h, w), 0), context,
                                                num_steps=steps, context_window=STREAM_WINDOW, sink_frames=STREAM_SINK):
                if decoder is not None:
                    with torch.no_grad():
                        decoder.push(latents.transpose(1, 2).float())
                if first is None:
                    synchronize(device)
                    first = time.perf_counter() - start
            synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
            return first, time.perf_counter() - start, peak

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the videos are longer than the trained 81 frames on purpose
            run(rate_frames, 2, True)  # the warm-up: every shape compiled (the window is full after a few chunks)
            peaks = {frames: run(frames, 2, True)[2] for frames in peak_frames}
            for steps in (1, 2, 4):
                first, seconds, _ = run(rate_frames, steps, True)
                _, sampling, _ = run(rate_frames, steps, False)
                goal = "-" if steps != 2 else ("met" if rate_frames / seconds >= STREAM_GOAL_FPS and
                                               first <= STREAM_GOAL_FIRST_S else "missed")
                check.row(rows, name, steps, rate_frames, f"{first:.2f}", f"{rate_frames / sampling:.1f}",
                          f"{rate_frames / seconds:.1f}", "-", goal)
        for frames, peak in peaks.items():
            check.row(rows, name, 2, frames, "-", "-", "-", mb(peak), "-")
        if device.type == "cuda" and None not in peaks.values():
            low, high = (peaks[f] for f in peak_frames)
            check.bar(f"streaming {name}: the peak at {peak_frames[1]} frames within 10% of the one at "
                      f"{peak_frames[0]}", high <= 1.1 * low)
        del model, vae, context
        free()


SECTIONS = ("smoke", "parity", "compile", "fp8", "offload", "sample", "load", "parallel", "streaming")
FIGURES_MARK = "<!-- figures: everything below is written by scripts/gpu_check.py -->"


def write_figures(path: str, figures: str) -> None:
    """Replace what follows :data:`FIGURES_MARK` in ``path`` (the whole file if it has none) with ``figures``,
    atomically."""
    head = ""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
        if FIGURES_MARK in text:
            head = text[:text.index(FIGURES_MARK) + len(FIGURES_MARK)] + "\n\n"
    with open(path + ".tmp", "w") as f:
        f.write(head + figures.replace("# GPU check\n", "## GPU check figures\n", 1).replace("\n## ", "\n### ")
                if head else figures)
    os.replace(path + ".tmp", path)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--small", action="store_true", help="tiny configs (minutes on a CPU: the test of this script)")
    parser.add_argument("--out", default=None, help="write the figures here (default docs/GPU.md on CUDA, none on CPU)")
    parser.add_argument("--workdir", default=None, help="where the random checkpoints go (default: a temporary folder)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default inductor; eager with --small on the CPU)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"the sections to run, comma separated (default all: {','.join(SECTIONS)})")
    args = parser.parse_args(argv)
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        parser.error(f"--sections: {', '.join(unknown) or 'none given'}; choose among {', '.join(SECTIONS)}")
    try:
        import diffusers  # noqa: F401  (the oracle every section but the smoke one compares with)
    except ImportError:
        print(f"{os.path.basename(__file__)} needs the test extra (diffusers, the oracle it compares with): "
              'pip install -e ".[test]"', file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA GPU here; use --device cpu --small")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    configs = SMALL_CONFIGS if args.small else CONFIGS
    backend = args.compile_backend or ("eager" if args.small and device.type == "cpu" else "inductor")
    out = args.out or (os.path.join(ROOT, "docs", "GPU.md") if device.type == "cuda" and not args.small else None)
    check = Check(device)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        for name, (config, _, _) in configs.items():  # random weights in diffusers' layout, for the sections that load
            if set(sections) - {"smoke", "streaming"}:
                ensure_random_weights(AnyFlowConfig(**config).to_dict(), os.path.join(workdir, name.replace(" ", "-")))
        work = {
            "smoke": lambda: check_smoke(check),
            "parity": lambda: check_parity(check, configs, workdir),
            "compile": lambda: check_compile(check, configs, workdir, backend),
            "fp8": lambda: check_fp8(check, configs, workdir),
            "offload": lambda: check_offload(check, configs, workdir),
            "sample": lambda: check_sample_estimate(check, configs, workdir),
            "load": lambda: check_load(check, configs, workdir),
            "parallel": lambda: check_parallel(check, configs, workdir),
            "streaming": lambda: check_streaming(check, SMALL_STREAMING if args.small else STREAMING, backend),
        }
        for name in SECTIONS:
            if name in sections:
                check.run(name, work[name])
    seconds = time.perf_counter() - start
    if out:
        write_figures(out, check.markdown(args, seconds))
        print(f"\nwrote {out}")
    print(f"\n{len(check.failures)} failure(s) in {seconds:.0f} s" + "".join(f"\n  {f}" for f in check.failures))
    return 1 if check.failures else 0


if __name__ == "__main__":
    sys.exit(main())
