"""AUPRO: area under the per-region-overlap curve up to a false-positive rate of 0.3, normalised
(MVTec AD paper; anomalib's AUPRO). Regions are the 8-connected components of each ground-truth mask,
labelled once for the whole test set."""
from __future__ import annotations

import numpy as np
import scipy.ndimage
import torch

from .ranking import RankedScores

__all__ = ["aupro", "aupro_reference", "label_regions", "pro_after"]


def label_regions(masks: torch.Tensor) -> tuple[torch.Tensor, int]:
    """8-connected components of every (H, W) mask in ``masks`` (N, H, W), numbered 1..R across the
    whole set (0 = normal). Returns (int64 labels of the masks' shape, R)."""
    if masks.dim() != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {tuple(masks.shape)}")
    m = masks.detach().bool().cpu()
    hit = m.flatten(1).any(1)  # label only the images that have a region
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-connectivity inside an image, none across images
    some, n = scipy.ndimage.label(m[hit].numpy(), structure=structure)
    labels = torch.zeros(m.shape, dtype=torch.int64)
    labels[hit] = torch.from_numpy(some.astype(np.int64))
    return labels, int(n)


def _check_limit(fpr_limit: float) -> None:
    if isinstance(fpr_limit, bool) or not isinstance(fpr_limit, (int, float)) or not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}")


def _area(fpr: torch.Tensor, pro: torch.Tensor, limit: float) -> float:
    """Trapezoid area under pro(fpr) from 0 to ``limit`` (linear at the cut), divided by ``limit``."""
    j = int(torch.searchsorted(fpr, torch.tensor([limit], dtype=fpr.dtype, device=fpr.device), right=True))
    area = torch.trapezoid(pro[:j], fpr[:j]) if j > 1 else fpr.new_zeros(())
    if j < fpr.numel():  # the segment that crosses the limit
        x0, x1, y0, y1 = fpr[j - 1], fpr[j], pro[j - 1], pro[j]
        y = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area = area + (limit - x0) * (y0 + y) / 2
    return float(area) / limit


def aupro(
    maps: torch.Tensor,
    masks: torch.Tensor,
    fpr_limit: float = 0.3,
    *,
    ranked: RankedScores | None = None,
    regions: tuple[torch.Tensor, int] | None = None,
) -> float:
    """Normalised area under the PRO curve for false-positive rates up to ``fpr_limit``, exact (every
    distinct score is a threshold).

    Args:
        maps: (N, H, W) floating anomaly maps, finite.
        masks: (N, H, W) ground truth, bool or {0, 1}.
        fpr_limit: integration limit of the false-positive rate, in (0, 1].
        ranked: the pixels already sorted (``RankedScores(maps, masks)``), to share one sort.
        regions: ``label_regions(masks)``, to share one labelling.
    Returns:
        AUPRO in [0, 1] as a Python float.
    Raises:
        ValueError: shapes differ, no anomalous or no normal pixel, bad values.
    """
    _check_limit(fpr_limit)
    if tuple(maps.shape) != tuple(masks.shape):
        raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(masks.shape)} must have one shape")
    ranked = ranked if ranked is not None else RankedScores(maps, masks)
    ranked._need_both("AUPRO")
    tp, fp = ranked.counts()
    pro = pro_after(ranked, regions if regions is not None else label_regions(masks))[tp.long()]
    return _area(fp / ranked.n_neg, pro, fpr_limit)


def pro_after(ranked: RankedScores, regions: tuple[torch.Tensor, int]) -> torch.Tensor:
    """(n_pos + 1,) float64: the per-region overlap once the k highest-scoring anomalous pixels of
    ``ranked`` are predicted anomalous, k = 0 .. n_pos (``regions``: :func:`label_regions` of the masks)."""
    labels, n_regions = regions
    # region of every anomalous pixel, in the sorted order; each adds 1 / (|region| * R) to the PRO
    lab = labels.reshape(-1).to(ranked.order.device)[ranked.order[ranked.labels]]
    weight = 1.0 / (torch.bincount(lab).double()[lab] * n_regions)
    return torch.cat([weight.new_zeros(1), torch.cumsum(weight, 0)])


def aupro_reference(maps: torch.Tensor, masks: torch.Tensor, fpr_limit: float = 0.3) -> float:
    """Oracle of :func:`aupro`: for every distinct score t, thresholds the maps at t and measures the
    false-positive rate and the mean overlap of each region, then integrates with numpy. O(T * pixels):
    small inputs only."""
    _check_limit(fpr_limit)
    s = maps.detach().double().cpu().numpy()
    gt = masks.detach().bool().cpu().numpy()
    labels, n = label_regions(masks)
    labels = labels.numpy()
    regions = [labels == r for r in range(1, n + 1)]
    xs, ys = [0.0], [0.0]
    for t in np.unique(s)[::-1]:
        pred = s >= t
        xs.append((pred & ~gt).sum() / (~gt).sum())
        ys.append(np.mean([(pred & r).sum() / r.sum() for r in regions]))
    xs, ys = np.array(xs), np.array(ys)
    i = int(np.nonzero(xs <= fpr_limit)[0][-1])  # the last point inside the limit
    x, y = list(xs[: i + 1]), list(ys[: i + 1])
    if xs[i] < fpr_limit:  # cut the next segment at the limit
        x.append(fpr_limit)
        y.append(ys[i] + (ys[i + 1] - ys[i]) * (fpr_limit - xs[i]) / (xs[i + 1] - xs[i]))
    return float(np.trapezoid(y, x) / fpr_limit)
