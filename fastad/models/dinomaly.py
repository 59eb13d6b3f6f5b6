"""Dinomaly (Guo et al., CVPR 2025) following the authors' multi-class MVTec script (spec section 4).

- Frozen DINOv2-with-registers ViT (:class:`ViTEncoder`), outputs of the middle 8 blocks
  (ViT-S/B: 2..9), all tokens (CLS and registers included).
- Bottleneck input = mean of the 8 layers; noisy MLP bottleneck (dropout 0.2 everywhere; 0.4 for
  Real-IAD); decoder of 8 pre-norm ViT blocks (LayerNorm eps 1e-8, qkv bias) whose attention is
  ``fastad.ops.linear_attention`` (LinearAttention2, elu + 1).
- Loose constraint: decoder outputs reversed, encoder and decoder layers fused by mean in 2 groups
  of 4, CLS/register tokens dropped, (B, D, 28, 28) maps.
- Loss: ``fastad.ops.hard_mining_cosine_loss`` with p = min(0.9 * it / 1000, 0.9), factor 0.1.
- StableAdamW (AMSGrad) lr 2e-3, weight decay 1e-4, eps 1e-10 (``optimizer_eps``); warm-up 100 iterations then cosine
  to 2e-4 at 10k iterations (the class-separated scripts run 5k: ``iterations=5000``); gradient
  norm clipped at 0.1; batch 16; 448 resize, 392 crop (``image_size=392, crop_fraction=0.875``; with
  the 16-px offline stand-in encoder 384).
- Map: per group ``1 - cos``, bilinear (align_corners=True) to the input size, mean, resized to
  256 (bilinear), 5x5 Gaussian sigma=4 with zero padding; image score = mean of the top 1% pixels.
  The smoothed 256-px map is returned bilinearly resized back to the input size (the contract: maps
  at the input size; ``map_size=None`` smooths at the input size directly).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import gaussian_blur_small, hard_mining_cosine_loss, linear_attention
from ..optim import StableAdamW, warm_cosine
from .base import AnomalyOutput, register
from .components.authors import load_authors_state, read_torch_state
from .components.maps import cosine_distance_map, top_ratio_mean, upsample_and_smooth
from .components.vit_encoder import ViTEncoder
from .training import TrainedModel

GROUPS = ((0, 1, 2, 3), (4, 5, 6, 7))


class NoisyBottleneck(nn.Module):
    """Dropout -> Linear(D, 4D) -> GELU -> Dropout -> Linear(4D, D) -> Dropout: (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(self.drop(x))))))


class LinearAttention(nn.Module):
    """Multi-head linear attention (Dinomaly's LinearAttention2): qkv projection, phi = elu + 1 on q
    and k, no scale, output projection. (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, num_heads: int, eps: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.eps = num_heads, eps
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = linear_attention(q, k, v, self.eps, nonfinite="nan")  # NaN reaches the loss guard
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class DecoderBlock(nn.Module):
    """Pre-norm ViT block with linear attention: x + attn(LN(x)), then x + MLP(LN(x)); LN eps 1e-8."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-8)
        self.attn = LinearAttention(dim, num_heads, eps)
        self.norm2 = nn.LayerNorm(dim, eps=1e-8)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _fuse(layers: list[torch.Tensor], groups) -> list[torch.Tensor]:
    return [torch.stack([layers[i] for i in g]).mean(0) for g in groups]


