"""Scaled float8 weights (anyflow.fp8, weights_convert.scaled_fp8): quantisation, the layer, loading,
conversion, LoRA, the CLI, the bytes held, and the error bar against diffusers."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from anyflow import AnyFlowFARConfig, AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel, PRESETS, sample
from anyflow.cli import main as anyflow_main
from anyflow.cli.demo import TINY_CHECKPOINT
from anyflow.runtime.fp8 import Float8Linear, dequantise, quantise, quantise_block_linears
from anyflow.model.parameters import FLOAT8_LINEARS, is_float8_weight, is_fp32_island, parameter_shapes
from weights_convert import CheckpointError, convert_state_dict, open_checkpoint
from weights_convert.cli import main as convert_main
from weights_convert.conversion import loaded_nbytes
from weights_convert.safetensors_io import read_header, write_file

from support import SMALL, assert_same_run, oracle_and_ours, random_inputs, randomize_, require_oracle, small_config

FLOAT8 = "float8_e4m3fn"
BAR = 1.25  # the bar: error vs the fp32 oracle <= 1.25 x that of plain per-row round-to-nearest e4m3


def e4m3_values() -> torch.Tensor:
    """Every finite non-negative float8 e4m3fn value, ascending, decoded by hand from its bits (sign 0,
    exponent e (bias 7), mantissa m): subnormals m/8 * 2^-6, normals (1 + m/8) * 2^(e - 7); e = 15,
    m = 7 is NaN. Position i holds code i, so an even position has an even mantissa."""
    values = [m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
              for e in range(16) for m in range(8) if (e, m) != (15, 7)]
    return torch.tensor(values, dtype=torch.float64)


E4M3 = e4m3_values()


def plain_rtn(weight: torch.Tensor) -> torch.Tensor:
    """The reference, written apart from anyflow.fp8: per row, scale = absmax / 448 (1 for a zero row);
    each quotient weight / scale (float32) rounded to the nearest e4m3 value (ties to the even code) by
    search in the decoded table; returned dequantised (float32)."""
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(absmax > 0, absmax / 448, torch.ones_like(absmax))
    quotient = (w / scale).clamp(-448, 448)
    magnitude = quotient.abs().double()
    upper = torch.searchsorted(E4M3, magnitude).clamp(max=len(E4M3) - 1)
    lower = (upper - 1).clamp(min=0)
    below, above = magnitude - E4M3[lower], E4M3[upper] - magnitude
    pick_upper = (above < below) | ((above == below) & (upper % 2 == 0))
    rounded = torch.where(pick_upper, E4M3[upper], E4M3[lower]).float() * quotient.sign()
    return rounded * scale


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and values (float8 compared by its bytes: torch.equal does not take float8)."""
    bits = (lambda t: t.view(torch.uint8)) if a.dtype == torch.float8_e4m3fn else (lambda t: t)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def relative_l2(x: torch.Tensor, reference: torch.Tensor) -> float:
    return ((x.double() - reference.double()).norm() / reference.double().norm()).item()


# ---- quantise and dequantise ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (48, 32), (17, 300)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_plain_per_row_rounding_to_nearest(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    weight = (torch.randn(shape, generator=gen) * torch.logspace(-3, 2, shape[0])[:, None]).to(dtype)
    values, scale = quantise(weight)
    assert values.dtype == torch.float8_e4m3fn and values.shape == shape
    assert scale.dtype == torch.float32 and scale.shape == shape[:1]
    back = dequantise(values, scale)
    # the same float32 quotient rounded to nearest by both: equal, whatever the code that rounds it
    assert torch.equal(back, plain_rtn(weight))
    # each row's largest weight maps to +-448 and so comes back within float32 rounding of itself
    absmax = weight.float().abs().amax(dim=1)
    torch.testing.assert_close(back.abs().amax(dim=1), absmax, rtol=1e-6, atol=0)
    assert values.float().abs().amax(dim=1).eq(448).all()
    # within half an e4m3 step: 2^-4 of the weight (3 mantissa bits), or half the subnormal step 2^-9 * scale
    bound = torch.maximum(weight.float().abs() * 2.0**-4, scale[:, None] * 2.0**-10)
    assert ((back - weight.float()).abs() <= bound).all()
    assert dequantise(values, scale, dtype).dtype == dtype


