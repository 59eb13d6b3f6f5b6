"""Evaluation protocols: how images are resized and how pixel ground truth is made, per method.

Each method's official code prepares images and masks its own way, which changes the pixel metrics
(P-AUROC, P-AP, P-F1max, AUPRO) though not the formulas; a number is comparable with a paper's table
only under that paper's protocol. Two protocols exist:

- ``'fastad'`` (the default of ``fastad run``): one rule for every method, so that methods compare
  with each other: bilinear resize ignoring the aspect ratio, masks resized nearest and positive
  where >= 128, metrics at the model's input size;
- ``'official'``: each method's own code, as read in the authors' repositories (``source`` says
  where), for the models that have one.

A protocol is data: the image filter, the aspect rule, the mask filter and threshold, and the size
at which pixel metrics are computed (``eval_size``: maps resized bilinearly, masks nearest, as
Dinomaly's evaluation does). :meth:`Protocol.transform` is the :class:`ImageTransform` of a model's
sizes; :func:`fastad.engine.score` applies ``eval_size``.
"""
from __future__ import annotations

from dataclasses import dataclass

from .transforms import ImageTransform

__all__ = ["OFFICIAL", "Protocol", "protocol_for"]


@dataclass(frozen=True)
class Protocol:
    """One method's preprocessing and pixel ground-truth rule (module docstring).

    Attributes:
        name: ``'fastad'`` or ``'official'``.
        resample: image filter (:data:`fastad.data.transforms.RESAMPLING`).
        aspect: ``'squash'`` or ``'keep'`` (short side to the resize size, then the centre crop).
        mask_resample: ``'nearest'`` or ``'bilinear'``.
        mask_threshold: a resized 8-bit mask pixel is positive where >= this (1: any value > 0;
            255: only pixels that stay fully on).
        eval_size: pixel metrics at this square size (None: the model's input size).
        source: where the rule comes from.
    """

    name: str
    resample: str
    aspect: str
    mask_resample: str
    mask_threshold: int
    eval_size: int | None
    source: str

    def transform(self, resize: tuple[int, int], crop: tuple[int, int]) -> ImageTransform:
        """The :class:`ImageTransform` of this protocol for a model's resize and crop sizes."""
        return ImageTransform(resize, crop, self.mask_threshold, resample=self.resample, aspect=self.aspect,
                              mask_resample=self.mask_resample)

    def describe(self) -> str:
        """One line for results tables."""
        rule = {1: "> 0", 255: "== 255"}.get(self.mask_threshold, f">= {self.mask_threshold}")
        where = f"; pixel metrics at {self.eval_size}x{self.eval_size} (maps bilinear, masks nearest)" if self.eval_size else ""
        return (f"{self.name}: images {self.resample}, aspect {self.aspect}; masks {self.mask_resample}, positive where "
                f"{rule} (8-bit){where} [{self.source}]")


FASTAD = Protocol("fastad", "bilinear", "squash", "nearest", 128, None, "fastad's one rule for every method")

# (fastad's registry name) -> the official rules, from the authors' data and evaluation code
OFFICIAL: dict[str, Protocol] = {
    "patchcore": Protocol(
        "official", "bilinear", "keep", "bilinear", 255, None,
        "amazon-science/patchcore-inspection datasets/mvtec.py: Resize(256) + CenterCrop(224) on images and masks; "
        "metrics cast the [0, 1] mask to int, so only pixels that stay 1.0 are positive"),
    "dinomaly": Protocol(
        "official", "bilinear", "squash", "bilinear", 1, 256,
        "guojiajeremy/Dinomaly dataset.py get_data_transforms + utils.py evaluation_batch(resize_mask=256): masks "
        "Resize((448, 448)) + CenterCrop(392), then nearest to 256 and gt.bool(); maps bilinear to 256"),
    "minimaxad": Protocol(
        "official", "bilinear", "squash", "bilinear", 128, None,
        "WangFengJiee/MiniMaxAD dataset.py: Resize((256, 256)) on images and masks, gt > 0.5"),
    "fod": Protocol(
        "official", "lanczos", "squash", "nearest", 1, None,
        "xcyao00/FOD datasets/mvtec.py: Resize((256, 256), ANTIALIAS) images, Resize(NEAREST) masks, np.bool"),
    "featurenorm": Protocol(
        "official", "bicubic", "keep", "nearest", 1, None,
        "xcyao00/ADPretrain datasets/mvtec.py: Resize(224, BICUBIC) + CenterCrop(224), masks Resize(NEAREST), astype(bool)"),
}
OFFICIAL["adpretrain"] = OFFICIAL["featurenorm"]
# RLR's code (no license) was not read here: spec 2.1 records its image resize (ANTIALIAS, as FOD's);
# its mask rule is unverified, so RLR has no official protocol until someone checks it.


def protocol_for(model: str, name: str = "fastad") -> Protocol:
    """The protocol ``name`` (``'fastad'`` or ``'official'``) of the registered model ``model``.
    Raises ValueError for an unknown name or a model without an official protocol."""
    if name == "fastad":
        return FASTAD
    if name != "official":
        raise ValueError(f"protocol must be 'fastad' or 'official', got {name!r}")
    try:
        return OFFICIAL[model]
    except KeyError:
        have = ", ".join(sorted(OFFICIAL))
        raise ValueError(f"{model} has no official protocol in fastad (models with one: {have}); "
                         "use --protocol fastad") from None
