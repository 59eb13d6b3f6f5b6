"""Per-position Gaussians of feature maps (PaDiM, and FeatureNorm's PaDiM scorer)."""
from __future__ import annotations

import torch
from torch import nn

from ... import distributed
from .maps import level_maps, score_and_map

__all__ = ["GaussianGrid", "per_level_maps"]


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

    def finish(self, eps: float, group=None) -> None:
        """Mean and inverse covariance from the accumulated sums (with ``group``: all ranks' sums)."""
        count, total, outer, grid = self._sums or (0, None, None, None)
        self._sums = None
        if distributed.active(group):
            if total is None:
                raise ValueError(f"rank {distributed.rank(group)} got no training image: PaDiM needs at least one "
                                 "image per process (use fewer processes)")
            device = distributed.collective_device(group)
            sums = [torch.tensor([float(count)], dtype=torch.float64, device=device), total.to(device), outer.to(device)]
            for t in sums:
                torch.distributed.all_reduce(t, group=group)
            count, total, outer = int(sums[0]), sums[1].to(total.device), sums[2].to(outer.device)
        if count < 2:
            raise ValueError(f"PaDiM needs at least 2 training images to estimate a covariance, got {count}")
        mean = total / count
        cov = (outer - count * torch.einsum("pi,pj->pij", mean, mean)) / (count - 1)
        cov += eps * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        self.mean = mean.float().reshape(*grid, -1)
        # contiguous: linalg.inv returns column-major strides, and a loaded copy must give the same einsum path
        self.inv_covariance = torch.linalg.inv(cov).float().reshape(*grid, cov.shape[-1], cov.shape[-1]).contiguous()

    def distance(self, e: torch.Tensor) -> torch.Tensor:
        """(B, d, h, w) -> (B, h, w) Mahalanobis distances."""
        delta = e.permute(0, 2, 3, 1) - self.mean
        m2 = torch.einsum("bhwi,hwij,bhwj->bhw", delta, self.inv_covariance, delta)
        return m2.clamp_min(0).sqrt()


def per_level_maps(grids, feats: list[torch.Tensor], size: tuple[int, int], sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """ADPretrain's PaDiM†: each level's Mahalanobis distances (``grids[l]`` on (B, C_l, h_l, w_l)
    ``feats[l]``) bilinearly upsampled (align_corners=True) to ``size``, averaged, Gaussian ``sigma``;
    returns (max of the smoothed map (B,), smoothed map (B, H, W))."""
    dist = [g.distance(e) for g, e in zip(grids, feats, strict=True)]
    maps = level_maps([d.flatten(1) for d in dist], [d.shape[-2:] for d in dist], size)
    return score_and_map(maps, sigma, smoothed_map=True)