def test_zero_rows_get_scale_one_and_stay_zero():
    weight = torch.randn(4, 6)
    weight[1] = 0
    weight[3, :] = torch.tensor([0, 0, 1e-30, 0, 0, 0])  # a tiny row keeps its own scale
    values, scale = quantise(weight)
    assert scale[1] == 1 and values[1].float().eq(0).all()
    torch.testing.assert_close(dequantise(values, scale)[3], weight[3], rtol=2.0**-4, atol=0)
    assert torch.isfinite(scale).all() and (scale > 0).all()


@pytest.mark.parametrize("weight,message", [
    (torch.tensor([[1.0, float("nan")]]), "NaN or infinite"),
    (torch.tensor([[1.0, float("inf")]]), "NaN or infinite"),
    (torch.ones(3), r"\(out, in\), got torch.float32 \(3,\)"),
    (torch.ones(2, 2, dtype=torch.int64), r"floating point weight \(out, in\), got torch.int64"),
])
def test_quantise_refuses_what_it_cannot_hold(weight, message):
    with pytest.raises(ValueError, match=message):
        quantise(weight)


# ---- the layer and the model ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float8_linear_is_f_linear_with_the_dequantised_weight(dtype):
    gen = torch.Generator().manual_seed(0)
    plain = torch.nn.Linear(40, 24)
    with torch.no_grad():
        plain.weight.copy_(torch.randn(24, 40, generator=gen) / 40**0.5)
    layer = Float8Linear.from_linear(plain)
    layer.bias.data = layer.bias.data.to(dtype)
    assert [name for name, _ in layer.state_dict().items()] == ["weight", "bias", "weight_scale"]
    assert not layer.weight.requires_grad
    x = torch.randn(2, 5, 40, generator=gen).to(dtype)
    weight = dequantise(layer.weight, layer.weight_scale, dtype)
    expected = F.linear(x.float(), weight.float(), layer.bias.float())
    out = layer(x)
    assert out.dtype == dtype and out.shape == (2, 5, 24)
    # float32: the very same product; bfloat16: the float32 product rounded once (half a bf16 step, 2^-9)
    torch.testing.assert_close(out.float(), expected, rtol=0 if dtype == torch.float32 else 2.0**-8, atol=1e-6)


