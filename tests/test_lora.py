"""LoRA adapters: each format, written in its own layout, merged by us and loaded by diffusers.

Parity: diffusers' ``load_lora_weights`` on the pipeline (PEFT layers, applied unmerged) and
``set_adapters`` for the scales, against our merged weights, fp32, within the parity bar. Where
diffusers reads nothing (``.diff`` weight deltas, norm deltas, the authors' PEFT-wrapped training
checkpoints) the reference is a merge written out in this file.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from anyflow import AnyFlowFARConfig, AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel
from anyflow.cli import main as anyflow_main
from anyflow.cli.demo import TINY_CHECKPOINT
from weights_convert import CheckpointError, convert, convert_state_dict, export_state_dict, open_checkpoint
from weights_convert.cli import main as convert_main
from weights_convert.lora import describe, open_adapter, parse_lora_argument

from support import SMALL, oracle_and_ours, random_inputs, randomize_, require_oracle, small_config

FP32_BAR = 1e-5  # max|ours - reference| <= FP32_BAR * max|reference|
RANK = 4

# Wan2.1 original module names -> diffusers', written out here independently of weights_convert.names
WAN_BLOCK = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
             "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
             "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj",
             "ffn.2": "ffn.net.2", "self_attn.norm_q": "attn1.norm_q", "norm3": "norm2"}
WAN_TOP = {"time_embedding.0": "condition_embedder.time_embedder.linear_1",
           "time_embedding.2": "condition_embedder.time_embedder.linear_2",
           "time_projection.1": "condition_embedder.time_proj",
           "text_embedding.0": "condition_embedder.text_embedder.linear_1",
           "text_embedding.2": "condition_embedder.text_embedder.linear_2",
           "head.head": "proj_out", "patch_embedding": "patch_embedding"}
AUTHORS_TARGETS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ffn.net.0.proj", "ffn.net.2",
                   "delta_embedder", "time_embedder"]  # their lora_config.target_module_name


def error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.double() - reference.double()).abs().max() / reference.double().abs().max()).item()


def factors(gen, shape, rank=RANK):
    """(A, B) of a LoRA for a weight of ``shape``: A (rank, *fan_in), B (fan_out, rank[, 1, 1, 1])."""
    fan_in = torch.Size(shape[1:]).numel()
    down = torch.randn(rank, *shape[1:], generator=gen) / fan_in**0.5
    up = 0.5 * torch.randn(shape[0], rank, *[1] * (len(shape) - 2), generator=gen) / rank**0.5
    return down, up


def wan_name(diffusers_module: str) -> str:
    """Our test table backwards: a diffusers module name in Wan2.1's original naming."""
    if diffusers_module.startswith("blocks."):
        _, index, rest = diffusers_module.split(".", 2)
        return f"blocks.{index}.{next(w for w, d in WAN_BLOCK.items() if d == rest)}"
    return next(w for w, d in WAN_TOP.items() if d == diffusers_module)


def block_modules(config, names):
    return [f"blocks.{i}.{name}" for i in range(config.num_layers) for name in names]


def pipeline_with_lora(oracle, adapters, far=False):
    """diffusers' pipeline around ``oracle`` with each (file, scale) loaded by load_lora_weights (on peft)."""
    require_oracle("LoraConfig", "peft")
    cls = require_oracle("AnyFlowFARPipeline" if far else "AnyFlowPipeline")
    pipe = cls(tokenizer=None, text_encoder=None, transformer=oracle, vae=None,
               scheduler=require_oracle("FlowMapEulerDiscreteScheduler")(shift=5.0))
    pipe.set_progress_bar_config(disable=True)
    names = []
    for i, (path, _) in enumerate(adapters):
        pipe.load_lora_weights(path, adapter_name=f"a{i}")
        names.append(f"a{i}")
    pipe.set_adapters(names, [scale for _, scale in adapters])
    return pipe


def merged_error(oracle, ours, unmerged, config, seed=0):
    """max|ours - oracle| / max|oracle| on random inputs, after checking that the adapter matters
    (the merged output is far from the ``unmerged`` model's)."""
    latents, t, r, text, image = random_inputs(config, batch=2, seed=seed)
    with torch.no_grad():
        expected = oracle(latents, t, r, text, image).sample
        out = ours(latents, t, r, text, image).sample
        before = unmerged(latents, t, r, text, image).sample
    assert error(before, expected) > 1e-2, "the adapter should change the output"
    return error(out, expected)


# ---- the three adapter layouts against diffusers -----------------------------------------------------

def diffusers_shapes(model) -> dict:
    """Parameter shapes under diffusers' names, of the oracle or of our model."""
    state = model.state_dict()
    return {k: v.shape for k, v in (state if "proj_out.weight" in state else export_state_dict(state)).items()}


