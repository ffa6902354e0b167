"""The text side of a snapshot in plain PyTorch: prompts to token ids, and the UMT5 encoder to embeddings.

    tokenizer.py  prompts cleaned and tokenised as diffusers' pipelines do (``tokenizers``, or ``sentencepiece``)
    encoder.py    the UMT5 encoder, whole in memory or streamed block by block from its files
    names.py      transformers' parameter names against ours, and the encoder's files read and checked

Names are imported on first use.
"""

from ..lazy import lazy_exports

_EXPORTS = {
    "UMT5Config": "encoder",
    "UMT5Encoder": "encoder",
    "StreamingUMT5Encoder": "encoder",
    "PromptTokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "encode_prompts": "tokenizer",
    "clean_prompt": "tokenizer",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
