"""Exact ROC AUC from one sort: the Mann-Whitney statistic with tied scores sharing their mean rank
(equal to ``sklearn.metrics.roc_auc_score``)."""
from __future__ import annotations

import torch


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve.

    Args:
        scores: (N,) or any shape, floating; higher = more anomalous. Must be finite.
        labels: same number of elements, {0, 1} (bool or integer).
    Returns:
        AUROC as a Python float.
    Raises:
        ValueError: shape mismatch, NaN/inf scores, labels outside {0, 1}, or only one class present.
    """
    s = scores.detach().reshape(-1).double()
    y = labels.detach().reshape(-1).to(s.device)
    if s.numel() != y.numel():
        raise ValueError(f"scores ({s.numel()}) and labels ({y.numel()}) differ in size")
    if not bool(torch.isfinite(s).all()):
        raise ValueError("scores contain NaN or inf")
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("labels must be 0 or 1")
    y = y.bool()
    n_pos = int(y.sum())
    n_neg = y.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both classes, got {n_pos} anomalous and {n_neg} normal")
    order = torch.argsort(s)
    sorted_s = s[order]
    # mean rank of each run of tied scores
    new_run = torch.ones_like(sorted_s, dtype=torch.bool)
    new_run[1:] = sorted_s[1:] != sorted_s[:-1]
    run_id = torch.cumsum(new_run, 0) - 1
    positions = torch.arange(1, s.numel() + 1, dtype=torch.float64, device=s.device)
    run_sum = torch.zeros(int(run_id[-1]) + 1, dtype=torch.float64, device=s.device).index_add_(0, run_id, positions)
    run_len = torch.bincount(run_id).double()
    ranks = (run_sum / run_len)[run_id]
    rank_pos = ranks[y[order]].sum().item()
    return (rank_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
