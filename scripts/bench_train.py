"""One stage-1 training step, ours against diffusers' AnyFlowTransformer3DModel, each in its own process.

    python scripts/bench_train.py [--config mid] [--rank 64] [--repeats 1] [--device cpu|cuda] [--mixed-precision]
                                  [--workdir DIR]

The step is the authors' (``anyflow.training.FlowMapLoss``, which runs either model): the forward
with gradients, 3 more without (the unconditional prediction of fused guidance and the central
difference at t +- epsilon), then the backward, with gradient checkpointing on, LoRA of --rank on
the authors' targets (self-attention q, k, v, o, the FFN, both time MLPs; PEFT's ``add_adapter``
for diffusers), the base weights frozen. Both models hold the same random weights (the oracle's
``save_pretrained``, read by both) and take the same inputs, t = 700 and r = 300.

Each measurement is a fresh process: load (every weight made resident), then one timed step with the peak reset
just before it
(CPU: ``/proc/self/clear_refs`` and the peak RSS, VmHWM; CUDA: ``max_memory_allocated``), so the
memory is the step's own. Printed: median seconds and peak growth over --repeats for each, the
ratios ours / diffusers (goals: time <= 0.9, memory <= 0.6), and the loss and LoRA-gradient norms of
both (the same step: equal to rounding). Needs the test extra (diffusers, peft).
"""

from __future__ import annotations

import argparse
import os
import statistics

from bench import CONFIGS
from benchlib import RESET_PEAKS, ensure_random_weights, run_worker

WORKER = r"""
import json, sys, time, gc
import torch
job = json.loads(sys.argv[1])
device = torch.device(job["device"])
from anyflow.training import FlowMapLoss
from anyflow.training.config import AUTHORS_LORA_TARGETS
rank = job["rank"]
if job["impl"] == "oracle":
    from diffusers import AnyFlowTransformer3DModel as M
    from peft import LoraConfig
    model = M.from_pretrained(job["weights"]).to(device)
    model.requires_grad_(False)
    targets = [n for n, m in model.named_modules()  # the authors' filter_learnable_module: linears naming a target
               if isinstance(m, torch.nn.Linear) and any(t in n for t in AUTHORS_LORA_TARGETS)]
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
    factors = {n: (m.lora_A["default"], m.lora_B["default"]) for n, m in model.named_modules()
               if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)}
else:
    from anyflow import AnyFlowTransformer3DModel as M
    from anyflow.training.lora import diffusers_module_name, inject_lora, lora_layers, train_only_lora
    model = M.from_pretrained(job["weights"], device=device)
    inject_lora(model, AUTHORS_LORA_TARGETS, rank, rank)
    train_only_lora(model)
    factors = {diffusers_module_name(n): (m.lora_A, m.lora_B) for n, m in lora_layers(model)}
with torch.no_grad():  # the same factors in both, by diffusers' module name (B nonzero, so that A gets a gradient)
    for i, name in enumerate(sorted(factors)):
        gen = torch.Generator().manual_seed(i)
        down, up = factors[name]
        down.weight.copy_(torch.randn(down.weight.shape, generator=gen) / down.weight.shape[1] ** 0.5)
        up.weight.copy_(torch.randn(up.weight.shape, generator=gen) * 1e-3)
        down.weight.requires_grad_(True)
        up.weight.requires_grad_(True)
model.enable_gradient_checkpointing()
model.train()
import torch._dynamo  # noqa: F401  (torch.utils.checkpoint imports it on first use, diffusers when it loads: not the step's)
with torch.no_grad():  # make every weight resident (a lazily mapped one would count as the step's memory)
    for p in model.parameters():
        p.detach().reshape(-1)[::256].float().sum()
from safetensors.torch import load_file
inputs = {k: v.to(device) for k, v in load_file(job["inputs"]).items()}
loss_fn = FlowMapLoss(guidance_scale=3.0)
def step():
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=job["mixed_precision"])
    with autocast:
        loss = loss_fn(model, inputs["latents"], inputs["text"], t=inputs["t"], r=inputs["r"], noise=inputs["noise"],
                       is_diffusion=torch.zeros(1, dtype=torch.bool, device=device),
                       negative_encoder_hidden_states=inputs["negative"])
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return loss
gc.collect()
""" + RESET_PEAKS + r"""
start = time.perf_counter()
loss = step()
seconds = time.perf_counter() - start
grads = [p.grad.float().norm() for n, p in model.named_parameters() if p.grad is not None]
result = {"seconds": seconds, "growth_mb": status("VmHWM") - base, "loss": loss.item(),
          "grad_norm": torch.stack(grads).norm().item(), "gradients": len(grads)}
if device.type == "cuda":
    result["growth_mb"] = torch.cuda.max_memory_allocated() / 2**20 - base_gpu
print(json.dumps(result))
"""


