"""The trainer around the objectives: LoRA in and out, the data folder, the config, the loop (stages 0, 1 and 2),
exact resume, two processes under FSDP2, the loss curve, ``anyflow train``, and bad inputs named in one line.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from anyflow import AnyFlowTransformer3DModel
from anyflow.cli import main as anyflow_main
from anyflow.training.config import AUTHORS_LORA_TARGETS, ConfigError, config_from_dict, load_config
from anyflow.training.data import BatchSchedule, DatasetWriter, LatentDataset
from anyflow.training.lora import inject_lora, save_lora_adapter, train_only_lora
from anyflow.training.loss_curve import write_loss_curve
from anyflow.training.optim import clip_gradients
from anyflow.training.trainer import Trainer
from support import oracle_and_ours, random_inputs, randomize_, require_oracle, small_config
from training_fixtures import read_log, tiny_checkpoint, tiny_config, tiny_data

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# A merged LoRA (W + s B A) against the unmerged one (W x + s B (A x)), or diffusers' PEFT layers: the same
# products summed in other orders, fp32. The project's fp32 bar: max|a - b| <= 1e-5 max|b| (seen: below 1e-6).
FP32_BAR = 1e-5


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def quiet(message: str) -> None:
    pass


@pytest.fixture
def run(tmp_path):
    """A folder with a tiny checkpoint (``model``) and data folder (``data``) for a run to train on."""
    tiny_checkpoint(tmp_path / "model")
    tiny_data(tmp_path / "data")
    return tmp_path


# ---- LoRA -----------------------------------------------------------------------------------------------

def lora_model(seed=1):
    """A small model with the authors' LoRA targets injected, every B drawn (so the adapter changes the output)."""
    model = AnyFlowTransformer3DModel(small_config()).eval()
    randomize_(model, seed)
    base = copy.deepcopy(model)
    torch.manual_seed(seed)
    inject_lora(model, AUTHORS_LORA_TARGETS, rank=4, alpha=8.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.3)
    return base, model


def test_lora_targets_are_the_authors_modules_and_only_factors_train():
    _, model = lora_model()
    wrapped = sorted(n for n, m in model.named_modules() if hasattr(m, "lora_A"))
    per_block = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "ffn.fc_in", "ffn.fc_out"]
    expected = [f"blocks.{i}.{m}" for i in range(2) for m in per_block]
    expected += [f"time_embed.{mlp}.{fc}" for mlp in ("source_time_mlp", "target_time_mlp") for fc in ("fc_in", "fc_out")]
    assert wrapped == sorted(expected)
    trainable = train_only_lora(model)
    assert len(trainable) == 2 * len(expected)
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert "blocks.0.self_attn.q.weight" in dict(model.named_parameters())  # the base keeps its names


def test_saved_adapter_merged_equals_the_injected_model(tmp_path):
    base, model = lora_model()
    save_lora_adapter(model, str(tmp_path / "adapter.safetensors"))
    latents, t, r, text, _ = random_inputs(model.config, batch=2)
    with torch.no_grad():
        injected, before = model(latents, t, r, text).sample, base(latents, t, r, text).sample
        merged = base.merge_lora(str(tmp_path / "adapter.safetensors"))(latents, t, r, text).sample
    assert relative(before, injected) > 1e-2  # the adapter matters
    assert relative(merged, injected) <= FP32_BAR
    assert os.listdir(tmp_path) == ["adapter.safetensors"]  # written whole, no partial left


@pytest.mark.reference
def test_saved_adapter_loads_in_diffusers(tmp_path):
    oracle_cls = require_oracle()
    require_oracle("LoraConfig", "peft")
    pipeline_cls = require_oracle("AnyFlowPipeline")
    oracle, ours = oracle_and_ours(oracle_cls, small_config(), seed=1)
    torch.manual_seed(0)
    inject_lora(ours, AUTHORS_LORA_TARGETS, rank=4, alpha=8.0)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.3)
    save_lora_adapter(ours, str(tmp_path / "adapter.safetensors"))
    pipe = pipeline_cls(tokenizer=None, text_encoder=None, transformer=oracle, vae=None,
                        scheduler=require_oracle("FlowMapEulerDiscreteScheduler")(shift=5.0))
    pipe.load_lora_weights(str(tmp_path / "adapter.safetensors"))  # reads alpha from the metadata
    latents, t, r, text, _ = random_inputs(ours.config, batch=2)
    with torch.no_grad():
        assert relative(ours(latents, t, r, text).sample, oracle(latents, t, r, text).sample) <= FP32_BAR


