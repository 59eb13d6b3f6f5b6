"""ADPretrain (NeurIPS 2025; spec section 3), as the authors' code (MIT) runs it: pretraining the
Feature Projectors of residual features (:mod:`fastad.models.components.residual`).

``fit(dataset)`` pretrains on labelled images with masks (the authors use Real-IAD; any fastad
dataset or concatenation whose items have 'image', 'mask', 'label', 'class_name', 'path'): two
augmented views per image (colour jitter, greyscale, blur), references drawn per batch (K from
{1, 4, 8}, normal images of the item's class, never the batch's own), and per level

- the angle-oriented loss (tau 0.15) on the projected features minus the level centre (the mean raw
  residual of the normal images, 4-shot references), both views as anchors, negatives only of the
  other label, the positive not in the denominator; labels: a cell is abnormal when more than
  32/196 of its pixels are;
- the norm-oriented loss on each view with ``A = sqrt(||x||_2 + 1) - 1`` (the code's norm, not the
  paper's pseudo-Huber), radius ``min(0.9 min A_abnormal, 0.4)``, margin 0.75, detached exp weights;
  labels: nearest-neighbour downsampled mask.

Batches with no anomalous image are skipped. Adam lr 1e-4, weight decay 5e-4, 10 epochs of batch 32,
the LR divided by 10 after epochs 7 and 9. The projectors then serve the few-shot detector
:class:`fastad.models.FeatureNorm` (``FeatureNorm(pretrained=PATH)``).

To follow the model contract, a fitted ADPretrain also scores images: FeatureNorm (token norm of the
projected residual, level mean, Gaussian sigma 4, max) against the first ``shots`` normal images of
the pretraining data, a check of what was learnt, not a per-class detector.
"""
from __future__ import annotations

import math
import os
import re
import warnings

import torch
import torch.nn.functional as F

from ..backbones import OFFLINE_DEFAULT
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..optim import adam
from .base import AnomalyOutput, register
from .components.residual import ResidualFeatures, feature_norm, feature_norm_map
from .training import TrainedModel

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
REALIAD_VIEW = re.compile(r"_(C\d+)_")  # audiojack_0001_OK_C1_20231021130209.jpg: camera 1
ABNORMAL_PATCH_FRACTION = 32 / 196  # the code's patchify_mask: > 32 abnormal pixels of a 14 x 14 patch


# -- losses -------------------------------------------------------------------------------------------
def angle_loss(view1: torch.Tensor, view2: torch.Tensor, abnormal: torch.Tensor, center: torch.Tensor | None = None,
               tau: float = 0.15) -> torch.Tensor:
    """Angle-oriented contrastive loss (the code's version of the paper's Eq. 2).

    Args:
        view1, view2: (N, C) features of the same N positions in two augmented views.
        abnormal: (N,) bool labels.
        center: (C,) subtracted before the cosine (None: the origin).
    Returns:
        scalar: mean over all 2N anchors of ``-log(exp(cos(x_i, x_i') / tau) / sum_{k: other label}
        exp(cos(x_i, x_k) / tau))``, negatives from both views; 0 when one label is absent.
    """
    if view1.shape != view2.shape or view1.dim() != 2 or abnormal.shape != view1.shape[:1]:
        raise ValueError(f"expected two (N, C) views and (N,) labels, got {tuple(view1.shape)}, {tuple(view2.shape)}, {tuple(abnormal.shape)}")
    abnormal = abnormal.bool()
    if abnormal.all() or not abnormal.any():
        return view1.sum() * 0  # no negatives: the authors' NaN/inf loss, replaced by 0
    if center is not None:
        view1, view2 = view1 - center, view2 - center
    a, b = F.normalize(view1, dim=-1), F.normalize(view2, dim=-1)
    feats, labels = torch.cat([a, b]), torch.cat([abnormal, abnormal])
    positive = (a * b).sum(-1).repeat(2) / tau
    normal, anomalous = feats[~labels], feats[labels]
    sim = normal @ anomalous.t() / tau  # (normal anchors, abnormal negatives); its transpose the reverse
    losses = torch.cat([torch.logsumexp(sim, 1) - positive[~labels], torch.logsumexp(sim.t(), 1) - positive[labels]])
    return losses.mean()


