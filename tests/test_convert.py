"""weights_convert end to end: every source layout, both targets, dtypes, shards, and bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from anyflow import AnyFlowTransformer3DModel
from weights_convert import CheckpointError, KeyMismatchError, convert, open_checkpoint
from weights_convert.cli import main as convert_main
from weights_convert.safetensors_io import read_header, write_file

from support import random_inputs, randomize_, require_oracle, small_config

pytestmark = pytest.mark.reference  # compares with the oracle: rerun by CI without SIMD kernels

# one head of 128: the head dim of the released models (a config is inferred for the released widths only)
CONFIG = small_config(num_attention_heads=1, attention_head_dim=128, image_dim=None)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hub-style snapshot (model_index.json + sharded transformer/) of a random oracle, and the oracle."""
    Oracle = require_oracle()
    oracle = Oracle(**CONFIG.to_dict()).eval()
    randomize_(oracle, 7)
    root = tmp_path_factory.mktemp("hub") / "snapshot"
    oracle.save_pretrained(root / "transformer", max_shard_size="200KB")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "AnyFlowPipeline"}))
    return root, oracle


def velocity(model, config=CONFIG, seed=0):
    latents, t, r, text, image = random_inputs(config, batch=2, seed=seed)
    with torch.no_grad():
        return model(latents, t, r, text, image).sample


def listing(folder):
    return sorted(os.listdir(folder))


