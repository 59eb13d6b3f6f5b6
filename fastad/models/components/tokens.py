"""Blocks shared by the token-reconstruction models FOD and RLR (spec sections 1.3, 1.4, 2.3-2.6).

Both run one small transformer per feature level on the flattened tokens of frozen CNN features
(3x3 average-pooled), embed the tokens with a 1x1 convolution plus a fixed 2-D sin-cos position
embedding, use the same post-norm feed-forward block, the same reconstruction loss and the same
per-token score, upsampled and averaged over the levels (:func:`fastad.models.components.maps.level_maps`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sincos_position_embedding(dim: int, grid: tuple[int, int], device=None) -> torch.Tensor:
    """(H*W, dim) float32 fixed 2-D position embedding, row-major tokens.

    The first ``dim / 2`` channels encode the column index, the last ``dim / 2`` the row index; within
    each half, channel 2k holds ``sin(pos * f_k)`` and 2k + 1 ``cos(pos * f_k)`` with
    ``f_k = exp(-2k ln(1e4) / (dim / 2))``. ``dim`` must be a multiple of 4.
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    h, w = grid
    half = dim // 2
    freq = torch.exp(torch.arange(0, half, 2, dtype=torch.float32, device=device) * (-math.log(1e4) / half))
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    out = torch.empty(h * w, dim, device=device)
    for offset, pos in ((0, cols), (half, rows)):
        angle = pos.reshape(-1, 1).float() * freq
        out[:, offset : offset + half : 2] = torch.sin(angle)
        out[:, offset + 1 : offset + half : 2] = torch.cos(angle)
    return out


class TokenEmbedding(nn.Module):
    """1x1 Conv1d (C -> d, no bias, Kaiming-normal fan_in leaky_relu) plus the sin-cos position
    embedding. Forward: (B, L, C) tokens on ``grid`` -> (B, L, d)."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv1d(channels, dim, 1, bias=False)
        nn.init.kaiming_normal_(self.proj.weight, mode="fan_in", nonlinearity="leaky_relu")
        self.dim = dim

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.proj(tokens.transpose(1, 2)).transpose(1, 2)
        return x + sincos_position_embedding(self.dim, grid, tokens.device).to(x.dtype)


class PostNormFeedForward(nn.Module):
    """``z = LN1(x)``, ``out = LN2(z + FFN(z))`` with FFN = Linear(d, 4d) -> GELU -> Linear(4d, d)
    (the tail of every FOD and RLR layer). Forward: (B, L, d) -> (B, L, d)."""

    def __init__(self, dim: int, expansion: int = 4):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, expansion * dim), nn.GELU(), nn.Linear(expansion * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm1(x)
        return self.norm2(z + self.ffn(z))


def level_tokens(features: list[torch.Tensor], aggregate: bool = True) -> list[torch.Tensor]:
    """Per level: 3x3 average pooling (stride 1, padding 1; off with ``aggregate=False``), then
    (B, C, H, W) -> (B, H*W, C) tokens."""
    out = []
    for f in features:
        if aggregate:
            f = F.avg_pool2d(f, 3, 1, 1)
        out.append(f.flatten(2).transpose(1, 2))
    return out


def feature_jitter(tokens: torch.Tensor, scale: float) -> torch.Tensor:
    """UniAD/RLR training noise: ``tokens + N(0, 1) * ||token||_2 / C * scale`` per token (B, L, C)."""
    if scale == 0:
        return tokens
    norm = tokens.norm(dim=-1, keepdim=True) / tokens.shape[-1]
    return tokens + torch.randn_like(tokens) * norm * scale


def reconstruction_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Patch-wise reconstruction loss: MSE over all elements + mean over tokens of 1 - cos (B, L, C)."""
    return F.mse_loss(out, target) + (1 - F.cosine_similarity(out, target, dim=-1)).mean()


def reconstruction_score(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, L, C) pair -> (B, L): ``mean_C (target - out)^2 + 1 - cos(target, out)``."""
    return ((target - out) ** 2).mean(-1) + 1 - F.cosine_similarity(target, out, dim=-1)


def level_width(stride: int) -> int:
    """FOD's and RLR's hidden width of a level: 128 / 256 / 512 at strides 4 / 8 / 16."""
    return 32 * stride


def level_grid(image_size: tuple[int, int], stride: int) -> tuple[int, int]:
    """Token grid (ceil(H / stride), ceil(W / stride)) of a level for (H, W) images."""
    return (math.ceil(image_size[0] / stride), math.ceil(image_size[1] / stride))
