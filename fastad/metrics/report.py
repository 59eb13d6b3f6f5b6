"""All seven benchmark metrics of a test set at once, plus their mean (mAD)."""
from __future__ import annotations

import math
import warnings

import torch

from .aupro import aupro, label_regions
from .ranking import RankedScores

METRICS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")


def _undefined(level: str, ranked: RankedScores) -> bool:
    if ranked.n_pos and ranked.n_neg:
        return False
    warnings.warn(
        f"{level} metrics are undefined with {ranked.n_pos} anomalous and {ranked.n_neg} normal "
        f"{'images' if level == 'image' else 'pixels'}: reported as NaN",
        RuntimeWarning,
        stacklevel=3,
    )
    return True


def compute_metrics(
    image_scores: torch.Tensor,
    image_labels: torch.Tensor,
    maps: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
    fpr_limit: float = 0.3,
    has_mask: torch.Tensor | None = None,
) -> dict[str, float]:
    """Image AUROC/AP/F1-max, pixel AUROC/AP/F1-max/AUPRO and ``mad`` (the mean of those defined).

    The pixels are sorted once and their regions labelled once for all pixel metrics. A level whose
    ground truth has a single class gives NaN with a RuntimeWarning (as scikit-learn does for AP);
    without ``maps`` the pixel metrics are NaN and ``mad`` is the mean of the image metrics.

    Args:
        image_scores: (N,) floating image scores; image_labels: (N,) bool or {0, 1}.
        maps: (N, H, W) floating anomaly maps; masks: (N, H, W) ground truth, bool or {0, 1}.
        fpr_limit: AUPRO's integration limit.
        has_mask: (N,) bool, the images whose mask is ground truth (default all); the pixel metrics
            are computed over these only (anomalous images without a pixel mask are left out), NaN
            when none is left.
    Returns:
        dict of the seven metrics and ``mad``, Python floats.
    """
    out = dict.fromkeys(METRICS, math.nan)
    img = RankedScores(image_scores, image_labels)
    if not _undefined("image", img):
        out.update(image_auroc=img.auroc(), image_ap=img.average_precision(), image_f1max=img.f1_max())
    if (maps is None) != (masks is None):
        raise ValueError("give both maps and masks, or neither")
    if maps is not None:
        if maps.dim() != 3 or tuple(maps.shape) != tuple(masks.shape):
            raise ValueError(f"maps and masks must both be (N, H, W), got {tuple(maps.shape)} and {tuple(masks.shape)}")
        if maps.shape[0] != img.labels.numel():
            raise ValueError(f"{maps.shape[0]} maps for {img.labels.numel()} image scores")
        if has_mask is not None:
            keep = torch.as_tensor(has_mask, dtype=torch.bool, device=maps.device).reshape(-1)
            if keep.numel() != maps.shape[0]:
                raise ValueError(f"has_mask has {keep.numel()} entries for {maps.shape[0]} maps")
            maps, masks = maps[keep], masks[keep.to(masks.device)]
        px = RankedScores(maps, masks) if maps.shape[0] else None
        if px is not None and not _undefined("pixel", px):
            out.update(
                pixel_auroc=px.auroc(),
                pixel_ap=px.average_precision(),
                pixel_f1max=px.f1_max(),
                pixel_aupro=aupro(maps, masks, fpr_limit, ranked=px, regions=label_regions(masks)),
            )
    defined = [v for v in out.values() if not math.isnan(v)]
    out["mad"] = sum(defined) / len(defined) if defined else math.nan
    return out
