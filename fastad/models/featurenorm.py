"""FeatureNorm: ADPretrain's few-shot detector on (pretrained) residual features (spec section 3.5).

``fit(dataset)`` on normal images of the target class takes the first ``shots`` = 8 as the reference
bank (every token of them), then fits the scorer on all the images:

- ``scorer='featurenorm'`` (default): each token's ``sqrt(||f||_2 + 1) - 1`` of its projected residual,
  bilinear (align_corners=True) to the input, mean over levels, Gaussian sigma = 4, image score =
  max; the smoothed map is returned, as the authors evaluate it;
- ``'patchcore'``: PatchCore† (3x3 patch embeddings pooled to 1024, 10% coreset, k = 1, bilinear
  upsampling, sigma 4) on the last three levels' projected features;
- ``'padim'``: PaDiM† (one full-channel Gaussian per level, per-level distances upsampled with
  align_corners=True, averaged, sigma 4).

The projectors come from an ``adpretrain`` checkpoint (``pretrained=PATH``, same backbone and
layers), or the authors' released ``.pth``; ``project=False`` scores the raw residuals. Input: 224 x 224,
no crop (bilinear; the authors' bicubic short-side resize and crop under ``--protocol official``).
"""
from __future__ import annotations

import itertools
import warnings

import torch
from torch import nn

from ..backbones import OFFLINE_DEFAULT
from .base import AnomalyModel, AnomalyOutput, image_batches, register
from .components.gaussian import GaussianGrid, per_level_maps
from .components.maps import upsample_and_smooth
from .components.memory_bank import MemoryBank, PatchEmbedding
from .components.residual import ResidualFeatures, feature_norm_map

SCORERS = ("featurenorm", "patchcore", "padim")
PADIM_EPS = 0.01  # PaDiM's covariance regulariser