def prepare(name: str, workdir: str) -> tuple:
    """Weights (the oracle's save_pretrained, fp32) and the step's inputs for a config of bench.py, made once."""
    import torch
    from safetensors.torch import save_file

    model_cfg, (frames, channels, height, width), text_len = CONFIGS[name]
    weights = os.path.join(workdir, f"{name}-weights")
    inputs = os.path.join(workdir, f"{name}-train-inputs.safetensors")
    ensure_random_weights(model_cfg, weights)
    if not os.path.exists(inputs):
        gen = torch.Generator().manual_seed(2)
        shape = (1, frames, channels, height, width)
        save_file({"latents": torch.randn(shape, generator=gen), "noise": torch.randn(shape, generator=gen),
                   "text": torch.randn(1, text_len, 4096, generator=gen),
                   "negative": torch.randn(1, text_len, 4096, generator=gen),
                   "t": torch.tensor([700.0]), "r": torch.tensor([300.0])}, inputs)
    return weights, inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="mid", choices=sorted(CONFIGS))
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank (and alpha); default 64")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mixed-precision", action="store_true", help="bf16 autocast, as the trainer's mixed_precision")
    parser.add_argument("--workdir", default=os.path.expanduser("~/.cache/anyflow-bench"))
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    weights, inputs = prepare(args.config, args.workdir)
    runs = {"ours": [], "oracle": []}
    for _ in range(args.repeats):
        for impl in runs:  # alternate, so drift hits both alike
            runs[impl].append(run_worker(WORKER, dict(impl=impl, weights=weights, inputs=inputs, device=args.device,
                                                      rank=args.rank, mixed_precision=args.mixed_precision)))
    print(f"machine: {os.cpu_count()} CPUs, device {args.device}, config {args.config} {CONFIGS[args.config]}, "
          f"LoRA rank {args.rank}, {'bf16 autocast' if args.mixed_precision else 'float32'}, gradient checkpointing")
    print(f"{'impl':<8} {'step s':>8} {'peak+ MB':>9} {'loss':>12} {'grad norm':>12} {'LoRA grads':>10}")
    median = {impl: (statistics.median(r["seconds"] for r in rs), statistics.median(r["growth_mb"] for r in rs))
              for impl, rs in runs.items()}
    for impl, rs in runs.items():
        print(f"{impl:<8} {median[impl][0]:8.2f} {median[impl][1]:9.0f} {rs[0]['loss']:12.6g} {rs[0]['grad_norm']:12.6g} "
              f"{rs[0]['gradients']:10d}")
    time_ratio, memory_ratio = (median["ours"][i] / median["oracle"][i] for i in (0, 1))
    print(f"ours / diffusers: time {time_ratio:.2f} (goal <= 0.9), peak memory {memory_ratio:.2f} (goal <= 0.6)")
    print("runs in order, s: " + "; ".join(f"{impl} " + " ".join(f"{r['seconds']:.1f}" for r in rs)
                                         for impl, rs in runs.items()))


if __name__ == "__main__":
    main()