def norm_loss(features: torch.Tensor, abnormal: torch.Tensor, radius: float = 0.4, margin: float = 0.75) -> torch.Tensor:
    """Norm-oriented contrastive loss (the code's version of the paper's Eq. 3-6).

    Args:
        features: (N, C); abnormal: (N,) bool labels.
    Returns:
        scalar: with ``A = feature_norm(x)``, ``r = min(0.9 min A_abnormal, radius)`` (``radius``
        without anomalies) and ``r_min = 0.99 r``, the sum of the non-empty terms
        ``mean_{normal, A > r} f(A - r)``, ``mean_{normal, A < r_min} f(r_min - A)`` and
        ``mean_{abnormal, A < r + margin} f(r + margin - A)``, where ``f(d) = -logsigmoid(-d) *
        exp(d)`` with the exp weight detached.
    """
    if features.dim() != 2 or abnormal.shape != features.shape[:1]:
        raise ValueError(f"expected (N, C) features and (N,) labels, got {tuple(features.shape)} and {tuple(abnormal.shape)}")
    abnormal = abnormal.bool()
    a = feature_norm(features)
    an, aa = a[~abnormal], a[abnormal]
    r_max = min(0.9 * aa.min().item(), radius) if len(aa) else radius  # a number: no gradient through r
    r_min = 0.99 * r_max

    def barrier(d):
        return (-F.logsigmoid(-d) * torch.exp(d).detach()).mean()

    terms = [barrier(d) for d in (an[an > r_max] - r_max, r_min - an[an < r_min], r_max + margin - aa[aa < r_max + margin]) if len(d)]
    return sum(terms) if terms else features.sum() * 0



# -- labels and augmentation ---------------------------------------------------------------------------
def patch_labels(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) masks -> (B, h, w) bool: more than 32/196 of a cell's pixels abnormal (angle loss)."""
    return F.adaptive_avg_pool2d(masks.unsqueeze(1).double(), grid).squeeze(1) > ABNORMAL_PATCH_FRACTION  # exact at 32/196