@register("featurenorm")
class FeatureNorm(ResidualFeatures, AnomalyModel):
    """Few-shot anomaly detector on residual features (module docstring).

    Args:
        backbone, layers, weights: as :class:`fastad.models.ADPretrain` (the same backbone and layers
            as the ``pretrained`` checkpoint).
        image_size, crop_fraction: input (H, W) (224) and centre-crop fraction (1: none).
        scorer: ``'featurenorm'``, ``'patchcore'`` or ``'padim'``.
        shots: normal reference images taken by :meth:`fit` (8).
        project: False scores the raw residual features (no projector; a baseline).
        pretrained: an ``adpretrain`` checkpoint whose projectors and centres are loaded.
        heads, num_references, depth: projector shape (16, 2048, 1), as in the checkpoint.
        coreset_ratio: PatchCore†'s coreset (0.1).
        sigma: map smoothing (4).
        aligned_references: FeatureNorm†: a JSON file {test image: [normal reference images]} or a folder
            of ``<class>.json`` (the authors' ``aligned/references/<dataset>/``, 10 per image); each test
            image is then scored against its own listed references (all of them, as the authors' code)
            instead of the ``shots`` images of :meth:`fit` (:meth:`prepare_test_set`).
        seed: PatchCore†'s coreset projection.
    Forward:
        images (B, 3, H, W), optional references (B, K, 3, H, W) (each image's own reference images) ->
        AnomalyOutput(scores (B,), maps (B, H, W)) float32, after :meth:`fit` (or with references).
    """

    def __init__(self, backbone: str = OFFLINE_DEFAULT, layers=None, weights: str | None = None, image_size=224,
                 crop_fraction: float = 1.0, scorer: str = "featurenorm", shots: int = 8, project: bool = True,
                 pretrained: str | None = None, heads: int = 16, num_references: int = 2048, depth: int = 1,
                 coreset_ratio: float = 0.1, sigma: float = 4.0, aligned_references: str | None = None, seed: int = 42):
        super().__init__()
        if aligned_references is not None and scorer != "featurenorm":
            raise ValueError(f"aligned_references is FeatureNorm†'s evaluation (scorer='featurenorm'), not {scorer!r}")
        if scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
        if shots < 1:
            raise ValueError(f"shots must be >= 1, got {shots}")
        self.config["layers"] = self.init_residual_features(backbone, layers, weights, heads, num_references, depth)
        self.scorer, self.shots, self.project_features, self.sigma = scorer, shots, project, sigma
        self.coreset_ratio, self.seed = coreset_ratio, seed
        self.scored_levels = list(range(len(self.channels)))[-3:] if scorer == "patchcore" else list(range(len(self.channels)))
        if scorer == "patchcore":
            self.patch_embedding = PatchEmbedding()
            self.memory = MemoryBank(self.patch_embedding.target_embed_dim)
        elif scorer == "padim":
            self.gaussians = nn.ModuleList(GaussianGrid() for _ in self.channels)
        if pretrained is not None:
            self.load_projectors(pretrained)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> the scored levels' (B, C_l, h_l, w_l) projected (or raw) residual features
        against the fitted reference bank."""
        res = self.residuals(images, self.banks())
        feats = self.project(res) if self.project_features else res
        return [feats[i] for i in self.scored_levels]

    @torch.no_grad()
    def fit(self, data, *, num_workers: int = 0, progress: bool | None = None, batch_size: int = 16) -> "FeatureNorm":
        """Take the first ``shots`` images of ``data`` (normal images of the target class: a fastad
        Dataset, a DataLoader of tensors / dicts with 'image', or a tensor) as the reference bank,
        then fit the scorer on all of them."""
        if self.project_features and self.config["pretrained"] is None:
            warnings.warn("FeatureNorm's projectors are untrained: pass pretrained=PATH (an adpretrain checkpoint) or "
                          "load a checkpoint (project=False scores the raw residuals)", stacklevel=2)
        batches = (self.check_images(x) for x in image_batches(data, self.device, batch_size=batch_size,
                                                                  num_workers=num_workers, progress=progress))
        taken, n = [], 0
        for images in batches:  # read only until `shots` images are seen; the scorer streams the rest
            taken.append(images)
            n += len(images)
            if n >= self.shots:
                break
        refs = torch.cat(taken)[: self.shots]
        if len(refs) < self.shots:
            warnings.warn(f"FeatureNorm: only {len(refs)} reference images, expected shots={self.shots}", stacklevel=2)
        self.set_reference_images(refs)
        self.eval()
        if self.scorer == "patchcore":
            emb = [self.patch_embedding(self.features(x))[0].flatten(0, 1) for x in itertools.chain(taken, batches)]
            self.memory.fill(torch.cat(emb), self.coreset_ratio, seed=self.seed)
        elif self.scorer == "padim":
            for x in itertools.chain(taken, batches):
                for g, e in zip(self.gaussians, self.features(x)):
                    g.accumulate(e)
            for g in self.gaussians:
                g.finish(PADIM_EPS)
        return self

    def prepare_test_set(self, dataset):
        """With ``aligned_references``: the test set with each image's listed references
        (:class:`fastad.data.WithReferences`, the listing of the set's class); else unchanged."""
        path = self.config.get("aligned_references")
        if path is None:
            return dataset
        from ..data import WithReferences, read_references

        classes = sorted({s.class_name for s in dataset.samples})
        if len(classes) != 1:
            raise ValueError(f"aligned references are read per class; this test set mixes {classes}")
        listing, where = read_references(path, classes[0])
        return WithReferences(dataset, listing, where=where)

    def aligned_features(self, images: torch.Tensor, references: torch.Tensor) -> list[torch.Tensor]:
        """:meth:`features` of each image against a bank of its own (K, 3, H, W) references."""
        if references.dim() != 5 or references.shape[0] != images.shape[0] or references.shape[2:] != images.shape[1:]:
            raise ValueError(f"references must be (B, K, 3, H, W) for images {tuple(images.shape)}, "
                             f"got {tuple(references.shape)}")
        out = []
        for x, refs in zip(images, self.check_images(references.flatten(0, 1)).unflatten(0, references.shape[:2])):
            res = self.residuals(x[None], self.reference_banks(refs))
            out.append(self.project(res) if self.project_features else res)
        return [torch.cat(level) for level in zip(*out)]

    @torch.no_grad()
    def forward(self, images: torch.Tensor, references: torch.Tensor | None = None) -> AnomalyOutput:
        images = self.check_images(images)
        size = tuple(images.shape[-2:])
        if references is not None:
            if self.scorer != "featurenorm":
                raise ValueError(f"per-image references are FeatureNorm†'s evaluation, not the {self.scorer} scorer's")
            return AnomalyOutput(*feature_norm_map(self.aligned_features(images, references), size, self.sigma))
        feats = self.features(images)
        if self.scorer == "patchcore":
            emb, (h, w) = self.patch_embedding(feats)
            scores, patch = self.memory.score(emb)
            return AnomalyOutput(scores, upsample_and_smooth(patch.reshape(-1, h, w), size, self.sigma))
        if self.scorer == "padim":
            if self.gaussians[0].mean.numel() == 0:
                raise RuntimeError("FeatureNorm's PaDiM scorer is not fitted: call fit() first")
            return AnomalyOutput(*per_level_maps(self.gaussians, feats, size, self.sigma))
        return AnomalyOutput(*feature_norm_map(feats, size, self.sigma))
