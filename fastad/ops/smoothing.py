"""Gaussian smoothing of anomaly maps, equal to ``scipy.ndimage.gaussian_filter`` (mode 'reflect',
truncate 4.0: a 33-tap kernel for sigma=4) but batched, in torch, on any device."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_tensor

__all__ = ["gaussian_blur", "gaussian_blur_small"]


def _kernel(sigma: float, truncate: float, dtype, device) -> torch.Tensor:
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return (w / w.sum()).to(dtype=dtype, device=device)


def _reflect_index(n: int, radius: int, device) -> torch.Tensor:
    # scipy 'reflect' (d c b a | a b c d | d c b a), folded again when radius > n
    i = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(i < n, i, 2 * n - 1 - i)


def gaussian_blur(maps: torch.Tensor, sigma: float = 4.0, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur over the last two axes.

    Args:
        maps: (..., H, W) floating tensor (e.g. (B, H, W) anomaly maps).
        sigma: standard deviation in pixels (> 0).
        truncate: kernel radius in sigmas, as scipy.
    Returns:
        Tensor of the same shape and dtype.
    """
    check_tensor("maps", maps, finite=False)
    if maps.dim() < 2:
        raise ValueError(f"maps must be (..., H, W), got shape {tuple(maps.shape)}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    shape = maps.shape
    h, w = shape[-2:]
    x = maps.reshape(-1, 1, h, w)
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    k = _kernel(sigma, truncate, work.dtype, work.device)
    r = (k.numel() - 1) // 2
    work = work[..., _reflect_index(h, r, work.device), :]
    work = F.conv2d(work, k.view(1, 1, -1, 1))
    work = work[..., _reflect_index(w, r, work.device)]
    work = F.conv2d(work, k.view(1, 1, 1, -1))
    return work.to(maps.dtype).reshape(shape)


def gaussian_blur_small(maps: torch.Tensor, kernel_size: int = 5, sigma: float = 4.0) -> torch.Tensor:
    """Dinomaly's / MiniMaxAD's map smoothing: one ``kernel_size`` x ``kernel_size`` Gaussian
    (normalised to sum 1) applied with zero padding, so borders darken; much weaker than
    :func:`gaussian_blur` at the same sigma.

    Args:
        maps: (..., H, W) floating tensor.
    Returns:
        Tensor of the same shape and dtype.
    """
    check_tensor("maps", maps, finite=False)
    if maps.dim() < 2:
        raise ValueError(f"maps must be (..., H, W), got shape {tuple(maps.shape)}")
    if kernel_size < 1 or kernel_size % 2 == 0 or not sigma > 0:
        raise ValueError(f"need an odd kernel_size >= 1 and sigma > 0, got {kernel_size} and {sigma}")
    shape = maps.shape
    x = maps.reshape(-1, 1, *shape[-2:])
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    r = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    k = torch.exp(-(r.view(-1, 1) ** 2 + r.view(1, -1) ** 2) / (2 * sigma**2))
    k = (k / k.sum()).to(work.dtype).to(work.device)
    out = F.conv2d(work, k.view(1, 1, kernel_size, kernel_size), padding=kernel_size // 2)
    return out.to(maps.dtype).reshape(shape)
