"""Block offload (anyflow/offload.py): the offloaded model computes what the plain one does, with only the
running block and the next one copied at any time, through every path that runs the blocks; the CLI flags;
the memory estimate with offload and float8 weights.

On the CPU the "device" copies are copies in host memory: the same logic runs (fetch, swap in, prefetch,
put back) without streams. The CUDA test at the end (streams, pinned memory, peak memory) runs only on a GPU.
"""

from __future__ import annotations

import copy
import importlib.util
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from anyflow import AnyFlowFARConfig, AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel, sample, sample_far
from anyflow.cli import main
from anyflow.cli.demo import TINY_CHECKPOINT, TINY_FAR_CHECKPOINT
from anyflow.model.config import PRESETS
from anyflow.runtime.memory import (
    estimate_device_memory, estimate_sampling_memory, fits_on_device, weight_bytes, with_block_offload,
)
from anyflow.runtime.offload import block_slots, check_offload, offload_blocks
from anyflow.model.parameters import FLOAT8_NAME, is_fp32_island
from support import SMALL, random_inputs, randomize_, small_config

# The offloaded model runs the same kernels on copies of the same values; only the copies' memory
# alignment may differ from the originals' (a mapped safetensors file vs a fresh allocation), which can
# change the order of a vectorised kernel's partial sums: a few float32 ulps. 1e-6 of the largest value
# is about 8 ulps, and far below any real difference (a block run on wrong weights changes the output by O(1)).
SAME_BAR = 1e-6
GB = 10**9


