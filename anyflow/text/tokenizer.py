"""From prompts to UMT5 embeddings, as diffusers' Wan2.1 and AnyFlow pipelines make them.

    prompt -> clean_prompt -> token ids (B, 512) and mask -> UMT5 encoder -> (B, 512, 4096),
    each prompt's positions past its last token set to zero

The tokenizer is a snapshot's ``tokenizer/`` folder, read with the ``tokenizers`` library from its
``tokenizer.json`` (or with ``sentencepiece`` from a lone ``spiece.model``): what transformers'
``T5TokenizerFast`` computes with ``padding="max_length", truncation=True`` (the ``</s>`` its
post-processor appends kept last when a prompt is cut). Neither library is imported until a
tokenizer is loaded.
"""

from __future__ import annotations

import html
import json
import os
import re
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

try:
    import ftfy
except ImportError:  # as diffusers: prompts are fixed by ftfy only where it is installed
    ftfy = None

TOKENIZER_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "spiece.model"
SETTINGS_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # the later overrides, as in transformers
INSTALL_HINT = "pip install tokenizers (or the project's video extra: pip install -e \".[video]\")"
MAX_LENGTH = 512  # the released pipelines' max_sequence_length

# Unicode White_Space: what the `regex` module's \s (which diffusers uses) matches. Python's re \s
# would also match U+001C..U+001F, which diffusers keeps inside a prompt.
_WHITESPACE = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


class TokenizerError(ValueError):
    """A tokenizer folder that cannot be read, or the library it needs missing; the message names the folder."""


def clean_prompt(text: str) -> str:
    """A prompt as diffusers' ``prompt_clean`` leaves it: ftfy's fixes (where ftfy is installed), HTML
    entities unescaped twice, runs of whitespace made one space, the ends stripped."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


class _TokenizersBackend:
    """A ``tokenizer.json`` run by the ``tokenizers`` library, special tokens from its post-processor."""

    def __init__(self, path: str):
        try:
            import tokenizers
        except ImportError:
            raise TokenizerError(f"{path}: reading it needs the tokenizers library: {INSTALL_HINT}") from None
        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(path)
        except Exception as exc:  # tokenizers raises a bare Exception for a file it cannot parse
            raise TokenizerError(f"{path}: not a tokenizers file ({str(exc).splitlines()[0]})") from None
        self.tokenizer.no_padding()

    def token_id(self, token: str) -> Optional[int]:
        return self.tokenizer.token_to_id(token)

    def encode(self, texts: List[str], max_length: int) -> List[List[int]]:
        self.tokenizer.enable_truncation(max_length)  # leaves room for the tokens the post-processor adds
        return [encoding.ids for encoding in self.tokenizer.encode_batch(texts, add_special_tokens=True)]


class _SentencePieceBackend:
    """A ``spiece.model`` run by ``sentencepiece``: its pieces, then ``</s>``."""

    def __init__(self, path: str):
        try:
            import sentencepiece
        except ImportError:
            raise TokenizerError(f"{path}: a folder with only {SENTENCEPIECE_FILE} needs sentencepiece "
                                 f"(pip install sentencepiece), or add its {TOKENIZER_FILE}") from None
        try:
            self.processor = sentencepiece.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"{path}: not a sentencepiece model ({str(exc).splitlines()[0]})") from None
        self.eos_id = self.token_id("</s>")
        if self.eos_id is None:
            raise TokenizerError(f"{path}: has no '</s>' piece to end each prompt with")

    def token_id(self, token: str) -> Optional[int]:
        index = self.processor.piece_to_id(token)
        return index if self.processor.id_to_piece(index) == token else None

    def encode(self, texts: List[str], max_length: int) -> List[List[int]]:
        return [ids[: max_length - 1] + [self.eos_id] for ids in self.processor.encode(texts)]


class PromptTokenizer:
    """Prompts -> token ids and attention mask, both (B, max_length) int64, as diffusers asks
    ``T5TokenizerFast`` for them: special tokens added, truncated to ``max_length``, padded on the
    right with the pad token (mask 0 there). Made by :func:`load_tokenizer`."""

    def __init__(self, backend, pad_id: int, source: str):
        self.backend = backend
        self.pad_id = pad_id
        self.source = source

    def __call__(self, prompts: Sequence[str], max_length: int = MAX_LENGTH) -> Tuple[torch.Tensor, torch.Tensor]:
        if type(max_length) is not int or max_length < 2:
            raise ValueError(f"max_length must be an integer of at least 2 (a token and </s>), got {max_length!r}")
        rows = self.backend.encode(list(prompts), max_length)
        ids = torch.full((len(rows), max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), max_length), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return ids, mask


def _pad_token(folder: str) -> str:
    """The pad token the folder's settings name ("<pad>" when they name none)."""
    pad = "<pad>"
    for name in SETTINGS_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                settings = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TokenizerError(f"{path}: unreadable ({exc})") from None
        if not isinstance(settings, dict):
            raise TokenizerError(f"{path}: not a JSON object")
        for side in ("padding_side", "truncation_side"):
            if settings.get(side, "right") != "right":
                raise TokenizerError(f"{path}: {side}={settings[side]!r} is refused: the pipelines pad and cut "
                                     f"on the right")
        token = settings.get("pad_token", pad)
        pad = token.get("content", pad) if isinstance(token, dict) else token
    if not isinstance(pad, str):
        raise TokenizerError(f"{folder}: pad_token {pad!r} is not a token")
    return pad


