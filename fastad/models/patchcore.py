"""PatchCore (Roth et al., CVPR 2022) following the official amazon-science code (spec section 6).

Defaults are the official WideResNet-50 IM224 baseline recipe with the offline backbone:
- features of the stride-8 and stride-16 stages (``layers=(2, 3)``; WRN-50 layer2 + layer3),
  3x3 local neighbourhoods (unfold, padding 1); the coarser level is bilinearly resized to the finer
  grid slot by slot; each level's C*9 patch is ``adaptive_avg_pool1d``-ed to 1024, the two levels
  stacked and pooled to 1024 (``pretrain_embed_dim``, ``target_embed_dim``);
- greedy k-center coreset of 10% with a 128-d random projection (fastad.ops.greedy_coreset);
- patch score = mean squared L2 distance to the ``num_neighbors`` nearest bank entries (official: 1,
  squared, as FAISS returns it); image score = max patch score;
- map: bilinear to the input size, Gaussian sigma=4 (scipy's 33-tap filter); the smoothed map is returned.
Input: 256 resize, 224 centre crop (``image_size=224, crop_fraction=0.875``).
Option ``reweight=True`` applies the paper's / anomalib's re-weighting of the image score with the
``reweight_neighbors=9`` bank neighbours of the nearest bank entry (Euclidean distances in the
softmax, as anomalib). The official code never re-weights, so it is off by default.
"""
from __future__ import annotations

import torch
from torch import nn

from ..backbones import OFFLINE_DEFAULT, FeatureExtractor
from ..faults import memory_stage
from ..ops.coreset import PRECISIONS
from .base import AnomalyModel, AnomalyOutput, image_batches, register
from .components.maps import upsample_and_smooth
from .components.memory_bank import MemoryBank, PatchEmbedding


