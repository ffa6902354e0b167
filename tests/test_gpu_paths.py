"""What the CUDA paths need, tested as far as a CPU can: the dtype a GPU gets, no host-device syncs
in a forward, one compiled graph for every timestep, the torch version floor."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest
import torch

from anyflow import AnyFlowFARTransformer3DModel, AnyFlowTransformer3DModel, sample, sample_far
from anyflow.model.config import AnyFlowFARConfig
from anyflow.model.parameters import DTYPE_CHOICES
from anyflow.runtime.devices import (
    attention_materialises_scores, auto_dtype, configure_precision, dtype_warning, resolve_dtype,
)
from anyflow.runtime.torch_support import TORCH_FLOOR
from support import SMALL, randomize_, small_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("capability, expected", [
    ((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16), ((8, 9), torch.bfloat16),  # H100, A100, L40
    ((7, 5), torch.float16), ((7, 0), torch.float16),  # T4 / RTX 20xx, V100
    ((6, 1), torch.float32),  # Pascal
])
def test_auto_dtype_follows_the_gpus_units(capability, expected):
    assert auto_dtype(CUDA, capability) == expected
    assert resolve_dtype("auto", DTYPE_CHOICES, device=CUDA, capability=capability) == expected
    assert auto_dtype(torch.device("cpu")) == torch.float32


def test_bfloat16_before_ampere_is_named_as_the_math_kernel():
    assert attention_materialises_scores(CUDA, torch.bfloat16, (7, 5))
    assert not attention_materialises_scores(CUDA, torch.float16, (7, 5))
    assert not attention_materialises_scores(CUDA, torch.bfloat16, (8, 0))
    assert not attention_materialises_scores(torch.device("cpu"), torch.bfloat16)
    assert "no bfloat16 units" in dtype_warning(CUDA, torch.bfloat16, (7, 5))
    assert dtype_warning(CUDA, torch.float16, (7, 5)) is None
    with pytest.raises(ValueError, match=r"--dtype must be a torch dtype or one of \['auto', 'float32', .*got 'half'"):
        resolve_dtype("half", DTYPE_CHOICES, argument="--dtype", device=CUDA, capability=(9, 0))


def test_float16_on_cuda_turns_off_reduced_precision_sums():
    flag = torch.backends.cuda.matmul
    before = flag.allow_fp16_reduced_precision_reduction
    try:
        flag.allow_fp16_reduced_precision_reduction = True
        configure_precision(torch.device("cpu"), torch.float16)
        configure_precision(CUDA, torch.bfloat16)
        assert flag.allow_fp16_reduced_precision_reduction  # only float16 on CUDA changes it
        configure_precision(CUDA, torch.float16)
        assert not flag.allow_fp16_reduced_precision_reduction
    finally:
        flag.allow_fp16_reduced_precision_reduction = before


def far_config() -> AnyFlowFARConfig:
    return AnyFlowFARConfig(**{**SMALL, "chunk_partition": (1, 2, 2)})


def test_a_forward_never_reads_a_device_tensor_on_the_host():
    """On the meta device every value is unknown: anything that would wait for a GPU (a tensor turned
    into a Python bool or number) raises there. Forward, a prepared context, number and tensor
    timesteps, and the FAR model's training forward, cache encoding and cached step all run."""
    with torch.device("meta"), torch.no_grad():
        model = AnyFlowTransformer3DModel(small_config())
        latents, text = torch.randn(1, 2, 4, 8, 8), torch.randn(1, 5, 24)
        t, r = torch.full((1, 2), 900.0), torch.full((1, 2), 400.0)
        assert model(latents, t, r, text).sample.shape == latents.shape
        assert model(latents, 900.0, 400.0, model.prepare_context(text)).sample.shape == latents.shape

        far = AnyFlowFARTransformer3DModel(far_config())
        video = torch.randn(1, 5, 4, 8, 8)
        full = sum(far.config.chunk_partition[-far.config.full_chunk_limit:])  # the frames not seen compressed
        assert far(video, 500.0, 0.0, text).sample.shape == (1, full, 4, 8, 8)
        cache = far.encode_cache(video[:, :3], (1, 2), text)
        assert far.step(video[:, 3:], torch.full((1, 2), 900.0), torch.full((1, 2), 0.0), text, cache).shape == (1, 2, 4, 8, 8)


