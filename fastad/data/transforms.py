"""Standard AD preprocessing: resize, center crop, ImageNet normalisation; masks follow the same
geometry (nearest resampling) and are binarised."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _resize_crop(img: Image.Image, resize: int, crop: int, resample) -> Image.Image:
    img = img.resize((resize, resize), resample)
    left = (resize - crop) // 2
    return img.crop((left, left, left + crop, left + crop))


class ImageTransform:
    """PIL image -> (3, crop, crop) float32 normalised tensor; PIL mask -> (crop, crop) float32 {0, 1}.

    Args:
        resize: square resize (256, as PatchCore/PaDiM).
        crop: center crop (224).
        mask_threshold: mask pixels >= this (0-255) are anomalous (128 binarises anti-aliased masks).
    """

    def __init__(self, resize: int = 256, crop: int = 224, mask_threshold: int = 128):
        if crop > resize:
            raise ValueError(f"crop ({crop}) must not exceed resize ({resize})")
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
