"""FSDP2 weight sharding and Ulysses sequence parallelism on 2 CPU processes (gloo), against one process.

The cases run in ``tests/distributed_cases.py`` under torchrun; each launch has a timeout, so a
hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from anyflow.cli.demo import TINY_CHECKPOINT, TINY_FAR_CHECKPOINT

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIMEOUT = 240  # seconds for one torchrun launch; a hang fails here
# Every comparison here is of two different computations: 2 processes of 1 thread each (torchrun runs its ranks
# with OMP_NUM_THREADS=1) against one process with the machine's threads, weights gathered by FSDP, tokens split
# by Ulysses. Sums run in other orders, so fp32 results agree to rounding, not bit for bit: the project's fp32
# bar, max|a - b| <= 1e-5 max|b| (seen: up to 2e-6).
FP32_BAR = 1e-5
pytestmark = [pytest.mark.parallel, pytest.mark.slow]  # torchrun launches


def torchrun(args, cwd=ROOT):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every case on 2 ranks in one launch: {case: [rank 0 result, rank 1 result]}."""
    out = tmp_path_factory.mktemp("distributed")
    cases = ["forward", "sample", "gradients", "far", "lora", "bad_setups"]
    run = torchrun([os.path.join(HERE, "distributed_cases.py"), str(out), *cases])
    assert run.returncode == 0, run.stderr[-4000:]
    return {case: [json.loads((out / f"{case}.rank{r}.json").read_text()) for r in range(2)] for case in cases}


def test_forward_under_sequence_parallelism_weight_sharding_and_both_equals_one_process(results):
    for rank in results["forward"]:
        assert set(rank) == {f"{m} {g}" for m in ("shard", "sequence", "both") for g in ("6x10", "8x8")}
        assert all(error <= FP32_BAR for error in rank.values()), rank


def test_sample_and_far_sharded_equal_one_process(results):
    assert all(rank["error"] <= FP32_BAR for rank in results["sample"])
    for rank in results["far"]:
        assert rank["sample"] <= FP32_BAR and rank["rollout"] <= FP32_BAR
        assert "sequence parallelism is for the bidirectional model" in rank["far sequence"]


def test_lora_merged_into_sharded_weights_equals_one_process(results):
    for rank in results["lora"]:
        assert rank["effect"] > 1e-2 and rank["error"] <= FP32_BAR, rank


def test_gradients_under_fsdp2_equal_one_process(results):
    for rank in results["gradients"]:
        assert rank["checked"] > 40 and rank["worst"] <= FP32_BAR and rank["accumulated"] <= FP32_BAR, rank


def test_bad_setups_fail_alike_on_every_rank(results):
    first, second = results["bad_setups"]
    own = second.pop("bad path on rank 1, seen by rank 1")
    told = first.pop("bad path on rank 1, seen by rank 0")
    assert "no-such-checkpoint" in own
    assert told.startswith("RuntimeError: rank 1 failed before loading (") and "no-such-checkpoint" in told
    assert told.endswith("every rank stops")
    assert first == second  # the same error, word for word, on both ranks
    assert "splits the 3 attention heads evenly over the ranks; 2 ranks do not divide them (use one of [1, 3])" in first["heads"]
    assert "sequence parallelism over 2 ranks needs at least 2 tokens, got 1" in first["tokens"]
    assert "sequence parallelism runs inference only" in first["training with sequence parallelism"]
    assert "got rank 0 cpu, rank 1 meta" in first["mixed devices"]


@pytest.mark.parametrize("checkpoint,extra", [
    (TINY_CHECKPOINT, ["--frames", "9", "--height", "48", "--width", "80", "--shard-weights", "--sequence-parallel"]),
    (TINY_FAR_CHECKPOINT, ["--frames", "25", "--height", "128", "--width", "256", "--shard-weights"]),
])
def test_sample_under_torchrun_writes_the_one_process_file(tmp_path, checkpoint, extra):
    save_file({"prompt_embeds": torch.randn(1, 6, 4096, generator=torch.Generator().manual_seed(7))},
              str(tmp_path / "embeds.safetensors"))
    common = ["--model", checkpoint, "--prompt-embeds", str(tmp_path / "embeds.safetensors"), "--steps", "2",
              "--seed", "3", "--device", "cpu"]
    one = subprocess.run([sys.executable, "-m", "anyflow", "sample", *common, *extra[:6],
                          "--out", str(tmp_path / "one.safetensors")], capture_output=True, text=True, timeout=TIMEOUT,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert one.returncode == 0, one.stderr
    run = torchrun(["-m", "anyflow", "sample", *common, *extra, "--out", str(tmp_path / "two.safetensors")])
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote ") == 1 and run.stdout.count("memory: ") == 1  # rank 0 speaks, rank 0 writes
    one, two = (load_file(str(tmp_path / f"{n}.safetensors"))["latents"] for n in ("one", "two"))
    assert one.shape == two.shape and ((two - one).abs().max() / one.abs().max()).item() <= FP32_BAR
    assert sorted(os.listdir(tmp_path)) == ["embeds.safetensors", "one.safetensors", "two.safetensors"]


def test_parallel_flags_without_torchrun_are_refused(tmp_path, capsys):
    from anyflow.cli import main

    save_file({"prompt_embeds": torch.zeros(1, 2, 4096)}, str(tmp_path / "e.safetensors"))
    code = main(["sample", "--model", TINY_CHECKPOINT, "--prompt-embeds", str(tmp_path / "e.safetensors"),
                 "--frames", "5", "--height", "32", "--width", "32", "--shard-weights",
                 "--out", str(tmp_path / "o.safetensors")])
    assert code == 1
    assert "--shard-weights needs several processes: torchrun --nproc-per-node N -m anyflow sample" in capsys.readouterr().err


def test_a_bad_argument_under_torchrun_is_one_line_on_every_rank(tmp_path):
    save_file({"prompt_embeds": torch.zeros(1, 2, 4096)}, str(tmp_path / "e.safetensors"))
    run = torchrun(["-m", "anyflow", "sample", "--model", TINY_CHECKPOINT, "--prompt-embeds", str(tmp_path / "e.safetensors"),
                    "--frames", "5", "--height", "32", "--width", "32", "--device", "cpu", "--shard-weights",
                    "--out", str(tmp_path / "missing" / "o.safetensors")])
    assert run.returncode != 0
    # both ranks write to one stderr, so their lines may interleave: count the messages, not the lines
    assert run.stderr.count("anyflow sample: error: --out ") == 2, run.stderr
    assert run.stderr.count("missing does not exist") == 2, run.stderr
    assert os.listdir(tmp_path) == ["e.safetensors"]