def test_lora_target_matching_nothing_is_named_with_the_nearest():
    model = AnyFlowTransformer3DModel(small_config())
    with pytest.raises(ValueError) as info:
        inject_lora(model, ["attn1.to_q", "ffn.net.3"], rank=4, alpha=4)
    message = str(info.value)
    assert "LoRA target 'ffn.net.3' matches no linear module" in message and "did you mean 'ffn.net.2'" in message
    assert "\n" not in message
    assert not any(hasattr(m, "lora_A") for m in model.modules())  # checked before any module changed


def test_a_bare_string_is_one_lora_target_and_other_types_are_refused():
    model = AnyFlowTransformer3DModel(small_config())
    assert inject_lora(model, "attn1.to_q", rank=4, alpha=4) == ["blocks.0.self_attn.q", "blocks.1.self_attn.q"]
    for bad in (3, None, [], "", ["attn1.to_k", 7], {"attn1.to_k": 1}, b"attn1"):
        with pytest.raises(ValueError, match=r"^LoRA targets must be a non-empty string \(a part of module names\) or "
                                             r"a non-empty list of them, got .*$"):
            inject_lora(model, bad, rank=4, alpha=4)
    assert sum(hasattr(m, "lora_A") for m in model.modules()) == 2  # nothing more wrapped


# ---- the loop ---------------------------------------------------------------------------------------------

def test_clip_gradients_equals_torch_clip_grad_norm():
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p) * 3
    expected = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, e in zip(params, expected):
        e.grad = p.grad.clone()
    reference = torch.nn.utils.clip_grad_norm_(expected, 1.0).item()
    assert clip_gradients(params, 1.0) == pytest.approx(reference, rel=1e-6)
    for p, e in zip(params, expected):
        assert torch.allclose(p.grad, e.grad, rtol=1e-6, atol=0)


@pytest.mark.slow
def test_a_tiny_model_overfits_a_tiny_dataset(tmp_path):
    """Stage 0 (plain flow matching: a fixed target, so the fall is the loop's doing) on one clip, every weight
    training: the mean loss of the last 10 of 60 iterations is below 0.8 x that of the first 10 (seen: 0.69)."""
    tiny_checkpoint(tmp_path / "model")
    tiny_data(tmp_path / "data", one_clip=True, frames=1)
    raw = tiny_config(tmp_path, "teacher", train={"total_iter": 60, "warmup_iter": 0, "optim_g": {"lr": 1e-2}},
                      datasets={"train": {"batch_size_per_gpu": 4}},
                      models={"text_encoder_cfg": {"drop_text_ratio": 0.0}},
                      logger={"save_checkpoint_freq": 100, "print_freq": 100})
    del raw["models"]["transformer_cfg"]["lora_config"]
    Trainer(config_from_dict(raw), say=quiet).train()
    losses = [r["loss"] for r in read_log(tmp_path)]
    assert len(losses) == 60
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)
    assert os.path.isfile(tmp_path / "out" / "model_ema" / "config.json")


@pytest.mark.slow
def test_stage1_run_writes_its_outputs_and_its_adapter_loads(run, capsys):
    Trainer(config_from_dict(tiny_config(run)), say=print).train()
    out = run / "out"
    assert sorted(os.listdir(out)) == ["checkpoints", "lora.safetensors", "lora_ema.safetensors", "loss.png",
                                       "train_log.jsonl"]
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_000004"]  # keep_checkpoints = 1
    assert (out / "checkpoints" / "latest").read_text() == "step_000004\n"
    records = read_log(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["lr"] for r in records] == [0.0, 5e-4, 1e-3, 1e-3]  # constant_with_warmup, warmup_iter 2
    assert all(r["loss"] > 0 and r["grad_norm"] >= 0 for r in records)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("step 1/4  loss ") and "s/step" in lines[0]
    model = AnyFlowTransformer3DModel.from_pretrained(str(run / "model"), lora=[str(out / "lora_ema.safetensors")])
    assert model.config.num_layers == 1


