"""Standard AD preprocessing: resize, center crop, ImageNet normalisation; masks follow the same
geometry (nearest resampling) and are binarised."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pair(size, name: str = "size") -> tuple[int, int]:
    """An int or an (H, W) pair of positive ints -> (H, W)."""
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    try:
        h, w = (int(v) for v in size)
        ok = (h, w) == tuple(size) and h > 0 and w > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a positive int or an (H, W) pair of positive ints, got {size!r}")
    return h, w


def _resize_crop(img: Image.Image, resize: tuple[int, int], crop: tuple[int, int], resample) -> Image.Image:
    img = img.resize((resize[1], resize[0]), resample)  # PIL sizes are (W, H)
    top, left = (resize[0] - crop[0]) // 2, (resize[1] - crop[1]) // 2
    return img.crop((left, top, left + crop[1], top + crop[0]))


class ImageTransform:
    """PIL image -> (3, H, W) float32 normalised tensor; PIL mask -> (H, W) float32 {0, 1}, with
    (H, W) = ``crop``. Images are resized to ``resize`` (bilinear; masks nearest), ignoring the aspect
    ratio, then center-cropped.

    Args:
        resize: resize, an int (square) or (H, W) (256, as PatchCore/PaDiM).
        crop: center crop, an int or (H, W) (224); equal to ``resize``: no crop.
        mask_threshold: mask pixels >= this (0-255) are anomalous (128 binarises anti-aliased masks).
    """

    def __init__(self, resize: int | tuple[int, int] = 256, crop: int | tuple[int, int] = 224, mask_threshold: int = 128):
        resize, crop = pair(resize, "resize"), pair(crop, "crop")
        if crop[0] > resize[0] or crop[1] > resize[1]:
            raise ValueError(f"crop {crop} must not exceed resize {resize}")
        self.resize, self.crop, self.mask_threshold = resize, crop, mask_threshold
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def image(self, img: Image.Image) -> torch.Tensor:
        img = _resize_crop(img.convert("RGB"), self.resize, self.crop, Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - self.mean) / self.std

    def mask(self, mask: Image.Image) -> torch.Tensor:
        m = _resize_crop(mask.convert("L"), self.resize, self.crop, Image.NEAREST)
        return torch.from_numpy((np.asarray(m) >= self.mask_threshold).astype(np.float32))