def peft_adapter(path, shapes, modules, seed, metadata=None, bias=False):
    """A diffusers / PEFT adapter as diffusers' save_lora_weights writes it (``transformer.`` keys, metadata)."""
    from diffusers import AnyFlowPipeline

    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for module in modules:
        down, up = factors(gen, shapes[f"{module}.weight"])
        layers[f"{module}.lora_A.weight"], layers[f"{module}.lora_B.weight"] = down, up
        if bias:
            layers[f"{module}.lora_B.bias"] = 0.3 * torch.randn(shapes[f"{module}.weight"][0], generator=gen)
    if metadata is not None:
        metadata = {"r": RANK, "target_modules": sorted(modules), "lora_bias": bias, **metadata}
    AnyFlowPipeline.save_lora_weights(str(path), transformer_lora_layers=layers,
                                      transformer_lora_adapter_metadata=metadata)
    return os.path.join(path, "pytorch_lora_weights.safetensors")


PEFT_CASES = {
    # name: (modules in every block, top-level modules, metadata, lora_B.bias)
    "attention_ffn_no_metadata": (["attn1.to_q", "attn1.to_v", "attn2.to_k", "ffn.net.2"], [], None, False),
    "authors_targets_alpha": ([m for m in AUTHORS_TARGETS if "." in m],
                              ["condition_embedder.time_embedder.linear_1", "condition_embedder.time_embedder.linear_2",
                               "condition_embedder.delta_embedder.linear_1", "condition_embedder.delta_embedder.linear_2"],
                              {"lora_alpha": 8}, False),
    "rslora": (["attn1.to_q", "ffn.net.2"], [], {"lora_alpha": 8, "use_rslora": True}, False),
    "alpha_pattern_bias_everything": (list(WAN_BLOCK.values())[:10],
                                      ["condition_embedder.time_proj", "condition_embedder.text_embedder.linear_1",
                                       "condition_embedder.text_embedder.linear_2", "proj_out", "patch_embedding"],
                                      {"lora_alpha": 2, "alpha_pattern": {"blocks.1.attn1.to_q": 12, "proj_out": 1}},
                                      True),
}


@pytest.mark.slow
@pytest.mark.reference
@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_adapter_equals_diffusers(oracle_cls, tmp_path, case):
    per_block, top, metadata, bias = PEFT_CASES[case]
    config = small_config()
    oracle, ours = oracle_and_ours(oracle_cls, config, seed=1)
    unmerged = copy.deepcopy(ours)
    path = peft_adapter(tmp_path, diffusers_shapes(oracle), block_modules(config, per_block) + top, seed=2, metadata=metadata, bias=bias)
    pipeline_with_lora(oracle, [(path, 0.7)])
    ours.merge_lora(path, scale=0.7)
    assert open_adapter(path).format == "peft"
    assert merged_error(oracle, ours, unmerged, config) <= FP32_BAR


def wan_adapter(path, shapes, modules, seed, down="lora_down", up="lora_up", diff_b=()):
    """A Wan2.1 original / ComfyUI adapter: ``diffusion_model.`` + Wan module names, lora_down / lora_up
    (or lora_A / lora_B), .alpha, .diff_b."""
    gen = torch.Generator().manual_seed(seed)
    prefix = "diffusion_model."
    tensors = {}
    for module in modules:
        name = prefix + wan_name(module)
        a, b = factors(gen, shapes[f"{module}.weight"])
        tensors[f"{name}.{down}.weight"], tensors[f"{name}.{up}.weight"] = a, b
        if module.startswith("blocks."):  # diffusers reads the blocks' alphas only
            tensors[f"{name}.alpha"] = torch.tensor(float(1 + len(tensors) % 7))
    for module in diff_b:
        tensors[f"{prefix}{wan_name(module)}.diff_b"] = 0.3 * torch.randn(shapes[f"{module}.bias"], generator=gen)
    save_file(tensors, str(path))
    return str(path)


WAN_MODULES = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0",
               "ffn.net.0.proj", "ffn.net.2"]
WAN_TOP_MODULES = ["condition_embedder.time_embedder.linear_1", "condition_embedder.time_embedder.linear_2",
                   "condition_embedder.time_proj", "condition_embedder.text_embedder.linear_1", "proj_out"]


@pytest.mark.reference
@pytest.mark.parametrize("naming", ["lora_down_up", "lora_A_B"])
def test_wan_adapter_equals_diffusers(oracle_cls, tmp_path, naming):
    config = small_config()
    oracle, ours = oracle_and_ours(oracle_cls, config, seed=3)
    unmerged = copy.deepcopy(ours)
    down, up = ("lora_down", "lora_up") if naming == "lora_down_up" else ("lora_A", "lora_B")
    modules = block_modules(config, WAN_MODULES) + WAN_TOP_MODULES
    # diff_b on every module: diffusers turns them into PEFT's lora_B.bias, which it needs on all or none
    path = wan_adapter(tmp_path / "wan.safetensors", diffusers_shapes(oracle), modules, seed=4, down=down, up=up,
                       diff_b=modules)
    pipeline_with_lora(oracle, [(path, 1.3)])
    ours.merge_lora(path, scale=1.3)
    assert open_adapter(path).format == "wan"
    assert merged_error(oracle, ours, unmerged, config, seed=1) <= FP32_BAR