def test_timesteps_as_numbers_and_tensors_are_still_checked():
    model = AnyFlowTransformer3DModel(small_config())
    latents, text = torch.randn(1, 2, 4, 8, 8), torch.randn(1, 5, 24)
    with pytest.raises(ValueError, match="timestep has non-finite values: nan"):
        model(latents, float("nan"), 0.0, text)
    with pytest.raises(ValueError, match="r_timestep has non-finite values"):
        model(latents, 900.0, torch.tensor([float("inf")]), text)


class CountingBackend:
    """A torch.compile backend that runs each graph as traced and counts the graphs made."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


@pytest.mark.slow
def test_a_compiled_model_makes_one_graph_for_every_timestep():
    import torch._dynamo

    torch._dynamo.reset()
    model = AnyFlowTransformer3DModel(small_config()).eval()
    randomize_(model, 0)
    noise, text = torch.randn(1, 2, 4, 8, 8), torch.randn(1, 5, 24)
    eager = sample(model, noise, text, num_steps=4)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    assert torch.equal(sample(compiled, noise, text, num_steps=4), eager)  # the same ops, traced
    assert backend.graphs == 1
    sample(compiled, noise, text, num_steps=8)
    assert backend.graphs == 1  # 12 steps, 12 different (t, r): one graph


@pytest.mark.slow
def test_python_numbers_as_timesteps_compile_no_graph_per_value():
    """The checks of a number timestep stay out of the traced path (no guard on its value): dynamo's default
    compiles once with the number static, once more with it dynamic (its automatic-dynamic policy, as for
    shapes; a later torch may start dynamic), then never again; ``dynamic=True`` compiles once."""
    import torch._dynamo

    model = AnyFlowTransformer3DModel(small_config()).eval()
    randomize_(model, 2)
    noise, text = torch.randn(1, 2, 4, 8, 8), torch.randn(1, 5, 24)
    for options in ({}, {"dynamic": True}):
        torch._dynamo.reset()
        backend = CountingBackend()
        compiled = torch.compile(model, backend=backend, **options)
        counts = []
        with torch.no_grad():
            for t, r in ((900.0, 300.0), (700.5, 100.25), (500.0, 0.0), (333.3, 111.1)):
                out = compiled(noise, t, r, text).sample
                counts.append(backend.graphs)
            assert (out - model(noise, t, r, text).sample).abs().max() <= 1e-5 * out.abs().max()
        expected = [1, 1, 1, 1] if options else [1, counts[1], counts[1], counts[1]]
        assert counts == expected and counts[1] <= 2, (options, counts)


@pytest.mark.slow
def test_regional_compilation_shares_one_graph_over_blocks_and_steps():
    import torch._dynamo

    torch._dynamo.reset()
    model = AnyFlowTransformer3DModel(small_config(num_layers=3)).eval()
    randomize_(model, 1)
    noise, text = torch.randn(1, 2, 4, 8, 8), torch.randn(1, 5, 24)
    eager = sample(model, noise, text, num_steps=4)
    backend = CountingBackend()
    model.compile_blocks(backend=backend)
    assert torch.equal(sample(model, noise, text, num_steps=4), eager)
    assert backend.graphs == 1  # 3 blocks x 4 steps


@pytest.mark.slow
def test_far_sampling_compiles_once_per_token_count_not_per_step():
    import torch._dynamo

    torch._dynamo.reset()
    model = AnyFlowFARTransformer3DModel(far_config()).eval()
    randomize_(model, 2)
    noise, text = torch.randn(1, 3, 4, 8, 8), torch.randn(1, 5, 24)
    backend = CountingBackend()
    model.compile_blocks(backend=backend)
    sample_far(model, noise, text, num_steps=2, chunk_partition=(1, 2))
    graphs = backend.graphs
    sample_far(model, noise, text, num_steps=4, chunk_partition=(1, 2))  # other timesteps, the same chunks
    assert backend.graphs == graphs  # graphs follow the chunks' shapes, not the steps


# --- the torch floor ------------------------------------------------------------------------------------

# torch APIs this project uses that are newer than torch 2.1, with the release that brought them.
NEWER_APIS = {
    "torch.compiler.is_compiling": (2, 3),
    "register_fsdp_forward_method": (2, 6),
    "ignored_params": (2, 7),  # FSDP2's fully_shard(..., ignored_params=...)
    "torch.distributed.fsdp.fully_shard": (2, 6),
    "MixedPrecisionPolicy": (2, 6),
    "register_post_accumulate_grad_hook": (2, 2),
}
# APIs newer than the floor, each used only behind a getattr fallback to an older one.
GUARDED_APIS = {"all_gather_single": "all_gather_into_tensor"}


def declared_floor():
    text = (ROOT / "setup.cfg").read_text()
    match = re.search(r"^\s*torch>=(\d+)\.(\d+)", text, re.M)
    assert match, "setup.cfg declares no torch floor"
    return int(match.group(1)), int(match.group(2))


def library_sources():
    for folder in ("anyflow", "weights_convert"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield path, path.read_text()


def test_setup_cfg_declares_the_torch_floor_the_code_needs():
    used = {name: version for name, version in NEWER_APIS.items()
            if any(name.rsplit(".", 1)[-1] in text for _, text in library_sources())}
    assert used, "the table of newer APIs matches nothing: update it"
    assert declared_floor() == TORCH_FLOOR == max(used.values())


def test_apis_newer_than_the_floor_have_a_fallback():
    for path, text in library_sources():
        tree = ast.parse(text)
        for node in ast.walk(tree):
            name = node.attr if isinstance(node, ast.Attribute) else None
            if name in GUARDED_APIS:
                pytest.fail(f"{path.relative_to(ROOT)}:{node.lineno}: {name} (newer than torch "
                            f"{'.'.join(map(str, TORCH_FLOOR))}) used directly; use getattr with {GUARDED_APIS[name]}")
        for name, fallback in GUARDED_APIS.items():
            if f'"{name}"' in text:
                assert fallback in text, f"{path}: getattr({name!r}) without the {fallback} fallback"


def test_importing_anyflow_on_an_older_torch_names_the_floor(monkeypatch):
    from anyflow.runtime import torch_support

    monkeypatch.setattr(torch, "__version__", "2.5.1+cu121")
    with pytest.raises(ImportError, match=r"torch 2.5.1\+cu121 .* needs torch >= 2.7"):
        torch_support.check_torch_version()
    monkeypatch.setattr(torch, "__version__", "2.7.0")
    torch_support.check_torch_version()


# --- what is made once, and where -------------------------------------------------------------------------

def test_rope_tables_are_cached_plain_tensors_usable_with_autograd():
    from anyflow.model.rope import build_rope_rotations, rope_rotations

    grid, device = (3, 4, 6), torch.device("cpu")
    with torch.inference_mode():
        first = rope_rotations(grid, 16, device, frame_offset=2)
    assert not first.is_inference() and not first.requires_grad
    assert rope_rotations(grid, 16, device, frame_offset=2) is first  # made once
    assert torch.equal(first, build_rope_rotations(grid, 16, device, 2, (1, 1), 10000.0))
    assert rope_rotations(grid, 16, device, frame_offset=3) is not first
    model = AnyFlowTransformer3DModel(small_config())
    latents, text = torch.randn(1, 2, 4, 8, 8), torch.randn(1, 5, 24)
    with torch.inference_mode():
        model(latents, 900.0, 400.0, text)  # fills the cache inside inference mode
    model(latents, 900.0, 400.0, text).sample.sum().backward()  # and autograd uses the same table


@pytest.mark.parametrize("tokens", [None, 1, 7, 10_000])
def test_ffn_chunking_changes_nothing_but_memory(tokens):
    model = AnyFlowTransformer3DModel(small_config()).eval()
    randomize_(model, 4)
    latents, text = torch.randn(1, 2, 4, 8, 8), torch.randn(1, 5, 24)
    with torch.no_grad():
        whole = model.set_ffn_chunking(10_000)(latents, 900.0, 400.0, text).sample
        chunked = model.set_ffn_chunking(tokens)(latents, 900.0, 400.0, text).sample
    # the same per-token products, over fewer rows at a time: a matmul may block its sums differently
    # for other row counts, so allow float32 rounding (1e-6 of the output's scale)
    assert (chunked - whole).abs().max() <= 1e-6 * whole.abs().max()
    assert all(block.ffn.tokens_per_chunk == tokens for block in model.blocks)
    with pytest.raises(ValueError, match="tokens_per_chunk must be a positive int or None, got 0"):
        model.set_ffn_chunking(0)


def test_lora_products_are_made_on_the_target_device(tmp_path):
    """A LoRA merged while loading is computed where the weight will live: on the meta device
    nothing is computed, so a product made on the host would show up as a real tensor."""
    from safetensors.torch import save_file

    from weights_convert.lora import apply_adapters
    from weights_convert.sources import open_checkpoint

    model = AnyFlowTransformer3DModel(small_config())
    model.save_pretrained(str(tmp_path / "model"))
    d = model.config.hidden_size
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.randn(2, d),
               "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.randn(d, 2)}, str(tmp_path / "lora.safetensors"))
    tensors = apply_adapters(open_checkpoint(str(tmp_path / "model")).tensors, [str(tmp_path / "lora.safetensors")])
    merged = tensors["blocks.0.self_attn.q.weight"]
    assert merged.read("meta").device.type == "meta"
    on_host = merged.read()
    assert on_host.device.type == "cpu" and not torch.equal(on_host, model.blocks[0].self_attn.q.weight)


def test_the_memory_estimate_knows_the_gpus_kernels():
    """1.3B at 480p, 81 frames (32,760 tokens): on a GPU the feed-forward takes every token at once; bfloat16
    before Ampere holds the attention scores (12 heads x 32,760^2 x (2 + 2 + 4) bytes: about 96 GiB)."""
    from anyflow import AnyFlowConfig
    from anyflow.runtime.memory import ForwardKernels, estimate_sampling_memory

    config = AnyFlowConfig.from_preset("anyflow-wan2.1-t2v-1.3b")
    shape, tokens = (1, 21, 16, 60, 104), 32_760

    def activations(kernels):
        return estimate_sampling_memory(config, 0, shape, 512, 2, kernels=kernels).activations

    cpu = activations(ForwardKernels.on(torch.device("cpu"), torch.bfloat16))
    gpu = ForwardKernels.on(CUDA, torch.float16)  # no capability lookup for float16: no GPU needed
    assert gpu == ForwardKernels(ffn_tokens_per_chunk=None, materialised_scores=False)
    assert activations(gpu) - cpu == (tokens - 4096) * config.ffn_dim * 8
    math_kernel = ForwardKernels(ffn_tokens_per_chunk=None, materialised_scores=True)
    assert activations(math_kernel) - activations(gpu) == 12 * tokens**2 * 8


def test_half_precision_kernels_count_as_native_only_at_the_avx512_dispatch_level(monkeypatch):
    """With ATen forced below AVX512 (ATEN_CPU_CAPABILITY=avx2 or default) torch's bfloat16 attention
    fails on AMX CPUs ("pack_vnni2 ..."): half precision is then computed in float32."""
    from anyflow.model.layers import _cpu_has_native

    for capability in ("DEFAULT", "AVX2"):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        assert not _cpu_has_native(torch.bfloat16) and not _cpu_has_native(torch.float16)
