"""Standard AD preprocessing: resize, center crop, ImageNet normalisation; masks follow the same
geometry and are binarised. The resampling filters, the aspect rule and the mask rule are options,
so that each method's official preprocessing (:mod:`fastad.data.protocols`) is one
:class:`ImageTransform`; the defaults are fastad's (bilinear, squash to the resize size, masks
nearest and positive from 128).

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


_DEVICE_STATS: dict = {}


def _on_device(mean: torch.Tensor, std: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``std`` on ``device``, copied there once (a host-to-device copy of pageable memory
    would wait for the device at every batch)."""
    if device.type == "cpu":
        return mean, std
    key = (str(device), tuple(mean.flatten().tolist()), tuple(std.flatten().tolist()))
    if key not in _DEVICE_STATS:
        _DEVICE_STATS[key] = (mean.to(device), std.to(device))
    return _DEVICE_STATS[key]


RESAMPLING = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}
ASPECTS = ("squash", "keep")


def resized_size(width: int, height: int, resize: tuple[int, int], aspect: str) -> tuple[int, int]:
    """(W, H) an image of ``width`` x ``height`` is resized to: ``resize`` (H, W) itself (``'squash'``),
    or with its aspect ratio kept (``'keep'``) at the smallest size covering ``resize``; for a square
    ``resize`` that is torchvision's ``Resize(int)``: the short side to the size, the long side
    ``int(size * long / short)``."""
    if aspect == "squash":
        return resize[1], resize[0]
    scale_h, scale_w = resize[0] / height, resize[1] / width
    if scale_w >= scale_h:  # the width is the (relatively) short side
        return resize[1], max(resize[0], int(resize[1] * height / width))
    return max(resize[1], int(resize[0] * width / height)), resize[0]


def _resize_crop(img: Image.Image, resize: tuple[int, int], crop: tuple[int, int], resample: int, aspect: str) -> Image.Image:
    w, h = resized_size(img.size[0], img.size[1], resize, aspect)
    img = img.resize((w, h), resample)
    # torchvision's CenterCrop offsets: int(round(d / 2)) (round half to even)
    top, left = int(round((h - crop[0]) / 2.0)), int(round((w - crop[1]) / 2.0))
    return img.crop((left, top, left + crop[1], top + crop[0]))


class ImageTransform:
    """PIL image -> (3, H, W) float32 normalised tensor; PIL mask -> (H, W) float32 {0, 1}, with
    (H, W) = ``crop``. Images are resized (``resample``) to ``resize`` ignoring the aspect ratio
    (``aspect='squash'``) or keeping it (``'keep'``: :func:`resized_size`), then center-cropped to
    ``crop``; masks take the same geometry with ``mask_resample`` and are positive where their 8-bit
    value is >= ``mask_threshold``.

    Args:
        resize: resize, an int (square) or (H, W) (256, as PatchCore/PaDiM).
        crop: center crop, an int or (H, W) (224); equal to ``resize`` with ``aspect='squash'``: no crop.
        mask_threshold: mask pixels >= this (0-255) are anomalous: 128 (default) binarises anti-aliased
            masks at half height, 1 is "any value > 0", 255 "only pixels that stay fully on".
        resample: image filter, ``'bilinear'`` (default), ``'bicubic'``, ``'lanczos'`` or ``'nearest'``.
        aspect: ``'squash'`` (default) or ``'keep'``.
        mask_resample: mask filter, ``'nearest'`` (default) or ``'bilinear'``.
    """

    def __init__(self, resize: int | tuple[int, int] = 256, crop: int | tuple[int, int] = 224, mask_threshold: int = 128,
                 *, resample: str = "bilinear", aspect: str = "squash", mask_resample: str = "nearest"):
        resize, crop = pair(resize, "resize"), pair(crop, "crop")
        if crop[0] > resize[0] or crop[1] > resize[1]:
            raise ValueError(f"crop {crop} must not exceed resize {resize}")
        for name, value in (("resample", resample), ("mask_resample", mask_resample)):
            if value not in RESAMPLING:
                raise ValueError(f"{name} must be one of {sorted(RESAMPLING)}, got {value!r}")
        if aspect not in ASPECTS:
            raise ValueError(f"aspect must be one of {ASPECTS}, got {aspect!r}")
        if isinstance(mask_threshold, bool) or not isinstance(mask_threshold, int) or not 1 <= mask_threshold <= 255:
            raise ValueError(f"mask_threshold must be an int in [1, 255], got {mask_threshold!r}")
        self.resize, self.crop, self.mask_threshold = resize, crop, mask_threshold
        self.resample, self.aspect, self.mask_resample = resample, aspect, mask_resample
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def with_sizes(self, resize, crop) -> "ImageTransform":
        """The same rules at other sizes."""
        return ImageTransform(resize, crop, self.mask_threshold, resample=self.resample, aspect=self.aspect,
                              mask_resample=self.mask_resample)

    def describe(self) -> dict:
        """Every setting that decides the pixels (the key of :mod:`fastad.data.cache`)."""
        return {"resize": list(self.resize), "crop": list(self.crop), "mask_threshold": self.mask_threshold,
                "resample": self.resample, "aspect": self.aspect, "mask_resample": self.mask_resample}

    def image_pixels(self, img: Image.Image) -> np.ndarray:
        """The model-ready image before normalisation: (H, W, 3) uint8 after resize and crop."""
        img = _resize_crop(to_rgb(img), self.resize, self.crop, RESAMPLING[self.resample], self.aspect)
        return np.asarray(img, dtype=np.uint8)

    def mask_pixels(self, mask: Image.Image) -> np.ndarray:
        """The binarised mask: (H, W) uint8 in {0, 1}."""
        m = _resize_crop(eight_bit(mask).convert("L"), self.resize, self.crop, RESAMPLING[self.mask_resample], self.aspect)
        return (np.asarray(m) >= self.mask_threshold).astype(np.uint8)

    def normalise(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(..., H, W, 3) uint8 pixels -> (..., 3, H, W) float32 normalised, on the pixels' device.
        The same float32 operations (divide by 255, subtract the mean, divide by the std) on any
        device and batch shape, so a cached, batched or GPU-side image equals :meth:`image`'s bit for bit."""
        if isinstance(pixels, np.ndarray) and not pixels.flags.writeable:  # PIL's arrays are read-only
            pixels = pixels.copy()
        x = torch.as_tensor(pixels).to(torch.float32).div_(255.0).movedim(-1, -3)  # in place: one allocation
        mean, std = _on_device(self.mean, self.std, x.device)
        return x.sub_(mean).div_(std)

    def image(self, img: Image.Image) -> torch.Tensor:
        """PIL image -> (3, H, W) float32 normalised."""
        return self.normalise(self.image_pixels(img))

    def mask(self, mask: Image.Image) -> torch.Tensor:
        """PIL mask -> (H, W) float32 in {0, 1}."""
        return torch.from_numpy(self.mask_pixels(mask).astype(np.float32))
