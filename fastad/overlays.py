"""Anomaly-map overlays for a quick look at a run: image, map over image, ground truth (PNG)."""
from __future__ import annotations

import os

import torch

from .data.transforms import IMAGENET_MEAN, IMAGENET_STD


def pick_examples(scores: torch.Tensor, labels: torch.Tensor, n: int = 4) -> list[int]:
    """Indices of the ``n - 1`` highest-scoring anomalous images and the highest-scoring normal one
    (the hardest false-positive candidate)."""
    order = torch.argsort(scores, descending=True).tolist()
    anomalous = [i for i in order if labels[i]][: max(n - 1, 0)]
    normal = [i for i in order if not labels[i]][:1]
    return anomalous + normal


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_overlay(image: torch.Tensor, amap: torch.Tensor, path: str, *, title: str, lo: float, hi: float,
                 mask: torch.Tensor | None = None, mask_title: str = "") -> str:
    """One PNG: the image, the anomaly map over it (colour scale ``lo``..``hi``) and, with ``mask``,
    the ground truth. ``image``: (3, H, W) ImageNet-normalised float; ``amap``: (h, w) (a map at
    another size is stretched over the image); ``mask``: (H, W). Returns ``path``."""
    plt = pyplot()
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = (image.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    fig, axes = plt.subplots(1, 3 if mask is not None else 2, figsize=(9 if mask is not None else 6, 3.2))
    axes[0].imshow(pixels)
    axes[0].set_title("image")
    axes[1].imshow(pixels)
    h, w = pixels.shape[:2]
    axes[1].imshow(amap.float().cpu().numpy(), cmap="jet", alpha=0.5, vmin=lo, vmax=hi, extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    axes[1].set_title(title)
    if mask is not None:
        axes[2].imshow(mask.cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        axes[2].set_title(mask_title)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def save_overlays(test_set, scores: torch.Tensor, maps: torch.Tensor, labels: torch.Tensor, out_dir: str, prefix: str, n: int = 4) -> list[str]:
    """Writes one PNG per picked test image to ``out_dir``; returns their paths.

    Args:
        test_set: the dataset the predictions come from (its items' ``image`` and ``mask`` are shown).
        scores: (N,) image scores; maps: (N, H, W) anomaly maps; labels: (N,) 0/1.
        prefix: file name prefix (the class name).
    """
    os.makedirs(out_dir, exist_ok=True)
    lo, hi = float(maps.min()), float(maps.max())  # one colour scale for the whole class
    paths = []
    for rank, i in enumerate(pick_examples(scores, labels, n)):
        item = test_set[i]
        kind = "anomalous" if labels[i] else "normal"
        paths.append(save_overlay(item["image"], maps[i], os.path.join(out_dir, f"{prefix}_{rank}_{kind}.png"),
                                  title=f"score {float(scores[i]):.3g}", lo=lo, hi=hi, mask=item["mask"], mask_title=kind))
    return paths
