"""RLR, "Learning Unified Reference Representation" (ECCV 2024; spec section 2), from the paper and
the spec only (the authors' code has no licence).

One small transformer per feature level reconstructs the (3x3 average-pooled) frozen CNN tokens.
Every layer runs two attentions in parallel against a learnable reference R (one per level, in
backbone feature space, embedded once and shared by the layers), with no residual connection:

- MLKA: query x, key R, value x, neighbour-masked: a token never sees its own window
  (``fastad.ops.neighbour_masked_attention``);
- LCA: query x, key = value = R, only the window (``fastad.ops.local_window_attention``);

``new = alpha * LCA(x) + MLKA(x)`` (alpha = 2), then the post-norm feed-forward block. Windows 11 / 7
/ 5 on the stride-4 / 8 / 16 levels (the code's 64 / 32 / 16 grids at 256 px), widths 32 x stride
(128 / 256 / 512), 8 heads, 4 layers, a final LayerNorm and Linear(d -> C). Training: UniAD feature
jitter (scale 4, the README command) on the input tokens, clean tokens as the target; MSE + (1 - cos)
per level; Adam lr 1e-4, batch 4, 200 epochs; the unified (multi-class) setting is the paper's.
Scoring: per token mean squared error + 1 - cos, bilinear (align_corners=True) to the input, mean
over levels; the map is returned unsmoothed (the authors' pixel metrics), the image score is the max
of its sigma=4 Gaussian-smoothed copy. Input: 256 x 256, no crop; the learnable references are sized
for ``image_size``, so the model takes that size only.

Defaults follow the README command (levels at strides 8 and 16, ``layers=(2, 3)``; the paper's
table 4 gives 98.9 I-AUROC for them, 98.6 for strides 4-16) with the offline EfficientNet-Lite0 in
place of the paper's EfficientNet-B6 (``backbone='tf_efficientnet_b6', weights=PATH`` selects it).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..backbones import OFFLINE_DEFAULT, FeatureExtractor
from ..ops import local_window_attention, neighbour_masked_attention
from ..optim import adam
from .base import AnomalyOutput, register
from .components.maps import level_maps, score_and_map
from .components.tokens import (
    PostNormFeedForward,
    TokenEmbedding,
    feature_jitter,
    level_grid,
    level_tokens,
    level_width,
    reconstruction_loss,
    reconstruction_score,
)
from .training import TrainedModel

WINDOWS = {4: 11, 8: 7, 16: 5}  # feature stride -> window side


class WindowAttention(nn.Module):
    """``nn.MultiheadAttention`` (q/k/v input projections, output projection, its initialisation)
    restricted to the keys inside (``only=True``) or outside (``only=False``) each token's window.

    Forward: query (B, L, d), key (B or 1, L, d), value (B or 1, L, d) on ``grid``, odd ``window``
    -> (B, L, d).
    """

    def __init__(self, dim: int, heads: int, only: bool):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.only = heads, only
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        bound = math.sqrt(6 / (dim + 3 * dim))  # xavier_uniform_ of MHA's stacked (3d, d) in-projection
        for lin in (self.q, self.k, self.v):
            nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(lin.bias)
        nn.init.zeros_(self.out.bias)

    def _heads(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        b, n, d = x.shape
        return x.reshape(b, n, self.heads, d // self.heads).transpose(1, 2).expand(batch, -1, -1, -1)

    def forward(self, query, key, value, grid: tuple[int, int], window: int) -> torch.Tensor:
        b, n, d = query.shape
        q, k, v = self._heads(self.q(query), b), self._heads(self.k(key), b), self._heads(self.v(value), b)
        attend = local_window_attention if self.only else neighbour_masked_attention
        o = attend(q, k.contiguous(), v.contiguous(), grid, window, nonfinite="nan")  # NaN reaches the guard
        return self.out(o.transpose(1, 2).reshape(b, n, d))


class RLRLayer(nn.Module):
    """``alpha * LCA(x; R) + MLKA(x; R)`` (no residual), then the post-norm feed-forward block.
    Forward: x (B, L, d), reference (1, L, d) -> (B, L, d)."""

    def __init__(self, dim: int, heads: int = 8, alpha: float = 2.0):
        super().__init__()
        self.lca = WindowAttention(dim, heads, only=True)
        self.mlka = WindowAttention(dim, heads, only=False)
        self.tail = PostNormFeedForward(dim)
        self.alpha = alpha

    def forward(self, x, reference, grid, window):
        new = self.alpha * self.lca(x, reference, reference, grid, window) + self.mlka(x, reference, x, grid, window)
        return self.tail(new)


class RLRLevel(nn.Module):
    """The reconstruction network of one level. Forward: tokens (B, L, C) -> (B, L, C)."""

    def __init__(self, channels: int, grid: tuple[int, int], window: int, dim: int, depth: int = 4, heads: int = 8,
                 alpha: float = 2.0):
        super().__init__()
        self.grid, self.window = tuple(grid), window
        self.reference = nn.Parameter(torch.randn(1, grid[0] * grid[1], channels))
        self.embed, self.embed_reference = TokenEmbedding(channels, dim), TokenEmbedding(channels, dim)
        self.layers = nn.ModuleList(RLRLayer(dim, heads, alpha) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, channels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] != self.reference.shape[1]:
            raise ValueError(f"a {self.grid} level expects {self.reference.shape[1]} tokens, got {tokens.shape[1]}: "
                             "the input size differs from the model's image_size")
        x = self.embed(tokens, self.grid)
        ref = self.embed_reference(self.reference, self.grid)
        for layer in self.layers:
            x = layer(x, ref, self.grid, self.window)
        return self.head(self.norm(x))


@register("rlr")
class RLR(TrainedModel):
    """RLR anomaly detector (multi-class by design: train it on all classes with ``--setting unified``).

    Args:
        backbone, layers, weights: frozen features (:class:`fastad.backbones.FeatureExtractor`;
            default the offline EfficientNet-Lite0 at strides 8 and 16).
        image_size, crop_fraction: input (H, W) the learnable references are sized for (256), and
            centre-crop fraction (1: none).
        depth, heads, alpha: layers (4), heads (8), LCA weight (2).
        windows: window side per level (default by stride: 11 / 7 / 5 at 4 / 8 / 16).
        jitter: feature-jitter scale (4; 0 disables).
        aggregate: 3x3 average pooling of the features (True).
        epochs, iterations, train_batch_size, lr: Adam schedule (200 epochs of batch 4, lr 1e-4,
            constant); ``iterations`` overrides the epochs.
        sigma: smoothing of the map for the image score (4).
        seed: batch order (3407).
    Forward:
        images (B, 3, *image_size) -> AnomalyOutput(scores (B,), maps (B, H, W)) float32.
    """

    fixed_input = True

    autocast_modules = ("backbone", "levels")

    def __init__(self, backbone: str = OFFLINE_DEFAULT, layers=(2, 3), weights: str | None = None, image_size=256,
                 crop_fraction: float = 1.0,
                 depth: int = 4, heads: int = 8, alpha: float = 2.0, windows=None, jitter: float = 4.0,
                 aggregate: bool = True, epochs: int = 200, iterations: int | None = None, train_batch_size: int = 4,
                 lr: float = 1e-4, sigma: float = 4.0, seed: int = 3407):
        super().__init__()
        self.backbone = FeatureExtractor(backbone, layers, weights)
        strides = self.backbone.reductions
        if windows is None:
            missing = [s for s in strides if s not in WINDOWS]
            if missing:
                raise ValueError(f"no default window for feature strides {missing}; pass windows=[...] per level")
            windows = [WINDOWS[s] for s in strides]
        if len(windows) != len(strides):
            raise ValueError(f"windows needs one entry per level ({len(strides)}), got {list(windows)}")
        self.levels = nn.ModuleList(
            RLRLevel(c, level_grid(self.image_size, s), w, level_width(s), depth, heads, alpha)
            for c, s, w in zip(self.backbone.channels, strides, windows))
        self.jitter, self.aggregate, self.sigma = jitter, aggregate, sigma
        self.epochs, self.iterations_override, self.train_batch_size = epochs, iterations, train_batch_size
        self.lr, self.seed, self.grad_clip = lr, seed, None

    def trainable_parameters(self):
        return self.levels.parameters()

    def make_optimizer(self):
        # one Adam over all levels = the authors' per-level zero_grad/backward/step: the levels share
        # no parameter and Adam updates each parameter from its own gradient alone
        opt = adam(self.trainable_parameters(), lr=self.lr)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0)

    def tokens(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> per level (B, L_l, C_l) backbone tokens."""
        return level_tokens(self.backbone(images), self.aggregate)

    def training_loss(self, images: torch.Tensor, iteration: int) -> torch.Tensor:
        return sum(reconstruction_loss(level(feature_jitter(t, self.jitter)), t)
                   for level, t in zip(self.levels, self.tokens(images)))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        images = self.check_images(images)
        scores = [reconstruction_score(level(t), t) for level, t in zip(self.levels, self.tokens(images))]
        maps = level_maps(scores, [level.grid for level in self.levels], tuple(images.shape[-2:]))
        return AnomalyOutput(*score_and_map(maps, self.sigma))
