"""FOD, "Focus the Discrepancy" (ICCV 2023; spec section 1), as the authors' code (MIT) runs it.

One transformer per feature level reconstructs the (3x3 average-pooled) frozen CNN tokens. Each of
its 3 I2Correlation layers runs an intra branch (self-attention) and an inter branch (cross-attention
to external reference tokens, position aligned with the input) and keeps their difference:
``new = SA(x) - CA(x, ref)``, then the post-norm feed-forward block. Each attention also predicts,
per token and head, the widths (sigma_y, sigma_x) of a Gaussian prior over grid positions, the
target correlation T (row-normalised). The attention has no output projection (the authors' code
computes one and discards it; the released numbers come from that code).

Losses per level (lambda1 = lambda2 = 0.5; Div = symmetric KL, Ent = row entropy, both averaged over
heads, tokens and layers; SG = stop-gradient):

- ``L1 = L_rec + l1 Div(T_g, SG S_g) - l1 Div(T_e, SG S_e)``: the priors adapt;
- ``L2 = L_rec - l1 Div(SG T_g, S_g) - l2 Ent(S_g) + l1 Div(SG T_e, S_e) + l2 Ent(S_e)``;
- ``L1.backward(retain_graph=True)``, ``L2.backward()`` (gradients accumulate), one Adam step
  (``adam_semantics='torch1.13'``: one step per level with zero-filled gradients, as the authors'
  code ran under its pinned torch 1.13).

Reference tokens (``reference=``): ``'mean'`` (default; per-position mean of the training features),
``'nearest'`` (per input token, the nearest training feature within a p x p window of its position,
training images never matching themselves), ``'coreset'`` (the nearest entry of a greedy k-center
coreset of all training tokens), ``'prototype'`` (M prototypes per position written by the memory
update of the appendix, Eq. 18-21; read as the softmax-weighted sum of Eq. 18).

Scoring: per token ``rec = mean_C (x - out)^2 + 1 - cos`` times ``max(a) - a`` with
``a = softmax_L(-D_e)``, D_e the symmetric KL between S_e and T_e averaged over layers; bilinear
(align_corners=True) to the input, mean over levels; map unsmoothed, image score = max of the
sigma=4 smoothed map. Recipe: Adam lr 1e-4, batch 1, 100 epochs, per class; WideResNet-50 layer2/3
in the code (``backbone='wide_resnet50_2'``), the offline EfficientNet-Lite0 at the same strides
(8, 16) by default here. Input: 256 x 256, no crop (bilinear; Lanczos, the code's, under
``--protocol official``); the
model takes ``image_size`` only (its position-aligned references and priors are sized for it).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import OFFLINE_DEFAULT, FeatureExtractor
from ..ops import greedy_coreset, nearest_reference
from .base import AnomalyOutput, image_batches, register
from .components.maps import level_maps, score_and_map
from .components.tokens import (
    PostNormFeedForward,
    TokenEmbedding,
    level_grid,
    level_tokens,
    level_width,
    reconstruction_loss,
    reconstruction_score,
)
from .training import TrainedModel

ADAM_SEMANTICS = ("torch2", "torch1.13")
REFERENCES = ("mean", "nearest", "coreset", "prototype")
BRANCHES = ("both", "intra", "inter")
LOG_EPS = 1e-4  # the authors' KL / entropy offset


@functools.lru_cache(maxsize=8)
def squared_offsets(grid: tuple[int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, L) squared row and column distances between the tokens of a row-major ``grid``."""
    rows, cols = torch.meshgrid(torch.arange(grid[0], device=device), torch.arange(grid[1], device=device), indexing="ij")
    rows, cols = rows.reshape(-1).float(), cols.reshape(-1).float()
    return (rows[:, None] - rows[None]) ** 2, (cols[:, None] - cols[None]) ** 2