def test_quantise_block_linears_changes_the_block_linears_only_and_casts_keep_them():
    config = small_config()
    model = AnyFlowTransformer3DModel(config).eval()
    randomize_(model, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantise_block_linears(model)
    state = model.state_dict()
    assert list((k, tuple(v.shape)) for k, v in state.items()) == list(parameter_shapes(config, FLOAT8).items())
    float8 = {k for k, v in state.items() if v.dtype == torch.float8_e4m3fn}
    assert float8 == {k for k in before if is_float8_weight(k)} and len(float8) == len(FLOAT8_LINEARS) * 2
    assert not any(isinstance(m, torch.nn.Linear) for m in model.blocks.modules())  # every linear of the blocks
    for name in float8:
        assert torch.equal(dequantise(state[name], state[f"{name}_scale"]), plain_rtn(before[name]))
    assert all(torch.equal(before[k], v) for k, v in state.items() if k in before and k not in float8)
    for cast in (lambda m: m.to_dtype("bfloat16"), lambda m: m.to(torch.float16), lambda m: m.float()):
        cast(model)
        layer = model.blocks[1].ffn.fc_out
        assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
        assert same(layer.weight, state["blocks.1.ffn.fc_out.weight"])
        assert layer.bias.dtype == model.dtype


@pytest.mark.parametrize("preset", ["anyflow-wan2.1-t2v-1.3b", "anyflow-wan2.1-t2v-14b"])
def test_float8_holds_about_half_the_bytes_of_bfloat16(preset):
    """At the released widths, on the meta device (shapes only). The block linears' bytes are exactly
    one per weight plus four per row: 0.5 + 2 / fan_in of bf16's, <= 0.5 + 2 / 1536 = 0.5013. The
    whole model: the rest (embeddings, head, norms, modulation tables: under 3% of the weights at
    1.3B) stays bf16 or float32, so <= 0.52 of the bf16 model."""
    config = PRESETS[preset]
    with torch.device("meta"):
        model = AnyFlowTransformer3DModel(config).to_dtype("bfloat16")

    def nbytes(which=lambda name: True) -> int:
        return sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if which(k))

    linears = lambda k: is_float8_weight(k.removesuffix("_scale"))  # noqa: E731
    weights = sum(t.numel() for k, t in model.state_dict().items() if is_float8_weight(k))
    rows = sum(t.shape[0] for k, t in model.state_dict().items() if is_float8_weight(k))
    bf16_linears, bf16 = nbytes(linears), nbytes()
    quantise_block_linears(model)
    assert nbytes(linears) == weights + 4 * rows
    assert nbytes(linears) <= (0.5 + 2 / config.hidden_size) * bf16_linears
    ratio = nbytes() / bf16
    print(f"{preset}: float8 model {nbytes() / 1e9:.2f} GB, bf16 {bf16 / 1e9:.2f} GB, ratio {ratio:.3f}")
    assert ratio <= 0.52


# ---- the bar against the oracle --------------------------------------------------------------------

# diffusers' names of the blocks' linear weights (the reference replaces these, independently of our names)
ORACLE_BLOCK_LINEARS = re.compile(r"blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ffn\.net\.(0\.proj|2))\.weight")


def plainly_quantised(oracle):
    """A copy of the oracle whose block linear weights are :func:`plain_rtn` of its own."""
    reference = copy.deepcopy(oracle)
    with torch.no_grad():
        replaced = [p.copy_(plain_rtn(p)) for k, p in reference.named_parameters() if ORACLE_BLOCK_LINEARS.fullmatch(k)]
    assert len(replaced) == 10 * len(oracle.blocks)
    return reference


BAR_CASES = {
    "small": (dict(), dict(batch=2)),
    "head_dim_64_three_layers": (dict(attention_head_dim=64, num_layers=3, ffn_dim=160), dict(height=6, width=10)),
    "image_t_minus_r": (dict(image_dim=20, deltatime_type="t-r"), dict(batch=2, frames=2)),
}


@pytest.mark.reference
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", sorted(BAR_CASES))
def test_error_is_within_the_bar_of_plain_per_row_quantisation(case, seed):
    config_overrides, input_overrides = BAR_CASES[case]
    config = small_config(**config_overrides)
    oracle, ours = oracle_and_ours(require_oracle(), config, seed)
    reference = plainly_quantised(oracle)
    quantise_block_linears(ours)
    latents, t, r, text, image = random_inputs(config, seed=seed, **input_overrides)
    with torch.no_grad():
        exact = oracle(latents, t, r, text, image).sample
        plain = reference(latents, t, r, text, image).sample
        fp32 = ours(latents, t, r, text, image).sample
        half = image if image is None else image.bfloat16()
        bf16 = ours.to_dtype("bfloat16")(latents.bfloat16(), t, r, text.bfloat16(), half).sample
    plain_error = relative_l2(plain, exact)
    assert plain_error > 1e-3, "the quantisation should show in the output"
    for compute, out in (("float32", fp32), ("bfloat16", bf16)):
        print(f"{case} seed {seed} computing in {compute}: rel L2 ours {relative_l2(out, exact):.3e}, "
              f"plain per-row e4m3 {plain_error:.3e}, ratio {relative_l2(out, exact) / plain_error:.3f}")
        assert relative_l2(out, exact) <= BAR * plain_error