@register("patchcore")
class PatchCore(AnomalyModel):
    """PatchCore anomaly detector.

    Args:
        backbone, layers, weights: see :class:`fastad.backbones.FeatureExtractor`; ``backbone`` may
            also be a module mapping images to a list of (B, C_i, h_i, w_i) maps, used as it is (such
            a model cannot be saved: its config is not plain values).
        image_size, crop_fraction: input (H, W) (224) and centre-crop fraction (0.875: resize 256).
        patch_size: local neighbourhood (3).
        pretrain_embed_dim, target_embed_dim: pooled per-level and final feature sizes (1024, 1024).
        coreset_ratio: fraction of patches kept (0.1; the IM320/ensemble configs use 0.01); 1.0 keeps all.
        projection_dim: dimension of the coreset's random projection (128).
        coreset_precision: ``'float32'`` (default, PatchCore's own) or ``'float16'`` (the selection
            runs on the projection rounded to float16, half the bytes per step); see
            :func:`fastad.ops.greedy_coreset`.
        num_neighbors: nearest bank entries averaged into a patch score (official: 1).
        reweight, reweight_neighbors: anomalib-style image-score re-weighting (off, 9).
        sigma: Gaussian smoothing of the map (4).
        bank_backend: ``'torch'`` or ``'faiss'`` (see :class:`fastad.ops.FeatureBank`).
        bank_memory: bytes of device memory the kNN search may use (None: no cap). With a cap,
            ``fit`` keeps the patch features in host memory (the coreset then runs on the CPU), a
            bank larger than the cap stays there and is searched in blocks streamed to the device.
        bank: in a distributed fit (``group=``), ``'replicated'`` (every process holds the whole
            bank) or ``'sharded'`` (each keeps its own coreset rows: bank memory per process divided
            by the number of processes; ``forward`` is then a collective that every process calls,
            and such a model cannot be saved to one file).
        seed: seed of the coreset projection and starting points.
    Forward:
        images (B, 3, H, W) -> AnomalyOutput(scores (B,), maps (B, H, W)) float32.
    """

    autocast_modules = ("backbone",)

    def __init__(
        self,
        backbone: str | nn.Module = OFFLINE_DEFAULT,
        layers=(2, 3),
        weights: str | None = None,
        image_size=224,
        crop_fraction: float = 0.875,
        patch_size: int = 3,
        pretrain_embed_dim: int = 1024,
        target_embed_dim: int = 1024,
        coreset_ratio: float = 0.1,
        projection_dim: int = 128,
        coreset_precision: str = "float32",
        num_neighbors: int = 1,
        reweight: bool = False,
        reweight_neighbors: int = 9,
        sigma: float = 4.0,
        bank_backend: str = "torch",
        bank_memory: int | None = None,
        bank: str = "replicated",
        seed: int = 0,
    ):
        super().__init__()
        self.backbone = backbone if isinstance(backbone, nn.Module) else FeatureExtractor(backbone, layers, weights)
        self.patch_embedding = PatchEmbedding(patch_size, pretrain_embed_dim, target_embed_dim)
        if bank not in ("replicated", "sharded"):
            raise ValueError(f"bank must be 'replicated' or 'sharded', got {bank!r}")
        if bank == "sharded" and reweight:
            raise ValueError("reweight=True needs the whole bank on every process: use bank='replicated'")
        if coreset_precision not in PRECISIONS:
            raise ValueError(f"coreset_precision must be one of {PRECISIONS}, got {coreset_precision!r}")
        self.bank = MemoryBank(target_embed_dim, bank_backend, bank_memory, sharded=bank == "sharded")
        self.coreset_precision = coreset_precision
        self.coreset_ratio, self.projection_dim, self.seed = coreset_ratio, projection_dim, seed
        self.num_neighbors, self.reweight, self.reweight_neighbors = num_neighbors, reweight, reweight_neighbors
        self.sigma = sigma

    @property
    def memory_bank(self) -> torch.Tensor:
        """(M, target_embed_dim) float32 coreset of normal patch features."""
        return self.bank.memory_bank

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, 3, H, W) -> ((B, h*w, target_embed_dim) float32 patch features, (h, w) grid)."""
        return self.patch_embedding(self.backbone(images))

    @torch.no_grad()
    def fit(self, data, *, num_workers: int = 0, progress: bool | None = None, batch_size: int = 16,
            group=None) -> "PatchCore":
        """Build the memory bank from normal images: a fastad Dataset (read in order, ``batch_size``
        at a time), a DataLoader of (B, 3, H, W) tensors or dicts with 'image', or a tensor.

        With ``group`` (torch.distributed; every rank calls ``fit`` with the same data) each rank
        embeds its contiguous share of the images, the coreset is selected across the ranks, and
        every rank ends with the bank one process would build (bit-identical)."""
        batches = image_batches(data, self.device, batch_size=batch_size, num_workers=num_workers, progress=progress,
                                group=group)
        # with a bank_memory cap the features wait in host memory (the bank may not fit the device)
        keep = torch.device("cpu") if self.bank.max_bytes is not None else self.device
        with memory_stage("the embedding", "lower --batch-size (fit(batch_size=N))"):
            feats = [self.embed(self.check_images(x))[0].reshape(-1, self.bank.dim).to(keep) for x in batches]
        feats = torch.cat(feats) if feats else torch.empty(0, self.bank.dim, device=keep)
        self.bank.fill(feats, self.coreset_ratio, self.projection_dim, self.seed, group=group,
                       precision=self.coreset_precision)
        return self

    @property
    def collective(self) -> bool:
        """True when ``forward`` is a collective: the bank is sharded over a process group."""
        return self.bank.group is not None

    def checkpoint_state(self):
        if self.bank.group is not None:
            raise ValueError("a PatchCore fitted with bank='sharded' holds 1/W of its bank on each process and cannot "
                             "be saved to one file; fit with bank='replicated' to save it")
        return super().checkpoint_state()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        images = self.check_images(images)
        emb, (h, w) = self.embed(images)
        scores, patch = self.bank.score(emb, self.num_neighbors, self.reweight, self.reweight_neighbors)
        return AnomalyOutput(scores, upsample_and_smooth(patch.reshape(-1, h, w), tuple(images.shape[-2:]), self.sigma))