@pytest.mark.slow
def test_hub_snapshot_converts_and_matches_the_oracle(hub, tmp_path, capsys):
    root, oracle = hub
    assert len([f for f in os.listdir(root / "transformer") if f.endswith(".safetensors")]) > 1
    before = {f: (root / "transformer" / f).read_bytes() for f in os.listdir(root / "transformer")}
    assert convert_main([str(root), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "detected: AnyFlow, diffusers layout (sharded safetensors" in printed and "every tensor verified" in printed
    assert listing(tmp_path / "out") == ["config.json", "model.safetensors"]
    model = AnyFlowTransformer3DModel.from_pretrained(str(tmp_path / "out"))
    assert model.config == CONFIG
    assert (velocity(model) - velocity(oracle)).abs().max() <= 1e-5 * velocity(oracle).abs().max()
    assert {f: (root / "transformer" / f).read_bytes() for f in os.listdir(root / "transformer")} == before


def test_a_renaming_conversion_and_inspect_never_import_torch(hub, tmp_path):
    root, _ = hub
    code = (
        "import sys\n"
        "from weights_convert import convert\n"
        "from anyflow.cli import main\n"
        f"convert({str(root)!r}, {str(tmp_path / 'out')!r}, progress=None)\n"
        f"convert({str(root)!r}, {str(tmp_path / 'named')!r}, dtype='float32', progress=None)\n"  # its own dtype, named
        f"assert main(['inspect', {str(tmp_path / 'out')!r}]) == 0\n"
        "print('torch' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert run.stdout.strip().splitlines()[-1] == "False"
    model = AnyFlowTransformer3DModel.from_pretrained(str(tmp_path / "out"))
    assert torch.equal(velocity(model), velocity(AnyFlowTransformer3DModel.from_pretrained(str(root))))


def test_without_in_kernel_copies_bytes_are_read_and_written(hub, tmp_path, monkeypatch):
    root, _ = hub

    def unsupported(*args):
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    convert(str(root), str(tmp_path / "copied"), max_shard_size="300KB", progress=None)
    monkeypatch.undo()
    convert(str(root), str(tmp_path / "kernel"), max_shard_size="300KB", progress=None)
    files = listing(tmp_path / "kernel")
    assert len(files) > 3 and listing(tmp_path / "copied") == files
    assert all((tmp_path / "copied" / f).read_bytes() == (tmp_path / "kernel" / f).read_bytes() for f in files)


@pytest.mark.parametrize("where", ["root", "transformer", "single_file"])
def test_from_pretrained_reads_diffusers_directly(hub, tmp_path, where):
    root, oracle = hub
    if where == "single_file":
        single = tmp_path / "single"
        oracle.save_pretrained(single)
        path = single / "diffusion_pytorch_model.safetensors"
    else:
        path = root if where == "root" else root / "transformer"
    model = AnyFlowTransformer3DModel.from_pretrained(str(path))
    assert torch.equal(velocity(model), velocity(AnyFlowTransformer3DModel.from_pretrained(str(root))))
    assert not any(name.startswith(".") for name in os.listdir(tmp_path))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_keeps_fp32_islands_in_files_and_models(hub, tmp_path, dtype):
    root, _ = hub
    convert(str(root), str(tmp_path / "out"), dtype=dtype, progress=None)
    records, _ = read_header(str(tmp_path / "out" / "model.safetensors"))
    fp32 = sorted(k for k, r in records.items() if r.dtype == "F32")
    assert fp32 == sorted(k for k in records if k.startswith("time_embed.source_time_mlp") or k.endswith("modulation")
                          or ".cross_attn_norm." in k)
    assert {r.dtype for k, r in records.items() if k not in fp32} == {{"bfloat16": "BF16", "float16": "F16"}[dtype]}
    model = AnyFlowTransformer3DModel.from_pretrained(str(tmp_path / "out"))
    assert model.dtype == getattr(torch, dtype) and model.head.modulation.dtype == torch.float32
    loaded = AnyFlowTransformer3DModel.from_pretrained(str(root), dtype=torch.bfloat16)
    assert loaded.blocks[0].modulation.dtype == torch.float32 and loaded.blocks[0].ffn.fc_in.weight.dtype == torch.bfloat16


def test_back_to_diffusers_loads_in_the_oracle_with_equal_outputs(hub, tmp_path):
    Oracle = require_oracle()
    root, oracle = hub
    convert(str(root), str(tmp_path / "ours"), progress=None)
    convert(str(tmp_path / "ours"), str(tmp_path / "back"), to="diffusers", max_shard_size="100KB", progress=None)
    files = listing(tmp_path / "back")
    assert "diffusion_pytorch_model.safetensors.index.json" in files and "diffusion_pytorch_model-00001-of-" in files[1]
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["_class_name"] == "AnyFlowTransformer3DModel"
    reloaded = Oracle.from_pretrained(str(tmp_path / "back")).eval()
    assert torch.equal(velocity(reloaded), velocity(oracle))


def test_sharded_output_and_save_pretrained(hub, tmp_path):
    root, _ = hub
    report = convert(str(root), str(tmp_path / "out"), max_shard_size="150KB", progress=None)
    assert "model.safetensors.index.json" in report.files and len(report.files) > 3
    model = AnyFlowTransformer3DModel.from_pretrained(str(tmp_path / "out"))
    model.save_pretrained(str(tmp_path / "saved"))
    again = AnyFlowTransformer3DModel.from_pretrained(str(tmp_path / "saved"))
    assert torch.equal(velocity(model), velocity(again))
    with pytest.raises(CheckpointError, match=r"already exists; pass force=True to replace it"):
        model.save_pretrained(str(tmp_path / "saved"))


@pytest.mark.parametrize("wrapped", [True, False])
def test_authors_pt_with_its_config_beside_it(hub, tmp_path, wrapped):
    root, oracle = hub
    state = oracle.state_dict()
    (tmp_path / "run").mkdir()
    torch.save({"ema": state, "step": 1000} if wrapped else state, tmp_path / "run" / "ckpt.pt")
    (tmp_path / "run" / "config.json").write_text(json.dumps(CONFIG.to_dict()))
    checkpoint = open_checkpoint(str(tmp_path / "run"))
    assert checkpoint.container == "torch .pt" and checkpoint.config == CONFIG
    assert checkpoint.config_source == str(tmp_path / "run" / "config.json")
    convert(str(tmp_path / "run"), str(tmp_path / "out"), progress=None)
    model = AnyFlowTransformer3DModel.from_pretrained(str(tmp_path / "out"))
    assert torch.equal(velocity(model), velocity(AnyFlowTransformer3DModel.from_pretrained(str(root))))


def test_no_config_and_a_width_no_released_model_has_is_refused(hub, tmp_path, capsys):
    """A 1 x 128 model and a 4 x 32 one have the same shapes: only the released widths say their heads."""
    _, oracle = hub
    torch.save({"ema": oracle.state_dict()}, tmp_path / "ckpt.pt")
    pt = tmp_path / "ckpt.pt"
    message = (f"{pt}: cannot infer the config from the tensor shapes: width 128 is no released model's (1536 with 12 "
               "heads, 5120 with 40 heads), so its head count cannot be read off the shapes; give the config: put its "
               "config.json beside the weights and pass their folder, or pass --config FILE to anyflow-convert "
               "(config_path= of convert and load_checkpoint)")
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(str(pt))
    assert str(caught.value) == message
    with pytest.raises(CheckpointError, match=r"width 128 is no released model's"):
        AnyFlowTransformer3DModel.from_pretrained(str(pt))
    assert convert_main([str(pt), str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"anyflow-convert: error: {message}"]
    assert not (tmp_path / "out").exists()
    (tmp_path / "config.json").write_text(json.dumps(CONFIG.to_dict()))
    assert convert_main([str(pt), str(tmp_path / "out"), "--config", str(tmp_path / "config.json")]) == 0
    assert f"({tmp_path / 'config.json'})" in capsys.readouterr().out


RELEASED = ["anyflow-wan2.1-t2v-1.3b", "anyflow-wan2.1-t2v-14b", "anyflow-far-wan2.1-1.3b", "anyflow-far-wan2.1-14b"]


@pytest.mark.parametrize("preset", RELEASED)
def test_the_released_models_configs_are_inferred_from_their_shapes(preset):
    from anyflow.model.config import PRESETS
    from anyflow.model.parameters import parameter_shapes
    from weights_convert.sources import infer_config

    assert infer_config(parameter_shapes(PRESETS[preset])) == PRESETS[preset]  # shapes only: nothing allocated


def test_inspect_says_how_a_config_was_inferred(tmp_path, capsys):
    """A released width (1536) without a config.json: a sparse file, headers only, nothing allocated."""
    from anyflow.cli import main
    from anyflow.model.config import AnyFlowConfig
    from anyflow.model.parameters import parameter_shapes
    from weights_convert.safetensors_io import header_bytes

    config = AnyFlowConfig(num_attention_heads=12, ffn_dim=64, num_layers=1, text_dim=32, freq_dim=32)
    entries = [(name, "BF16", shape) for name, shape in sorted(parameter_shapes(config).items())]
    header = header_bytes(entries)
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(2 * math.prod(shape) for _, _, shape in entries))
    assert main(["inspect", str(path)]) == 0
    config_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("config: "))
    assert config_line == (f"config: {config.to_dict()} (inferred from the tensor shapes, heads = D / 128 as in the "
                           "released models)")


def test_config_override_for_a_pt(hub, tmp_path):
    root, oracle = hub
    torch.save({"ema": oracle.state_dict()}, tmp_path / "ckpt.pt")
    (tmp_path / "config.json").write_text(json.dumps({**CONFIG.to_dict(), "gate_value": 0.5, "deltatime_type": "t-r"}))
    checkpoint = open_checkpoint(str(tmp_path / "ckpt.pt"), config_path=str(tmp_path / "config.json"))
    assert checkpoint.config.gate_value == 0.5 and checkpoint.config.deltatime_type == "t-r"
    (tmp_path / "bad.json").write_text(json.dumps({**CONFIG.to_dict(), "ffn_dim": 64}))
    with pytest.raises(KeyMismatchError, match=r"blocks.0.ffn.net.0.proj.weight: checkpoint \[48, 128\] vs config \[64, 128\]"):
        open_checkpoint(str(tmp_path / "ckpt.pt"), config_path=str(tmp_path / "bad.json"))


def wan_base(tmp_path):
    WanTransformer3DModel = require_oracle("WanTransformer3DModel")
    config = {k: v for k, v in CONFIG.to_dict().items() if k not in ("gate_value", "deltatime_type")}
    wan = WanTransformer3DModel(**config).eval()
    randomize_(wan, 11)
    wan.save_pretrained(tmp_path / "wan")
    return wan


def wan_and_warm_started_velocities(wan, model, seed=0):
    """Wan(x, t) and the warm-started AnyFlow(x, t, r=t), one timestep per sample."""
    latents, t, _, text, _ = random_inputs(CONFIG, batch=2, seed=seed)
    with torch.no_grad():
        ref = wan(latents.transpose(1, 2), t[:, 0], text).sample.transpose(1, 2)
        return model(latents, t[:, 0], t[:, 0], text).sample, ref


def to_wan_original(state):
    """diffusers Wan names -> the original Wan2.1 names (the inverse of diffusers' own single-file table)."""
    from weights_convert.names import WAN_ORIGINAL_PER_BLOCK, WAN_ORIGINAL_TOP

    top = {v: k for g in WAN_ORIGINAL_TOP.values() for k, v in g.items()}
    block = {v: k for g in WAN_ORIGINAL_PER_BLOCK.values() for k, v in g.items()}
    out = {}
    for key, value in state.items():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            out[f"blocks.{index}.{block[rest]}"] = value
        else:
            out[top[key]] = value
    return out


@pytest.mark.parametrize("layout", ["diffusers", "original", "original_prefixed"])
def test_wan_base_warm_start_equals_wan_when_r_equals_t(tmp_path, layout):
    wan = wan_base(tmp_path)
    source = tmp_path / "wan"
    if layout != "diffusers":
        prefix = "model.diffusion_model." if layout == "original_prefixed" else ""
        original = {prefix + k: v.contiguous() for k, v in to_wan_original(wan.state_dict()).items()}
        source = tmp_path / "wan_original.safetensors"
        write_file(str(source), sorted(original.items()))
    config = str(tmp_path / "wan" / "config.json")  # its width (128) is no released model's: not inferred
    checkpoint = open_checkpoint(str(source), config_path=config)
    assert checkpoint.format == ("wan-diffusers" if layout == "diffusers" else "wan-original")
    convert(str(source), str(tmp_path / "out"), config_path=config, progress=None)
    model = AnyFlowTransformer3DModel.from_pretrained(str(tmp_path / "out"))
    for a, b in zip(model.time_embed.source_time_mlp.parameters(), model.time_embed.target_time_mlp.parameters()):
        assert torch.equal(a, b)
    assert (model.config.gate_value, model.config.deltatime_type) == (0.25, "r")
    ours, ref = wan_and_warm_started_velocities(wan, model)
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_i2v_checkpoints_and_far_weights_under_a_bidirectional_config_are_refused(hub, tmp_path):
    WanTransformer3DModel = require_oracle("WanTransformer3DModel")
    root, oracle = hub
    state = {k: v.contiguous() for k, v in oracle.state_dict().items()}
    far = {**state, "far_patch_embedding.weight": torch.zeros(128, 4, 1, 4, 4), "far_patch_embedding.bias": torch.zeros(128)}
    (tmp_path / "far").mkdir()
    write_file(str(tmp_path / "far" / "model.safetensors"), sorted(far.items()))
    (tmp_path / "far" / "config.json").write_text(json.dumps({"_class_name": "AnyFlowTransformer3DModel",
                                                              **CONFIG.to_dict()}))
    with pytest.raises(CheckpointError, match=r"describes the bidirectional model, but the weights have far_patch_embedding"):
        open_checkpoint(str(tmp_path / "far"))
    config = {k: v for k, v in CONFIG.to_dict().items() if k not in ("gate_value", "deltatime_type")}
    WanTransformer3DModel(**{**config, "image_dim": 8, "added_kv_proj_dim": 128}).save_pretrained(tmp_path / "i2v")
    with pytest.raises(CheckpointError, match=r"Wan2.1 image-to-video checkpoint"):
        open_checkpoint(str(tmp_path / "i2v"))


def test_inspect_reads_headers(hub, capsys):
    from anyflow.cli import main

    root, _ = hub
    assert main(["inspect", str(root)]) == 0
    printed = capsys.readouterr().out
    assert "format: AnyFlow, diffusers layout (sharded safetensors" in printed
    assert "parameters: " in printed and "float32" in printed and "'num_layers': 2" in printed


def inspected_paths(argv, capsys):
    """The path:, files: and the config's source of ``anyflow inspect``."""
    from anyflow.cli import main

    assert main(["inspect", *argv]) == 0
    lines = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in capsys.readouterr().out.splitlines()}
    return lines["path"], lines["files"], lines["config"].rsplit(" (", 1)[1].rstrip(")")


def test_inspect_prints_the_path_absolute_once_and_the_files_relative_to_it(hub, tmp_path, capsys, monkeypatch):
    root, oracle = hub
    oracle.save_pretrained(tmp_path / "single")
    monkeypatch.chdir(tmp_path)
    single = "diffusion_pytorch_model.safetensors"
    assert inspected_paths(["single"], capsys) == (str(tmp_path / "single"), single, "config.json")
    assert inspected_paths([f"single/{single}"], capsys) == (str(tmp_path / "single" / single), single, "config.json")
    monkeypatch.chdir(root.parent)
    assert len([f for f in os.listdir(root / "transformer") if f.endswith(".safetensors")]) == 9
    files = ("10 files: transformer/diffusion_pytorch_model-00001-of-00009.safetensors, "
             "transformer/diffusion_pytorch_model-00002-of-00009.safetensors ... "
             "transformer/diffusion_pytorch_model-00009-of-00009.safetensors, "
             "transformer/diffusion_pytorch_model.safetensors.index.json")
    assert inspected_paths([root.name], capsys) == (str(root), files, "transformer/config.json")


def test_out_must_be_in_an_existing_folder(hub, tmp_path, capsys):
    root, _ = hub
    out = tmp_path / "missing" / "out"
    code, err = run_cli([root, out], capsys)
    assert code == 1 and err == f"anyflow-convert: error: {out}: OUT's folder {tmp_path / 'missing'} does not exist; create it first"
    with pytest.raises(CheckpointError, match=f"^{out}: OUT's folder {tmp_path / 'missing'} does not exist; create it first$"):
        convert(str(root), str(out), progress=None)
    assert listing(tmp_path) == []  # nothing created
    AnyFlowTransformer3DModel(CONFIG).save_pretrained(str(tmp_path / "saved" / "model"))  # as diffusers' does
    assert listing(tmp_path / "saved" / "model") == ["config.json", "model.safetensors"]


def test_a_long_list_of_written_files_is_summarised(hub, tmp_path, capsys):
    root, _ = hub
    out = tmp_path / "out"
    assert convert_main([str(root), str(out), "--max-shard-size", "1KB"]) == 0
    shards = len(listing(out)) - 2
    assert shards > 20
    wrote = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("wrote "))
    assert wrote.startswith(f"wrote anyflow layout to {out}: {shards + 2} files: config.json, "
                            f"model-00001-of-{shards:05d}.safetensors ... model-{shards:05d}-of-{shards:05d}.safetensors, "
                            "model.safetensors.index.json (")