@pytest.mark.slow
def test_a_training_checkpoint_is_named_as_such_with_the_runs_weights_and_never_merged(run, capsys):
    """``checkpoints/step_N/rank0.pt`` given to inspect, sample --lora (even with --lora-skip-unknown),
    from_pretrained or anyflow-convert: one line saying what it is and which of the run's files to use."""
    from weights_convert.cli import main as convert_main
    from weights_convert.pt_files import TrainerCheckpointError

    Trainer(config_from_dict(tiny_config(run, train={"total_iter": 2})), say=quiet).train()
    out = run / "out"
    step = out / "checkpoints" / "step_000002"
    rank0 = step / "rank0.pt"
    what = f"{rank0}: a checkpoint of anyflow train (step 2: the state a resumed run reads), not a model or an adapter"
    written = (f"{what}; use the weights the run wrote in {out}: lora_ema.safetensors or lora.safetensors "
               "(adapters: --lora)")
    capsys.readouterr()
    assert anyflow_main(["inspect", str(rank0)]) == 0
    assert capsys.readouterr().out == written + "\n"
    save_file({"prompt_embeds": torch.randn(1, 3, 24)}, str(run / "embeds.safetensors"))
    sample = ["sample", "--model", str(run / "model"), "--prompt-embeds", str(run / "embeds.safetensors"), "--frames",
              "5", "--height", "32", "--width", "32", "--steps", "1", "--device", "cpu", "--out", str(run / "o.safetensors")]
    assert anyflow_main(sample + ["--lora", str(rank0), "--lora-skip-unknown"]) == 1
    assert capsys.readouterr().err == f"anyflow sample: error: --lora: {written}\n"
    assert not (run / "o.safetensors").exists()
    with pytest.raises(TrainerCheckpointError, match=f"^{re.escape(written)}$"):
        AnyFlowTransformer3DModel.from_pretrained(str(run / "model"), lora=[str(rank0)])
    (step / "rank1.pt").write_bytes(rank0.read_bytes())  # a step folder of two processes
    assert convert_main([str(step), str(run / "converted")]) == 1
    assert capsys.readouterr().err.strip().endswith(written.replace(str(rank0), str(step)))
    for name in ("lora.safetensors", "lora_ema.safetensors"):
        os.remove(out / name)
    assert anyflow_main(["inspect", str(rank0)]) == 0
    assert capsys.readouterr().out == (
        f"{what}; the run in {out} has written no weights yet: it writes lora_ema.safetensors or lora.safetensors "
        "(adapters: --lora), or model_ema/ or model/ (whole models) when it finishes (the same anyflow train "
        "command resumes it)\n")
    (out / "model").mkdir()
    (out / "model_ema").mkdir()
    with pytest.raises(TrainerCheckpointError, match=f"^{re.escape(what)}; use the weights the run wrote in "
                                                     f"{re.escape(str(out))}: model_ema/ or model/ \\(whole models\\)$"):
        AnyFlowTransformer3DModel.from_pretrained(str(rank0))
    (run / "copied.pt").write_bytes(rank0.read_bytes())
    with pytest.raises(TrainerCheckpointError, match=r"copied.pt: a checkpoint of anyflow train \(step 2: .*; use the "
                                                     r"weights its run wrote beside its checkpoints/ folder: "
                                                     r"lora_ema.safetensors or lora.safetensors \(adapters: --lora\), "
                                                     r"or model_ema/ or model/ \(whole models\)$"):
        AnyFlowTransformer3DModel.from_pretrained(str(run / "model"), lora=str(run / "copied.pt"))


@pytest.mark.slow
def test_resume_continues_exactly_as_the_uninterrupted_run(tmp_path):
    """Same process, same operations, same order: the resumed run's losses and weights equal the uninterrupted
    run's bit for bit (the checkpoint holds every state the iterations read: weights, AdamW, EMA, the draws'
    generator, the batches drawn)."""
    tiny_checkpoint(tmp_path / "model")
    tiny_data(tmp_path / "data")
    whole_run = tiny_config(tmp_path, train={"total_iter": 4}, path={"output_dir": str(tmp_path / "whole")})
    Trainer(config_from_dict(whole_run), say=quiet).train()
    split = tiny_config(tmp_path, train={"total_iter": 2})
    Trainer(config_from_dict(split), say=quiet).train()  # stops after 2, checkpointed
    with open(tmp_path / "out" / "train_log.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": -1.0}) + "\n")  # an iteration after the checkpoint, to be forgotten
    messages = []
    Trainer(config_from_dict(tiny_config(tmp_path, train={"total_iter": 4})), say=messages.append).train()
    assert any("resuming from" in m and "(step 2)" in m for m in messages)
    whole_log = [json.loads(line) for line in open(tmp_path / "whole" / "train_log.jsonl")]
    resumed_log = read_log(tmp_path)
    assert [r["loss"] for r in resumed_log] == [r["loss"] for r in whole_log]
    assert [r["grad_norm"] for r in resumed_log] == [r["grad_norm"] for r in whole_log]
    for name in ("lora.safetensors", "lora_ema.safetensors"):
        a, b = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "out" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_stage2_alternates_generator_and_fake_score_on_cpu(run):
    raw = tiny_config(run, "onpolicy", train={"total_iter": 2})
    trainer = Trainer(config_from_dict(raw), say=quiet)
    real_before = {n: p.clone() for n, p in trainer.real_score.named_parameters()}
    fake_before = {n: p.clone() for n, p in trainer.fake_score.named.items()}
    trainer.train()
    records = read_log(run)
    keys = {"generator_loss", "flow_map_loss", "fake_score_loss", "grad_norm", "fake_score_grad_norm"}
    assert all(keys <= set(r) and all(torch.isfinite(torch.tensor(r[k])) for k in keys) for r in records)
    assert all(torch.equal(p, real_before[n]) for n, p in trainer.real_score.named_parameters())  # frozen
    assert any(not torch.equal(p, fake_before[n]) for n, p in trainer.fake_score.named.items())  # trained
    assert trainer.batches == 4  # a batch for each model, each iteration
    assert os.path.isfile(run / "out" / "lora_ema.safetensors")


