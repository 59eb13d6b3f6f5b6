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