# ---- bad input: nothing lost, nothing half-written ---------------------------------------------


def run_cli(args, capsys):
    code = convert_main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, (err[-1] if err else "")


def test_out_exists_needs_force_and_force_replaces_only_after_success(hub, tmp_path, capsys):
    root, _ = hub
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = run_cli([root, out], capsys)
    assert code == 1 and "already exists; pass --force" in err and (out / "keep.txt").exists()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    code, err = run_cli([broken, out, "--force"], capsys)
    assert code == 1 and "corrupt safetensors header" in err and (out / "keep.txt").read_text() == "precious"
    assert run_cli([root, out, "--force"], capsys)[0] == 0
    assert listing(out) == ["config.json", "model.safetensors"]
    assert listing(tmp_path) == ["broken.safetensors", "out"]  # no partial or replaced folders left


def test_src_equal_to_or_inside_out_is_refused(hub, tmp_path, capsys):
    root, _ = hub
    copy = tmp_path / "snap"
    shutil.copytree(root, copy)
    code, err = run_cli([copy, copy, "--force"], capsys)
    assert code == 1 and "the source is OUT itself" in err
    code, err = run_cli([copy / "transformer", copy, "--force"], capsys)
    assert code == 1 and "the source is inside OUT" in err
    assert os.path.isfile(copy / "transformer" / "config.json")
    before = {f: (copy / "transformer" / f).read_bytes() for f in os.listdir(copy / "transformer")}
    for src, out in [(copy, copy / "converted"), (copy / "transformer", copy / "transformer" / "sub"),
                     (copy, copy / "transformer" / "sub")]:
        code, err = run_cli([src, out], capsys)
        assert code == 1 and err.endswith(f"{out}: OUT is inside the source folder {src}, which is never modified; refused")
        assert not out.exists()
    assert {f: (copy / "transformer" / f).read_bytes() for f in os.listdir(copy / "transformer")} == before
    assert sorted(os.listdir(copy)) == ["model_index.json", "transformer"]