@pytest.mark.slow
@pytest.mark.reference
def test_musubi_adapter_equals_diffusers(oracle_cls, tmp_path):
    config = small_config()
    oracle, ours = oracle_and_ours(oracle_cls, config, seed=5)
    unmerged = copy.deepcopy(ours)
    gen = torch.Generator().manual_seed(6)
    shapes = diffusers_shapes(oracle)
    tensors = {}
    for module in block_modules(config, list(WAN_BLOCK.values())[:10]):  # musubi-tuner trains all of them
        name = "lora_unet_" + wan_name(module).replace(".", "_")
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = factors(gen, shapes[f"{module}.weight"])
        tensors[f"{name}.alpha"] = torch.tensor(float(1 + len(tensors) % 5))
    path = str(tmp_path / "musubi.safetensors")
    save_file(tensors, path)
    pipeline_with_lora(oracle, [(path, 0.5)])
    ours.merge_lora(path, scale=0.5)
    assert open_adapter(path).format == "musubi"
    assert merged_error(oracle, ours, unmerged, config) <= FP32_BAR


@pytest.mark.reference
def test_stacked_adapters_of_two_formats_equal_diffusers(oracle_cls, tmp_path):
    config = small_config()
    oracle, ours = oracle_and_ours(oracle_cls, config, seed=7)
    unmerged = copy.deepcopy(ours)
    first = peft_adapter(tmp_path / "peft", diffusers_shapes(oracle), block_modules(config, ["attn1.to_q", "ffn.net.0.proj"]), seed=8,
                         metadata={"lora_alpha": 6})
    second = wan_adapter(tmp_path / "wan.safetensors", diffusers_shapes(oracle), block_modules(config, ["attn1.to_q", "attn2.to_v"]),
                         seed=9)
    pipeline_with_lora(oracle, [(first, 0.8), (second, -0.6)])
    ours.merge_lora(first, 0.8).merge_lora(second, -0.6)
    assert merged_error(oracle, ours, unmerged, config, seed=2) <= FP32_BAR


@pytest.mark.slow
@pytest.mark.reference
def test_far_model_and_pipeline_with_an_adapter_equal_diffusers(tmp_path):
    from test_far import pipeline_latents

    Oracle = require_oracle("AnyFlowFARTransformer3DModel")
    config = AnyFlowFARConfig(**{**SMALL, "chunk_partition": (1, 2, 2)})
    oracle = Oracle(**config.to_dict()).eval()
    randomize_(oracle, 10)
    ours = AnyFlowFARTransformer3DModel(config).eval()
    ours.load_state_dict(convert_state_dict(oracle.state_dict()))
    unmerged = copy.deepcopy(ours)
    path = wan_adapter(tmp_path / "wan.safetensors", diffusers_shapes(oracle), block_modules(config, WAN_MODULES), seed=11)
    pipeline_with_lora(oracle, [(path, 0.9)], far=True)
    ours.merge_lora(path, 0.9)
    gen = torch.Generator().manual_seed(12)
    latents, text = torch.randn(1, 5, 4, 8, 8, generator=gen), torch.randn(1, 5, config.text_dim, generator=gen)
    t = torch.full((1, 5), 700.0)
    with torch.no_grad():
        expected = oracle(latents, t, 0.5 * t, text, chunk_partition=[1, 2, 2]).sample
        out = ours(latents, t, 0.5 * t, text).sample
        before = unmerged(latents, t, 0.5 * t, text).sample
    assert error(before, expected) > 1e-2 and error(out, expected) <= FP32_BAR
    from anyflow import sample_far

    with torch.no_grad():
        ours_sample = sample_far(ours, latents, text, num_steps=2, chunk_partition=(1, 2, 2))
    theirs = pipeline_latents(oracle, latents, text, (1, 2, 2), padding=False, num_inference_steps=2)
    assert error(ours_sample, theirs) <= FP32_BAR


# ---- what diffusers does not read: full deltas, norms, tables; the authors' training checkpoints ------

# Wan2.1 parameter -> diffusers parameter, for the reference merge below
WAN_PARAMETERS = {"blocks.0.self_attn.k.weight": "blocks.0.attn1.to_k.weight", "patch_embedding.weight": "patch_embedding.weight",
                  "blocks.0.self_attn.q.weight": "blocks.0.attn1.to_q.weight",
                  "blocks.1.self_attn.norm_q.weight": "blocks.1.attn1.norm_q.weight", "head.head.weight": "proj_out.weight",
                  "blocks.0.norm3.bias": "blocks.0.norm2.bias", "blocks.1.cross_attn.v.bias": "blocks.1.attn2.to_v.bias",
                  "blocks.1.modulation": "blocks.1.scale_shift_table", "head.modulation": "scale_shift_table"}


