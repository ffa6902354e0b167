"""The UMT5 text encoder of the Wan2.1 / AnyFlow snapshots: token embedding -> blocks -> final RMSNorm.

Each block: RMSNorm -> self-attention (unscaled scores, plus a learned relative position bias and
the padding mask) -> residual; RMSNorm -> gated-GELU feed-forward -> residual. Unlike T5, whose
first block's position bias serves every block, UMT5 learns one table per block. It computes what
transformers' ``UMT5EncoderModel`` computes on the same weights (the released ``text_encoder/``
folders, read through :mod:`anyflow.text.names`), to float32 rounding.

Two ways to run it, with the same result:

- :class:`UMT5Encoder` holds every weight: for many prompts (about 11 GB for UMT5-XXL in bf16);
- :class:`StreamingUMT5Encoder` holds none: it maps one block's weights from the checkpoint, runs
  it on the hidden states and drops it (unmapping its pages) before mapping the next, and reads
  only the embedding rows of the tokens in use (2 GB for the whole XXL table). Peak memory: about
  one block (0.4 GB) plus activations.

Precision as transformers: the RMSNorm statistics in float32, rounded to the weight's dtype before
the scale; every other operation in the weights' dtype (products of half-precision values in
float32 on CPUs without half-precision units, rounded once: :mod:`anyflow.model.layers`). In float16 the
feed-forward output projection stays float32 (transformers' ``_keep_in_fp32_modules``), which makes
the residual stream float32 from the first feed-forward on, and the residual is clamped to the
float16 range after each sublayer as T5 does.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..model.layers import Linear, RMSNorm, computes_in_fp32
from ..runtime.devices import resolve_device, resolve_dtype

DTypeLike = Union[str, torch.dtype, None]

# What transformers' UMT5Config assumes for a key its config.json lacks.
TRANSFORMERS_DEFAULTS: Dict[str, Any] = dict(
    vocab_size=250112, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6, relative_attention_num_buckets=32,
    relative_attention_max_distance=128, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu",
)
# config.json keys outside the config whose other values mean another computation: key -> (allowed, why not).
CONSTRAINED_KEYS: Dict[str, Tuple[tuple, str]] = {
    "model_type": (("umt5",), "T5 and mT5 encoders share the first block's position bias; this is UMT5 "
                              "(one per block)"),
    "is_decoder": ((False,), "a decoder stack attends causally; this is the encoder"),
}


@dataclass(frozen=True)
class UMT5Config:
    """The encoder's shape, under the key names of transformers' ``UMT5Config`` (``config.json``)."""

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int
    relative_attention_max_distance: int
    layer_norm_epsilon: float
    feed_forward_proj: str

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "int" and (type(value) is not int or value < 1):
                raise ValueError(f"{field.name} must be a positive integer, got {value!r}")
        if not isinstance(self.layer_norm_epsilon, (int, float)) or not 0 < self.layer_norm_epsilon < 1:
            raise ValueError(f"layer_norm_epsilon must be a number in (0, 1), got {self.layer_norm_epsilon!r}")
        if self.feed_forward_proj != "gated-gelu":
            raise ValueError(f"feed_forward_proj={self.feed_forward_proj!r} is not supported: UMT5's feed-forward is "
                             f"'gated-gelu' (GELU, tanh approximation, times a linear gate)")
        if self.relative_attention_num_buckets < 4:
            raise ValueError(f"relative_attention_num_buckets must be at least 4, got "
                             f"{self.relative_attention_num_buckets}")
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
            raise ValueError(f"relative_attention_max_distance ({self.relative_attention_max_distance}) must exceed "
                             f"relative_attention_num_buckets // 4 ({self.relative_attention_num_buckets // 4})")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "config") -> "UMT5Config":
        """Read a transformers ``config.json`` dict: our keys (transformers' defaults where absent),
        the constrained keys checked, every other key (dropout, decoder settings, ...) ignored as
        transformers' encoder ignores it in inference. ``source`` names the file in errors."""
        from weights_convert.configs import sort_keys

        fields = [f.name for f in dataclasses.fields(cls)]
        values, _, _ = sort_keys(raw, source, fields, CONSTRAINED_KEYS)  # unknown keys: not the encoder's concern
        values = {name: values.get(name, TRANSFORMERS_DEFAULTS[name]) for name in fields}
        try:
            return cls(**values)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None

    @classmethod
    def from_pretrained(cls, folder: str) -> "UMT5Config":
        """The config in ``folder/config.json`` (a ``text_encoder/`` folder)."""
        from weights_convert.safetensors_io import CheckpointError, read_json_object
        from weights_convert.sources import checked_path

        path = os.path.join(checked_path(folder, "the text encoder folder"), "config.json")
        if not os.path.isfile(path):
            raise CheckpointError(f"{folder}: no config.json (a transformers UMT5EncoderModel folder has one)")
        return cls.from_dict(read_json_object(path, "UMT5 config"), path)


UMT5_XXL = UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                      relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
                      feed_forward_proj="gated-gelu")