@register("dinomaly")
class Dinomaly(TrainedModel):
    """Dinomaly anomaly detector.

    Args:
        encoder: ``'dinov2reg_vit_base_14'`` (paper), ``'dinov2reg_vit_small_14'``,
            ``'dinov2reg_vit_large_14'``, another timm ViT name, or ``'efficientnet_lite0'``: an
            offline stand-in (random-init ViT blocks on the offline Lite0's stride-16 features,
            patch 16; not the paper's encoder).
        weights: encoder weights: None (local timm / Hugging Face cache), a file (Meta's
            ``dinov2_vitb14_reg4_pretrain.pth`` or a timm file) or ``'random'``. Never downloaded.
        encoder_layers: encoder blocks used (default: Dinomaly's middle 8 for the encoder).
        encoder_kwargs: extra timm arguments of the encoder (e.g. ``{'depth': 4}`` for small tests).
        image_size, crop_fraction: input (H, W), multiples of the encoder's patch (default: 392 for
            the 14-px DINOv2 patch, else the largest multiple of the patch up to 392), and the
            centre-crop fraction (0.875: 448 resize for 392).
        groups: loose-constraint groups over the encoder layers / reversed decoder blocks.
        dropout: bottleneck dropout (0.2; 0.4 for Real-IAD).
        decoder_depth, mlp_ratio: decoder blocks (8) and MLP width (4).
        iterations, train_batch_size: training length and batch (10000, 16).
        lr, final_lr, warmup_iters, weight_decay, grad_clip: optimiser (2e-3, 2e-4, 100, 1e-4, 0.1).
        p_final, p_ramp, factor: hard-mining schedule p = min(p_final * it / p_ramp, p_final) and
            easy-point gradient factor (0.9, 1000, 0.1).
        map_size, smoothing_kernel, sigma, max_ratio: inference (256; None: the input size; 5, 4, 0.01).
        attention_eps: added to the linear attention's denominator (0; README suggests 1e-6 on NaN).
        authors_checkpoint: a ``model.pth`` the authors' scripts write (``torch.save(model.state_dict())``
            of their ViTill): its bottleneck and decoder are loaded (:meth:`load_authors_checkpoint`) and
            ``fit`` does not train; the encoder comes from ``weights``.
        optimizer_eps: StableAdamW's eps (1e-10, the multi-class scripts'; the class-separated MVTec/VisA/MPDD
            scripts use 1e-8: :mod:`fastad.recipes`).
        seed: batch order (1).
    Forward:
        images (B, 3, H, W), H and W multiples of the patch ->
        AnomalyOutput(scores (B,), maps (B, H, W)) float32.
    """

    autocast_modules = ("encoder", "bottleneck", "decoder")

    def __init__(self, encoder: str = "dinov2reg_vit_base_14", weights: str | None = None, encoder_layers=None,
                 encoder_kwargs: dict | None = None, image_size=None, crop_fraction: float = 0.875, groups=GROUPS,
                 dropout: float = 0.2, decoder_depth: int = 8,
                 mlp_ratio: float = 4.0, iterations: int = 10000, train_batch_size: int = 16, lr: float = 2e-3,
                 final_lr: float = 2e-4, warmup_iters: int = 100, weight_decay: float = 1e-4, grad_clip: float | None = 0.1,
                 p_final: float = 0.9, p_ramp: int = 1000, factor: float = 0.1, map_size: int = 256,
                 smoothing_kernel: int = 5, sigma: float = 4.0, max_ratio: float = 0.01, attention_eps: float = 0.0,
                 optimizer_eps: float = 1e-10, authors_checkpoint: str | None = None, seed: int = 1):
        super().__init__()
        groups = tuple(tuple(int(i) for i in g) for g in groups)
        self.encoder = ViTEncoder(encoder, encoder_layers, weights, **(encoder_kwargs or {}))
        self.input_multiple = p = self.encoder.patch
        if image_size is None:  # 392 for the 14-px DINOv2 patch
            self.config["image_size"] = [392 // p * p] * 2
        n_layers = len(self.encoder.layers)
        if decoder_depth != n_layers or sorted(i for g in groups for i in g) != list(range(n_layers)):
            raise ValueError(f"groups {groups} must partition the {n_layers} encoder layers, and decoder_depth "
                             f"({decoder_depth}) must equal their number")
        dim, heads = self.encoder.dim, self.encoder.vit.blocks[0].attn.num_heads
        self.bottleneck = NoisyBottleneck(dim, int(dim * 4), dropout)
        self.decoder = nn.ModuleList(DecoderBlock(dim, heads, mlp_ratio, attention_eps) for _ in range(decoder_depth))
        self.groups = groups
        self.iterations, self.train_batch_size, self.seed = iterations, train_batch_size, seed
        self.lr, self.final_lr, self.warmup_iters, self.weight_decay, self.grad_clip = lr, final_lr, warmup_iters, weight_decay, grad_clip
        self.optimizer_eps = optimizer_eps
        self.p_final, self.p_ramp, self.factor = p_final, p_ramp, factor
        self.map_size, self.smoothing_kernel, self.sigma, self.max_ratio = map_size, smoothing_kernel, sigma, max_ratio
        for m in [*self.bottleneck.modules(), *self.decoder.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.01, a=-0.03, b=0.03)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if authors_checkpoint is not None:
            self.load_authors_checkpoint(authors_checkpoint)

    def load_authors_checkpoint(self, path) -> "Dinomaly":
        """Load the trained bottleneck and decoder from a state dict of the authors' ViTill (keys
        ``bottleneck.0.fc1.*``, ``decoder.<i>.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*``;
        its ``encoder.*`` keys are skipped: the frozen encoder is ``weights``). Raises ValueError naming
        keys that do not fit."""
        state = read_torch_state(path, "Dinomaly model.pth")
        mapping = [m for i in range(len(self.decoder)) for m in
                   ((f"decoder.{i}.mlp.fc1", f"decoder.{i}.mlp.0"), (f"decoder.{i}.mlp.fc2", f"decoder.{i}.mlp.2"))]
        mapping += [("bottleneck.0", "bottleneck"), ("decoder", "decoder")]
        trained = nn.ModuleDict({"bottleneck": self.bottleneck, "decoder": self.decoder})
        load_authors_state(trained, state, mapping, path, ignore=("encoder.",))
        return self

    def trainable_parameters(self):
        yield from self.bottleneck.parameters()
        yield from self.decoder.parameters()

    def make_optimizer(self):
        opt = StableAdamW(list(self.trainable_parameters()), lr=self.lr, betas=(0.9, 0.999), eps=self.optimizer_eps,
                          weight_decay=self.weight_decay, amsgrad=True)
        factor = warm_cosine(self.lr, self.final_lr, self.iterations, self.warmup_iters)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)

    def hard_mining_p(self, iteration: int) -> float:
        return min(self.p_final * iteration / self.p_ramp, self.p_final)

    def features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(B, 3, H, W) -> (encoder groups, decoder groups): one (B, D, H/14, W/14) map per group."""
        enc_layers = self.encoder(images)
        x = self.bottleneck(torch.stack(enc_layers).mean(0))
        dec_layers = []
        for block in self.decoder:
            x = block(x)
            dec_layers.append(x)
        dec_layers = dec_layers[::-1]
        p = self.encoder.patch
        h, w = images.shape[-2] // p, images.shape[-1] // p
        n = self.encoder.num_prefix

        def maps(layers):
            return [t[:, n:].transpose(1, 2).reshape(t.shape[0], -1, h, w) for t in _fuse(layers, self.groups)]

        return maps(enc_layers), maps(dec_layers)

    def training_loss(self, images: torch.Tensor, iteration: int) -> torch.Tensor:
        enc, dec = self.features(images)
        return hard_mining_cosine_loss(enc, dec, self.hard_mining_p(iteration), self.factor, nonfinite="nan",
                                       group=self.group)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        images = self.check_images(images)
        size = tuple(images.shape[-2:])
        enc, dec = self.features(images)
        maps = cosine_distance_map(enc, dec, size)
        if self.map_size and tuple(maps.shape[-2:]) != (self.map_size, self.map_size):
            maps = upsample_and_smooth(maps, (self.map_size, self.map_size), 0)  # bilinear, no smoothing
        maps = gaussian_blur_small(maps, self.smoothing_kernel, self.sigma)
        scores = top_ratio_mean(maps, self.max_ratio)  # on the authors' 256-px map
        return AnomalyOutput(scores, maps if tuple(maps.shape[-2:]) == size else upsample_and_smooth(maps, size, 0))
