"""Standard AD preprocessing: resize, center crop, ImageNet normalisation; masks follow the same
geometry (nearest resampling) and are binarised.

Image modes are converted explicitly: 16-bit and 32-bit integer images (PIL modes ``I;16*``, ``I``)
are scaled by 255 / 65535 to 8 bits (the full 16-bit range: rescale 10- or 12-bit data first if it
should fill the range), float images (``F``) are taken as [0, 1] if their maximum is at most 1, else
as [0, 255]; then greyscale is repeated to three channels, palettes are expanded and an alpha channel
is dropped (``RGBA``, ``LA``: the colour values are kept, not composited)."""
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


def eight_bit(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer and float greyscale images -> 8-bit ``L`` (module docstring); other
    modes unchanged."""
    if img.mode.startswith("I"):
        arr = np.asarray(img).astype(np.float64) * (255.0 / 65535.0)
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = arr * 255.0 if arr.size and np.nanmax(arr) <= 1.0 else arr
    else:
        return img
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit ``RGB`` (module docstring: alpha dropped, greyscale repeated)."""
    img = eight_bit(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
    return img.convert("RGB")


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
        img = _resize_crop(to_rgb(img), self.resize, self.crop, Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - self.mean) / self.std

    def mask(self, mask: Image.Image) -> torch.Tensor:
        m = _resize_crop(eight_bit(mask).convert("L"), self.resize, self.crop, Image.NEAREST)
        return torch.from_numpy((np.asarray(m) >= self.mask_threshold).astype(np.float32))