def gaussian_prior(sigma: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Target correlation T: (B, heads, L, 2) widths (sigma_y, sigma_x) -> (B, heads, L, L) rows of
    ``exp(-dy^2 / 2 sy^2 - dx^2 / 2 sx^2) / (2 pi sy sx)``, normalised to sum 1."""
    dy2, dx2 = squared_offsets(tuple(grid), sigma.device)
    sy, sx = sigma[..., :1], sigma[..., 1:]
    t = torch.exp(-dy2 / (2 * sy**2) - dx2 / (2 * sx**2)) / (2 * math.pi * sy * sx)
    return t / t.sum(-1, keepdim=True)


def row_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, L) row distributions -> (B, L): ``sum_j p (log(p + 1e-4) - log(q + 1e-4))``,
    mean over heads."""
    return (p * (torch.log(p + LOG_EPS) - torch.log(q + LOG_EPS))).sum(-1).mean(1)


def symmetric_kl(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Div(T, S) = mean KL(T, S) + mean KL(S, T), a scalar."""
    return row_kl(t, s).mean() + row_kl(s, t).mean()


def row_entropy(s: torch.Tensor) -> torch.Tensor:
    """Ent(S) = mean over heads and tokens of ``-sum_j S log(S + 1e-4)``, a scalar."""
    return -(s * torch.log(s + LOG_EPS)).sum(-1).mean()


class CorrelationAttention(nn.Module):
    """FOD's Attention2D. Forward: query (B, L, d), key / value (B or 1, L, d) on ``grid`` ->
    (output (B, L, d) = concatenated heads, S (B, heads, L, L) softmax, T (B, heads, L, L) prior)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.sigma = nn.Linear(dim, 2 * heads)

    def forward(self, query, key, value, grid):
        b, n, d = query.shape
        h = self.heads

        def split(x):
            return x.reshape(x.shape[0], -1, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(query)), split(self.k(key)), split(self.v(value))
        s = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
        out = (s @ v).transpose(1, 2).reshape(b, n, d)
        sigma = 3 ** (torch.sigmoid(5 * self.sigma(query)) + 1e-5) - 1  # (B, L, 2h) in (0, 2)
        sigma = sigma.reshape(b, n, h, 2).transpose(1, 2)
        return out, s, gaussian_prior(sigma, grid)


class I2CorrelationLayer(nn.Module):
    """Intra (self) and inter (reference) correlation, fused as ``SA(x) - CA(x, ref)`` (one branch:
    ``x + branch(x)``), then the post-norm feed-forward block.
    Forward: x (B, L, d), ref (B or 1, L, d) -> (B, L, d), {'Sg','Tg','Se','Te'} maps of the active branches."""

    def __init__(self, dim: int, heads: int = 8, branches: str = "both"):
        super().__init__()
        self.branches = branches
        self.intra = CorrelationAttention(dim, heads) if branches in ("both", "intra") else None
        self.inter = CorrelationAttention(dim, heads) if branches in ("both", "inter") else None
        self.tail = PostNormFeedForward(dim)

    def forward(self, x, ref, grid):
        maps, new = {}, x
        if self.intra is not None:
            a, maps["Sg"], maps["Tg"] = self.intra(x, x, x, grid)
            new = new + a
        if self.inter is not None:
            c, maps["Se"], maps["Te"] = self.inter(x, ref, ref, grid)
            new = new + c if self.intra is None else a - c  # (x + SA) - (x + CA)
        return self.tail(new), maps


class FODLevel(nn.Module):
    """The network of one level. Forward: tokens (B, L, C), reference tokens (B or 1, L, C) ->
    (reconstruction (B, L, C), per-layer correlation maps)."""

    def __init__(self, channels: int, grid: tuple[int, int], dim: int, depth: int = 3, heads: int = 8, branches: str = "both"):
        super().__init__()
        self.grid = tuple(grid)
        self.embed, self.embed_reference = TokenEmbedding(channels, dim), TokenEmbedding(channels, dim)
        self.layers = nn.ModuleList(I2CorrelationLayer(dim, heads, branches) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, channels)

    def forward(self, tokens, reference):
        x = self.embed(tokens, self.grid)
        ref = self.embed_reference(reference, self.grid)
        maps = []
        for layer in self.layers:
            x, m = layer(x, ref, self.grid)
            maps.append(m)
        return self.head(self.norm(x)), maps


def fod_phase_losses(rec: torch.Tensor, maps: list[dict], lambda1: float, lambda2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The two losses of one level (module docstring), correlation terms averaged over layers."""
    n = len(maps)
    l1, l2 = rec, rec
    for m in maps:
        if "Sg" in m:
            l1 = l1 + lambda1 * symmetric_kl(m["Tg"], m["Sg"].detach()) / n
            l2 = l2 - (lambda1 * symmetric_kl(m["Tg"].detach(), m["Sg"]) + lambda2 * row_entropy(m["Sg"])) / n
        if "Se" in m:
            l1 = l1 - lambda1 * symmetric_kl(m["Te"], m["Se"].detach()) / n
            l2 = l2 + (lambda1 * symmetric_kl(m["Te"].detach(), m["Se"]) + lambda2 * row_entropy(m["Se"])) / n
    return l1, l2


@register("fod")
class FOD(TrainedModel):
    """FOD anomaly detector (one model per class).

    Args:
        backbone, layers, weights: frozen features (:class:`fastad.backbones.FeatureExtractor`).
        image_size, crop_fraction: input (H, W) (256) and centre-crop fraction (1: none).
        depth, heads, branches: layers (3), heads (8), ``'both'`` / ``'intra'`` / ``'inter'``.
        reference: ``'mean'``, ``'nearest'``, ``'coreset'`` or ``'prototype'`` (module docstring).
        nearest_window: p of the nearest-feature window (3); coreset_ratio: kept fraction of the
            training tokens (0.01); prototypes: M per position (10).
        lambda1, lambda2: loss weights (0.5, 0.5).
        aggregate: 3x3 average pooling of the features (True).
        epochs, iterations, train_batch_size, lr: Adam schedule (100 epochs of batch 1, lr 1e-4).
        adam_semantics: ``'torch2'`` (default: each level's parameters move by their own gradient only,
            what the authors' code does under any torch >= 2) or ``'torch1.13'`` (their pinned torch: the
            per-level steps also give the other level momentum-only steps; the released numbers come
            from it; :meth:`training_step`).
        sigma: smoothing of the map for the image score (4).
        seed: batch order, coreset and prototype initialisation (3407).
    Forward:
        images (B, 3, *image_size) -> AnomalyOutput(scores (B,), maps (B, H, W)) float32.
    """

    data_parallel = "its recipe trains with batch 1 and two optimizer phases per image"

    fixed_input = True

    # the levels stay float32: their association-discrepancy losses take logs of attention probabilities
    # (a bfloat16 run gave a NaN loss at the first iteration)
    autocast_modules = ("backbone",)

    def __init__(self, backbone: str = OFFLINE_DEFAULT, layers=(2, 3), weights: str | None = None, image_size=256,
                 crop_fraction: float = 1.0,
                 depth: int = 3, heads: int = 8, branches: str = "both", reference: str = "mean", nearest_window: int = 3,
                 coreset_ratio: float = 0.01, prototypes: int = 10, lambda1: float = 0.5, lambda2: float = 0.5,
                 aggregate: bool = True, epochs: int = 100, iterations: int | None = None, train_batch_size: int = 1,
                 lr: float = 1e-4, adam_semantics: str = "torch2", sigma: float = 4.0, seed: int = 3407):
        super().__init__()
        if adam_semantics not in ADAM_SEMANTICS:
            raise ValueError(f"adam_semantics must be one of {ADAM_SEMANTICS}, got {adam_semantics!r}")
        self.adam_semantics = adam_semantics
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
        if branches not in BRANCHES:
            raise ValueError(f"branches must be one of {BRANCHES}, got {branches!r}")
        self.backbone = FeatureExtractor(backbone, layers, weights)
        self.levels = nn.ModuleList(
            FODLevel(c, level_grid(self.image_size, s), level_width(s), depth, heads, branches)
            for c, s in zip(self.backbone.channels, self.backbone.reductions))
        for i in range(len(self.levels)):  # data-dependent shapes, filled by build_references / a checkpoint
            self.register_buffer(f"reference_{i}", torch.empty(0))
        self.branches, self.reference, self.nearest_window = branches, reference, nearest_window
        self.coreset_ratio, self.prototypes = coreset_ratio, prototypes
        self.lambda1, self.lambda2, self.aggregate, self.sigma = lambda1, lambda2, aggregate, sigma
        self.epochs, self.iterations_override, self.train_batch_size = epochs, iterations, train_batch_size
        self.lr, self.seed, self.grad_clip = lr, seed, None

    def trainable_parameters(self):
        return self.levels.parameters()

    def make_optimizer(self):
        # one Adam over every level, as the authors'; under torch >= 2 semantics one joint step equals
        # their per-level steps (no shared parameter, per-parameter updates)
        opt = torch.optim.Adam(list(self.trainable_parameters()), lr=self.lr)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0)

    def tokens(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> per level (B, L_l, C_l) backbone tokens."""
        return level_tokens(self.backbone(images), self.aggregate)

    # -- external reference features ---------------------------------------------------------------
    def _bank(self, i: int) -> torch.Tensor:
        bank = getattr(self, f"reference_{i}")
        if bank.numel() == 0:
            raise RuntimeError("FOD has no reference features: call fit() (or build_references()) or load a checkpoint")
        return bank

    @torch.no_grad()
    def build_references(self, data) -> "FOD":
        """Extract the training features and store each level's reference data: (1, L, C) mean,
        (N, H, W, C) all features (nearest), (M', C) coreset or (L, M, C) prototypes.
        ``data``: a Dataset of dicts with 'image', or an iterable of image batches / dicts."""
        feats = None
        for images in image_batches(data, self.device, desc="references"):
            t = self.tokens(self.check_images(images))
            feats = [[x.cpu()] for x in t] if feats is None else [f + [x.cpu()] for f, x in zip(feats, t)]
        if feats is None:
            raise ValueError("FOD needs training images to build its reference features, got none")
        gen = torch.Generator().manual_seed(self.seed)
        for i, (level, chunks) in enumerate(zip(self.levels, feats)):
            x = torch.cat(chunks)  # (N, L, C)
            if self.reference == "mean":
                ref = x.mean(0, keepdim=True)
            elif self.reference == "nearest":
                ref = x.reshape(x.shape[0], *level.grid, x.shape[-1])
            elif self.reference == "coreset":
                flat = x.reshape(-1, x.shape[-1])
                ref = flat[greedy_coreset(flat.to(self.device), ratio=self.coreset_ratio, seed=self.seed).cpu()]
            else:
                ref = prototype_memory(x, self.prototypes, gen)
            setattr(self, f"reference_{i}", ref.contiguous().to(self.device))
        return self

    @torch.no_grad()
    def reference_tokens(self, i: int, tokens: torch.Tensor) -> torch.Tensor:
        """Level ``i``'s reference for input tokens (B, L, C): (1, L, C) (mean) or (B, L, C)."""
        bank = self._bank(i)
        if self.reference == "mean":
            return bank
        if self.reference == "coreset":
            return tokens - nearest_reference(tokens.contiguous(), bank)[2]
        if self.reference == "prototype":
            w = torch.softmax(torch.einsum("blc,lmc->blm", tokens, bank), -1)
            return torch.einsum("blm,lmc->blc", w, bank)
        grid = self.levels[i].grid
        x = tokens.reshape(tokens.shape[0], *grid, tokens.shape[-1]).contiguous()
        out = []
        for one in x:  # a training image must not be its own reference (batched convs differ in the last bits)
            keep = (bank - one).flatten(1).abs().amax(1) > 1e-3 * one.abs().amax()
            if not keep.any():
                raise ValueError("FOD 'nearest' needs at least 2 distinct training images")
            res = nearest_reference(one[None], bank[keep].contiguous(), window=self.nearest_window)[2]
            out.append((one[None] - res).reshape(1, -1, tokens.shape[-1]))
        return torch.cat(out)

    def fit(self, data, iterations: int | None = None, **kwargs) -> "FOD":
        """Build the reference features (once), then train (:meth:`TrainedModel.fit`)."""
        if getattr(self, "reference_0").numel() == 0:
            self.build_references(data)
        return super().fit(data, iterations, **kwargs)

    # -- training and scoring ------------------------------------------------------------------------
    def level_losses(self, i: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Level ``i``'s (L1, L2, L_rec) for its (B, L, C) tokens."""
        out, maps = self.levels[i](tokens, self.reference_tokens(i, tokens))
        r = reconstruction_loss(out, tokens)
        return (*fod_phase_losses(r, maps, self.lambda1, self.lambda2), r)

    def phase_losses(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L1, L2, L_rec), each summed over the levels."""
        l1 = l2 = rec = 0
        for i, t in enumerate(self.tokens(images)):
            a, b, r = self.level_losses(i, t)
            l1, l2, rec = l1 + a, l2 + b, rec + r
        return l1, l2, rec

    def training_step(self, batch, iteration: int) -> torch.Tensor:
        """The two-phase update: ``L1.backward(retain_graph=True)``, ``L2.backward()``, then one step
        (``adam_semantics='torch2'``), or, as the authors' code ran under torch 1.13 (``'torch1.13'``),
        per level in turn: its losses, ``zero_grad`` keeping zero gradient tensors, backward, a step of
        the one Adam (which also moves every earlier-touched parameter of the other levels by its
        momentum alone). Records L_rec."""
        images = self.batch_images(batch)
        if self.adam_semantics == "torch2":
            l1, l2, rec = self.phase_losses(images)
            self.update(l1, l2)
            return rec.detach()
        rec = 0
        for i, t in enumerate(self.tokens(images)):
            a, b, r = self.level_losses(i, t)
            if not self.update(a, b, set_to_none=False):
                break
            rec = rec + r.detach()
        return rec

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        images = self.check_images(images)
        scores = []
        for i, (level, t) in enumerate(zip(self.levels, self.tokens(images))):
            out, maps = level(t, self.reference_tokens(i, t))
            rec = reconstruction_score(out, t)
            if self.branches == "intra":
                d = torch.stack([row_kl(m["Sg"], m["Tg"]) + row_kl(m["Tg"], m["Sg"]) for m in maps]).mean(0)
                scores.append(rec * torch.softmax(-d, -1))
                continue
            d = torch.stack([row_kl(m["Se"], m["Te"]) + row_kl(m["Te"], m["Se"]) for m in maps]).mean(0)
            a = torch.softmax(-d, -1)
            scores.append(rec * (a.max(-1, keepdim=True).values - a))
        maps = level_maps(scores, [level.grid for level in self.levels], tuple(images.shape[-2:]))
        return AnomalyOutput(*score_and_map(maps, self.sigma))


@torch.no_grad()
def prototype_memory(x: torch.Tensor, m: int, generator: torch.Generator) -> torch.Tensor:
    """FOD appendix Eq. 18-21: M unit prototypes per position, initialised from M random training
    images, updated once by every training feature. x (N, L, C) -> (L, M, C)."""
    n = x.shape[0]
    if m > n:
        raise ValueError(f"{m} prototypes per position need at least {m} training images, got {n}")
    protos = F.normalize(x[torch.randperm(n, generator=generator)[:m]].transpose(0, 1), dim=-1)  # (L, M, C)
    logits = torch.einsum("nlc,lmc->nlm", x, protos)
    assign = logits.argmax(-1)  # the prototype each feature declares nearest (Eq. 18)
    nu = torch.softmax(logits, 0)  # Eq. 20: over the features, per prototype
    member = F.one_hot(assign, m).bool()  # (N, L, M)
    peak = nu.masked_fill(~member, 0).amax(0, keepdim=True).clamp_min(1e-30)
    nu = torch.where(member, nu / peak, 0)  # Eq. 21
    return F.normalize(protos + torch.einsum("nlm,nlc->lmc", nu, x), dim=-1)  # Eq. 19
