"""Tiny text-side components in the layouts of the released snapshots' ``tokenizer/`` and ``text_encoder/`` folders.

Written without transformers (a reference test checks that transformers reads them as the real
ones and writes the same names), so tests that need no oracle can use them:

- :func:`make_tiny_tokenizer`: a T5-style Unigram tokenizer (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2,
  ``</s>`` appended by the post-processor), trained with the ``tokenizers`` library on a few sentences;
- :func:`make_tiny_umt5`: a small UMT5 encoder with random weights, as transformers'
  ``UMT5EncoderModel.save_pretrained`` writes it (``config.json``, one file or shards and their index).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import torch
from safetensors.torch import save_file

SENTENCES = [
    "A cat walks across a sunny garden, then jumps onto the old stone wall.",
    "The camera slowly pans over a snowy mountain range at dawn.",
    "Waves crash against the rocks while seagulls circle overhead.",
    "A red car drives through a rainy city street at night, neon lights reflecting on the road.",
    "Two astronauts float inside a space station and smile at the camera.",
    "A chef chops vegetables quickly in a busy restaurant kitchen.",
    "Close-up of a hummingbird drinking nectar from a bright flower.",
    "Children fly colourful kites on a windy beach in the afternoon.",
]
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2, as T5's

TINY_UMT5: Dict[str, Any] = dict(vocab_size=120, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, relative_attention_max_distance=20)


def make_tiny_tokenizer(folder, vocab_size: int = 120, metaspace_only: bool = False) -> str:
    """Write a tokenizer folder as the released snapshots hold one: ``tokenizer.json``,
    ``tokenizer_config.json`` (class T5Tokenizer) and ``special_tokens_map.json``. Returns the folder.

    The pre-tokenizer splits on whitespace, then marks words with "▁" (Metaspace), as transformers 5
    writes and runs every T5 tokenizer; ``metaspace_only`` writes Metaspace alone, as transformers 4
    converted T5 tokenizers (spaces in the text become "▁" pieces of their own; transformers 5 adds the
    whitespace split back when it loads such a file, the ``tokenizers`` library does not).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.Unigram())
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), metaspace])
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, unk_token="<unk>",
                                      shrinking_factor=0.75, max_piece_length=8)
    tokenizer.train_from_iterator(SENTENCES, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tokenizer.token_to_id("</s>"))])
    if [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] != [0, 1, 2]:
        ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        raise RuntimeError(f"the trainer numbered the special tokens {ids}, not [0, 1, 2]")
    if metaspace_only:
        tokenizer.pre_tokenizer = metaspace
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for i, t in enumerate(SPECIAL_TOKENS)}
    config = {"added_tokens_decoder": added, "additional_special_tokens": [], "clean_up_tokenization_spaces": True,
              "eos_token": "</s>", "extra_ids": 0, "model_max_length": 512, "pad_token": "<pad>",
              "tokenizer_class": "T5Tokenizer", "unk_token": "<unk>"}
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2)
    return folder


def umt5_config_json(**config) -> Dict[str, Any]:
    """``config.json`` as transformers (5.x) writes it for a ``UMT5EncoderModel``."""
    c = {**TINY_UMT5, **config}
    return {"architectures": ["UMT5EncoderModel"], "classifier_dropout": 0.0, "d_ff": c["d_ff"], "d_kv": c["d_kv"],
            "d_model": c["d_model"], "decoder_start_token_id": 0, "dense_act_fn": "gelu_new", "dropout_rate": 0.1,
            "dtype": c.get("dtype", "float32"), "eos_token_id": 1, "feed_forward_proj": "gated-gelu",
            "initializer_factor": 1.0, "is_decoder": False, "is_encoder_decoder": True, "is_gated_act": True,
            "layer_norm_epsilon": 1e-06, "model_type": "umt5", "num_decoder_layers": c["num_layers"],
            "num_heads": c["num_heads"], "num_layers": c["num_layers"], "pad_token_id": 0,
            "relative_attention_max_distance": c["relative_attention_max_distance"],
            "relative_attention_num_buckets": c["relative_attention_num_buckets"], "scale_decoder_outputs": True,
            "tie_word_embeddings": True, "transformers_version": "5.24.0", "use_cache": True,
            "vocab_size": c["vocab_size"]}


def random_umt5_weights(seed: int = 0, **config) -> Dict[str, torch.Tensor]:
    """Float32 weights under transformers' names, drawn so activations are O(1) and the position bias matters."""
    c = {**TINY_UMT5, **config}
    gen = torch.Generator().manual_seed(seed)
    d, inner = c["d_model"], c["num_heads"] * c["d_kv"]

    def matrix(rows, cols):
        return torch.randn(rows, cols, generator=gen) / cols**0.5

    def norm():
        return 1 + 0.2 * torch.randn(d, generator=gen)

    weights = {"shared.weight": torch.randn(c["vocab_size"], d, generator=gen)}
    for i in range(c["num_layers"]):
        p = f"encoder.block.{i}.layer."
        weights.update({
            p + "0.SelfAttention.q.weight": matrix(inner, d), p + "0.SelfAttention.k.weight": matrix(inner, d),
            p + "0.SelfAttention.v.weight": matrix(inner, d), p + "0.SelfAttention.o.weight": matrix(d, inner),
            p + "0.SelfAttention.relative_attention_bias.weight":
                torch.randn(c["relative_attention_num_buckets"], c["num_heads"], generator=gen),
            p + "0.layer_norm.weight": norm(),
            p + "1.DenseReluDense.wi_0.weight": matrix(c["d_ff"], d),
            p + "1.DenseReluDense.wi_1.weight": matrix(c["d_ff"], d),
            p + "1.DenseReluDense.wo.weight": matrix(d, c["d_ff"]), p + "1.layer_norm.weight": norm(),
        })
    weights["encoder.final_layer_norm.weight"] = norm()
    return weights


def save_umt5_folder(folder, weights: Dict[str, torch.Tensor], config: Dict[str, Any],
                     max_shard_bytes: Optional[int] = None) -> str:
    """Write ``config.json`` and ``weights`` as ``save_pretrained`` does: ``model.safetensors``, or shards of at
    most ``max_shard_bytes`` (a tensor alone may exceed it) named ``model-0000i-of-0000n.safetensors`` with
    ``model.safetensors.index.json``. Returns the folder."""
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    if max_shard_bytes is None:
        save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return folder
    shards, size = [{}], 0
    for name, tensor in weights.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    return folder


def make_tiny_umt5(folder, dtype: torch.dtype = torch.float32, max_shard_bytes: Optional[int] = None, seed: int = 0,
                   **config) -> str:
    """Write a tiny UMT5 ``text_encoder/`` folder with random weights in ``dtype``: the shape of
    :data:`TINY_UMT5` unless ``config`` overrides it, one file or shards. Returns the folder."""
    weights = {name: t.to(dtype) for name, t in random_umt5_weights(seed, **config).items()}
    return save_umt5_folder(folder, weights, umt5_config_json(**config, dtype=str(dtype).replace("torch.", "")),
                            max_shard_bytes)