def nearest_labels(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) masks -> (B, h, w) bool by nearest-neighbour downsampling (norm loss)."""
    return F.interpolate(masks.unsqueeze(1).float(), size=grid, mode="nearest").squeeze(1) > 0.5


def augment_view(images: torch.Tensor, generator: torch.Generator, normalisation: str = "imagenet") -> torch.Tensor:
    """One MoCo-style view of ImageNet-normalised images (B, 3, H, W), every draw from ``generator``:
    ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8 (the four in random order), RandomGrayscale p 0.2,
    GaussianBlur sigma in [0.1, 2] (kernel 2 ceil(3 sigma) + 1) with p 0.5; returned normalised with
    the ImageNet or (``normalisation='clip'``, the authors' MoCoTransform for every backbone) the CLIP
    mean and std."""
    import torchvision.transforms.v2.functional as TF

    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand((), generator=generator).item()

    out = []
    for img in (images * std + mean).clamp(0, 1):
        if u(0, 1) < 0.8:
            jitters = [(TF.adjust_brightness, u(0.6, 1.4)), (TF.adjust_contrast, u(0.6, 1.4)),
                       (TF.adjust_saturation, u(0.6, 1.4)), (TF.adjust_hue, u(-0.1, 0.1))]
            for i in torch.randperm(4, generator=generator).tolist():
                fn, factor = jitters[i]
                img = fn(img, factor)
        if u(0, 1) < 0.2:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if u(0, 1) < 0.5:
            sigma = u(0.1, 2.0)
            k = 2 * math.ceil(3 * sigma) + 1
            img = TF.gaussian_blur(img, [k, k], [sigma, sigma])
        out.append(img)
    if normalisation == "clip":
        mean = torch.tensor(CLIP_MEAN, device=images.device).view(3, 1, 1)
        std = torch.tensor(CLIP_STD, device=images.device).view(3, 1, 1)
    return (torch.stack(out) - mean) / std


def reference_key(class_name: str, path: str, same_view: bool) -> str:
    """The pool a training image's references are drawn from: its class, or with ``same_view`` its class
    and Real-IAD camera view (``_C<k>_`` in the file name; the class alone when there is none)."""
    m = REALIAD_VIEW.search(os.path.basename(path)) if same_view else None
    return f"{class_name}/{m.group(1)}" if m else class_name


# -- the pretraining model ------------------------------------------------------------------------------
@register("adpretrain")
class ADPretrain(ResidualFeatures, TrainedModel):
    """ADPretrain's projector pretraining (module docstring).

    Args:
        backbone, layers, weights: frozen features: a timm CNN (:class:`fastad.backbones.FeatureExtractor`;
            default the offline EfficientNet-Lite0 at strides 4-32) or a timm DINOv2 (a name with
            'dinov2'; ``layers`` = 0-indexed blocks, default from ``VIT_LEVELS``).
        image_size, crop_fraction: input (H, W) (224) and centre-crop fraction (1: none).
        heads, num_references, depth: projector attention heads (16), learnable references (2048), layers (1).
        tau, radius, margin: angle temperature (0.15), norm radius bound (0.4), abnormal margin (0.75).
        shot_choices, center_shots: K drawn per batch ({1, 4, 8}); K for the centres (4).
        epochs, iterations, train_batch_size, lr, weight_decay, milestones: the schedule
            (10 epochs of 32, ``iterations`` overrides; Adam 1e-4, 5e-4; LR / 10 after epochs 7, 9).
        shots, sigma: references and map smoothing of the scoring check (8, 4).
        view_normalisation: ``'imagenet'`` (default: what the backbone was trained on) or ``'clip'`` (the
            authors' augmentation normalises both views with CLIP statistics for every backbone).
        same_view_references: draw each image's references from its class and Real-IAD camera view, as
            the authors' code (False: from its class).
        seed: references, augmentations, batch order (42).
    Forward:
        images (B, 3, H, W) -> AnomalyOutput(scores (B,), maps (B, H, W)) float32, after :meth:`fit`.
    """

    data_parallel = "its batches are drawn per class and per defect kind, not as slices of one permutation"

    def __init__(self, backbone: str = OFFLINE_DEFAULT, layers=None, weights: str | None = None, image_size=224,
                 crop_fraction: float = 1.0, heads: int = 16, num_references: int = 2048, depth: int = 1,
                 tau: float = 0.15, radius: float = 0.4, margin: float = 0.75, shot_choices=(1, 4, 8),
                 center_shots: int = 4, epochs: int = 10, iterations: int | None = None, train_batch_size: int = 32,
                 lr: float = 1e-4, weight_decay: float = 5e-4, milestones=(7, 9), shots: int = 8, sigma: float = 4.0,
                 view_normalisation: str = "imagenet", same_view_references: bool = False, seed: int = 42):
        super().__init__()
        if view_normalisation not in ("imagenet", "clip"):
            raise ValueError(f"view_normalisation must be 'imagenet' or 'clip', got {view_normalisation!r}")
        self.view_normalisation, self.same_view_references = view_normalisation, same_view_references
        if shots < 1 or center_shots < 1 or not shot_choices or min(shot_choices) < 1:
            raise ValueError(f"shots, center_shots and shot_choices must be >= 1, got {shots}, {center_shots}, {list(shot_choices)}")
        self.config["layers"] = self.init_residual_features(backbone, layers, weights, heads, num_references, depth)
        self.tau, self.radius, self.margin = tau, radius, margin
        self.shot_choices, self.center_shots = tuple(shot_choices), center_shots
        self.epochs, self.iterations_override, self.train_batch_size = epochs, iterations, train_batch_size
        self.lr, self.weight_decay, self.milestones = lr, weight_decay, tuple(milestones)
        self.shots, self.sigma, self.seed, self.grad_clip = shots, sigma, seed, None

    def trainable_parameters(self):
        return self.projectors.parameters()

    def make_optimizer(self):
        opt = adam(self.trainable_parameters(), lr=self.lr, weight_decay=self.weight_decay)

        def decay(it):  # MultiStepLR over epochs, stepped per iteration
            epoch = it // self.epoch_length if self.epoch_length else 0
            return 0.1 ** sum(epoch >= m for m in self.milestones)

        return opt, torch.optim.lr_scheduler.LambdaLR(opt, decay)

    def fit(self, data, iterations: int | None = None, **kwargs) -> "ADPretrain":
        """Pretrain the projectors on labelled images (module docstring): the level centres first,
        then :meth:`TrainedModel.fit` (checkpoints, exact resume; ``kwargs`` go there); finally take
        the first ``shots`` normal images as the scoring check's references."""
        if len(data) == 0:
            raise ValueError("fit() got an empty dataset; expected labelled images with masks")
        rows = _sample_rows(data)  # read once: other datasets are read item by item
        self._data, self._pool = data, _normal_pool(rows, self.same_view_references)
        if not any(label for label, _, _ in rows):
            warnings.warn("ADPretrain.fit() got no anomalous images: every batch is skipped and the projectors stay "
                          "untrained (pretrain on labelled data with masks, e.g. train + test splits)", stacklevel=2)
        if self.iteration == 0:
            self._fit_centers()
        TrainedModel.fit(self, data, iterations, **kwargs)
        first = [i for members in self._pool.values() for i, _ in members]
        self.set_reference_images(torch.stack([data[i]["image"] for i in sorted(first)[: self.shots]]).to(self.device, torch.float32))
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        banks = self.banks()
        images = self.check_images(images)
        return AnomalyOutput(*feature_norm_map(self.project(self.residuals(images, banks)), tuple(images.shape[-2:]), self.sigma))

    def _draw_banks(self, classes: list[str], exclude: set[str], k: int, gen: torch.Generator) -> dict[str, list[torch.Tensor]]:
        """Per reference key (:func:`reference_key`: the class, or class and view): k random normal images
        of that pool (not in ``exclude``) -> their token banks."""
        banks = {}
        for c in sorted(set(classes)):
            pool = [i for i, p in self._pool.get(c, []) if p not in exclude] or [i for i, _ in self._pool.get(c, [])]
            if not pool:
                raise ValueError(f"ADPretrain pretraining needs normal images of class {c!r} as references, found none")
            pick = torch.randperm(len(pool), generator=gen)[:k].tolist()
            refs = torch.stack([self._data[pool[j]]["image"] for j in pick]).to(self.device, torch.float32)
            banks[c] = self.reference_banks(refs)
        return banks

    def _class_residuals(self, images, classes, banks) -> list[torch.Tensor]:
        out = None
        for c, bank in banks.items():
            idx = torch.tensor([i for i, x in enumerate(classes) if x == c], device=images.device)
            res = self.residuals(images[idx], bank)
            if out is None:
                out = [r.new_empty(len(images), *r.shape[1:]) for r in res]
            for o, r in zip(out, res):
                o[idx] = r
        return out

    @torch.no_grad()
    def _fit_centers(self) -> None:
        """Level centres: the mean raw residual of every normal image, ``center_shots`` references per class."""
        gen = torch.Generator().manual_seed(self.seed)
        sums, counts = [0.0] * len(self.channels), [0] * len(self.channels)
        for c, members in sorted(self._pool.items()):
            bank = self._draw_banks([c], set(), self.center_shots, gen)[c]
            for start in range(0, len(members), self.train_batch_size):
                images = torch.stack([self._data[i]["image"] for i, _ in members[start : start + self.train_batch_size]])
                for lvl, r in enumerate(self.residuals(images.to(self.device, torch.float32), bank)):
                    sums[lvl] = sums[lvl] + r.double().sum((0, 2, 3))
                    counts[lvl] += r.shape[0] * r.shape[2] * r.shape[3]
        for lvl, (s, n) in enumerate(zip(sums, counts)):
            setattr(self, f"center_{lvl}", (s / n).float())

    def training_step(self, batch, iteration: int):
        """One pretraining step (module docstring); None for a batch without anomalies (skipped)."""
        if not isinstance(batch, dict) or not {"mask", "label", "class_name", "path"} <= set(batch):
            raise ValueError("ADPretrain pretraining needs batches of dicts with 'image', 'mask', 'label', 'class_name' and 'path'")
        labels = torch.as_tensor(batch["label"])
        if not (labels > 0).any():
            return None
        if "has_mask" in batch and not torch.as_tensor(batch["has_mask"]).all():
            missing = [p for p, m in zip(batch["path"], torch.as_tensor(batch["has_mask"]).tolist()) if not m]
            raise ValueError(f"ADPretrain pretraining needs a pixel mask for every anomalous image; none for {missing[:3]}")
        images = self.batch_images(batch)
        masks = batch["mask"].to(self.device)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + iteration)
        k = self.shot_choices[int(torch.randint(len(self.shot_choices), (), generator=gen))]
        keys = [reference_key(c, p, self.same_view_references) for c, p in zip(batch["class_name"], batch["path"])]
        banks = self._draw_banks(keys, set(batch["path"]), k, gen)
        views = [self.project(self._class_residuals(augment_view(images, gen, self.view_normalisation), keys, banks))
                 for _ in range(2)]
        loss = 0
        for lvl, (f1, f2) in enumerate(zip(*views)):
            grid = tuple(f1.shape[-2:])
            t1, t2 = (f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for f in (f1, f2))
            near = nearest_labels(masks, grid).reshape(-1)
            loss = loss + angle_loss(t1, t2, patch_labels(masks, grid).reshape(-1), self.centers()[lvl], self.tau)
            loss = loss + norm_loss(t1, near, self.radius, self.margin) + norm_loss(t2, near, self.radius, self.margin)
        self.update(loss)
        return loss.detach()


def _sample_rows(data) -> list[tuple[int, str, str]]:
    """(label, class name, path) of every item of a fastad dataset, a ConcatDataset or Subset of them,
    read from their sample lists (no image is loaded); other datasets are read item by item."""
    from torch.utils.data import ConcatDataset, Subset

    if isinstance(data, ConcatDataset):
        return [row for d in data.datasets for row in _sample_rows(d)]
    if isinstance(data, Subset):
        rows = _sample_rows(data.dataset)
        return [rows[i] for i in data.indices]
    if hasattr(data, "samples"):
        return [(int(s.label), s.class_name, str(s.path)) for s in data.samples]
    return [(int(x["label"]), x["class_name"], str(x["path"])) for x in (data[i] for i in range(len(data)))]


def _normal_pool(rows: list[tuple[int, str, str]], same_view: bool = False) -> dict[str, list[tuple[int, str]]]:
    """:func:`_sample_rows` -> :func:`reference_key` -> [(index, path)] of its normal items."""
    pool: dict[str, list[tuple[int, str]]] = {}
    for i, (label, c, path) in enumerate(rows):
        if label == 0:
            pool.setdefault(reference_key(c, path, same_view), []).append((i, path))
    if not pool:
        raise ValueError("ADPretrain pretraining needs normal images (references and centres), found none")
    return pool