def load_tokenizer(folder: str) -> PromptTokenizer:
    """The T5 tokenizer in a snapshot's ``tokenizer/`` folder: from ``tokenizer.json`` with the
    ``tokenizers`` library, or from a lone ``spiece.model`` with ``sentencepiece``.

    Raises :class:`TokenizerError` (one line) naming the folder and what is missing: the folder, both
    files, the library a file needs, or the pad token in the vocabulary.
    """
    if not os.path.isdir(folder):
        raise TokenizerError(f"{folder}: no such tokenizer folder")
    if os.path.isfile(os.path.join(folder, TOKENIZER_FILE)):
        backend = _TokenizersBackend(os.path.join(folder, TOKENIZER_FILE))
    elif os.path.isfile(os.path.join(folder, SENTENCEPIECE_FILE)):
        backend = _SentencePieceBackend(os.path.join(folder, SENTENCEPIECE_FILE))
    else:
        raise TokenizerError(f"{folder}: no {TOKENIZER_FILE} (nor {SENTENCEPIECE_FILE}): not a T5 tokenizer folder; "
                             f"it holds {sorted(os.listdir(folder))[:8]}")
    pad = _pad_token(folder)
    pad_id = backend.token_id(pad)
    if pad_id is None:
        raise TokenizerError(f"{folder}: the pad token {pad!r} is not in the vocabulary")
    return PromptTokenizer(backend, pad_id, folder)


def encode_prompts(tokenizer: PromptTokenizer, encoder, prompts: Union[str, Sequence[str]],
                   max_length: int = MAX_LENGTH, dtype: Optional[torch.dtype] = None,
                   device: Optional[torch.device] = None) -> torch.Tensor:
    """Prompts -> UMT5 embeddings (B, max_length, D) as diffusers' Wan and AnyFlow ``encode_prompt``
    make them: each prompt cleaned (:func:`clean_prompt`), tokenized, encoded with its padding mask,
    and every position past its own tokens set to zero. ``encoder`` is a
    :class:`anyflow.text.encoder.UMT5Encoder` or a streaming one; the result is in its dtype and on
    its device unless ``dtype`` or ``device`` say otherwise.

    The encoder runs over the longest prompt's tokens only, not all ``max_length``: what it leaves
    out is padding, which no real token attends to and whose outputs are zeroed anyway, so the result
    is the same to rounding at a fraction of the cost for short prompts.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
    ids, mask = tokenizer([clean_prompt(p) for p in prompts], max_length)
    lengths = mask.sum(1)  # (B,)
    longest = int(lengths.max())
    with torch.no_grad():
        hidden = encoder(ids[:, :longest].to(encoder.device), mask[:, :longest].to(encoder.device))  # (B, longest, D)
    real = torch.arange(longest, device=hidden.device) < lengths.to(hidden.device)[:, None]  # (B, longest)
    hidden = hidden.masked_fill(~real[..., None], 0)
    hidden = F.pad(hidden, (0, 0, 0, max_length - longest))  # (B, max_length, D)
    return hidden.to(dtype=dtype or encoder.dtype, device=device or hidden.device)