def test_index_naming_a_missing_or_outside_shard_is_refused(hub, tmp_path):
    root, _ = hub
    copy = tmp_path / "t"
    shutil.copytree(root / "transformer", copy)
    index_path = copy / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = next(iter(index["weight_map"]))
    for shard, message in [("../outside.safetensors", "not a file in the index's own folder; refused"),
                           ("/etc/passwd", "not a file in the index's own folder; refused"),
                           ("nope.safetensors", "names shard 'nope.safetensors', which does not exist")]:
        index["weight_map"][key] = shard
        index_path.write_text(json.dumps(index))
        with pytest.raises(CheckpointError, match=message):
            open_checkpoint(str(copy))


def test_truncated_and_corrupt_files_name_the_file(hub, tmp_path):
    root, oracle = hub
    oracle.save_pretrained(tmp_path / "single")
    path = tmp_path / "single" / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=rf"{path}: truncated: the header describes {len(data)} bytes"):
        open_checkpoint(str(path))
    path.write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(CheckpointError, match=rf"{path}: corrupt safetensors header length"):
        open_checkpoint(str(path))


def test_missing_unexpected_and_misshapen_keys(hub, tmp_path):
    _, oracle = hub
    state = {k: v.contiguous() for k, v in oracle.state_dict().items()}
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "blocks.1.attn2.to_v.bias"}, r"missing keys: blocks.1.attn2.to_v.bias"),
        "unexpected": ({**state, "blocks.0.extra.weight": torch.zeros(1)}, r"unmapped keys: blocks.0.extra.weight"),
        "shape": ({**state, "blocks.1.attn1.to_q.bias": torch.zeros(7)}, r"blocks.1.attn1.to_q.bias: checkpoint \[7\] vs config \[128\]"),
    }
    (tmp_path / "config.json").write_text(json.dumps(CONFIG.to_dict()))
    for name, (tensors, message) in cases.items():
        write_file(str(tmp_path / f"{name}.safetensors"), sorted(tensors.items()))
        with pytest.raises(KeyMismatchError, match=message):
            open_checkpoint(str(tmp_path / f"{name}.safetensors"))