@pytest.mark.slow
@pytest.mark.reference
@pytest.mark.parametrize("seed", [0, 1])
def test_far_rollout_error_is_within_the_bar(seed):
    config = AnyFlowFARConfig(**{**SMALL, "chunk_partition": (1, 2, 2, 2, 1)})
    oracle = require_oracle("AnyFlowFARTransformer3DModel")(**config.to_dict()).eval()
    randomize_(oracle, seed)
    ours = AnyFlowFARTransformer3DModel(config).eval()
    ours.load_state_dict(convert_state_dict(oracle.state_dict()), strict=True)
    reference = plainly_quantised(oracle)
    quantise_block_linears(ours)
    latents, t, r, text, _ = random_inputs(config, batch=2, frames=8, seed=seed)
    partition = list(config.chunk_partition)
    with torch.no_grad():
        exact = oracle(latents, t, r, text, chunk_partition=partition).sample
        plain = reference(latents, t, r, text, chunk_partition=partition).sample
        fp32 = ours(latents, t, r, text).sample
        bf16 = ours.to_dtype("bfloat16")(latents.bfloat16(), t, r, text.bfloat16()).sample
    plain_error = relative_l2(plain, exact)
    assert plain_error > 1e-3
    for out in (fp32, bf16):
        print(f"FAR seed {seed}: rel L2 ours {relative_l2(out, exact):.3e}, plain {plain_error:.3e}")
        assert relative_l2(out, exact) <= BAR * plain_error


# ---- loading and conversion ----------------------------------------------------------------------


@pytest.fixture(params=["bidirectional", "far"])
def base(request, tmp_path):
    """Our-layout float32 checkpoint of a random small model (bidirectional or FAR)."""
    if request.param == "far":
        model = AnyFlowFARTransformer3DModel(AnyFlowFARConfig(**{**SMALL, "chunk_partition": (1, 2)})).eval()
    else:
        model = AnyFlowTransformer3DModel(small_config()).eval()
    randomize_(model, 5)
    model.save_pretrained(str(tmp_path / "base"))
    return str(tmp_path / "base"), type(model)


