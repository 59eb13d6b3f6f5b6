"""PaDiM (Defard et al., ICPR 2020), as the official code and anomalib implement it.

- Features of the stride-4, 8 and 16 stages (``layers=(1, 2, 3)``: WRN-50/ResNet-18 layer1-3),
  the coarser ones nearest-upsampled to the finest grid and concatenated.
- A fixed random subset of ``n_features`` channels (550 for WideResNet-50, 100 for ResNet-18 as in
  the paper; 100 for the offline EfficientNet-Lite0, whose 176 channels are fewer than ResNet-18's 448).
- One Gaussian per grid position: mean and unbiased covariance + 0.01 I, accumulated in float64 so
  any number of images streams through ``fit`` (memory: positions x d^2 x 8 bytes).
- Score: Mahalanobis distance per position, bilinear upsampling (align_corners=False) to the input
  size, Gaussian sigma=4; image score = max of the map.

``per_level=True`` is ADPretrain's PaDiM† (spec 3.5): one Gaussian per level on its own grid with
all its channels (concatenating four 1024-d ViT levels would need 4096^2 covariances per position),
each level's distances bilinearly upsampled (align_corners=True) to the input, averaged, smoothed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import OFFLINE_DEFAULT, FeatureExtractor
from ._batches import image_batches, upsample_and_smooth
from ._tokens import level_maps, score_and_map

DEFAULT_FEATURES = {"wide_resnet50_2": 550, "resnet18": 100, OFFLINE_DEFAULT: 100}


class GaussianGrid(nn.Module):
    """One Gaussian per grid position, fitted by streaming (B, d, h, w) embeddings through
    :meth:`accumulate` (float64 sums), then :meth:`finish`. Buffers: ``mean`` (h, w, d) and
    ``inv_covariance`` (h, w, d, d), float32."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("inv_covariance", torch.empty(0))
        self._sums = None

    def accumulate(self, e: torch.Tensor) -> None:
        b, d, h, w = e.shape
        x = e.double().permute(2, 3, 0, 1).reshape(h * w, b, d)  # (positions, batch, d)
        total, outer = x.sum(1), torch.einsum("pbi,pbj->pij", x, x)
        if self._sums is None:
            self._sums = [0, total, outer, (h, w)]
        else:
            self._sums[1] += total
            self._sums[2] += outer
        self._sums[0] += b

    def finish(self, eps: float) -> None:
        count, total, outer, grid = self._sums or (0, None, None, None)
        self._sums = None
        if count < 2:
            raise ValueError(f"PaDiM needs at least 2 training images to estimate a covariance, got {count}")
        mean = total / count
        cov = (outer - count * torch.einsum("pi,pj->pij", mean, mean)) / (count - 1)
        cov += eps * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        self.mean = mean.float().reshape(*grid, -1)
        self.inv_covariance = torch.linalg.inv(cov).float().reshape(*grid, cov.shape[-1], cov.shape[-1])

    def distance(self, e: torch.Tensor) -> torch.Tensor:
        """(B, d, h, w) -> (B, h, w) Mahalanobis distances."""
        delta = e.permute(0, 2, 3, 1) - self.mean
        m2 = torch.einsum("bhwi,hwij,bhwj->bhw", delta, self.inv_covariance, delta)
        return m2.clamp_min(0).sqrt()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("mean", "inv_covariance"):  # data-dependent shapes
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class PaDiM(nn.Module):
    """PaDiM anomaly detector.

    Args:
        backbone, layers, weights: see :class:`fastad.backbones.FeatureExtractor`; ``backbone`` may
            also be a module mapping images to a list of (B, C_i, h_i, w_i) maps with a ``channels``
            list (e.g. ADPretrain's projected residual features), used as it is.
        n_features: channels kept (random subset); default from ``DEFAULT_FEATURES``, else all.
        per_level: one Gaussian per level with all its channels (ADPretrain's PaDiM†).
        eps: covariance regulariser (0.01).
        sigma: Gaussian smoothing of the map (4).
        seed: seed of the channel subset.
    Forward:
        images (B, 3, H, W) -> (scores (B,), maps (B, H, W)) float32.
    """

    def __init__(
        self,
        backbone: str | nn.Module = OFFLINE_DEFAULT,
        layers=(1, 2, 3),
        weights: str | None = None,
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
    def fit(self, data) -> "PaDiM":
        """Fit the per-position Gaussians on normal images (iterable of (B, 3, H, W) tensors or dicts
        with an 'image' entry)."""
        for images in image_batches(data, self.channel_index.device):
            for g, e in zip(self.gaussians, self._groups(images)):
                g.accumulate(e)
        for g in self.gaussians:
            g.finish(self.eps)
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> (image scores (B,), anomaly maps (B, H, W)), float32."""
        if self.gaussians[0].mean.numel() == 0:
            raise RuntimeError("PaDiM is not fitted: call fit() or load a checkpoint first")
        images = images.to(self.channel_index.device, torch.float32)
        size = tuple(images.shape[-2:])
        dist = [g.distance(e) for g, e in zip(self.gaussians, self._groups(images))]
        if self.per_level:
            maps = level_maps([d.flatten(1) for d in dist], [d.shape[-2:] for d in dist], size)
            return score_and_map(maps, self.sigma, smoothed_map=True)
        maps = upsample_and_smooth(dist[0], size, self.sigma)
        return maps.flatten(1).max(1).values, maps
