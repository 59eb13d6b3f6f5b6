"""Anomaly-map post-processing shared by the models: upsampling, smoothing, image scores."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...ops import gaussian_blur


def upsample_and_smooth(patch_maps: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """(B, h, w) patch scores -> (B, H, W): bilinear upsampling (align_corners=False) then the
    scipy-equivalent Gaussian (sigma=4 in PatchCore and PaDiM); sigma=0 skips smoothing."""
    maps = torch.nn.functional.interpolate(patch_maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False)
    maps = maps.squeeze(1)
    return gaussian_blur(maps, sigma) if sigma > 0 else maps


def cosine_distance_map(enc: list[torch.Tensor], dec: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Mean over levels of ``1 - cos(enc, dec)`` along channels, each level bilinearly upsampled to
    ``size`` with align_corners=True (Dinomaly and MiniMaxAD inference).

    Args:
        enc, dec: lists of (B, C_l, h_l, w_l) feature maps, pairwise of one shape.
    Returns:
        (B, H, W) float32.
    """
    maps = []
    for a, b in zip(enc, dec, strict=True):
        d = 1 - torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=1)
        maps.append(torch.nn.functional.interpolate(d.unsqueeze(1), size=size, mode="bilinear", align_corners=True))
    return torch.cat(maps, 1).mean(1)


def top_ratio_mean(maps: torch.Tensor, ratio: float = 0.01) -> torch.Tensor:
    """(B, H, W) -> (B,): mean of the ``int(H * W * ratio)`` largest values per map (at least one;
    Dinomaly and MiniMaxAD: ratio 0.01, i.e. 655 of 256 x 256 pixels)."""
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must lie in (0, 1], got {ratio}")
    flat = maps.flatten(1)
    k = max(1, int(flat.shape[1] * ratio))
    return flat.topk(k, dim=1).values.mean(1)


def level_maps(scores: list[torch.Tensor], grids: list[tuple[int, int]], size: tuple[int, int]) -> torch.Tensor:
    """Per-level token scores (B, H_l*W_l) -> (B, H, W): bilinear (align_corners=True) to ``size``,
    mean over levels."""
    maps = [F.interpolate(s.reshape(-1, 1, *g), size=size, mode="bilinear", align_corners=True) for s, g in zip(scores, grids)]
    return torch.cat(maps, 1).mean(1)


def score_and_map(maps: torch.Tensor, sigma: float, smoothed_map: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Image score = max of the Gaussian-smoothed (sigma, scipy style) map. FOD and RLR return the
    map unsmoothed, as their authors compute pixel metrics on it; FeatureNorm and PaDiM† return the
    smoothed one (``smoothed_map=True``). (B, H, W) -> ((B,), (B, H, W))."""
    smooth = gaussian_blur(maps, sigma) if sigma > 0 else maps
    return smooth.flatten(1).max(1).values, smooth if smoothed_map else maps