@pytest.mark.parametrize("content,message", [
    (bytes(range(7, 207)) * 20, "not a torch checkpoint: a file starting with bytes 07 08 09 0a, neither a zip archive "
                                "(torch.save) nor a pickle (legacy torch.save)"),
    (b"", "not a torch checkpoint: an empty file"),
    ("truncated zip", "corrupt or truncated torch zip archive"),
])
def test_a_pt_that_is_no_torch_checkpoint_is_named_as_such(tmp_path, capsys, content, message):
    if content == "truncated zip":
        torch.save({"ema": {"patch_embedding.weight": torch.zeros(64)}}, tmp_path / "full.pt")
        content = (tmp_path / "full.pt").read_bytes()[:300]
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(content)
    code, err = run_cli([folder, tmp_path / "out"], capsys)
    assert code == 1 and f"{folder / 'pytorch_model.bin'}: {message}" in err and "pickled code" not in err
    assert not (tmp_path / "out").exists()


def start_slow_conversion(root, out, *args, **popen) -> subprocess.Popen:
    """``anyflow-convert root out *args`` in a subprocess, 50 ms per tensor, returned while it writes."""
    slow = (
        "import sys, time, weights_convert.writer as w\n"
        "real = w._converted_bytes\n"
        "w._converted_bytes = lambda *a, **k: (time.sleep(0.05), real(*a, **k))[1]\n"
        "from weights_convert.cli import main\n"
        f"sys.exit(main({[str(root), str(out), *args]!r}))\n"
    )
    process = subprocess.Popen([sys.executable, "-c", slow], **popen)
    deadline = time.time() + 60
    while not any(".partial-" in n for n in os.listdir(out.parent)) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # a few tensors into the write
    return process


