"""Nearest-reference matching: for every feature, the closest entry of a bank of normal features
and the residual ``x - nearest``.

Global search (ADPretrain/ResAD residual features: no positional constraint) or windowed search
(FOD's "nearest features": only the ``window x window`` neighbourhood of the same position in every
reference image). Scores are exact float64 in the kernels and the reference, with the lowest bank
index winning ties, so both return the same indices.

With ``group`` the bank is sharded across processes (each rank passes its rows, or its reference
images, and the same queries): every rank searches its shard, the float64 scores and global indices
are all-gathered and merged (lowest global index on ties), and the residual comes from the rank that
holds the winner. Same values and indices as one process searching the concatenated bank.
"""
from __future__ import annotations

import torch

from .. import distributed
from ._checks import check_same_device, check_tensor
from . import dispatch
from .dispatch import implementation
from .grid_attention import window_mask

__all__ = ["nearest_reference", "nearest_reference_reference"]

_METRICS = {"l2": 0, "cosine": 1}
_EPS = 1e-12  # F.normalize's eps: a zero vector has cosine 0 with everything


def _validate(x: torch.Tensor, bank: torch.Tensor, metric: str, window: int | None) -> None:
    if metric not in _METRICS:
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    check_tensor("bank", bank, ndim=2 if window is None else 4)
    if window is None:
        check_tensor("x", x)
        if x.dim() < 1 or x.shape[-1] != bank.shape[1]:
            raise ValueError(f"x must be (..., C) with C={bank.shape[1]} as in bank (M, C), got x {tuple(x.shape)}")
    else:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
            raise ValueError(f"window must be a positive odd int, got {window!r}")
        check_tensor("x", x, ndim=4)
        if x.shape[1:] != bank.shape[1:]:
            raise ValueError(
                "windowed search needs x (B, H, W, C) and bank (K, H, W, C) with the same H, W, C; "
                f"got x {tuple(x.shape)} and bank {tuple(bank.shape)}"
            )
    if x.dtype != bank.dtype:
        raise TypeError(f"x and bank must have the same dtype, got {x.dtype} and {bank.dtype}")
    check_same_device(x=x, bank=bank)


def nearest_reference_reference(x, bank, *, metric: str = "l2", window: int | None = None):
    """Pure-PyTorch oracle (float64, dense scores per query chunk). Same arguments and returns as
    :func:`nearest_reference`, values in float64."""
    _validate(x, bank, metric, window)
    c = bank.shape[-1]
    b = bank.reshape(-1, c).double()
    q = x.reshape(-1, c).double()
    if metric == "cosine":
        b = b / b.norm(dim=1, keepdim=True).clamp_min(_EPS)
        q = q / q.norm(dim=1, keepdim=True).clamp_min(_EPS)
    if window is not None:
        _, h, w, _ = x.shape
        allowed = window_mask((h, w), window, x.device).repeat(1, bank.shape[0])  # (HW, K*HW)
    values, indices = [], []
    for start in range(0, q.shape[0], 512):
        qc = q[start : start + 512]
        if metric == "l2":
            s = torch.cdist(qc, b, compute_mode="donot_use_mm_for_euclid_dist")
        else:
            s = -(qc @ b.t())
        if window is not None:
            pos = torch.arange(start, start + qc.shape[0], device=x.device) % (x.shape[1] * x.shape[2])
            s = s.masked_fill(~allowed[pos], float("inf"))
        v, i = s.min(1)
        values.append(v if metric == "l2" else -v)
        indices.append(i)
    values, indices = torch.cat(values), torch.cat(indices)
    lead = x.shape[:-1]
    residual = x - bank.reshape(-1, c)[indices].reshape(x.shape)
    return values.reshape(lead), indices.reshape(lead), residual