@pytest.mark.slow
def test_far_model_trains_causally_and_its_compressed_patch_embedding_is_written(run):
    """A FAR generator: stage 1 on its chunks (clean context before the last full_chunk_limit), stage 2 rolling out
    chunk by chunk against bidirectional scores, as the authors' FAR trainers; far_patch_embed trains whole, so the
    merged model is written beside the adapters."""
    from anyflow import AnyFlowFARConfig, AnyFlowFARTransformer3DModel
    from support import SMALL

    config = AnyFlowFARConfig(**{**SMALL, "num_layers": 1, "chunk_partition": (1, 1, 1, 1), "full_chunk_limit": 1})
    far = AnyFlowFARTransformer3DModel(config)
    randomize_(far, 0)
    far.save_pretrained(str(run / "far"))
    tiny_data(run / "far-data", frames=4)
    for stage in ("pretrain", "onpolicy"):
        steps = 3 if stage == "pretrain" else 1  # a sample without context (k = 1 chunk) leaves far_patch_embed alone
        raw = tiny_config(run, stage, train={"total_iter": steps, "warmup_iter": 0}, path={"output_dir": str(run / stage)},
                          datasets={"train": {"data_root": str(run / "far-data")}},
                          models={"transformer_cfg": {"model_name": str(run / "far"),
                                                      "far_config": {"long_context_training_ratio": 1.0}},
                                  "rollout_cfg": {"num_inference_steps_list": [1, 2]}})
        trainer = Trainer(config_from_dict(raw), say=quiet)
        before = trainer.generator.named["far_patch_embed.proj.weight"].clone()
        trainer.train()
        if stage == "pretrain":
            assert not torch.equal(trainer.generator.named["far_patch_embed.proj.weight"], before)
        assert {"lora.safetensors", "lora_ema.safetensors", "model", "model_ema"} <= set(os.listdir(run / stage))
    merged = AnyFlowFARTransformer3DModel.from_pretrained(str(run / "onpolicy" / "model_ema"))
    assert torch.equal(merged.far_patch_embed.proj.weight, trainer.ema.whole()["far_patch_embed.proj.weight"])
    with pytest.raises(ValueError, match=r"4 latent frames, the FAR model's chunk_partition \[1, 1, 1, 1, 1\] needs 5$"):
        AnyFlowFARTransformer3DModel(AnyFlowFARConfig(**{**SMALL, "chunk_partition": (1,) * 5})).save_pretrained(
            str(run / "far5"))
        Trainer(config_from_dict(tiny_config(run, models={"transformer_cfg": {"model_name": str(run / "far5")}},
                                             datasets={"train": {"data_root": str(run / "far-data")}})), say=quiet)


@pytest.mark.slow
@pytest.mark.parallel
def test_two_processes_under_fsdp2_give_one_process_loss_and_gradients(tmp_path):
    """Stage 1's first iteration on 2 gloo processes of 1 sample each against 1 process of 2 (the same draws:
    every process draws the global batch's), the rescale over the global batch included. Different sums
    (FSDP's reduce-scatter, sharded clipping norms): the fp32 bar."""
    from training_fixtures import first_step

    tiny_checkpoint(tmp_path / "model")
    tiny_data(tmp_path / "data")
    one = first_step(tiny_config(tmp_path, path={"output_dir": str(tmp_path / "one")}))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               os.path.join(HERE, "training_fixtures.py"), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
    assert done.returncode == 0, done.stderr[-4000:]
    two = json.loads((tmp_path / "two.json").read_text())
    for key in ("loss", "grad_norm"):
        assert two["record"][key] == pytest.approx(one["record"][key], rel=FP32_BAR)
    assert two["gradients"].keys() == one["gradients"].keys() and len(one["gradients"]) == 20
    for name, gradient in one["gradients"].items():
        expected, got = torch.tensor(gradient), torch.tensor(two["gradients"][name])
        if expected.abs().max() > 0:
            assert relative(got, expected) <= FP32_BAR, name
        else:  # the A factors: B starts at zero, so their first gradient is zero
            assert got.abs().max() == 0, name


# ---- the loss curve ---------------------------------------------------------------------------------------

