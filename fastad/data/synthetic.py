"""Procedural textures with defects of known masks: the embedded default data (no files needed).

Normal images are a class-specific texture (a fixed set of oriented gratings with random phases plus
fine noise); a defect is an ellipse or a thin scratch whose content is replaced by a darker or
brighter, differently oriented pattern. Deterministic for a given seed."""
from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

from .transforms import IMAGENET_MEAN, IMAGENET_STD, pair


class SyntheticDataset(Dataset):
    """Items as :class:`fastad.data.datasets.AnomalyDataset` (``path`` is ``synthetic://<split>/<i>``).

    Args:
        split: ``'train'`` (normal only) or ``'test'`` (half anomalous).
        n: number of images.
        size: image side in pixels, or (H, W) (a non-square image is the top-left H x W of the square one).
        seed: base seed; train and test draw from disjoint streams.
    """

    def __init__(self, split: str = "train", n: int = 32, size: int | tuple[int, int] = 224, seed: int = 0):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.shape = pair(size, "size")
        if n < 1 or min(self.shape) < 16:
            raise ValueError(f"need n >= 1 and size >= 16 (an int or (H, W)), got n={n}, size={size}")
        self.split, self.n, self.size, self.seed = split, n, max(self.shape), seed
        g = torch.Generator().manual_seed(seed)
        self.freqs = 0.05 + 0.25 * torch.rand(4, generator=g)  # cycles per pixel
        self.angles = math.pi * torch.rand(4, generator=g)
        self.colour = 0.35 + 0.3 * torch.rand(3, generator=g)
        self.labels_list = [0] * n if split == "train" else [int(i % 2 == 1) for i in range(n)]

    def __len__(self) -> int:
        return self.n

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor(self.labels_list)

    def _texture(self, g, freqs, angles):
        s = self.size
        yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32), indexing="ij")
        t = torch.zeros(s, s)
        for f, a in zip(freqs.tolist(), angles.tolist()):
            phase = 2 * math.pi * torch.rand((), generator=g).item()
            t += torch.sin(2 * math.pi * f * (xx * math.cos(a) + yy * math.sin(a)) + phase)
        return t / len(freqs) + 0.15 * torch.randn(s, s, generator=g)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        g = torch.Generator().manual_seed(self.seed * 100003 + (0 if self.split == "train" else 50021) + i)
        s = self.size
        tex = self._texture(g, self.freqs, self.angles)
        mask = torch.zeros(s, s)
        if self.labels_list[i]:
            yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32), indexing="ij")
            cy, cx = (0.2 + 0.6 * torch.rand(2, generator=g)) * s
            if torch.rand((), generator=g) < 0.5:  # ellipse
                ry, rx = (0.04 + 0.08 * torch.rand(2, generator=g)) * s
                mask = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).float()
            else:  # scratch
                a = math.pi * torch.rand((), generator=g).item()
                dist = ((xx - cx) * math.sin(a) - (yy - cy) * math.cos(a)).abs()
                along = ((xx - cx) * math.cos(a) + (yy - cy) * math.sin(a)).abs()
                mask = ((dist <= 0.012 * s + 1) & (along <= 0.2 * s)).float()
            defect = self._texture(g, self.freqs * 1.7, self.angles + math.pi / 2) + (1.2 if torch.rand((), generator=g) < 0.5 else -1.2)
            tex = tex * (1 - mask) + defect * mask
        rgb = (self.colour.view(3, 1, 1) + 0.18 * tex).clamp(0, 1)
        image = (rgb - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
        h, w = self.shape
        return {"image": image[:, :h, :w].contiguous(), "mask": mask[:h, :w].contiguous(), "label": self.labels_list[i], "class_name": "synthetic",
                "path": f"synthetic://{self.split}/{i}"}