@pytest.mark.reference
def test_full_weight_and_bias_deltas_equal_a_reference_merge(oracle_cls, tmp_path):
    config = small_config()
    oracle, ours = oracle_and_ours(oracle_cls, config, seed=13)
    unmerged = copy.deepcopy(ours)
    state = oracle.state_dict()
    gen = torch.Generator().manual_seed(14)
    k_down, k_up = factors(gen, state["blocks.0.attn1.to_k.weight"].shape)
    p_down, p_up = factors(gen, state["patch_embedding.weight"].shape)
    adapter = {  # factors with and without alpha; weight, norm, table and bias deltas, none of which diffusers reads
        "blocks.0.self_attn.k.lora_down.weight": k_down, "blocks.0.self_attn.k.lora_up.weight": k_up,
        "blocks.0.self_attn.k.alpha": torch.tensor(2.0),
        "patch_embedding.lora_down.weight": p_down, "patch_embedding.lora_up.weight": p_up,
        **{f"{p.removesuffix('.weight')}.diff": 0.1 * torch.randn(state[WAN_PARAMETERS[p]].shape, generator=gen)
           for p in ["blocks.0.self_attn.q.weight", "blocks.1.self_attn.norm_q.weight", "head.head.weight",
                     "blocks.1.modulation", "head.modulation"]},
        **{f"{p.removesuffix('.bias')}.diff_b": 0.1 * torch.randn(state[WAN_PARAMETERS[p]].shape, generator=gen)
           for p in ["blocks.0.norm3.bias", "blocks.1.cross_attn.v.bias"]},
    }
    path = raw_adapter(tmp_path / "deltas.safetensors", {f"diffusion_model.{k}": v for k, v in adapter.items()})
    scale = 0.6
    reference = {k: v.clone() for k, v in state.items()}  # the merge rule, written out
    reference["blocks.0.attn1.to_k.weight"] += scale * 2.0 / RANK * (k_up @ k_down)
    reference["patch_embedding.weight"] += scale * (p_up.reshape(-1, RANK) @ p_down.reshape(RANK, -1)).reshape(
        state["patch_embedding.weight"].shape)
    for key, value in adapter.items():
        if key.endswith((".diff", ".diff_b")):
            module, part = key.rsplit(".", 1)
            wan = module if module.endswith("modulation") else f"{module}.{'bias' if part == 'diff_b' else 'weight'}"
            reference[WAN_PARAMETERS[wan]] += scale * value
    ours.merge_lora(path, scale)
    expected = convert_state_dict(reference)
    before = convert_state_dict(state)
    assert sum(not torch.equal(expected[k], before[k]) for k in expected) == len(WAN_PARAMETERS)
    for name, param in ours.state_dict().items():
        torch.testing.assert_close(param, expected[name], rtol=1e-6, atol=1e-7, msg=name)
    oracle.load_state_dict(reference)
    assert merged_error(oracle, ours, unmerged, config) <= FP32_BAR


def authors_training_checkpoint(path, oracle, seed, far=False):
    """What the authors' trainer saves: {'ema': state dict of the PEFT-wrapped model, adapter 'real'}."""
    LoraConfig, get_peft_model = require_oracle("LoraConfig", "peft"), require_oracle("get_peft_model", "peft")
    targets = sorted(name for name, module in oracle.named_modules()
                     if isinstance(module, torch.nn.Linear) and any(t in name for t in AUTHORS_TARGETS))
    wrapped = get_peft_model(oracle, LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets, lora_dropout=0.0),
                             adapter_name="real")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if ".lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)
    state = wrapped.state_dict()
    assert "base_model.model.blocks.0.attn1.to_q.base_layer.weight" in state
    assert "base_model.model.blocks.0.attn1.to_q.lora_A.real.weight" in state
    torch.save({"ema": state}, path)
    return wrapped, state