def run_convert(args, capsys):
    code = convert_main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_convert_to_float8_reads_back_as_quantising_on_load(base, tmp_path, capsys):
    path, model_class = base
    out = tmp_path / "fp8"
    assert run_convert([path, out, "--dtype", FLOAT8], capsys)[0] == 0
    records, _ = read_header(str(out / "model.safetensors"))
    for name, record in records.items():
        fp32 = name.endswith("_scale") or is_fp32_island(name)
        expected = "F8_E4M3" if is_float8_weight(name) else "F32" if fp32 else "BF16"
        assert record.dtype == expected, name
    assert "scaled float8" in open_checkpoint(str(out)).description

    loaded = model_class.from_pretrained(str(out))  # float8 as stored: weight_dtype None keeps it
    on_load = model_class.from_pretrained(path, dtype="bfloat16", weight_dtype=torch.float8_e4m3fn)
    assert loaded.state_dict().keys() == on_load.state_dict().keys()
    assert all(same(tensor, loaded.state_dict()[name]) for name, tensor in on_load.state_dict().items())
    assert loaded_nbytes(open_checkpoint(path), "bfloat16", FLOAT8) == sum(
        t.numel() * t.element_size() for t in loaded.state_dict().values())

    # refused without --force, as every conversion; --force replaces it
    code, err = run_convert([path, out, "--dtype", FLOAT8], capsys)
    assert code == 1 and "already exists; pass --force" in err
    assert run_convert([path, out, "--dtype", FLOAT8, "--force"], capsys)[0] == 0

    # keep: the pairs copied byte for byte; bfloat16: dequantised; diffusers: refused with the way out
    assert run_convert([out, tmp_path / "kept", "--dtype", "keep"], capsys)[0] == 0
    kept, written = load_file(str(tmp_path / "kept" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert kept.keys() == written.keys() and all(same(v, written[k]) for k, v in kept.items())
    assert run_convert([out, tmp_path / "bf16", "--dtype", "bfloat16"], capsys)[0] == 0
    dequantised = model_class.from_pretrained(str(tmp_path / "bf16"))
    weight = dequantised.blocks[0].self_attn.q.weight
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight, dequantise(loaded.blocks[0].self_attn.q.weight, loaded.blocks[0].self_attn.q.weight_scale,
                                          torch.bfloat16))
    code, err = run_convert([out, tmp_path / "diffusers", "--to", "diffusers"], capsys)
    assert code == 1 and "written in the anyflow layout only; pass --dtype bfloat16" in err


def test_a_float8_model_saves_and_loads_as_it_is(tmp_path):
    model = quantise_block_linears(AnyFlowTransformer3DModel(small_config()).eval())
    model.save_pretrained(str(tmp_path / "saved"))
    again = AnyFlowTransformer3DModel.from_pretrained(str(tmp_path / "saved"))
    assert all(same(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_bad_weight_dtypes_and_broken_pairs_are_refused_by_name(base, tmp_path, capsys):
    path, model_class = base
    with pytest.raises(ValueError, match=r"weight_dtype must be a torch dtype or one of \['float8_e4m3fn'\], got 'bfloat16'"):
        model_class.from_pretrained(path, weight_dtype="bfloat16")
    assert run_convert([path, tmp_path / "fp8", "--dtype", FLOAT8], capsys)[0] == 0
    tensors = load_file(str(tmp_path / "fp8" / "model.safetensors"))
    cases = {
        "no scale": ({k: v for k, v in tensors.items() if k != "blocks.1.ffn.fc_in.weight_scale"},
                     r"blocks\.1\.ffn\.fc_in\.weight is F8_E4M3 without its blocks\.1\.ffn\.fc_in\.weight_scale"),
        "short scale": ({**tensors, "blocks.0.self_attn.q.weight_scale": torch.ones(3)},
                        r"blocks\.0\.self_attn\.q\.weight_scale is F32 \[3\], expected F32 \[32\]"),
        "scale of a bf16 weight": ({**tensors, "blocks.0.self_attn.k.weight": torch.ones(32, 32, dtype=torch.bfloat16)},
                                   r"blocks\.0\.self_attn\.k\.weight_scale scales blocks\.0\.self_attn\.k\.weight, which "
                                   r"is BF16 \[32, 32\], not F8_E4M3"),
    }
    for case, (broken, message) in cases.items():
        folder = tmp_path / case.replace(" ", "_")
        folder.mkdir()
        (folder / "config.json").write_text((tmp_path / "fp8" / "config.json").read_text())
        write_file(str(folder / "model.safetensors"), list(broken.items()))
        with pytest.raises(CheckpointError, match=f"not a valid scaled float8 checkpoint: {message}"):
            model_class.from_pretrained(str(folder))


# ---- LoRA -------------------------------------------------------------------------------------------


def adapter_for(path, model, seed):
    """A Wan2.1-layout adapter on some block linears and one layer outside the blocks."""
    gen = torch.Generator().manual_seed(seed)
    modules = {f"blocks.{i}.{m}": f"blocks.{i}.{ours}" for i in range(len(model.blocks))
               for m, ours in (("self_attn.q", "self_attn.q"), ("cross_attn.v", "cross_attn.v"), ("ffn.0", "ffn.fc_in"),
                               ("ffn.2", "ffn.fc_out"))}
    modules["time_projection.1"] = "time_embed.modulation_proj"
    tensors = {}
    for wan, ours in modules.items():
        out_features, in_features = dict(model.named_parameters())[f"{ours}.weight"].shape
        tensors[f"diffusion_model.{wan}.lora_down.weight"] = torch.randn(4, in_features, generator=gen) / in_features**0.5
        tensors[f"diffusion_model.{wan}.lora_up.weight"] = 0.5 * torch.randn(out_features, 4, generator=gen)
    save_file(tensors, str(path))
    return str(path)


def test_lora_merges_into_float8_weights(base, tmp_path, capsys):
    path, model_class = base
    unmerged = model_class.from_pretrained(path).state_dict()
    adapter = adapter_for(tmp_path / "adapter.safetensors", model_class.from_pretrained(path), seed=6)
    merged_fp32 = model_class.from_pretrained(path, lora=[(adapter, 0.7)])
    on_load = model_class.from_pretrained(path, weight_dtype=FLOAT8, lora=[(adapter, 0.7)])
    into_fp8 = model_class.from_pretrained(path, weight_dtype=FLOAT8).merge_lora(adapter, 0.7)
    changed = 0
    for name, exact in merged_fp32.state_dict().items():
        if not is_float8_weight(name):
            # outside the blocks' linears: the float32 merge itself (the same sums, one rounding)
            assert torch.equal(on_load.state_dict()[name], exact), name
            assert torch.equal(into_fp8.state_dict()[name], exact), name
            continue
        state = on_load.state_dict()
        # merging on load quantises the float32 merge: the reference quantisation of it
        assert torch.equal(dequantise(state[name], state[f"{name}_scale"]), plain_rtn(exact)), name
        # merging into float8 weights quantises twice (the base, then the sum): each rounding is within half an
        # e4m3 step (2^-4 relative), so the result stays within 2x the error of quantising the merge once
        twice = dequantise(into_fp8.state_dict()[name], into_fp8.state_dict()[f"{name}_scale"])
        assert relative_l2(twice, exact) <= 2 * relative_l2(plain_rtn(exact), exact), name
        changed += not same(state[name], quantise(unmerged[name])[0])
    assert changed == 4 * len(merged_fp32.blocks)

    # an adapter merged into a float8 checkpoint on load is the merge into the loaded float8 model
    assert run_convert([path, tmp_path / "fp8", "--dtype", FLOAT8], capsys)[0] == 0
    lazily = model_class.from_pretrained(str(tmp_path / "fp8"), lora=[(adapter, 0.7)])
    afterwards = model_class.from_pretrained(str(tmp_path / "fp8")).merge_lora(adapter, 0.7)
    assert all(same(tensor, afterwards.state_dict()[name]) for name, tensor in lazily.state_dict().items())


# ---- the command line --------------------------------------------------------------------------------


def test_sample_with_float8_weights(tmp_path, capsys):
    gen = torch.Generator().manual_seed(3)
    embeddings = tmp_path / "embeds.safetensors"
    save_file({"prompt_embeds": torch.randn(1, 6, 4096, generator=gen)}, str(embeddings))
    out = tmp_path / "latents.safetensors"
    args = ["sample", "--model", TINY_CHECKPOINT, "--prompt-embeds", str(embeddings), "--steps", "2", "--frames", "5",
            "--height", "32", "--width", "32", "--seed", "4", "--device", "cpu", "--out", str(out)]
    assert anyflow_main(args + ["--weight-dtype", FLOAT8]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    latents = load_file(str(out))["latents"]

    noise = torch.randn(1, 2, 16, 4, 4, generator=torch.Generator().manual_seed(4))
    text = load_file(str(embeddings))["prompt_embeds"]
    model = AnyFlowTransformer3DModel.from_pretrained(TINY_CHECKPOINT, dtype="float32", weight_dtype=FLOAT8)
    assert isinstance(model.blocks[0].ffn.fc_in, Float8Linear)
    assert_same_run(latents, sample(model, noise, text, num_steps=2).transpose(1, 2))
    exact = sample(AnyFlowTransformer3DModel.from_pretrained(TINY_CHECKPOINT, dtype="float32"), noise, text, num_steps=2)
    assert 0 < relative_l2(latents, exact.transpose(1, 2)) < 0.1  # changed by the quantisation, not broken by it


def test_generate_and_convert_offer_float8(capsys):
    for main, argv in ((anyflow_main, ["generate", "--help"]), (convert_main, ["--help"])):
        with pytest.raises(SystemExit):
            main(argv)
        assert FLOAT8 in capsys.readouterr().out
