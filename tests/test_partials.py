"""Partials that killed processes left (``.NAME.partial-HOST-PID``): every writer removes those of dead processes of
this host in the folder it writes, whatever their NAME (the trainer's next step, a renamed OUT, a file the rerun
no longer writes); those of live processes and of other hosts stay."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from anyflow.cli import main
from anyflow.cli.demo import TINY_CHECKPOINT
from anyflow.training.config import config_from_dict
from anyflow.training.data import DatasetWriter
from anyflow.training.trainer import Trainer
from weights_convert import convert
from weights_convert.partials import _host, discard, partial_path
from training_fixtures import tiny_checkpoint, tiny_config, tiny_data


def leave_partials(folder, *names) -> set:
    """For each NAME, partials in ``folder`` of a dead process of this host (a folder, and a file under an earlier
    version's name without the host), of a live process and of another host; the names that must stay."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    kept = set()
    for name in names:
        (folder / f".{name}.partial-{_host()}-{dead.pid}").mkdir()
        (folder / f".{name}.partial-{dead.pid}").write_bytes(b"")
        for owner in (f"{_host()}-{os.getppid()}", f"otherhost-{dead.pid}"):
            (folder / f".{name}.partial-{owner}").write_bytes(b"")
            kept.add(f".{name}.partial-{owner}")
    return kept


def test_a_new_partial_removes_the_dead_ones_of_every_name_in_its_folder(tmp_path):
    kept = leave_partials(tmp_path, "a.safetensors", "step_000142", "out")
    (tmp_path / ".hidden").write_bytes(b"")
    (tmp_path / "x.partial-1").write_bytes(b"")  # no partial of ours: not hidden
    partial = partial_path(str(tmp_path / "new"))
    assert set(os.listdir(tmp_path)) == kept | {".hidden", "x.partial-1"}
    discard(partial)
    discard(partial_path(str(tmp_path / "not_yet" / "new")))  # a folder not made yet holds none


def test_sample_removes_a_dead_generate_latents_partial(tmp_path):
    save_file({"prompt_embeds": torch.randn(1, 6, 4096)}, str(tmp_path / "embeds.safetensors"))
    kept = leave_partials(tmp_path, "v.safetensors", "v.mp4")
    assert main(["sample", "--model", TINY_CHECKPOINT, "--prompt-embeds", str(tmp_path / "embeds.safetensors"),
                 "--frames", "5", "--height", "32", "--width", "32", "--steps", "1", "--device", "cpu",
                 "--out", str(tmp_path / "o.safetensors")]) == 0
    assert set(os.listdir(tmp_path)) == {"embeds.safetensors", "o.safetensors"} | kept


def test_convert_removes_the_partial_of_an_out_since_renamed(tmp_path):
    kept = leave_partials(tmp_path, "converted")
    convert(TINY_CHECKPOINT, str(tmp_path / "renamed"), progress=None)
    assert set(os.listdir(tmp_path)) == {"renamed"} | kept


@pytest.mark.slow
def test_the_trainer_removes_a_dead_runs_step_and_adapter_partials(tmp_path):
    tiny_checkpoint(tmp_path / "model")
    tiny_data(tmp_path / "data")
    (tmp_path / "out" / "checkpoints").mkdir(parents=True)
    kept_steps = leave_partials(tmp_path / "out" / "checkpoints", "step_000142", "latest")
    kept_outputs = leave_partials(tmp_path / "out", "lora.safetensors", "train_log.jsonl")
    Trainer(config_from_dict(tiny_config(tmp_path, train={"total_iter": 2})), say=lambda message: None).train()
    assert set(os.listdir(tmp_path / "out" / "checkpoints")) == {"latest", "step_000002"} | kept_steps
    assert set(os.listdir(tmp_path / "out")) == {"checkpoints", "lora.safetensors", "lora_ema.safetensors", "loss.png",
                                                 "train_log.jsonl"} | kept_outputs


def test_the_dataset_writer_removes_a_dead_writers_partial_folder(tmp_path):
    kept = leave_partials(tmp_path, "old_data")
    with DatasetWriter(str(tmp_path / "data")) as writer:
        writer.add(torch.zeros(2, 4, 4, 4), torch.zeros(3, 24))
    assert set(os.listdir(tmp_path)) == {"data"} | kept
