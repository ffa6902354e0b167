"""Projections of the conditioning context (text, optional image tokens) to the model width."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear
from .norms import LayerNormFP32


class TextProjection(nn.Module):
    """UMT5 embeddings (B, S, text_dim) -> (B, S, D): Linear, GELU (tanh), Linear."""

    def __init__(self, text_dim: int, hidden_size: int):
        super().__init__()
        self.fc_in = Linear(text_dim, hidden_size)
        self.fc_out = Linear(hidden_size, hidden_size)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(text), approximate="tanh"))


class ImageProjection(nn.Module):
    """Image tokens (B, S_img, image_dim) -> (B, S_img, D).

    LayerNorm, Linear(image_dim -> image_dim), GELU (exact), Linear(image_dim -> D), LayerNorm;
    both norms are affine with eps 1e-5 and computed in float32.
    """

    def __init__(self, image_dim: int, hidden_size: int):
        super().__init__()
        self.norm_in = LayerNormFP32(image_dim, eps=1e-5)
        self.fc_in = Linear(image_dim, image_dim)
        self.fc_out = Linear(image_dim, hidden_size)
        self.norm_out = LayerNormFP32(hidden_size, eps=1e-5)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.norm_out(self.fc_out(F.gelu(self.fc_in(self.norm_in(image)))))