def assert_same(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.shape == reference.shape and ours.dtype == reference.dtype
    assert (ours - reference).abs().max() <= SAME_BAR * reference.abs().max(), (ours - reference).abs().max()


def offloaded(model):
    """A copy of ``model`` with block offload on the CPU (the same logic as on a GPU, see the module docstring)."""
    return offload_blocks(copy.deepcopy(model), "cpu")


@pytest.fixture(scope="module")
def bidirectional():
    model = AnyFlowTransformer3DModel(small_config(num_layers=3, image_dim=20)).eval()
    randomize_(model, 1)
    return model


@pytest.fixture(scope="module")
def far():
    model = AnyFlowFARTransformer3DModel(AnyFlowFARConfig(**{**SMALL, "num_layers": 3, "chunk_partition": (1, 2, 2, 1)}))
    randomize_(model.eval(), 2)
    return model


# ---- the same outputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_bidirectional_forward_and_a_reused_prepared_context_equal_the_plain_models(bidirectional, mode):
    latents, t, r, text, image = random_inputs(bidirectional.config, batch=2, seed=3)
    ours = offloaded(bidirectional)
    with mode():
        reference = bidirectional(latents, t, r, text, image).sample
        assert_same(ours(latents, t, r, text, image).sample, reference)
        prepared, plain_prepared = ours.prepare_context(text, image), bidirectional.prepare_context(text, image)
        for (k, v), (pk, pv) in zip(prepared.kv, plain_prepared.kv):
            assert_same(k, pk), assert_same(v, pv)
        for _ in range(2):  # reused across calls, as the sampler does
            assert_same(ours(latents, t, r, prepared).sample, reference)
    assert ours.block_offload.resident == []


def test_far_forward_with_clean_copies_equals_the_plain_models(far):
    gen = torch.Generator().manual_seed(4)
    latents = torch.randn(1, 6, 4, 8, 8, generator=gen)
    clean = torch.randn(1, 5, 4, 8, 8, generator=gen)  # the full-resolution frames: the last three chunks'
    text = torch.randn(1, 5, far.config.text_dim, generator=gen)
    t, r = 1000 * torch.rand(1, 6, generator=gen), 300 * torch.rand(1, 6, generator=gen)
    ours = offloaded(far)
    with torch.no_grad():
        for kwargs in ({}, {"clean_hidden_states": clean}):
            assert_same(ours(latents, t, r, text, **kwargs).sample, far(latents, t, r, text, **kwargs).sample)


@pytest.mark.slow
def test_far_encode_cache_and_step_equal_the_plain_models(far):
    gen = torch.Generator().manual_seed(5)
    latents = torch.randn(1, 6, 4, 8, 8, generator=gen)
    chunk = torch.randn(1, 2, 4, 8, 8, generator=gen)
    text = torch.randn(1, 5, far.config.text_dim, generator=gen)
    ours = offloaded(far)
    with torch.no_grad():
        context, plain_context = ours.prepare_context(text), far.prepare_context(text)
        first = ours.encode_cache(latents[:, :5], (1, 2, 2), context)  # the first chunk compressed
        plain_first = far.encode_cache(latents[:, :5], (1, 2, 2), plain_context)
        cache = ours.encode_cache(latents, (1, 2, 2, 1), context, first)  # incremental: reuses the first chunk
        plain_cache = far.encode_cache(latents, (1, 2, 2, 1), plain_context, plain_first)
        assert cache.num_compressed_chunks == 2
        for (k, v), (pk, pv) in zip(cache.layers, plain_cache.layers):
            assert_same(k, pk), assert_same(v, pv)
        assert_same(ours.step(chunk, 800.0, 300.0, context, cache), far.step(chunk, 800.0, 300.0, plain_context,
                                                                              plain_cache))
        assert_same(ours.step(chunk[:, :1], 800.0, 0.0, text, None), far.step(chunk[:, :1], 800.0, 0.0, text, None))


@pytest.mark.slow
def test_the_samplers_on_the_tiny_checkpoints_equal_the_plain_models():
    gen = torch.Generator().manual_seed(6)
    text = torch.randn(1, 6, 4096, generator=gen)
    plain = AnyFlowTransformer3DModel.from_pretrained(TINY_CHECKPOINT)
    ours = AnyFlowTransformer3DModel.from_pretrained(TINY_CHECKPOINT, offload="blocks")
    noise = torch.randn(1, 3, 16, 8, 6, generator=gen)
    negative = torch.randn(1, 6, 4096, generator=gen)
    for kwargs in ({}, {"guidance_scale": 3.0, "negative_encoder_hidden_states": negative}):
        assert_same(sample(ours, noise, text, num_steps=2, **kwargs), sample(plain, noise, text, num_steps=2, **kwargs))

    plain = AnyFlowFARTransformer3DModel.from_pretrained(TINY_FAR_CHECKPOINT)
    ours = AnyFlowFARTransformer3DModel.from_pretrained(TINY_FAR_CHECKPOINT, offload="blocks")
    noise = torch.randn(1, 7, 16, 16, 32, generator=gen)
    partition = (1, 2, 2, 2)
    assert_same(sample_far(ours, noise, text, num_steps=2, chunk_partition=partition),
                sample_far(plain, noise, text, num_steps=2, chunk_partition=partition))


def test_float8_weights_offload_as_they_are_and_sample_as_without_offload():
    text = torch.randn(1, 6, 4096, generator=torch.Generator().manual_seed(12))
    noise = torch.randn(1, 3, 16, 8, 6, generator=torch.Generator().manual_seed(13))
    plain = AnyFlowTransformer3DModel.from_pretrained(TINY_CHECKPOINT, weight_dtype=FLOAT8_NAME)
    ours = AnyFlowTransformer3DModel.from_pretrained(TINY_CHECKPOINT, weight_dtype=FLOAT8_NAME, offload="blocks")
    held = {name: t.dtype for name, t in ours.blocks[0].state_dict().items()}
    assert held["ffn.fc_in.weight"] == torch.float8_e4m3fn and held["ffn.fc_in.weight_scale"] == torch.float32
    assert_same(sample(ours, noise, text, num_steps=2), sample(plain, noise, text, num_steps=2))


# ---- what is where ----------------------------------------------------------------------------------------


def test_only_the_running_block_and_the_next_are_copied_and_everything_else_stays(bidirectional):
    model = copy.deepcopy(bidirectional)
    model.blocks[1].ffn.fc_in.register_buffer("weight_scale", torch.ones(48))  # a buffer travels with its block
    ours = offload_blocks(model, "cpu")
    offloader = ours.block_offload
    assert len(block_slots(ours.blocks[1])) == len(block_slots(ours.blocks[0])) + 1
    hosts = [[t.data_ptr() for t in block.state_dict().values()] for block in ours.blocks]
    seen = []

    def copied(i):  # whether block i's parameters and buffers now point at copies
        now = [t.data_ptr() for t in ours.blocks[i].state_dict().values()]
        assert all(a != b for a, b in zip(now, hosts[i])) or now == hosts[i], "a block is half copied"
        return now != hosts[i]

    def check(i):
        def hook(*_):
            seen.append(i)
            assert [j for j in range(3) if copied(j)] == [i]
            assert offloader.resident == ([i, i + 1] if i < 2 else [i])
        return hook

    handles = [block.register_forward_pre_hook(check(i)) for i, block in enumerate(ours.blocks)]
    handles += [block.cross_attn.k.register_forward_pre_hook(check(i)) for i, block in enumerate(ours.blocks)]
    latents, t, r, text, image = random_inputs(bidirectional.config, seed=7)
    with torch.no_grad():
        prepared = ours.prepare_context(text, image)  # context_kv of each block: the k hooks
        assert seen == [0, 1, 2]
        ours(latents, t, r, prepared)  # the forward: the block hooks
        assert seen == [0, 1, 2] * 2
    for handle in handles:
        handle.remove()
    assert offloader.resident == [] and not any(copied(j) for j in range(3))
    assert all(p.device.type == "cpu" for p in ours.parameters()) and ours.device == torch.device("cpu")


def test_an_error_inside_a_block_puts_every_block_back(bidirectional, monkeypatch):
    ours = offloaded(bidirectional)
    hosts = [p.data_ptr() for p in ours.blocks.parameters()]

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(ours.blocks[1], "forward", fail)
    latents, t, r, text, image = random_inputs(bidirectional.config, seed=8)
    with torch.no_grad(), pytest.raises(RuntimeError, match="boom"):
        ours(latents, t, r, text, image)
    assert ours.block_offload.resident == [] and [p.data_ptr() for p in ours.blocks.parameters()] == hosts
    monkeypatch.undo()
    with torch.no_grad():  # and the model runs again
        assert_same(ours(latents, t, r, text, image).sample, bidirectional(latents, t, r, text, image).sample)


def test_gradients_are_refused_and_a_bad_offload_named_before_loading(bidirectional, monkeypatch):
    ours = offloaded(bidirectional)
    latents, t, r, text, image = random_inputs(bidirectional.config, seed=9)
    with pytest.raises(RuntimeError, match=r"block offload runs inference only: call the model under torch.no_grad"):
        ours(latents, t, r, text, image)
    assert ours.block_offload.resident == []
    assert check_offload(None) is None and check_offload("blocks") == "blocks"

    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded before the argument was checked")

    monkeypatch.setattr("weights_convert.load_checkpoint", must_not_load)
    with pytest.raises(ValueError, match=r"offload must be None or one of \['blocks'\], got 'layers'"):
        AnyFlowTransformer3DModel.from_pretrained(TINY_CHECKPOINT, offload="layers")


# ---- the command line -------------------------------------------------------------------------------------


@pytest.fixture
def embeddings(tmp_path):
    path = tmp_path / "embeds.safetensors"
    save_file({"prompt_embeds": torch.randn(1, 6, 4096, generator=torch.Generator().manual_seed(3))}, str(path))
    return path


def test_sample_offload_writes_the_plain_samplers_latents(tmp_path, embeddings, capsys):
    args = ["sample", "--model", TINY_CHECKPOINT, "--prompt-embeds", str(embeddings), "--steps", "2", "--frames", "9",
            "--height", "64", "--width", "48", "--seed", "11", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "plain.safetensors")]) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--offload", "--out", str(tmp_path / "offloaded.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert "DiT blocks offloaded to host memory" in printed and "offloaded" not in plain
    assert_same(load_file(str(tmp_path / "offloaded.safetensors"))["latents"],
                load_file(str(tmp_path / "plain.safetensors"))["latents"])


