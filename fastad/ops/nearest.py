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
from .feature_bank import FeatureBank, _candidates_top, operand_roundoff
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
    """(float64 values, indices), both x.shape[:-1], of validated inputs (every path float64-exact)."""
    c = bank.shape[-1]
    key = (dispatch.bucket(x.numel() // c), dispatch.bucket(bank.numel() // c), c, metric, window or 0)
    # global search on CUDA: the GEMM path first (the extension's float64 warp per query reuses no bank row)
    kinds = dict(extension=True, triton=window is None, prefer="triton" if x.is_cuda else None)
    return dispatch.run("nearest_reference", x, lambda: _search_on(x, bank, metric, window, kinds), key=key, **kinds)


def _search_on(x, bank, metric, window, kinds):
    c = bank.shape[-1]
    lead = x.shape[:-1]
    name = implementation(x, **kinds)
    if name == "triton":
        v, i = _search_gemm(x.reshape(-1, c), bank.reshape(-1, c), metric)
        return v.reshape(lead), i.reshape(lead)
    if name != "extension":
        v, i, _ = nearest_reference_reference(x, bank, metric=metric, window=window)
        return v, i
    xf, bf = x.float().contiguous(), bank.float().contiguous()
    if window is None:
        xf, bf = xf.reshape(-1, c), bf.reshape(-1, c)
    values, indices = torch.ops.fastad.nearest_reference(xf, bf, _METRICS[metric], window or 0)
    return values.reshape(lead), indices.reshape(lead)


_GEMM_ELEMENTS = 1 << 24  # queries x bank rows per score block of the GEMM path


def _search_gemm(x: torch.Tensor, bank: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Global search from a GEMM: (N, C) x and (M, C) bank, 16/32-bit floats -> (N,) float64 values and
    int64 indices, the float64 answer of the float32 rows. l2: :class:`FeatureBank`'s exact search
    (candidates from a GEMM with a rigorous bound, re-scored in float64). Cosine: one GEMM of the rows
    against the bank normalised in float64 and rounded to float32 (a query's own norm is one positive
    factor of its row: it changes no ranking, so queries are only scaled by a power of two to a norm
    near 1, exactly, against overflow), then every bank row scoring within twice the bound of the
    best re-scored as ``x.b / (|x| |b|)`` in float64 (Triton)."""
    q, b = x.float().contiguous(), bank.float().contiguous()
    if metric == "l2":
        fb = FeatureBank(b.shape[1], device=b.device)
        fb.add(b)
        d, i = fb._search_torch(q, 1)  # squared distances, float64
        return d[:, 0].sqrt(), i[:, 0]
    c = q.shape[1]
    qn = torch.linalg.vector_norm(q, dim=1, dtype=torch.float64).clamp_min(_EPS)
    bn = torch.linalg.vector_norm(b, dim=1, dtype=torch.float64).clamp_min(_EPS)
    b_unit = (b / bn.unsqueeze(1)).float()
    # power-of-two row scales (exact in float32) that bring every query's norm into [1, 2)
    scales = torch.exp2(-torch.floor(torch.log2(qn)).clamp(-126, 126))
    # score = q'.b_unit (q' = the scaled q) vs the exact q'.b/|b|: |b_unit - b/|b|| <= u32 + d64
    # (rounding to float32, the float64 norm's error); the GEMM adds (2u + u^2 + gamma_C) |q'| |b_unit|
    # (operands rounded to u: operand_roundoff, float32 accumulation in any order); tiny: subnormal
    # components of q' or b_unit; 5% for second-order terms
    u32, d64, u = 2.0 ** -24, (c + 4) * 2.0 ** -53, operand_roundoff(torch.float32)
    e = 1.05 * ((u32 + d64) + (2 * u + u * u + c * 2.0 ** -24) * (1 + 2.0 ** -21))
    tiny = 4 * (c + 1) * 2.0 ** -149
    rows = max(1, min(4096, _GEMM_ELEMENTS // b.shape[0]))
    values, indices = [], []
    for s in range(0, q.shape[0], rows):
        qc, nc, sc = q[s : s + rows], qn[s : s + rows], scales[s : s + rows]
        score = (qc * sc.float().unsqueeze(1)) @ b_unit.t()
        v, i = _candidates_top(score, 2 * (e * nc * sc + tiny), qc, b, 1, "cosine", (nc, bn))
        values.append(v[:, 0])
        indices.append(i[:, 0])
    return torch.cat(values), torch.cat(indices)


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
