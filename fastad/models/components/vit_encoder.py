"""Frozen DINOv2-with-registers ViT through timm, returning the raw outputs of chosen blocks
(Dinomaly's encoder, spec section 4.2).

The timm model is built at the checkpoints' native 518 px (37 x 37 position grid), so weights load
without resampling; at run time the patch position embedding is resized the way DINOv2 (and
Dinomaly's copy of it) does it: bicubic, ``scale_factor = (grid + 0.1) / 37``, no antialiasing.
timm's own resampling (exact size, antialiased) gives slightly different features.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...backbones import OFFLINE_DEFAULT, FeatureExtractor, create_model as create_timm_model

# Dinomaly's encoder names -> timm model names (weights: the authors' Meta .pth files or timm's)
VIT_ENCODERS = {
    "dinov2reg_vit_small_14": "vit_small_patch14_reg4_dinov2",
    "dinov2reg_vit_base_14": "vit_base_patch14_reg4_dinov2",
    "dinov2reg_vit_large_14": "vit_large_patch14_reg4_dinov2",
}
# Dinomaly's middle blocks (0-indexed): ViT-S/B use 2..9, ViT-L 4, 6, ..., 18
TARGET_LAYERS = {
    "dinov2reg_vit_small_14": (2, 3, 4, 5, 6, 7, 8, 9),
    "dinov2reg_vit_base_14": (2, 3, 4, 5, 6, 7, 8, 9),
    "dinov2reg_vit_large_14": (4, 6, 8, 10, 12, 14, 16, 18),
    OFFLINE_DEFAULT: (2, 3, 4, 5, 6, 7, 8, 9),
}
INTERPOLATE_OFFSET = 0.1
# the offline stand-in: a frozen random-init ViT (depth 10, width 192, 4 registers) on the offline
# ImageNet EfficientNet-Lite0's stride-16 features (a timm hybrid ViT, as R50+ViT); not DINOv2
HYBRID_DEFAULTS = {"depth": 10, "embed_dim": 192, "num_heads": 3}


def _hybrid_vit(weights: str | None, **kwargs) -> nn.Module:
    from functools import partial

    from timm.layers import HybridEmbed
    from timm.models.vision_transformer import VisionTransformer

    backbone = FeatureExtractor(OFFLINE_DEFAULT, (3,), weights)
    args = {**HYBRID_DEFAULTS, **kwargs}
    return VisionTransformer(img_size=224, patch_size=1, num_classes=0, reg_tokens=4, no_embed_class=True,
                             dynamic_img_size=True, embed_layer=partial(HybridEmbed, backbone=backbone), **args)


class ViTEncoder(nn.Module):
    """Frozen ViT giving the token sequences of ``layers``.

    Args:
        name: a key of ``VIT_ENCODERS``, any timm ViT with patch tokens, or ``'efficientnet_lite0'``
            (runs offline: random-init ViT blocks on the pretrained Lite0's stride-16 features;
            ``weights`` then names Lite0's weights).
        layers: 0-indexed blocks whose outputs are returned (default: Dinomaly's for ``name``).
        weights: None (local timm/Hugging Face cache), a file (Meta's DINOv2 .pth or a timm file), or
            ``'random'`` (no weights; tests and smoke runs).
        model_kwargs: extra timm arguments (e.g. ``depth=4`` for a small random encoder).
    Forward:
        images (B, 3, H, W) float, H and W multiples of the patch size ->
        list of (B, prefix + H/p * W/p, D) float32 block outputs (CLS and register tokens first).
    """

    def __init__(self, name: str = "dinov2reg_vit_base_14", layers=None, weights: str | None = None, **model_kwargs):
        super().__init__()
        timm_name = VIT_ENCODERS.get(name, name)
        if name == OFFLINE_DEFAULT:
            self.vit = _hybrid_vit(weights, **model_kwargs)
            self.patch = self.vit.patch_embed.backbone.reductions[-1]
        else:
            self.vit = create_timm_model(timm_name, weights, num_classes=0, dynamic_img_size=True, **model_kwargs)
            self.patch = self.vit.patch_embed.patch_size[0]
        self.layers = tuple(layers if layers is not None else TARGET_LAYERS.get(name, range(len(self.vit.blocks))))
        if not self.layers or max(self.layers) >= len(self.vit.blocks) or min(self.layers) < 0:
            raise ValueError(f"layers {self.layers} out of range for {len(self.vit.blocks)} blocks of {timm_name}")
        self.dim = self.vit.embed_dim
        self.num_prefix = self.vit.num_prefix_tokens
        self.vit.eval()
        for p in self.vit.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):  # frozen: always in eval mode
        super().train(mode)
        self.vit.eval()
        return self

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, d = x.shape
        vit = self.vit
        pos = vit.pos_embed
        if not vit.no_embed_class:  # a CLS position entry: add it to the CLS token, resize the rest
            cls_pos, pos = pos[:, : vit.num_prefix_tokens], pos[:, vit.num_prefix_tokens :]
        m = int(round(pos.shape[1] ** 0.5))
        grid = pos.reshape(1, m, m, d).permute(0, 3, 1, 2)
        if (h, w) != (m, m):
            scale = ((h + INTERPOLATE_OFFSET) / m, (w + INTERPOLATE_OFFSET) / m)
            grid = F.interpolate(grid.float(), scale_factor=scale, mode="bicubic", antialias=False).to(pos.dtype)
        x = x.reshape(b, h * w, d) + grid.permute(0, 2, 3, 1).reshape(1, h * w, d)
        prefix = torch.cat([t.expand(b, -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None], 1)
        if not vit.no_embed_class:
            prefix = prefix + cls_pos
        return torch.cat([prefix, x], 1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        h, w = images.shape[-2:]
        if h % self.patch or w % self.patch:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.patch}")
        x = self._pos_embed(self.vit.patch_embed(images))
        x = self.vit.norm_pre(x)
        out = []
        for i, block in enumerate(self.vit.blocks[: max(self.layers) + 1]):
            x = block(x)
            if i in self.layers:
                out.append(x.float())
        return out


class ViTMaps(nn.Module):
    """A frozen ViT as a list of (B, D, H/p, W/p) maps of ``layers`` (prefix tokens dropped), with the
    ``channels`` / ``reductions`` lists of :class:`fastad.backbones.FeatureExtractor`."""

    def __init__(self, name: str, layers, weights):
        super().__init__()
        self.encoder = ViTEncoder(name, layers, weights)
        self.channels = [self.encoder.dim] * len(self.encoder.layers)
        self.reductions = [self.encoder.patch] * len(self.encoder.layers)

    def forward(self, images):
        h, w = (s // self.encoder.patch for s in images.shape[-2:])
        p = self.encoder.num_prefix
        return [t[:, p:].transpose(1, 2).reshape(t.shape[0], -1, h, w) for t in self.encoder(images)]