def test_sample_offload_in_several_processes_is_refused(tmp_path, embeddings):
    from anyflow.cli import build_parser
    from anyflow.cli.sample import check_sample_run

    args = build_parser().parse_args(["sample", "--model", TINY_CHECKPOINT, "--prompt-embeds", str(embeddings),
                                      "--offload", "--shard-weights", "--out", str(tmp_path / "o.safetensors")])
    two_processes = SimpleNamespace(count=2, rank=0, device=torch.device("cpu"))  # as torchrun's rank 0 sees them
    with pytest.raises(ValueError, match=r"^--offload: runs in one process"):
        check_sample_run(args, two_processes)


@pytest.mark.skipif(importlib.util.find_spec("av") is None or importlib.util.find_spec("tokenizers") is None,
                    reason="anyflow generate needs the video extra (av, tokenizers)")
def test_generate_offload_makes_the_plain_pipelines_latents(tmp_path):
    from anyflow.pipeline import VideoPipeline
    from snapshot_fixtures import make_tiny_snapshot

    snapshot = make_tiny_snapshot(tmp_path / "snapshot")
    prompt = "a cat on a wall"
    assert main(["generate", "--model", snapshot, "--prompt", prompt, "--frames", "5", "--height", "32", "--width", "32",
                 "--steps", "2", "--seed", "4", "--device", "cpu", "--offload", "--out", str(tmp_path / "v.gif"),
                 "--save-latents", str(tmp_path / "l.safetensors")]) == 0
    pipeline = VideoPipeline.from_pretrained(snapshot, offload="blocks")
    assert pipeline.transformer.block_offload is not None
    expected = VideoPipeline.from_pretrained(snapshot)(prompt, num_frames=5, height=32, width=32, num_steps=2, seed=4,
                                                      output="latents")
    assert_same(load_file(str(tmp_path / "l.safetensors"))["latents"], expected.transpose(1, 2))


# ---- the memory estimate ----------------------------------------------------------------------------------