def nearest_reference(x: torch.Tensor, bank: torch.Tensor, *, metric: str = "l2", window: int | None = None,
                      group=None):
    """Nearest bank entry of every feature, and the residual.

    Args:
        x: global search: (..., C); windowed search: (B, H, W, C) (channels last).
            float16/bfloat16/float32/float64, finite, on the bank's device.
        bank: global search: (M, C); windowed search: (K, H, W, C), K reference images on the same grid.
        metric: ``'l2'`` (Euclidean distance) or ``'cosine'`` (cosine similarity, ADPretrain/ResAD).
        window: None for a global search, or an odd int p: each query only sees the p x p
            neighbourhood (clipped at the borders) of its own position in each reference image.
    Returns:
        values: x.shape[:-1], dtype of x: the Euclidean distance (l2) or the cosine similarity.
        indices: x.shape[:-1], int64 rows of ``bank.reshape(-1, C)``; lowest index on ties.
        residual: x.shape, dtype of x: ``x - bank.reshape(-1, C)[indices]``.
        group: torch.distributed process group (None: this process alone): ``bank`` is this rank's
            shard (rows, or reference images for a windowed search; may be empty), ``x`` the same
            queries on every rank; indices refer to the concatenation of the shards in rank order.
    """
    if distributed.active(group):
        return _sharded(x, bank, metric, window, group)
    _validate(x, bank, metric, window)
    values, indices = _search(x, bank, metric, window)
    residual = x - bank.reshape(-1, bank.shape[-1])[indices]
    return values.to(x.dtype), indices, residual


def _search(x, bank, metric, window):
    """(float64 values, indices), both x.shape[:-1], of validated inputs (both paths float64-exact)."""
    c = bank.shape[-1]
    key = (dispatch.bucket(x.numel() // c), dispatch.bucket(bank.numel() // c), c, metric, window or 0)
    return dispatch.run("nearest_reference", x, lambda: _search_on(x, bank, metric, window), extension=True, key=key)


def _search_on(x, bank, metric, window):
    c = bank.shape[-1]
    lead = x.shape[:-1]
    if implementation(x, extension=True) != "extension":
        v, i, _ = nearest_reference_reference(x, bank, metric=metric, window=window)
        return v, i
    xf, bf = x.float().contiguous(), bank.float().contiguous()
    if window is None:
        xf, bf = xf.reshape(-1, c), bf.reshape(-1, c)
    values, indices = torch.ops.fastad.nearest_reference(xf, bf, _METRICS[metric], window or 0)
    return values.reshape(lead), indices.reshape(lead)


def _sharded(x, bank, metric, window, group):
    c = bank.shape[-1]
    rows = bank.reshape(-1, c) if bank.numel() or bank.dim() == 2 else bank.new_empty(0, c)
    first, total = distributed.offset(rows.shape[0], group)
    if total == 0:
        raise ValueError("bank is empty on every rank; expected at least one reference feature")
    lead = x.shape[:-1]
    if rows.shape[0]:
        _validate(x, bank, metric, window)
        values, indices = _search(x, bank, metric, window)
        residual = x - rows[indices]
        indices = indices + first
    else:  # this rank holds no reference: it never wins
        check_tensor("x", x)
        values = torch.full(lead, float("inf") if metric == "l2" else -float("inf"), dtype=torch.float64, device=x.device)
        indices = torch.full(lead, -1, dtype=torch.long, device=x.device)
        residual = torch.zeros_like(x)
    device = distributed.collective_device(group)
    world = distributed.world_size(group)
    all_v = [torch.empty(lead, dtype=torch.float64, device=device) for _ in range(world)]
    all_i = [torch.empty(lead, dtype=torch.long, device=device) for _ in range(world)]
    torch.distributed.all_gather(all_v, values.to(device).contiguous(), group=group)
    torch.distributed.all_gather(all_i, indices.to(device).contiguous(), group=group)
    v, i = torch.stack(all_v), torch.stack(all_i)
    # ranks hold increasing index ranges: the first rank with the best score has the lowest index
    winner = (v.argmin(0) if metric == "l2" else v.argmax(0)).unsqueeze(0)
    best_v, best_i = v.gather(0, winner)[0].to(x.device), i.gather(0, winner)[0].to(x.device)
    mine = (winner[0] == distributed.rank(group)).to(x.device).unsqueeze(-1)
    residual = torch.where(mine, residual, torch.zeros_like(residual)).to(device)
    torch.distributed.all_reduce(residual, group=group)  # exactly one rank contributes each row
    return best_v.to(x.dtype), best_i, residual.to(x.device)