@pytest.mark.slow
@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_conversion_says_one_line_and_leaves_nothing(hub, tmp_path, signum, code):
    root, _ = hub
    out = tmp_path / "out"
    process = start_slow_conversion(root, out, "--dtype", "bfloat16", stderr=subprocess.PIPE, text=True)
    process.send_signal(signum)
    err = process.communicate(timeout=60)[1].strip().splitlines()
    assert process.returncode == code and len(err) == 1, err
    assert err[0] == (f"anyflow-convert: interrupted ({signal.Signals(signum).name}); nothing was written and {out} "
                      "is as it was")
    assert os.listdir(tmp_path) == []


class Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pt_with_pickled_code_is_refused_and_not_executed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    torch.save({"ema": {"patch_embedding.weight": torch.zeros(1)}, "payload": Boom()}, tmp_path / "evil.pt")
    code, err = run_cli([tmp_path / "evil.pt", tmp_path / "out"], capsys)
    assert code == 1 and "refused: loading it would execute pickled code" in err and "nothing was executed" in err
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out").exists()


def test_killed_conversion_leaves_no_out_and_a_rerun_succeeds(hub, tmp_path):
    root, _ = hub
    out = tmp_path / "out"
    process = start_slow_conversion(root, out)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists() and any(".partial-" in n for n in os.listdir(tmp_path))
    convert(str(root), str(out), progress=None)
    assert listing(tmp_path) == ["out"] and listing(out) == ["config.json", "model.safetensors"]