@pytest.mark.reference
@pytest.mark.parametrize("far", [False, True], ids=["bidirectional", "far"])
def test_authors_peft_wrapped_checkpoint_is_merged_on_load_and_conversion(tmp_path, far):
    Oracle = require_oracle("AnyFlowFARTransformer3DModel" if far else "AnyFlowTransformer3DModel")
    config = AnyFlowFARConfig(**{**SMALL, "chunk_partition": (1, 2)}) if far else small_config()
    oracle = Oracle(**config.to_dict()).eval()
    randomize_(oracle, 15)
    (tmp_path / "run").mkdir()  # the .pt in a folder with its config: a width no released model has is not inferred
    (tmp_path / "run" / "config.json").write_text(json.dumps(config.to_dict()))
    path = str(tmp_path / "run")
    wrapped, state = authors_training_checkpoint(str(tmp_path / "run" / "step_6000.pt"), oracle, seed=16)
    reference = {}
    for key, value in state.items():  # the reference merge: W + (alpha / rank) B @ A, alpha = rank
        name = key.removeprefix("base_model.model.")
        if ".lora_" in name:
            continue
        if ".base_layer." in name and name.endswith(".weight"):
            module = name[: -len(".base_layer.weight")]
            value = value + state[f"base_model.model.{module}.lora_B.real.weight"] @ state[
                f"base_model.model.{module}.lora_A.real.weight"]
        reference[name.replace(".base_layer.", ".")] = value
    model_class = AnyFlowFARTransformer3DModel if far else AnyFlowTransformer3DModel
    ours = model_class.from_pretrained(path)
    expected = convert_state_dict(reference)
    assert open_checkpoint(path).folded_lora == 6 * config.num_layers + 4  # 6 per block, both timestep MLPs
    for name, param in ours.state_dict().items():
        torch.testing.assert_close(param, expected[name], rtol=1e-6, atol=1e-7, msg=name)
    latents, t, r, text, _ = random_inputs(config, batch=1, frames=3)
    partition = {"chunk_partition": [1, 2]} if far else {}
    with torch.no_grad():  # and the wrapped model itself, LoRA applied unmerged
        theirs = wrapped.base_model.model(latents, t, r, text, **partition).sample
        out = ours(latents, t, r, text, **partition).sample
    assert error(out, theirs) <= FP32_BAR
    convert(path, str(tmp_path / "merged"), progress=None)
    converted = model_class.from_pretrained(str(tmp_path / "merged"))
    for name, param in converted.state_dict().items():
        assert torch.equal(param, ours.state_dict()[name]), name
    assert "PEFT-wrapped training checkpoint: the LoRA of" in open_checkpoint(path).description


# ---- loading and conversion paths ---------------------------------------------------------------------

@pytest.fixture
def base_and_adapter(tmp_path):
    """Our-layout checkpoint of a random small model, and a Wan-layout adapter for it."""
    config = small_config()
    model = AnyFlowTransformer3DModel(config).eval()
    randomize_(model, 17)
    model.save_pretrained(str(tmp_path / "base"))
    adapter = wan_adapter(tmp_path / "adapter.safetensors", diffusers_shapes(model),
                          block_modules(config, WAN_MODULES) + ["condition_embedder.time_embedder.linear_1"], seed=18,
                          diff_b=["blocks.0.ffn.net.2"])
    return str(tmp_path / "base"), adapter, model


def test_from_pretrained_with_lora_equals_merge_lora_and_keeps_the_fp32_islands(base_and_adapter):
    base, adapter, _ = base_and_adapter
    loaded = AnyFlowTransformer3DModel.from_pretrained(base, lora=[(adapter, 0.4)])
    merged = AnyFlowTransformer3DModel.from_pretrained(base).merge_lora(adapter, 0.4)
    for name, param in loaded.state_dict().items():
        assert torch.equal(param, merged.state_dict()[name]), name
    half = AnyFlowTransformer3DModel.from_pretrained(base, dtype="bfloat16", lora=[adapter])
    island = half.time_embed.source_time_mlp.fc_in.weight
    assert island.dtype == torch.float32 and half.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    full = AnyFlowTransformer3DModel.from_pretrained(base, lora=[adapter])
    torch.testing.assert_close(island, full.time_embed.source_time_mlp.fc_in.weight, rtol=0, atol=0)
    assert not torch.equal(island, AnyFlowTransformer3DModel.from_pretrained(base).time_embed.source_time_mlp.fc_in.weight)
    # rounded once: the bf16 weight is the fp32 merge rounded, so within half a bf16 step of it
    q_full, q_half = full.blocks[0].self_attn.q.weight, half.blocks[0].self_attn.q.weight.float()
    assert torch.equal(q_half, q_full.bfloat16().float())


def test_convert_bakes_adapters_into_the_output(base_and_adapter, tmp_path, capsys):
    base, adapter, _ = base_and_adapter
    expected = AnyFlowTransformer3DModel.from_pretrained(base, lora=[(adapter, 0.4)])
    assert convert_main([base, str(tmp_path / "out"), "--lora", f"{adapter}:0.4"]) == 0
    assert f"merged LoRA: {adapter} x 0.4" in capsys.readouterr().out
    converted = AnyFlowTransformer3DModel.from_pretrained(str(tmp_path / "out"))
    for name, param in converted.state_dict().items():
        assert torch.equal(param, expected.state_dict()[name]), name
    convert(base, str(tmp_path / "bf16"), dtype="bfloat16", lora=[(adapter, 0.4)], progress=None)
    half = AnyFlowTransformer3DModel.from_pretrained(str(tmp_path / "bf16"))
    for name, param in half.state_dict().items():
        assert torch.equal(param, expected.state_dict()[name].to(param.dtype)), name


def test_convert_refuses_to_write_over_an_adapter(base_and_adapter, capsys):
    base, adapter, _ = base_and_adapter
    with pytest.raises(SystemExit):
        convert_main([base, os.path.dirname(adapter) + "/y", "--lora-skip-unknown"])
    assert "no --lora given" in capsys.readouterr().err
    folder = os.path.join(os.path.dirname(adapter), "adapters")
    os.mkdir(folder)
    moved = os.path.join(folder, "style.safetensors")
    os.rename(adapter, moved)
    with pytest.raises(CheckpointError, match=f"{moved}: the source is inside OUT"):
        convert(base, folder, lora=[moved], force=True, progress=None)
    assert os.path.isfile(moved)


