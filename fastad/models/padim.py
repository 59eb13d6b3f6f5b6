"""PaDiM (Defard et al., ICPR 2020), as the official code and anomalib implement it.

- Features of the stride-4, 8 and 16 stages (``layers=(1, 2, 3)``: WRN-50/ResNet-18 layer1-3),
  the coarser ones nearest-upsampled to the finest grid and concatenated.
- A fixed random subset of ``n_features`` channels (550 for WideResNet-50, 100 for ResNet-18 as in
  the paper; 100 for the offline EfficientNet-Lite0, whose 176 channels are fewer than ResNet-18's 448).
- One Gaussian per grid position: mean and unbiased covariance + 0.01 I, accumulated in float64 so
  any number of images streams through ``fit`` (memory: positions x d^2 x 8 bytes).
- Score: Mahalanobis distance per position, bilinear upsampling (align_corners=False) to the input
  size, Gaussian sigma=4; image score = max of the map (the smoothed map is returned).
- Input: 256 resize, 224 centre crop (``image_size=224, crop_fraction=0.875``).

``per_level=True`` is ADPretrain's PaDiM† (spec 3.5): one Gaussian per level on its own grid with
all its channels (concatenating four 1024-d ViT levels would need 4096^2 covariances per position),
each level's distances bilinearly upsampled (align_corners=True) to the input, averaged, smoothed
(:func:`per_level_maps`, which FeatureNorm's PaDiM scorer shares).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import OFFLINE_DEFAULT, FeatureExtractor
from .base import AnomalyModel, AnomalyOutput, image_batches, register
from .components.gaussian import GaussianGrid, per_level_maps
from .components.maps import upsample_and_smooth

DEFAULT_FEATURES = {"wide_resnet50_2": 550, "resnet18": 100, OFFLINE_DEFAULT: 100}


@register("padim")
class PaDiM(AnomalyModel):
    """PaDiM anomaly detector.

    Args:
        backbone, layers, weights: see :class:`fastad.backbones.FeatureExtractor`; ``backbone`` may
            also be a module mapping images to a list of (B, C_i, h_i, w_i) maps with a ``channels``
            list, used as it is (such a model cannot be saved: its config is not plain values).
        image_size, crop_fraction: input (H, W) (224) and centre-crop fraction (0.875: resize 256).
        n_features: channels kept (random subset); default from ``DEFAULT_FEATURES``, else all.
        per_level: one Gaussian per level with all its channels (ADPretrain's PaDiM†).
        eps: covariance regulariser (0.01).
        sigma: Gaussian smoothing of the map (4).
        seed: seed of the channel subset.
    Forward:
        images (B, 3, H, W) -> AnomalyOutput(scores (B,), maps (B, H, W)) float32.
    """

    autocast_modules = ("backbone",)

    def __init__(
        self,
        backbone: str | nn.Module = OFFLINE_DEFAULT,
        layers=(1, 2, 3),
        weights: str | None = None,
        image_size=224,
        crop_fraction: float = 0.875,
        n_features: int | None = None,
        per_level: bool = False,
        eps: float = 0.01,
        sigma: float = 4.0,
        seed: int = 0,
    ):
        super().__init__()
        self.backbone = backbone if isinstance(backbone, nn.Module) else FeatureExtractor(backbone, layers, weights)
        total = sum(self.backbone.channels)
        n = total if per_level else n_features or DEFAULT_FEATURES.get(backbone, total)
        if not 1 <= n <= total:
            raise ValueError(f"n_features must be in [1, {total}] for {backbone} layers {layers}, got {n}")
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("channel_index", torch.randperm(total, generator=gen)[:n].sort().values)
        self.per_level, self.eps, self.sigma = per_level, eps, sigma
        self.gaussians = nn.ModuleList(GaussianGrid() for _ in (self.backbone.channels if per_level else [0]))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, n_features, h, w) float32 embedding on the finest grid."""
        feats = self.backbone(images)
        size = feats[0].shape[-2:]
        emb = torch.cat([f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="nearest") for f in feats], 1)
        return emb.index_select(1, self.channel_index)

    def _groups(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.backbone(images) if self.per_level else [self.embed(images)]

    @torch.no_grad()
    def fit(self, data, *, num_workers: int = 0, progress: bool | None = None, batch_size: int = 16,
            group=None) -> "PaDiM":
        """Fit the per-position Gaussians on normal images: a fastad Dataset (read ``batch_size`` at a
        time), a DataLoader of (B, 3, H, W) tensors or dicts with 'image', or a tensor. With ``group``
        (torch.distributed) each rank reads its contiguous share and the float64 sums are all-reduced:
        every rank gets the same Gaussians (equal to one process's within float64 summation order)."""
        for images in image_batches(data, self.device, batch_size=batch_size, num_workers=num_workers, progress=progress,
                                    group=group):
            for g, e in zip(self.gaussians, self._groups(self.check_images(images))):
                g.accumulate(e)
        for g in self.gaussians:
            g.finish(self.eps, group=group)
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        if self.gaussians[0].mean.numel() == 0:
            raise RuntimeError("PaDiM is not fitted: call fit() or load a checkpoint first")
        images = self.check_images(images)
        size = tuple(images.shape[-2:])
        if self.per_level:
            return AnomalyOutput(*per_level_maps(self.gaussians, self._groups(images), size, self.sigma))
        maps = upsample_and_smooth(self.gaussians[0].distance(self.embed(images)), size, self.sigma)
        return AnomalyOutput(maps.flatten(1).max(1).values, maps)