def test_fuzzed_headers_indexes_and_pt_files_end_in_clear_errors(hub, tmp_path, capsys):
    """Random corruption of every kind of input file: always exit 1 with a one-line reason, or success."""
    import random

    root, oracle = hub
    rng = random.Random(1234)
    single = tmp_path / "single"
    oracle.save_pretrained(single)
    torch.save({"ema": oracle.state_dict()}, tmp_path / "good.pt")
    originals = {
        "safetensors": (single / "diffusion_pytorch_model.safetensors").read_bytes(),
        "index": (root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_bytes(),
        "pt": (tmp_path / "good.pt").read_bytes(),
    }
    outcomes = {"error": 0, "ok": 0}
    for trial in range(60):
        kind = ["safetensors", "index", "pt"][trial % 3]
        data = bytearray(originals[kind])
        header_end = 8 + int.from_bytes(originals["safetensors"][:8], "little") if kind == "safetensors" else len(data)
        for _ in range(rng.randint(1, 4)):
            op = rng.choice(["flip", "truncate", "insert"])
            at = rng.randrange(0, min(len(data), header_end + 16))
            if op == "flip":
                data[at] = rng.randrange(256)
            elif op == "truncate":
                del data[at:]
                if not data:
                    break
            else:
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        case = tmp_path / f"case{trial}"
        if kind == "index":
            shutil.copytree(root / "transformer", case)
            (case / "diffusion_pytorch_model.safetensors.index.json").write_bytes(bytes(data))
            src = case
        else:
            case.mkdir()
            (case / "config.json").write_text(json.dumps(CONFIG.to_dict()))  # a width no released model has
            weights = case / ("model.safetensors" if kind == "safetensors" else "ckpt.pt")
            weights.write_bytes(bytes(data))
            src = weights if kind == "safetensors" else case  # a .pt reads the config.json of its folder
        code = convert_main([str(src), str(tmp_path / f"out{trial}")])
        err = capsys.readouterr().err.strip().splitlines()
        if code == 0:
            outcomes["ok"] += 1
            continue
        outcomes["error"] += 1
        assert code == 1 and len(err) == 1 and err[0].startswith("anyflow-convert: error: "), (kind, err)
        assert "Traceback" not in err[0]
        assert not (tmp_path / f"out{trial}").exists()
    assert outcomes["error"] >= 30
