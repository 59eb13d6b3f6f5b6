"""PatchCore (Roth et al., CVPR 2022) following the official amazon-science code (spec section 6).

Defaults are the official WideResNet-50 IM224 baseline recipe with the offline backbone:
- features of the stride-8 and stride-16 stages (``layers=(2, 3)``; WRN-50 layer2 + layer3),
  3x3 local neighbourhoods (unfold, padding 1); the coarser level is bilinearly resized to the finer
  grid slot by slot; each level's C*9 patch is ``adaptive_avg_pool1d``-ed to 1024, the two levels
  stacked and pooled to 1024 (``pretrain_embed_dim``, ``target_embed_dim``);
- greedy k-center coreset of 10% with a 128-d random projection (fastad.ops.greedy_coreset);
- patch score = mean squared L2 distance to the ``num_neighbors`` nearest bank entries (official: 1,
  squared, as FAISS returns it); image score = max patch score;
- map: bilinear to the input size, Gaussian sigma=4 (scipy's 33-tap filter).
Option ``reweight=True`` applies the paper's / anomalib's re-weighting of the image score with the
``reweight_neighbors=9`` bank neighbours of the nearest bank entry (Euclidean distances in the
softmax, as anomalib). The official code never re-weights, so it is off by default.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import OFFLINE_DEFAULT, FeatureExtractor
from ..ops import FeatureBank, greedy_coreset
from ._batches import image_batches, upsample_and_smooth


class PatchCore(nn.Module):
    """PatchCore anomaly detector.

    Args:
        backbone, layers, weights: see :class:`fastad.backbones.FeatureExtractor`; ``backbone`` may
            also be a module mapping images to a list of (B, C_i, h_i, w_i) maps (e.g. ADPretrain's
            projected residual features), used as it is.
        patch_size: local neighbourhood (3).
        pretrain_embed_dim, target_embed_dim: pooled per-level and final feature sizes (1024, 1024).
        coreset_ratio: fraction of patches kept (0.1; the IM320/ensemble configs use 0.01); 1.0 keeps all.
        projection_dim: dimension of the coreset's random projection (128).
        num_neighbors: nearest bank entries averaged into a patch score (official: 1).
        reweight, reweight_neighbors: anomalib-style image-score re-weighting (off, 9).
        sigma: Gaussian smoothing of the map (4).
        bank_backend: ``'torch'`` or ``'faiss'`` (see :class:`fastad.ops.FeatureBank`).
        seed: seed of the coreset projection and starting points.
    """

    def __init__(
        self,
        backbone: str | nn.Module = OFFLINE_DEFAULT,
        layers=(2, 3),
        weights: str | None = None,
        patch_size: int = 3,
        pretrain_embed_dim: int = 1024,
        target_embed_dim: int = 1024,
        coreset_ratio: float = 0.1,
        projection_dim: int = 128,
        num_neighbors: int = 1,
        reweight: bool = False,
        reweight_neighbors: int = 9,
        sigma: float = 4.0,
        bank_backend: str = "torch",
        seed: int = 0,
    ):
        super().__init__()
        self.backbone = backbone if isinstance(backbone, nn.Module) else FeatureExtractor(backbone, layers, weights)
        self.patch_size, self.pretrain_embed_dim, self.target_embed_dim = patch_size, pretrain_embed_dim, target_embed_dim
        self.coreset_ratio, self.projection_dim, self.seed = coreset_ratio, projection_dim, seed
        self.num_neighbors, self.reweight, self.reweight_neighbors = num_neighbors, reweight, reweight_neighbors
        self.sigma, self.bank_backend = sigma, bank_backend
        self.register_buffer("memory_bank", torch.empty(0, target_embed_dim))
        self._bank: FeatureBank | None = None

    @property
    def device(self) -> torch.device:
        return self.memory_bank.device

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, H, W) -> ((B, h*w, target_embed_dim) float32 patch features, (h, w) grid)."""
        feats = self.backbone(images)
        b = images.shape[0]
        h, w = feats[0].shape[-2:]
        p = self.patch_size
        pooled = []
        for f in feats:
            c, fh, fw = f.shape[1:]
            u = F.unfold(f, p, padding=p // 2).view(b, c * p * p, fh, fw)
            if (fh, fw) != (h, w):
                u = F.interpolate(u, size=(h, w), mode="bilinear", align_corners=False)
            u = u.permute(0, 2, 3, 1).reshape(b * h * w, 1, c * p * p)
            pooled.append(F.adaptive_avg_pool1d(u, self.pretrain_embed_dim))
        stacked = torch.cat(pooled, 1).reshape(b * h * w, 1, -1)
        out = F.adaptive_avg_pool1d(stacked, self.target_embed_dim).reshape(b, h * w, self.target_embed_dim)
        return out, (h, w)

    @torch.no_grad()
    def fit(self, data) -> "PatchCore":
        """Build the memory bank from normal images: an iterable of (B, 3, H, W) tensors or dicts
        with an 'image' entry (e.g. a DataLoader over a fastad dataset)."""
        feats = [self.embed(x)[0].reshape(-1, self.target_embed_dim) for x in image_batches(data, self.device)]
        if not feats:
            raise ValueError("fit() got no training images")
        feats = torch.cat(feats)
        if self.coreset_ratio < 1.0:
            keep = greedy_coreset(feats, ratio=self.coreset_ratio, projection_dim=self.projection_dim, seed=self.seed)
            feats = feats[keep]
        self.memory_bank = feats.contiguous()
        self._bank = None
        return self

    def _feature_bank(self) -> FeatureBank:
        if len(self.memory_bank) == 0:
            raise RuntimeError("PatchCore is not fitted: call fit() or load a checkpoint first")
        if self._bank is None or self._bank.device != self.device:
            self._bank = FeatureBank(self.target_embed_dim, self.bank_backend, device=self.device)
            self._bank.add(self.memory_bank)
        return self._bank

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> (image scores (B,), anomaly maps (B, H, W)), float32."""
        bank = self._feature_bank()
        images = images.to(self.device, torch.float32)
        emb, (h, w) = self.embed(images)
        b = emb.shape[0]
        dist, idx = bank.search(emb.reshape(-1, self.target_embed_dim), self.num_neighbors)
        patch = dist.mean(1).reshape(b, h * w)
        best, arg = patch.max(1)
        scores = self._reweight(emb, best, arg, idx[:, 0].reshape(b, h * w)) if self.reweight else best
        maps = upsample_and_smooth(patch.reshape(b, h, w), tuple(images.shape[-2:]), self.sigma)
        return scores, maps

    def _reweight(self, emb, best, arg, nearest):
        bank = self._feature_bank()
        rows = torch.arange(emb.shape[0], device=emb.device)
        worst_feat = emb[rows, arg]  # most anomalous test patch per image
        anchor = self.memory_bank[nearest[rows, arg]]  # its nearest bank entry
        k = min(self.reweight_neighbors, len(self.memory_bank))
        _, support = bank.search(anchor, k)
        d = torch.linalg.vector_norm(worst_feat.unsqueeze(1) - self.memory_bank[support], dim=-1)
        return (1.0 - torch.softmax(d, 1)[:, 0]) * best

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the bank size is data dependent: resize the buffer before loading it
        key = prefix + "memory_bank"
        if key in state_dict:
            self.memory_bank = torch.empty_like(state_dict[key], device=self.memory_bank.device)
            self._bank = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