def relative_position_buckets(offset: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """The bucket of each key's offset from its query (key position - query position), bidirectional as
    T5 buckets it; any shape.

    Half the buckets are for keys after the query, half for keys before; in each half, offsets below
    a quarter of ``num_buckets`` get a bucket each, larger ones share logarithmically wider buckets up
    to ``max_distance``, and all beyond share the last.
    """
    half = num_buckets // 2
    exact = half // 2
    distance = offset.abs()
    log_scaled = torch.log(distance.clamp(min=exact).float() / exact) / math.log(max_distance / exact) * (half - exact)
    far = (exact + log_scaled.to(torch.long)).clamp(max=half - 1)
    return (offset > 0).long() * half + torch.where(distance < exact, distance, far)


def offset_buckets(length: int, config: UMT5Config, device: Optional[torch.device] = None) -> torch.Tensor:
    """(2L - 1,) the bucket of every offset -(L - 1) .. L - 1 between the positions of L tokens."""
    offsets = torch.arange(1 - length, length, device=device)
    return relative_position_buckets(offsets, config.relative_attention_num_buckets,
                                     config.relative_attention_max_distance)


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T + bias) v, unscaled (T5 folds 1/sqrt(d) into its weights): q, k, v (B, H, L, d),
    bias (B, H, L, L) -> (B, H, L, d). In float32 for half precision on a CPU without half units."""
    if computes_in_fp32(q):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias.float(), scale=1.0)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)


def clamp_float16(x: torch.Tensor) -> torch.Tensor:
    """T5's float16 guard on the residual stream: once a value overflowed, clamp all to +-(max - 1000)."""
    if x.dtype != torch.float16:
        return x
    largest = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), largest - 1000, largest)
    return x.clamp(-limit, limit)


def lookup_table(rows: int, cols: int) -> nn.Embedding:
    """An ``nn.Embedding`` of zeros, for weights that are loaded (its default normal init, on the meta
    device where models are built to be loaded, imports torch._dynamo: 2 s)."""
    return nn.Embedding(rows, cols, _weight=torch.zeros(rows, cols))


class SelfAttention(nn.Module):
    """Multi-head self-attention with this block's own relative position bias and the padding mask."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, num_buckets: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = Linear(dim, num_heads * head_dim, bias=False)
        self.k = Linear(dim, num_heads * head_dim, bias=False)
        self.v = Linear(dim, num_heads * head_dim, bias=False)
        self.o = Linear(num_heads * head_dim, dim, bias=False)
        self.position_bias = lookup_table(num_buckets, num_heads)

    def bias(self, buckets: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
        """buckets (2L - 1,) of the offsets, keep (B, L) True at real tokens or None (all real)
        -> the scores' bias (B or 1, H, L, L), contiguous as the attention kernels want it, padded keys
        at the dtype's lowest value. Each row is a window of the 2L - 1 offsets' biases (one lookup of
        2L - 1 rows rather than of L * L)."""
        length = (buckets.shape[0] + 1) // 2
        per_offset = self.position_bias(buckets).t().contiguous()  # (H, 2L - 1): offset o at o + L - 1
        bias = per_offset.unfold(1, length, 1).flip(1).unsqueeze(0)  # (1, H, L, L), [i, j]: offset j - i
        if keep is None:
            return bias
        return torch.where(keep[:, None, None, :], bias, torch.finfo(bias.dtype).min)  # (B, H, L, L)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
        """x (B, L, D), buckets and keep as :meth:`bias` -> (B, L, D)."""
        q, k, v = (proj(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for proj in (self.q, self.k, self.v))
        return self.o(biased_attention(q, k, v, self.bias(buckets, keep)).transpose(1, 2).flatten(2))


class GatedGeluFFN(nn.Module):
    """down(gelu_tanh(gate(x)) * up(x)); the product is rounded to ``down``'s dtype (float32 in a float16 model)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate = Linear(dim, hidden_dim, bias=False)
        self.up = Linear(dim, hidden_dim, bias=False)
        self.down = Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(self.gate(x), approximate="tanh") * self.up(x)
        return self.down(hidden.to(self.down.weight.dtype))


