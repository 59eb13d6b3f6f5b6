"""Shared helpers of the embedding models."""
from __future__ import annotations

from collections.abc import Iterable

import torch


def image_batches(data: Iterable, device) -> Iterable[torch.Tensor]:
    """Yields (B, 3, H, W) float tensors on ``device`` from tensors, or dicts with an 'image' entry
    (what fastad's datasets and DataLoaders produce)."""
    if isinstance(data, torch.Tensor):
        data = [data]
    for batch in data:
        images = batch["image"] if isinstance(batch, dict) else batch
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"expected image batches of shape (B, 3, H, W), got {shape}")
        yield images.to(device, torch.float32)


def upsample_and_smooth(patch_maps: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """(B, h, w) patch scores -> (B, H, W): bilinear upsampling (align_corners=False) then the
    scipy-equivalent Gaussian (sigma=4 in PatchCore and PaDiM); sigma=0 skips smoothing."""
    from ..ops import gaussian_blur

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