def test_loss_curve_png_draws_each_loss_in_its_panel(tmp_path):
    from matplotlib import image

    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": k, "generator_loss": 1 / k, "fake_score_loss": 0.5, "lr": 1e-4}) + "\n"
                           for k in range(1, 31)))
    assert write_loss_curve(str(log), str(tmp_path / "loss.png"), width=400, panel_height=120)
    pixels = image.imread(str(tmp_path / "loss.png"))  # a valid PNG, read back
    assert pixels.shape[:2] == (240, 400)  # a panel per loss; the learning rate is no loss
    inked = (pixels[..., :3] < 0.9).any(axis=-1).sum(axis=1)  # non-white pixels per row
    assert inked[:120].sum() > 300 and inked[120:].sum() > 300  # both panels drawn
    (tmp_path / "empty.jsonl").write_text("")
    assert not write_loss_curve(str(tmp_path / "empty.jsonl"), str(tmp_path / "none.png"))


@pytest.mark.slow
def test_without_matplotlib_the_run_writes_its_log_and_says_how_to_draw_it(run, monkeypatch, capsys):
    import anyflow.training.loss_curve as loss_curve

    monkeypatch.setattr(loss_curve.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else importlib.util.find_spec(name, *a))
    lines = []
    Trainer(config_from_dict(tiny_config(run, train={"total_iter": 1})), say=lines.append).train()
    assert os.path.isfile(run / "out" / "train_log.jsonl") and not os.path.exists(run / "out" / "loss.png")
    assert any("to draw them into loss.png: pip install matplotlib" in line for line in lines), lines


# ---- the command and bad inputs -------------------------------------------------------------------------