class EncoderBlock(nn.Module):
    """Pre-norm self-attention and feed-forward, each added to the residual stream."""

    def __init__(self, config: UMT5Config):
        super().__init__()
        d, eps = config.d_model, config.layer_norm_epsilon
        self.attn_norm = RMSNorm(d, eps)
        self.attn = SelfAttention(d, config.num_heads, config.d_kv, config.relative_attention_num_buckets)
        self.ffn_norm = RMSNorm(d, eps)
        self.ffn = GatedGeluFFN(d, config.d_ff)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
        x = clamp_float16(x + self.attn(self.attn_norm(x), buckets, keep))
        return clamp_float16(x + self.ffn(self.ffn_norm(x)))


def parameter_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype parameter ``name`` takes in a model held in ``dtype``: ``dtype``, except the
    feed-forward output projection, float32 in a float16 model (as transformers loads it)."""
    return torch.float32 if dtype == torch.float16 and name.endswith("ffn.down.weight") else dtype


def _checked_inputs(config: UMT5Config, input_ids: torch.Tensor,
                    attention_mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """input_ids (B, L) and attention_mask (B, L) or None -> (ids, keep: (B, L) bool)."""
    if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be integer token ids (B, L), got {input_ids.dtype} {list(input_ids.shape)}")
    if input_ids.numel() and not 0 <= int(input_ids.min()) <= int(input_ids.max()) < config.vocab_size:
        raise ValueError(f"input_ids hold token ids in [{int(input_ids.min())}, {int(input_ids.max())}], outside the "
                         f"vocabulary of {config.vocab_size} tokens")
    if attention_mask is None:
        return input_ids, torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {list(attention_mask.shape)} must match input_ids {list(input_ids.shape)}")
    return input_ids, attention_mask.to(input_ids.device).bool()


def _run_blocks(config: UMT5Config, x: torch.Tensor, keep: torch.Tensor,
                block_at: Callable[[int], EncoderBlock]) -> torch.Tensor:
    """x (B, L, D) through every block; ``block_at(i)`` may build the block, which is dropped once it has run."""
    buckets = offset_buckets(x.shape[1], config, x.device)
    keep = None if bool(keep.all()) else keep  # no padding: no mask (as transformers)
    for index in range(config.num_layers):
        x = block_at(index)(x, buckets, keep)
    return x


class UMT5Encoder(nn.Module):
    """The UMT5 encoder with every weight in memory: token ids (B, L) and mask -> hidden states (B, L, D).

    Load it with :meth:`from_pretrained`; :meth:`streaming` gives the same encoder reading one
    block at a time.
    """

    def __init__(self, config: UMT5Config):
        super().__init__()
        self.config = config
        self.token_embed = lookup_table(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.num_layers))
        self.final_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the embeddings and of the output."""
        return self.token_embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.token_embed.weight.device

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids (B, L), attention_mask (B, L) 1 at real tokens and 0 at padding (None: all real)
        -> last hidden states (B, L, D) in the model's dtype, padded positions included."""
        input_ids, keep = _checked_inputs(self.config, input_ids, attention_mask)
        x = _run_blocks(self.config, self.token_embed(input_ids), keep, self.blocks.__getitem__)
        return self.final_norm(x)

    def to_dtype(self, dtype: DTypeLike) -> "UMT5Encoder":
        """Cast in place to ``dtype`` (float16 keeps the feed-forward output projections in float32); returns self."""
        dtype = resolve_dtype(dtype)
        if dtype is not None:
            for name, param in self.named_parameters():
                param.data = param.data.to(parameter_dtype(name, dtype))
        return self

    @classmethod
    def from_pretrained(cls, folder: str, dtype: DTypeLike = None,
                        device: Union[str, torch.device] = "cpu") -> "UMT5Encoder":
        """Load a ``text_encoder/`` folder (transformers' ``UMT5EncoderModel``: ``config.json``, one
        safetensors file or shards, any float dtype) in ``dtype`` as :meth:`to_dtype` casts (None: the
        checkpoint's, that of its embedding). Tensors are mapped, not copied, where no cast or move is
        needed. Missing or unexpected tensors and wrong shapes are refused with one line naming the
        key, shape and file."""
        from weights_convert.safetensors_io import map_records

        config, records, file_dtype = _open(folder)
        dtype, device = resolve_dtype(dtype) or file_dtype, resolve_device(device)
        mapped = map_records(records.values())  # by transformers' names
        tensors = {name: mapped[r.name].to(device=device, dtype=parameter_dtype(name, dtype))
                   for name, r in records.items()}
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(tensors, strict=True, assign=True)
        return model.eval()

    @staticmethod
    def streaming(folder: str, dtype: DTypeLike = None,
                  device: Union[str, torch.device] = "cpu") -> "StreamingUMT5Encoder":
        """The encoder in ``folder`` run one block at a time (see :class:`StreamingUMT5Encoder`)."""
        return StreamingUMT5Encoder.from_pretrained(folder, dtype=dtype, device=device)