# ---- bad adapters: one clear error each, the model untouched ----------------------------------------------

def raw_adapter(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed"


BAD = {
    "wider_model": ({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": (RANK, 64),
                     "diffusion_model.blocks.0.self_attn.q.lora_up.weight": (64, RANK)},
                    r"blocks\.0\.self_attn\.q: lora_up \(64, 4\) @ lora_down \(4, 64\) does not fit the model's "
                    r"blocks\.0\.self_attn\.q\.weight \(32, 32\) \(an adapter for another model width\?\)"),
    "image_to_video": ({"diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight": (RANK, 32),
                        "diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight": (32, RANK),
                        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": (RANK, 32),
                        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": (32, RANK)},
                       r"modules this model does not have: \['blocks\.0\.cross_attn\.k_img'\].*image-to-video.*"
                       r"--lora-skip-unknown"),
    "deeper_model": ({"diffusion_model.blocks.5.ffn.0.lora_down.weight": (RANK, 32),
                      "diffusion_model.blocks.5.ffn.0.lora_up.weight": (48, RANK)},
                     r"\['blocks\.5\.ffn\.0'\].*blocks up to 5, this model 2 blocks"),
    "rank_mismatch": ({"transformer.blocks.1.attn1.to_v.lora_A.weight": (RANK, 32),
                       "transformer.blocks.1.attn1.to_v.lora_B.weight": (32, RANK - 1)},
                      r"blocks\.1\.attn1\.to_v: ranks differ: lora_A \(4, 32\) has rank 4, lora_B \(32, 3\) has 3"),
    "half_a_pair": ({"lora_unet_blocks_0_ffn_2.lora_down.weight": (RANK, 48)},
                    r"blocks_0_ffn_2: has lora_down without its partner lora_up$"),
    "bias_delta_on_a_norm": ({"diffusion_model.blocks.0.self_attn.norm_q.diff_b": (32,)},
                             r"norm_q: diff_b \(32,\) does not fit the model's module, which has no bias"),
    "dora": ({"transformer.blocks.0.attn1.to_q.lora_A.weight": (RANK, 32),
              "transformer.blocks.0.attn1.to_q.lora_magnitude_vector": (32,)}, r"a DoRA adapter"),
    "a_model_not_an_adapter": ({"blocks.0.attn1.to_q.weight": (32, 32)},
                               r"not a LoRA adapter: keys such as \['blocks\.0\.attn1\.to_q\.weight'\]"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_adapter_is_refused_by_name_and_the_model_is_untouched(tmp_path, case):
    shapes, message = BAD[case]
    model = AnyFlowTransformer3DModel(small_config()).eval()
    randomize_(model, 19)
    before = snapshot(model)
    path = raw_adapter(tmp_path / f"{case}.safetensors", {k: 0.1 * torch.randn(s) for k, s in shapes.items()})
    with pytest.raises(CheckpointError, match=message):
        model.merge_lora(path)
    assert_untouched(model, before)


def test_non_finite_values_are_refused_before_anything_changes(tmp_path):
    model = AnyFlowTransformer3DModel(small_config()).eval()
    randomize_(model, 20)
    before = snapshot(model)
    up = torch.randn(32, RANK)
    up[3, 1] = float("nan")
    path = raw_adapter(tmp_path / "nan.safetensors", {  # the bad module sorts last: the good ones come first
        "transformer.blocks.0.attn1.to_q.lora_A.weight": torch.randn(RANK, 32),
        "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.randn(32, RANK),
        "transformer.blocks.1.attn1.to_v.lora_A.weight": torch.randn(RANK, 32),
        "transformer.blocks.1.attn1.to_v.lora_B.weight": up})
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn1\.to_v lora_B has NaN or infinite values"):
        model.merge_lora(path)
    assert_untouched(model, before)
    with pytest.raises(ValueError, match="must be finite"):
        model.merge_lora(path, scale=float("inf"))


def test_skip_unknown_merges_the_rest(tmp_path):
    model = AnyFlowTransformer3DModel(small_config()).eval()
    randomize_(model, 21)
    known = {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(RANK, 32),
             "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(32, RANK)}
    image = {"diffusion_model.blocks.0.cross_attn.v_img.lora_down.weight": torch.randn(RANK, 32),
             "diffusion_model.blocks.0.cross_attn.v_img.lora_up.weight": torch.randn(32, RANK)}
    with_image = raw_adapter(tmp_path / "i2v.safetensors", {**known, **image})
    without = raw_adapter(tmp_path / "t2v.safetensors", known)
    expected = AnyFlowTransformer3DModel.from_state_dict(model.config, snapshot(model)).merge_lora(without)
    model.merge_lora(with_image, skip_unknown=True)
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected.state_dict()[name]), name


class Payload:
    """Unpickling this would run code (it writes a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_in_a_pt_adapter_is_refused_and_never_run(tmp_path):
    model = AnyFlowTransformer3DModel(small_config()).eval()
    marker = tmp_path / "ran"
    path = str(tmp_path / "adapter.pt")
    torch.save({"blocks.0.self_attn.q.lora_down.weight": torch.zeros(RANK, 32), "x": Payload(str(marker))}, path)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="refused: loading it would execute pickled code"):
        model.merge_lora(path)
    assert not marker.exists()
    assert_untouched(model, before)


def test_a_pt_adapter_loads_with_weights_only(tmp_path):
    model = AnyFlowTransformer3DModel(small_config()).eval()
    randomize_(model, 22)
    tensors = {"diffusion_model.blocks.1.ffn.0.lora_down.weight": torch.randn(RANK, 32),
               "diffusion_model.blocks.1.ffn.0.lora_up.weight": torch.randn(48, RANK),
               "diffusion_model.blocks.1.ffn.0.alpha": torch.tensor(2.0)}
    torch.save(tensors, tmp_path / "a.pt")
    before = model.blocks[1].ffn.fc_in.weight.clone()
    model.merge_lora(str(tmp_path / "a.pt"))
    expected = before + 0.5 * tensors["diffusion_model.blocks.1.ffn.0.lora_up.weight"] @ tensors[
        "diffusion_model.blocks.1.ffn.0.lora_down.weight"]
    torch.testing.assert_close(model.blocks[1].ffn.fc_in.weight, expected, rtol=1e-6, atol=1e-6)


def test_adapters_and_models_given_in_each_others_place_are_named(tmp_path, base_and_adapter):
    base, adapter, _ = base_and_adapter
    with pytest.raises(CheckpointError, match="a LoRA adapter, not a model: .*--lora"):
        AnyFlowTransformer3DModel.from_pretrained(adapter)
    wrapped = str(tmp_path / "wrapped.pt")
    torch.save({"base_model.model.blocks.0.attn1.to_q.base_layer.weight": torch.zeros(32, 32),
                "base_model.model.blocks.0.attn1.to_q.lora_A.real.weight": torch.zeros(RANK, 32)}, wrapped)
    with pytest.raises(CheckpointError, match="a whole model wrapped by PEFT"):
        open_adapter(wrapped)
    with pytest.raises(CheckpointError, match="no such adapter file"):
        AnyFlowTransformer3DModel.from_pretrained(base, lora=[str(tmp_path / "missing.safetensors")])


# ---- the command line ------------------------------------------------------------------------------------

def test_inspect_describes_an_adapter(base_and_adapter, capsys):
    _, adapter, _ = base_and_adapter
    assert anyflow_main(["inspect", adapter]) == 0
    out = capsys.readouterr().out
    assert "format: Wan2.1 original / ComfyUI LoRA (lora_down, lora_up, diff_b)" in out
    assert "rank: 4; alpha:" in out
    assert "blocks.*.self_attn.q x2" in out and "time_embed.source_time_mlp.fc_in" in out
    assert "for a model of at least 2 blocks, width 32" in out
    assert describe(open_adapter(adapter)) == out.strip().splitlines()


def test_parse_lora_argument(tmp_path):
    assert parse_lora_argument("style.safetensors:0.75") == ("style.safetensors", 0.75)
    assert parse_lora_argument("style.safetensors") == ("style.safetensors", 1.0)
    odd = tmp_path / "run:2.safetensors"
    odd.write_bytes(b"")
    assert parse_lora_argument(str(odd)) == (str(odd), 1.0)
    assert parse_lora_argument(f"{odd}:-0.5") == (str(odd), -0.5)


def test_a_scale_that_is_no_finite_number_is_named_once(tmp_path, capsys, base_and_adapter):
    base, adapter, _ = base_and_adapter
    odd = tmp_path / "run:2.safetensors"
    odd.write_bytes(b"")
    cases = {f"{adapter}:abc": f"--lora {adapter}:abc: the scale 'abc' is not a number",
             f"{odd}:x": f"--lora {odd}:x: the scale 'x' is not a number",
             "style.safetensors:v2": "--lora style.safetensors:v2: the scale 'v2' is not a number, and there is no "
                                     "file style.safetensors:v2",
             "x:nan": "--lora x:nan: the scale must be a finite number, got 'nan'",
             f"{adapter}:-inf": f"--lora {adapter}:-inf: the scale must be a finite number, got '-inf'"}
    embeds = tmp_path / "embeds.safetensors"
    for text, message in cases.items():
        with pytest.raises(ValueError) as caught:
            parse_lora_argument(text)
        assert str(caught.value) == message
        args = ["sample", "--model", base, "--prompt-embeds", str(embeds), "--lora", text,
                "--out", str(tmp_path / "out.safetensors")]
        assert anyflow_main(args) == 1
        assert capsys.readouterr().err.strip().splitlines() == [f"anyflow sample: error: {message}"]
        assert convert_main([base, str(tmp_path / "converted"), "--lora", text]) == 1
        assert capsys.readouterr().err.strip().splitlines() == [f"anyflow-convert: error: {message}"]
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors", "base", "run:2.safetensors"]  # nothing written


def test_lora_takes_one_adapter_or_a_list(base_and_adapter):
    from pathlib import Path

    from weights_convert.lora import normalize_lora

    base, adapter, _ = base_and_adapter
    assert normalize_lora(adapter) == normalize_lora(Path(adapter)) == normalize_lora([adapter]) == [(adapter, 1.0)]
    assert normalize_lora((adapter, 0.4)) == normalize_lora([(Path(adapter), 0.4)]) == [(adapter, 0.4)]
    assert normalize_lora([adapter, (adapter, 2)]) == [(adapter, 1.0), (adapter, 2.0)]
    assert normalize_lora(None) == normalize_lora([]) == []
    with pytest.raises(ValueError, match=rf"^lora: the scale of {adapter} must be finite, got nan$"):
        normalize_lora((adapter, float("nan")))

    def loaded(lora):
        return AnyFlowTransformer3DModel.from_pretrained(base, lora=lora).state_dict()

    for single, listed in [(adapter, [adapter]), (Path(adapter), [adapter]), ((adapter, 0.4), [(adapter, 0.4)])]:
        expected = loaded(listed)
        assert all(torch.equal(value, expected[name]) for name, value in loaded(single).items()), single


def test_inspect_names_the_parts_as_the_file_does_and_refuses_half_pairs(tmp_path, capsys):
    peft = raw_adapter(tmp_path / "peft.safetensors", {
        "transformer.blocks.0.attn1.to_q.lora_A.weight": torch.randn(RANK, 32),
        "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.randn(32, RANK)})
    assert anyflow_main(["inspect", peft]) == 0
    assert "format: diffusers / PEFT LoRA (lora_A, lora_B)" in capsys.readouterr().out.splitlines()
    half = raw_adapter(tmp_path / "half.safetensors", {
        "transformer.blocks.0.attn1.to_q.lora_A.weight": torch.randn(RANK, 32),
        "transformer.blocks.1.attn1.to_q.lora_A.weight": torch.randn(RANK, 32),
        "transformer.blocks.1.attn1.to_q.lora_B.weight": torch.randn(32, RANK)})
    problem = f"{half}: blocks.0.attn1.to_q: has lora_A without its partner lora_B"
    assert anyflow_main(["inspect", half]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip().splitlines() == [f"anyflow inspect: error: {problem}"]
    model = AnyFlowTransformer3DModel(small_config())
    with pytest.raises(CheckpointError) as caught:  # what loading says
        model.merge_lora(half)
    assert str(caught.value) == problem


def test_sample_with_lora_equals_the_library(tmp_path, capsys):
    from anyflow import sample
    from safetensors.torch import load_file

    model = AnyFlowTransformer3DModel.from_pretrained(TINY_CHECKPOINT)
    with open(os.path.join(TINY_CHECKPOINT, "transformer", "config.json")) as f:
        config = json.load(f)
    gen = torch.Generator().manual_seed(23)
    shape = diffusers_shapes(model)["blocks.0.attn1.to_q.weight"]
    adapter = raw_adapter(tmp_path / "adapter.safetensors", {
        f"transformer.blocks.{i}.attn1.to_q.lora_{ab}.weight": factor
        for i in range(config["num_layers"]) for ab, factor in zip("AB", factors(gen, shape))})
    embeds = tmp_path / "embeds.safetensors"
    text = torch.randn(1, 6, config["text_dim"], generator=torch.Generator().manual_seed(24))
    save_file({"prompt_embeds": text}, str(embeds))
    out = tmp_path / "latents.safetensors"
    args = ["sample", "--model", TINY_CHECKPOINT, "--prompt-embeds", str(embeds), "--frames", "5", "--height", "32",
            "--width", "32", "--steps", "2", "--lora", f"{adapter}:0.5", "--out", str(out)]
    assert anyflow_main(args) == 0
    assert f"LoRA {adapter} x 0.5 merged" in capsys.readouterr().out
    noise = torch.randn(1, 2, config["in_channels"], 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = sample(model.merge_lora(adapter, 0.5), noise, text, num_steps=2)
    torch.testing.assert_close(load_file(str(out))["latents"], expected.transpose(1, 2), rtol=0, atol=0)
    assert anyflow_main(args[:-2] + ["--out", adapter, "--force"]) == 1
    assert "--lora" in capsys.readouterr().err
    assert anyflow_main(args[:-4] + ["--lora-skip-unknown", "--out", str(tmp_path / "x.safetensors")]) == 1
    assert "no --lora given" in capsys.readouterr().err