def write_toml(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_anyflow_train_runs_a_toml_config(run, capsys):
    config = write_toml(run / "run.toml", f"""
manual_seed = 1
[path]
output_dir = "{run / 'out'}"
[datasets.train]
data_root = "{run / 'data'}"
batch_size_per_gpu = 2
[models.transformer_cfg]
model_name = "{run / 'model'}"
[models.transformer_cfg.lora_config]
lora_rank = 2
lora_alpha = 2
[train]
train_pipeline = "pretrain"
total_iter = 2
""")
    assert anyflow_main(["train", config]) == 0
    out = capsys.readouterr().out
    assert "step 2/2" in out and "lora_ema.safetensors" in out
    assert len(read_log(run)) == 2


@pytest.mark.parametrize("text,expected", [
    ("[train]\nema_decy = 0.99\n", "unknown key 'train.ema_decy' (did you mean 'train.ema_decay'?)"),
    ("[models.transformer_cfg.lora_config]\nlora_rnk = 8\n",
     "unknown key 'models.transformer_cfg.lora_config.lora_rnk' (did you mean 'models.transformer_cfg.lora_config.lora_rank'?)"),
    ("[train]\ntotal_iter = '100'\n", "train.total_iter must be an int, got '100'"),
    ("[train.optim_g]\nbetas = [0.9]\n", "train.optim_g.betas must be a list of 2 floats, got [0.9]"),
    ("[train]\ntrain_pipeline = 'onpolicy'\n", "models.real_cfg.model_name is required for train_pipeline = 'onpolicy'"),
    ("[train]\ntrain_pipeline = 'stage1'\n", "train.train_pipeline must be one of 'teacher', 'pretrain', 'onpolicy'"),
    ("[train\n", "not valid TOML"),
])
def test_config_mistakes_are_one_line_naming_the_key(tmp_path, text, expected):
    base = (f"[path]\noutput_dir = '{tmp_path / 'out'}'\n[datasets.train]\ndata_root = '{tmp_path}'\n"
            f"[models.transformer_cfg]\nmodel_name = 'm'\n")
    path = write_toml(tmp_path / "c.toml", base + text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert expected in str(info.value) and str(info.value).startswith(path) and "\n" not in str(info.value)


def test_cli_prints_a_config_typo_as_one_line(tmp_path, capsys):
    path = write_toml(tmp_path / "c.toml", "[logger]\nprint_frq = 5\n")
    assert anyflow_main(["train", path]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"anyflow train: error: {path}: unknown key 'logger.print_frq' (did you mean 'logger.print_freq'?)"


def test_missing_data_folder_is_one_line(run):
    raw = tiny_config(run, datasets={"train": {"data_root": str(run / "nowhere")}})
    with pytest.raises(ValueError, match=r"^training data .*nowhere: no such folder \(make one with "
                                         r"scripts/prepare_training_data.py\)$"):
        Trainer(config_from_dict(raw), say=quiet)


def test_data_of_the_wrong_shape_is_one_line(run):
    shard = str(run / "data" / "shard_00001.safetensors")
    tensors = load_file(shard)
    save_file({"latents": tensors["latents"][:, :, :1].contiguous(), "prompt_embeds": tensors["prompt_embeds"]}, shard)
    with pytest.raises(ValueError, match=r"shard_00001.safetensors: 'latents' is \(1, 4, 1, 4, 4\), "
                                         r"dataset.json says \(1, 4, 2, 4, 4\)$"):
        LatentDataset(str(run / "data"))


def test_data_for_another_model_is_one_line(run, tmp_path):
    AnyFlowTransformer3DModel(small_config(in_channels=8, out_channels=8, num_layers=1)).save_pretrained(
        str(tmp_path / "wide"))
    raw = tiny_config(run, models={"transformer_cfg": {"model_name": str(tmp_path / "wide")}})
    with pytest.raises(ValueError, match=r"latents have 4 channels, the model takes in_channels=8$"):
        Trainer(config_from_dict(raw), say=quiet)


def test_a_lora_target_matching_nothing_stops_the_run(run):
    raw = tiny_config(run, models={"transformer_cfg": {"lora_config": {"target_module_name": ["attn1.to_qkv"]}}})
    with pytest.raises(ValueError, match="LoRA target 'attn1.to_qkv' matches no linear module"):
        Trainer(config_from_dict(raw), say=quiet)


def test_batches_cover_each_epoch_and_split_over_processes(run):
    dataset = LatentDataset(str(run / "data"))
    assert len(dataset) == 4 and dataset.frame_shape == (2, 4, 4, 4)
    one = BatchSchedule(dataset, batch_size=2, seed=0)
    assert sorted(one.indices(0) + one.indices(1)) == [0, 1, 2, 3]  # an epoch visits every sample once
    ranks = [BatchSchedule(dataset, batch_size=1, seed=0, rank=r, processes=2) for r in range(2)]
    assert [r.indices(1)[0] for r in ranks] == one.indices(1)  # process p takes row p of the global batch
    with pytest.raises(ValueError, match="4 samples, fewer than one global batch of 6"):
        BatchSchedule(dataset, batch_size=3, seed=0, processes=2)


# ---- DatasetWriter -------------------------------------------------------------------------------------------

def test_dataset_writer_refuses_bad_arguments_and_values_in_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match=r"^DatasetWriter shard_size: must be a positive int \(samples a shard\), "
                                         r"got 0$"):
        DatasetWriter(str(tmp_path / "data"), shard_size=0)
    with pytest.raises(ValueError, match=r"^DatasetWriter root .*a_file: a file, not a folder; choose a new folder$"):
        DatasetWriter(str(tmp_path / "a_file"))
    with pytest.raises(ValueError, match=r"^DatasetWriter negative: 1 of 6 values are NaN or infinite$"):
        DatasetWriter(str(tmp_path / "data"), negative=torch.tensor([[[1.0, float("inf"), 0], [0, 0, 0]]]))
    latents, text = torch.zeros(2, 4, 4, 4), torch.zeros(3, 24)
    bad = latents.clone()
    bad[1, 2, 3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^DatasetWriter sample 1: latents: 1 of 128 values are NaN or infinite$"):
        with DatasetWriter(str(tmp_path / "data")) as writer:
            writer.add(latents, text)
            writer.add(bad, text)
    with pytest.raises(ValueError, match=r"^DatasetWriter sample 0: prompt_embeds: 72 of 72 values are NaN or "
                                         r"infinite$"):
        with DatasetWriter(str(tmp_path / "data")) as writer:
            writer.add(latents, torch.full((3, 24), float("-inf")).to(torch.bfloat16))
    assert sorted(os.listdir(tmp_path)) == ["a_file"]  # nothing hidden left behind


@pytest.mark.slow
def test_dataset_writer_without_with_closes_or_leaves_nothing(tmp_path):
    import gc

    latents, text = torch.randn(2, 4, 4, 4), torch.randn(3, 24)
    writer = DatasetWriter(str(tmp_path / "closed"), negative=torch.randn(1, 3, 24), shard_size=1)
    writer.add(latents, text, "one")
    writer.add(latents, text, "two")
    writer.close()
    with pytest.raises(ValueError, match=r"^DatasetWriter sample 2: the writer of .*closed is closed; add every sample "
                                         r"before close\(\)$"):
        writer.add(latents, text)
    assert len(LatentDataset(str(tmp_path / "closed"))) == 2
    dropped = DatasetWriter(str(tmp_path / "dropped"), shard_size=1)
    dropped.add(latents, text)
    del dropped
    gc.collect()
    assert os.listdir(tmp_path) == ["closed"]
    script = (f"import sys, torch; sys.path.insert(0, {HERE!r})\n"
              "from anyflow.training.data import DatasetWriter\n"
              f"writer = DatasetWriter({str(tmp_path / 'unclosed')!r}, shard_size=1)\n"
              "writer.add(torch.zeros(2, 4, 4, 4), torch.zeros(3, 24))\n")  # and the interpreter exits
    subprocess.run([sys.executable, "-c", script], check=True)
    assert os.listdir(tmp_path) == ["closed"]


def test_safetensors_files_follow_the_umask(tmp_path):
    """Shards and the negative embedding are made as every file is (0o666 & ~umask), not 0600 as safetensors'
    save_file makes them; no module of the package writes safetensors files with it."""
    previous = os.umask(0o027)
    try:
        tiny_data(tmp_path / "data")
    finally:
        os.umask(previous)
    modes = {name: os.stat(tmp_path / "data" / name).st_mode & 0o777 for name in os.listdir(tmp_path / "data")}
    assert modes == {name: 0o640 for name in ("dataset.json", "negative_prompt_embeds.safetensors",
                                              "shard_00000.safetensors", "shard_00001.safetensors")}
    for folder in ("anyflow", "weights_convert"):
        for path, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in (f for f in files if f.endswith(".py")):
                with open(os.path.join(path, name)) as f:
                    assert not re.search(r"import save_file|\b(save_file|serialize_file)\(", f.read()), name


# ---- scripts/prepare_training_data.py ---------------------------------------------------------------------

@pytest.mark.slow
def test_prepare_training_data_makes_a_folder_the_trainer_trains_on(tmp_path, capsys):
    """Videos and captions through the project's VAE and text encoder (a tiny snapshot) into a data folder, then
    two stage-1 iterations of the snapshot's transformer on it."""
    pytest.importorskip("av")
    pytest.importorskip("tokenizers")
    import numpy as np

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from prepare_training_data import main as prepare
    from snapshot_fixtures import make_tiny_snapshot

    from anyflow.pipeline import VideoPipeline
    from anyflow.pipeline.video_io import write_video

    snapshot = make_tiny_snapshot(tmp_path / "snapshot")
    videos = tmp_path / "videos"
    videos.mkdir()
    rng = np.random.default_rng(0)
    for name, frames in (("fox", 9), ("cat", 9), ("short", 3)):
        write_video(str(videos / f"{name}.mp4"), rng.integers(0, 255, (frames, 40, 56, 3), dtype=np.uint8))
        (videos / f"{name}.txt").write_text(f"a {name} in the snow\n")
    args = ["--model", snapshot, "--videos", str(videos), "--out", str(tmp_path / "data"), "--frames", "5",
            "--height", "32", "--width", "48", "--shard-size", "1", "--device", "cpu"]
    assert prepare(args) == 0
    out = capsys.readouterr().out
    assert "skipped, fewer than 5 frames: short.mp4 (3 frames)" in out and "wrote 2 samples" in out
    dataset = LatentDataset(str(tmp_path / "data"))
    assert len(dataset) == 2 and dataset.frame_shape == (2, 4, 4, 6) and dataset.text_shape == (512, 32)
    pipe = VideoPipeline.from_pretrained(snapshot)
    assert torch.equal(dataset[0][1], pipe.encode_prompt(["a cat in the snow"])[0])  # sorted: cat first
    assert dataset.negative_embedding().shape == (1, 512, 32)
    assert prepare(args) == 1  # the folder exists now
    assert "exists and is not empty" in capsys.readouterr().err

    raw = tiny_config(tmp_path, train={"total_iter": 2}, models={"transformer_cfg": {
        "model_name": os.path.join(snapshot, "transformer")}})
    Trainer(config_from_dict(raw), say=quiet).train()
    assert len(read_log(tmp_path)) == 2


# ---- runs that go wrong: non-finite values, a changed config, a bad output folder ---------------------

@pytest.mark.slow
def test_a_nonfinite_loss_stops_the_run_keeps_the_last_checkpoint_and_writes_no_weights(run, capsys):
    raw = tiny_config(run, train={"total_iter": 6, "warmup_iter": 0, "optim_g": {"lr": 1e30}},
                      logger={"save_checkpoint_freq": 1})
    with pytest.raises(ValueError, match=r"^step \d: .*(loss|grad_norm) (nan|inf).*training stopped \(the last good "
                                         r"checkpoint, .*step_\d+, is kept; no weights were written\)"):
        Trainer(config_from_dict(raw), say=quiet).train()
    out = run / "out"
    assert not (out / "lora.safetensors").exists() and not (out / "lora_ema.safetensors").exists()
    with open(out / "checkpoints" / "latest") as f:
        latest = f.read().strip()
    assert all(math.isfinite(r["loss"]) for r in read_log(run) if r["step"] <= int(latest.split("_")[1]))


@pytest.mark.slow
def test_max_nonfinite_steps_skips_such_a_step_without_updating(run, monkeypatch):
    raw = tiny_config(run, train={"total_iter": 3, "warmup_iter": 0, "max_nonfinite_steps": 1})
    trainer = Trainer(config_from_dict(raw), say=quiet)
    real = trainer._flow_map_loss
    monkeypatch.setattr(trainer, "_flow_map_loss", lambda latents, text: real(latents, text) * float("nan")
                        if trainer.step == 1 else real(latents, text))
    before = {n: p.detach().clone() for n, p in trainer.generator.named.items()}
    trainer.train_step()  # step 1: finite
    after_first = {n: p.detach().clone() for n, p in trainer.generator.named.items()}
    record = trainer.train_step()  # step 2: NaN, skipped
    trainer._check_finite(record)
    assert math.isnan(record["loss"]) and trainer.skipped == 1
    assert all(torch.equal(p, after_first[n]) for n, p in trainer.generator.named.items())  # no update taken
    assert any(not torch.equal(after_first[n], before[n]) for n in before)
    trainer.train_step()  # step 3: finite again
    record = dict(record, loss=float("inf"))
    with pytest.raises(ValueError, match=r"training stopped"):
        trainer._check_finite(record)  # a second one is past the one allowed


@pytest.mark.slow
def test_resume_refuses_what_cannot_change_before_loading_and_records_what_may(run, monkeypatch):
    Trainer(config_from_dict(tiny_config(run, train={"total_iter": 2})), say=quiet).train()
    import anyflow.training.trainer as trainer_module

    real_load = trainer_module._load
    monkeypatch.setattr(trainer_module, "_load", lambda *a, **k: pytest.fail("a model loaded before the config check"))
    for change, keys in (({"train": {"train_pipeline": "teacher", "total_iter": 4}}, "train.train_pipeline"),
                         ({"models": {"transformer_cfg": {"lora_config": {"lora_rank": 8}}}},
                          "models.transformer_cfg.lora_config.lora_rank"),
                         ({"datasets": {"train": {"batch_size_per_gpu": 1}}}, "datasets.train.batch_size_per_gpu")):
        with pytest.raises(ConfigError, match=rf"cannot change when it resumes: {re.escape(keys)} "):
            Trainer(config_from_dict(tiny_config(run, **change)), say=quiet)
    monkeypatch.setattr(trainer_module, "_load", real_load)
    lines = []
    trainer = Trainer(config_from_dict(tiny_config(run, train={"total_iter": 3, "optim_g": {"lr": 5e-4}})),
                      say=lines.append)
    assert trainer.step == 2 and trainer.config_changes == {"train.total_iter": [2, 3], "train.optim_g.lr": [1e-3, 5e-4]}
    assert "train.optim_g.lr 0.001 -> 0.0005" in lines[-1]
    recorded = [json.loads(line) for line in open(run / "out" / "config_changes.jsonl")]
    assert recorded == [{"step": 2, "config": "config", "changes": trainer.config_changes}]


def test_a_resumed_command_copies_its_own_config(run, capsys):
    text = (f"manual_seed = 3\n[path]\noutput_dir = '{run / 'out'}'\n[datasets.train]\ndata_root = '{run / 'data'}'\n"
            f"batch_size_per_gpu = 2\n[models.transformer_cfg]\nmodel_name = '{run / 'model'}'\n[train]\n")
    path = write_toml(run / "run.toml", text + "total_iter = 1\n")
    assert anyflow_main(["train", path]) == 0
    write_toml(run / "run.toml", text + "total_iter = 2\n")
    assert anyflow_main(["train", path]) == 0
    assert "total_iter = 2" in (run / "out" / "config.toml").read_text()


@pytest.mark.parametrize("case", ["the data folder", "inside the data folder", "a file"])
def test_an_output_dir_that_cannot_hold_the_run_is_one_line_before_loading(run, case, monkeypatch):
    import anyflow.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "_load", lambda *a, **k: pytest.fail("a model loaded before the check"))
    out = {"the data folder": run / "data", "inside the data folder": run / "data" / "run", "a file": run / "file"}[case]
    (run / "file").write_text("")
    with pytest.raises(ValueError, match=r"path.output_dir .*(is the data folder|is a file)"):
        Trainer(config_from_dict(tiny_config(run, path={"output_dir": str(out)})), say=quiet)


def test_an_interrupted_run_says_its_checkpoint_is_kept(run, monkeypatch, capsys):
    from anyflow.runtime.interrupts import Interrupted

    def interrupt(self):
        raise Interrupted(2)

    monkeypatch.setattr(Trainer, "train", interrupt)
    text = (f"[path]\noutput_dir = '{run / 'out'}'\n[datasets.train]\ndata_root = '{run / 'data'}'\n"
            f"[models.transformer_cfg]\nmodel_name = '{run / 'model'}'\n")
    assert anyflow_main(["train", write_toml(run / "run.toml", text)]) == 130
    err = capsys.readouterr().err
    assert "the last checkpoint is kept; the same command resumes from it" in err and "nothing was written" not in err