def _open(folder: str) -> Tuple[UMT5Config, Dict[str, Any], torch.dtype]:
    """The config of ``folder``, the checked records of its tensors under our names, and its dtype (the embedding's)."""
    from weights_convert.safetensors_io import torch_dtype

    from .names import EMBEDDING, text_encoder_records

    config = UMT5Config.from_pretrained(folder)
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in UMT5Encoder(config).named_parameters()}
    records = text_encoder_records(folder, config.num_layers, shapes)
    return config, records, torch_dtype(records[EMBEDDING].dtype)


class StreamingUMT5Encoder:
    """The UMT5 encoder run from its checkpoint one block at a time, holding no block between calls.

    Each call reads the embedding rows of the tokens it is given, then, block by block, maps the
    block's weights from the files (cast or moved where asked), runs it and drops it, unmapping its
    pages, before mapping the next: peak memory about one block plus activations. Encode all prompts
    of a run in one call (positive and negative together) to go through the weights once. Same
    result as :class:`UMT5Encoder` on the same weights.
    """

    def __init__(self, config: UMT5Config, records: Mapping[str, Any], dtype: torch.dtype, device: torch.device):
        self.config = config
        self.records = dict(records)
        self.dtype = dtype
        self.device = device
        self.final_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)
        weight = self.records["final_norm.weight"].read().to(device=device, dtype=dtype)  # its own small copy
        self.final_norm.weight = nn.Parameter(weight, requires_grad=False)

    @classmethod
    def from_pretrained(cls, folder: str, dtype: DTypeLike = None,
                        device: Union[str, torch.device] = "cpu") -> "StreamingUMT5Encoder":
        """Check the ``text_encoder/`` folder (config, names, shapes, as :meth:`UMT5Encoder.from_pretrained`) and
        read nothing else yet. ``dtype`` as there (None: the checkpoint's)."""
        config, records, file_dtype = _open(folder)
        return cls(config, records, resolve_dtype(dtype) or file_dtype, resolve_device(device))

    def load_block(self, index: int) -> EncoderBlock:
        """Block ``index`` holding its weights, mapped from the checkpoint (cast or moved where asked):
        a mapping of its own, closed when the block is dropped."""
        from weights_convert.safetensors_io import map_records

        with torch.device("meta"):
            block = EncoderBlock(self.config)
        names = {name: f"blocks.{index}.{name}" for name, _ in block.named_parameters()}  # block's -> encoder's
        mapped = map_records(self.records[ours] for ours in names.values())  # by transformers' names
        tensors = {name: mapped[self.records[ours].name].to(device=self.device, dtype=parameter_dtype(ours, self.dtype))
                   for name, ours in names.items()}
        block.load_state_dict(tensors, strict=True, assign=True)
        return block.eval().requires_grad_(False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, L) -> (B, L, D), reading only the rows of the distinct tokens."""
        record = self.records["token_embed.weight"]
        tokens, where = torch.unique(input_ids.cpu(), return_inverse=True)
        rows = torch.cat([record.read_rows(t, t + 1) for t in tokens.tolist()])  # (T, D)
        return rows.to(device=self.device, dtype=self.dtype)[where.to(self.device)]

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """As :meth:`UMT5Encoder.forward`: (B, L) ids and mask -> (B, L, D) hidden states."""
        input_ids, keep = _checked_inputs(self.config, input_ids.to(self.device), attention_mask)
        x = _run_blocks(self.config, self.embed(input_ids), keep, self.load_block)
        return self.final_norm(x)