@pytest.mark.parametrize("far_model", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_bytes_are_the_models_parameters_by_part(far_model, dtype):
    config = (AnyFlowFARConfig(**{**SMALL, "image_dim": 20}) if far_model else small_config(image_dim=20))
    with torch.device("meta"):
        model = (AnyFlowFARTransformer3DModel if far_model else AnyFlowTransformer3DModel)(config)
    size = torch.empty(0, dtype=dtype).element_size()

    def nbytes(prefix):
        return sum(p.numel() * (4 if is_fp32_island(name) else size) for name, p in model.named_parameters()
                   if name.startswith(prefix))

    counted = weight_bytes(config, size)
    assert counted.block == nbytes("blocks.0.") == nbytes("blocks.1.")
    assert counted.total == nbytes("") and counted.outside == nbytes("") - nbytes("blocks.")
    fp8 = weight_bytes(config, size, FLOAT8_NAME)
    d, f = config.hidden_size, config.ffn_dim
    linears = 8 * d * d + 2 * d * f  # q, k, v, o of both attentions and the FFN's two
    scales = 4 * (8 * d + f + d)  # a float32 per output row
    assert fp8.block == counted.block - linears * size + linears + scales and fp8.outside == counted.outside
    assert fp8.upcast == d * f * (4 + size if size == 2 else 4)  # the FFN's: float32, then rounded to the dtype


def test_offload_keeps_two_blocks_on_the_device_and_the_rest_in_host_memory():
    config = PRESETS["anyflow-wan2.1-t2v-1.3b"]
    weights = weight_bytes(config, 2)
    plain = estimate_sampling_memory(config, weights.total, (1, 21, 16, 60, 104), 512, 2)
    offloaded = with_block_offload(plain, weights)
    assert offloaded.weights == weights.outside + 2 * weights.block and offloaded.host_weights == 30 * weights.block
    assert offloaded.total == plain.total - 28 * weights.block and "in host memory" in offloaded.describe()
    on_cpu = with_block_offload(plain, weights, host_is_device=True)
    assert on_cpu.total == plain.total + 2 * weights.block and on_cpu.host_weights == 0


def test_14b_at_480p_fits_24_gb_with_offload_and_12_gb_with_float8_and_offload():
    config = PRESETS["anyflow-wan2.1-t2v-14b"]  # hidden 5120, 40 heads, ffn 13824, 40 layers, text_dim 4096, freq 256
    assert (config.hidden_size, config.num_attention_heads, config.ffn_dim, config.num_layers, config.text_dim,
            config.freq_dim) == (5120, 40, 13824, 40, 4096, 256)
    run = dict(num_frames=81, height=480, width=832, element_size=2)  # bf16
    assert not fits_on_device(config, 24 * GB, **run)  # 28.6 GB of bf16 weights alone
    assert fits_on_device(config, 24 * GB, offload="blocks", **run)
    assert not fits_on_device(config, 12 * GB, weight_dtype=FLOAT8_NAME, **run)  # float8 alone: 14.6 GB of weights
    assert fits_on_device(config, 12 * GB, weight_dtype=FLOAT8_NAME, offload="blocks", **run)
    both = estimate_device_memory(config, weight_dtype=FLOAT8_NAME, offload="blocks", **run)
    block = weight_bytes(config, 2, FLOAT8_NAME).block
    assert 0.35 * GB < block < 0.36 * GB  # 351e6 block linear elements at one byte, plus scales and the rest
    assert both.weights < 1.5 * GB and 4 * GB < both.activations < 5 * GB  # 32,760 tokens of width 5120


# ---- on a GPU -----------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures CUDA memory; scripts/gpu_check.py runs it on a GPU")
def test_on_cuda_the_blocks_are_pinned_and_the_peak_holds_about_two_blocks():
    config = small_config(num_attention_heads=8, attention_head_dim=64, ffn_dim=2048, num_layers=8, text_dim=64)
    plain = AnyFlowTransformer3DModel(config).eval()
    randomize_(plain, 10)
    ours = offload_blocks(copy.deepcopy(plain), "cuda")
    assert all(t.is_pinned() for block in ours.blocks for t in block.state_dict().values())
    latents, t, r, text, _ = random_inputs(config, frames=3, height=16, width=16, text_len=8, seed=11)
    block = sum(t.numel() * t.element_size() for t in ours.blocks[0].state_dict().values())
    with torch.no_grad():
        ours(latents, t, r, text)  # warm up the allocator
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        velocity = ours(latents, t, r, text).sample
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        reference = plain.cuda()(latents, t, r, text).sample
    assert peak < 3 * block + 64 * 2**20  # two blocks' copies (a third's worth of slack) and small activations
    assert (velocity - reference).abs().max() <= SAME_BAR * reference.abs().max()
