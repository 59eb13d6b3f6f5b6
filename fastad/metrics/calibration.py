"""What a fitted model keeps from its evaluation to label new images, as anomalib's post-processor does:
the image-level F1-optimal threshold, the min-max statistics of the test scores (and of the maps, with
the pixel F1-optimal threshold when pixel ground truth exists), and anomalib's normalisation.

``normalise(x, threshold, lo, hi) = clip((x - threshold) / (hi - lo) + 0.5, 0, 1)``: the threshold
maps to 0.5, so ``normalised >= 0.5`` is the label at the threshold (anomalib's
``normalize_anomaly_score``, min-max statistics of the set the threshold was chosen on).
"""
from __future__ import annotations

import math

import torch

from .ranking import RankedScores

__all__ = ["calibrate", "normalise"]


def calibrate(scores: torch.Tensor, labels: torch.Tensor, maps: torch.Tensor | None = None,
              masks: torch.Tensor | None = None, has_mask: torch.Tensor | None = None) -> dict:
    """Thresholds and min-max statistics of an evaluated test set.

    Args:
        scores: (N,) floating image scores; labels: (N,) bool or {0, 1} (1 = anomalous).
        maps: (N, H, W) floating anomaly maps and masks: (N, H, W) {0, 1} ground truth, optional;
        has_mask: (N,) bool, the images whose mask is ground truth (default all).
    Returns:
        a JSON-able dict: ``image_threshold`` (the F1-optimal score, anomalous = score >= it; None
        without both normal and anomalous images), ``image_min`` / ``image_max`` (of the scores),
        ``pixel_threshold`` (F1-optimal over the pixels of the masked images; None without anomalous
        pixels or maps), ``map_min`` / ``map_max`` (None without maps), ``n_images``.
    """
    scores = scores.detach().double().reshape(-1)
    if scores.numel() == 0 or not torch.isfinite(scores).all():
        raise ValueError(f"calibrate needs finite scores, got {scores.numel()} with "
                         f"{int((~torch.isfinite(scores)).sum())} non-finite")
    ranked = RankedScores(scores, labels.reshape(-1))
    out = {"image_threshold": None, "image_min": float(scores.min()), "image_max": float(scores.max()),
           "pixel_threshold": None, "map_min": None, "map_max": None, "n_images": int(scores.numel())}
    if ranked.n_pos and ranked.n_neg:
        out["image_threshold"] = float(ranked.f1_max_threshold()[1])
    if maps is not None:
        maps = maps.detach().double()
        out.update(map_min=float(maps.min()), map_max=float(maps.max()))
        keep = torch.ones(len(maps), dtype=torch.bool) if has_mask is None else has_mask.bool().cpu()
        if masks is not None and keep.any():
            pixels = RankedScores(maps[keep], masks[keep].cpu() > 0.5)
            if pixels.n_pos and pixels.n_neg:
                out["pixel_threshold"] = float(pixels.f1_max_threshold()[1])
    return out


def normalise(x: torch.Tensor, threshold: float, lo: float, hi: float) -> torch.Tensor:
    """anomalib's min-max normalisation around a threshold: ``clip((x - threshold) / (hi - lo) + 0.5, 0, 1)``
    (``hi == lo``: 0.5 plus the sign of ``x - threshold``, clipped), in ``x``'s dtype (float64 math)."""
    span = hi - lo
    if not math.isfinite(span) or span < 0:
        raise ValueError(f"normalise needs statistics with hi >= lo, got lo={lo}, hi={hi}")
    d = x.double() - threshold
    y = d / span + 0.5 if span > 0 else torch.sign(d) + 0.5
    return y.clamp(0, 1).to(x.dtype if x.is_floating_point() else torch.float64)
