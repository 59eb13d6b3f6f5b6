"""Streaming (torchmetrics-style) classes over the one-sort metrics: ``update`` per batch, ``compute``
at the end, ``reset`` between epochs.

With torchmetrics installed the classes are ``torchmetrics.Metric`` subclasses: Lightning logs them,
``MetricCollection`` holds them, and several processes sync their states through torchmetrics' own
``all_gather`` (list states reduced by ``"cat"``). Without torchmetrics they keep the same ``update`` /
``compute`` / ``reset`` interface for one process.

Memory: every batch is stored once, detached, as float32 scores (any floating input) and bool labels
(one byte per pixel), on the device it came from; ``compute`` concatenates them once. One
:class:`AnomalyMetrics` object serves all seven metrics from one copy of the maps (anomalib keeps one
copy per metric object).
"""
from __future__ import annotations

import torch

from .ranking import RankedScores, binary_labels
from .report import compute_metrics

try:
    from torchmetrics import Metric as _Metric
except ImportError:  # the same interface for one process (syncing needs torchmetrics)

    class _Metric(torch.nn.Module):
        def __init__(self, **kwargs):
            if kwargs:
                raise TypeError(f"{sorted(kwargs)} need torchmetrics (pip install torchmetrics)")
            super().__init__()
            self._states: list[str] = []

        def add_state(self, name, default, dist_reduce_fx=None, persistent=False):
            self._states.append(name)
            setattr(self, name, list(default))

        def reset(self):
            for name in self._states:
                setattr(self, name, [])

        def forward(self, *args, **kwargs):
            raise NotImplementedError("calling the metric needs torchmetrics: use update() and compute()")


__all__ = ["AUPRO", "AUROC", "AnomalyMetrics", "AveragePrecision", "F1Max"]


def _cat(state) -> torch.Tensor:
    """A list state (or the tensor torchmetrics leaves after a sync) as one tensor."""
    if isinstance(state, torch.Tensor):
        return state
    return torch.cat(state) if state else torch.empty(0)


def _empty(state) -> bool:
    return state.numel() == 0 if isinstance(state, torch.Tensor) else not state


def _scores(preds: torch.Tensor, name: str) -> torch.Tensor:
    """Floating or bool (thresholded predictions: 0 / 1) ``preds`` as a finite float32 copy."""
    if not isinstance(preds, torch.Tensor) or not (preds.is_floating_point() or preds.dtype == torch.bool):
        got = preds.dtype if isinstance(preds, torch.Tensor) else type(preds).__name__
        raise TypeError(f"{name} must be a floating (or bool) torch.Tensor, got {got}")
    if not bool(torch.isfinite(preds).all()):
        raise ValueError(f"{name} contains NaN or inf values; expected finite scores")
    # a float32 copy: never a view that would keep the caller's larger tensor (or graph) alive
    return preds.detach().to(torch.float32, copy=True)


def _maps(preds: torch.Tensor, target: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W) or (B, 1, H, W) maps and masks -> float32 (B, H, W) and bool (B, H, W)."""
    p, t = _scores(preds, f"{what} preds"), binary_labels(target, f"{what} target")
    if p.dim() == 4 and p.shape[1] == 1:
        p = p[:, 0]
    if t.dim() == 4 and t.shape[1] == 1:
        t = t[:, 0]
    if p.dim() != 3 or p.shape != t.shape:
        raise ValueError(
            f"{what} expects preds and target of one shape (B, H, W) or (B, 1, H, W), "
            f"got {tuple(preds.shape)} and {tuple(target.shape)}"
        )
    return p, t.to(p.device)


class _DtypeFollowsInput:
    """compute() in float64 once a float64 batch was given, else float32 (as torchmetrics users expect)."""

    _result_dtype = torch.float32

    def _saw(self, preds: torch.Tensor) -> None:
        if preds.dtype == torch.float64:
            self._result_dtype = torch.float64

    def reset(self):
        super().reset()
        self._result_dtype = torch.float32


class _Ranked(_DtypeFollowsInput, _Metric):
    """Scores and labels of any shape, flattened: AUROC, AP, F1-max."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``preds`` floating scores of any shape (image scores (B,), maps (B, H, W) or
        (B, 1, H, W)), or bool predictions (as 0 / 1); ``target`` the same number of elements, bool or
        {0, 1}."""
        p, t = _scores(preds, "preds").reshape(-1), binary_labels(target, "target").reshape(-1)
        if p.numel() != t.numel():
            raise ValueError(f"preds ({p.numel()} elements) and target ({t.numel()}) differ in size")
        self._saw(preds)
        self.preds.append(p)
        self.target.append(t.to(p.device))

    def _ranked(self) -> RankedScores:
        p, t = _cat(self.preds), _cat(self.target)
        if p.numel() == 0:
            raise ValueError(f"{type(self).__name__}.compute() before any update()")
        return RankedScores(p, t)

    def compute(self) -> torch.Tensor:
        """The metric over every batch so far: 0-d tensor, float64 if a batch was float64, else float32."""
        return torch.tensor(self._value(self._ranked()), dtype=self._result_dtype)


class AUROC(_Ranked):
    """Area under the ROC curve (= ``sklearn.metrics.roc_auc_score``, ties included)."""

    def _value(self, r: RankedScores) -> float:
        return r.auroc()


class AveragePrecision(_Ranked):
    """Average precision (= ``sklearn.metrics.average_precision_score``; anomalib's AUPR)."""

    def _value(self, r: RankedScores) -> float:
        return r.average_precision()


class F1Max(_Ranked):
    """Best F1 score over all thresholds (anomalib's F1Max). After :meth:`compute`, ``threshold`` is the
    score giving it (0-d tensor, the result's dtype; anomalous = score >= threshold; equal F1 at several
    thresholds: the lowest)."""

    threshold: torch.Tensor

    def _value(self, r: RankedScores) -> float:
        value, threshold = r.f1_max_threshold()
        self.threshold = threshold.to(self._result_dtype)
        return value


class AUPRO(_DtypeFollowsInput, _Metric):
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (see :func:`~fastad.metrics.aupro`).

    ``update(preds, target)``: anomaly maps (B, H, W) or (B, 1, H, W), floating; masks of the same
    shape, bool or {0, 1}. Regions are the 8-connected components of each mask.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, fpr_limit: float = 0.3, **kwargs):
        super().__init__(**kwargs)
        from .aupro import _check_limit

        _check_limit(fpr_limit)
        self.fpr_limit = float(fpr_limit)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        p, t = _maps(preds, target, "AUPRO")
        self._saw(preds)
        self.preds.append(p)
        self.target.append(t)

    def compute(self) -> torch.Tensor:
        """AUPRO over every batch so far: 0-d tensor, float64 if a batch was float64, else float32."""
        from .aupro import aupro

        p, t = _cat(self.preds), _cat(self.target)
        if p.numel() == 0:
            raise ValueError("AUPRO.compute() before any update()")
        return torch.tensor(aupro(p, t, float(self.fpr_limit)), dtype=self._result_dtype)


class AnomalyMetrics(_Metric):
    """All seven benchmark metrics (and ``mad``) of a test set streamed in batches: the same numbers
    as :func:`~fastad.metrics.compute_metrics` on the concatenation, from one stored copy.

    ``update(image_scores, image_labels, maps=None, masks=None, has_mask=None)``: (B,) floating
    scores, (B,) bool or {0, 1} labels; optional (B, H, W) or (B, 1, H, W) maps and masks (give
    both in every batch or in none); ``has_mask`` (B,) bool marks the images whose mask is ground
    truth (default all). ``compute()`` returns a dict of float64 0-d tensors keyed by
    :data:`~fastad.metrics.METRICS` and ``mad`` (NaN with a RuntimeWarning where a level has one class).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, fpr_limit: float = 0.3, **kwargs):
        super().__init__(**kwargs)
        self.fpr_limit = float(fpr_limit)
        for name in ("scores", "labels", "maps", "masks", "has_mask"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, image_scores, image_labels, maps=None, masks=None, has_mask=None) -> None:
        s = _scores(image_scores, "image_scores").reshape(-1)
        y = binary_labels(image_labels, "image_labels").reshape(-1).to(s.device)
        if s.numel() != y.numel():
            raise ValueError(f"image_scores ({s.numel()}) and image_labels ({y.numel()}) differ in size")
        if (maps is None) != (masks is None):
            raise ValueError("give both maps and masks, or neither")
        if not _empty(self.scores) and _empty(self.maps) != (maps is None):
            raise ValueError("give maps and masks in every batch or in none")
        if maps is not None:
            m, g = _maps(maps, masks, "AnomalyMetrics")
            if m.shape[0] != s.numel():
                raise ValueError(f"{m.shape[0]} maps for {s.numel()} image scores")
            keep = torch.ones(s.numel(), dtype=torch.bool) if has_mask is None else binary_labels(has_mask, "has_mask").reshape(-1).cpu()
            if keep.numel() != s.numel():
                raise ValueError(f"has_mask has {keep.numel()} entries for {s.numel()} images")
            self.maps.append(m)
            self.masks.append(g)
            self.has_mask.append(keep.to(m.device))
        self.scores.append(s)
        self.labels.append(y)

    def compute(self) -> dict[str, torch.Tensor]:
        scores = _cat(self.scores)
        if scores.numel() == 0:
            raise ValueError("AnomalyMetrics.compute() before any update()")
        if _empty(self.maps):
            out = compute_metrics(scores, _cat(self.labels), fpr_limit=self.fpr_limit)
        else:
            out = compute_metrics(scores, _cat(self.labels), _cat(self.maps), _cat(self.masks), self.fpr_limit,
                                  has_mask=_cat(self.has_mask))
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}

