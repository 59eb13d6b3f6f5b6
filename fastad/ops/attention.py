"""Attention restricted by a p x p window on the token grid, without an N x N score matrix or mask.

* :func:`neighbour_masked_attention`: a query may NOT attend to keys inside its window (UniAD's
  neighbour mask; RLR's MLKA). A query whose window covers the whole grid has no key left: its
  output and its gradients are defined as 0 (the dense-mask softmax would give NaN).
* :func:`local_window_attention`: a query attends ONLY to keys inside its window (RLR's LCA).
* :func:`linear_attention`: Dinomaly's ``LinearAttention2`` (kernel feature map elu + 1), one fused
  kernel per (batch, head) forward and one backward, the d x d state kept in registers.

The window of the query at grid cell (i, j) holds the key cells (i', j') with |i - i'| <= p // 2 and
|j - j'| <= p // 2, clipped at the borders, the query's own cell included (spec sections 2.2, 7). Queries
and keys lie on the same (H, W) grid, flattened row-major: N = H * W.

The Triton kernels are flash-attention style (online softmax, the log-sum-exp saved for a backward
pass that recomputes the probabilities). Each block of queries (or, backward, of keys) walks the
band of grid rows and columns its windows can reach: the whole grid for the neighbour mask, only the
window for local attention, so that one costs O(N p^2 d) instead of O(N^2 d). The mask itself is
computed from indices. The ``*_reference`` functions build the dense mask as the authors' code does.

Off the kernels (CPU without ``TRITON_INTERPRET=1``, float64) the masked ops run PyTorch's
``scaled_dot_product_attention`` with the dense boolean mask and linear attention runs the authors'
einsums: the same results, at the baselines' speed and memory.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from . import _triton
from ._checks import check_same_device, check_tensor, compute_dtype
from ._triton import tl, triton

if _triton.HAS_TRITON:
    from ._triton import store_rounded

__all__ = [
    "linear_attention",
    "linear_attention_reference",
    "local_window_attention",
    "local_window_attention_reference",
    "neighbour_masked_attention",
    "neighbour_masked_attention_reference",
    "window_mask",
]


def window_mask(grid: tuple[int, int], window: int, device=None) -> torch.Tensor:
    """(N, N) bool, True where key n lies in the ``window x window`` neighbourhood of query m."""
    h, w = grid
    r = window // 2
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    return ((ys[:, None] - ys[None]).abs() <= r) & ((xs[:, None] - xs[None]).abs() <= r)


def _check_qkv(q, k, v) -> None:
    # the NaN/inf scan reads every input once and syncs; under torch.compile it is skipped (it would
    # break the graph)
    finite = not torch.compiler.is_compiling()
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, finite=finite)
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"q, k and v must all be (batch, heads, N, head_dim) of one shape, got {tuple(q.shape)}, "
            f"{tuple(k.shape)} and {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    check_same_device(q=q, k=k, v=v)


def _validate(q, k, v, grid, window, scale) -> tuple[int, int, float]:
    _check_qkv(q, k, v)
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)
    ):
        raise ValueError(f"grid must be (H, W), two positive ints, got {grid!r}")
    if grid[0] * grid[1] != q.shape[2]:
        raise ValueError(f"grid {tuple(grid)} has {grid[0] * grid[1]} cells but q, k, v have N={q.shape[2]} tokens")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd int, got {window!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[3])
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    return int(grid[0]), int(grid[1]), float(scale)


@functools.lru_cache(maxsize=16)
def _allowed_keys(h: int, w: int, window: int, only: bool, device):
    """(N, N) allowed pairs, and the (N, 1) rows that have none (softmax'd unmasked, then zeroed, so
    that neither their output nor their gradient is NaN). Cached: a model calls it once per layer."""
    inside = window_mask((h, w), window, device)
    allowed = inside if only else ~inside
    empty = ~allowed.any(-1, keepdim=True)
    return allowed | empty, empty


def _reference(q, k, v, grid, window, scale, only: bool):
    h, w, scale = _validate(q, k, v, grid, window, scale)
    keep, empty = _allowed_keys(h, w, window, only, q.device)
    # the authors' additive float mask: 0 where allowed, -inf elsewhere
    mask = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))
    attn = torch.softmax(q @ k.transpose(-1, -2) * scale + mask, dim=-1)
    return torch.where(empty, 0, attn) @ v


def neighbour_masked_attention_reference(q, k, v, grid, window, scale=None):
    """Oracle of :func:`neighbour_masked_attention`: dense (N, N) additive mask, softmax, matmul."""
    return _reference(q, k, v, grid, window, scale, only=False)


def local_window_attention_reference(q, k, v, grid, window, scale=None):
    """Oracle of :func:`local_window_attention`: dense (N, N) additive mask, softmax, matmul."""
    return _reference(q, k, v, grid, window, scale, only=True)


def neighbour_masked_attention(q, k, v, grid, window, scale=None):
    """Softmax attention in which no query attends to the keys inside its own ``window``.

    Args:
        q, k, v: (batch, heads, N, head_dim) float16, bfloat16, float32 or float64, one shape and
            dtype; N = H * W tokens of the grid in row-major order.
        grid: (H, W) of the token grid.
        window: odd window side p (UniAD 7; RLR 11 / 7 / 5 on 64 / 32 / 16 grids).
        scale: score scale, default 1 / sqrt(head_dim) (nn.MultiheadAttention's).
    Returns:
        (batch, heads, N, head_dim) in the input dtype; rows with no key left are 0. Differentiable
        with respect to q, k and v.
    """
    return _grid_attention_dispatch(q, k, v, grid, window, scale, only=False)


def local_window_attention(q, k, v, grid, window, scale=None):
    """Softmax attention in which every query attends only to the keys inside its own ``window``.

    Same arguments and result as :func:`neighbour_masked_attention`; every query sees at least its
    own cell, so no row is empty.
    """
    return _grid_attention_dispatch(q, k, v, grid, window, scale, only=True)


def _grid_attention_dispatch(q, k, v, grid, window, scale, only: bool):
    h, w, scale = _validate(q, k, v, grid, window, scale)
    if _triton.use_triton(q):
        return torch.ops.fastad.grid_attention(q, k, v, h, w, window // 2, only, scale)[0]
    # PyTorch path: SDPA (a fused CPU kernel) with the dense boolean mask
    keep, empty = _allowed_keys(h, w, window, only, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale).masked_fill(empty, 0)


# ----------------------------------------------------------------------------------------------------
# the op: forward, backward, fake kernels, autograd


def _require_kernels(q: torch.Tensor) -> None:
    if not _triton.use_triton(q):
        raise RuntimeError(
            "the fastad attention kernels need a CUDA tensor (or TRITON_INTERPRET=1 on the CPU) of a 16- or "
            "32-bit float dtype; call the public functions, which take the PyTorch path otherwise"
        )


@torch.library.custom_op("fastad::grid_attention", mutates_args=())
def _grid_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int, w: int, radius: int, only: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    _require_kernels(q)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, nh, n, d = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((b, nh, n), dtype=torch.float32, device=q.device)
    cfg = _config(q, w)
    grid = (triton.cdiv(n, cfg["BLOCK_M"]), b * nh)
    _fwd_kernel[grid](q, k, v, o, lse, scale, n, d, h, w, radius, ONLY=only, **cfg)
    return o, lse


@_grid_attention.register_fake
def _(q, k, v, h, w, radius, only, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("fastad::grid_attention_backward", mutates_args=())
def _grid_attention_backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    h: int, w: int, radius: int, only: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    _require_kernels(q)
    do, q, k, v = do.contiguous(), q.contiguous(), k.contiguous(), v.contiguous()
    b, nh, n, d = q.shape
    delta = (do.float() * o.float()).sum(-1)  # rowsum(dO * O), FlashAttention-2's D
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    cfg = _config(q, w)
    grid = (triton.cdiv(n, cfg["BLOCK_M"]), b * nh)
    _bwd_dq_kernel[grid](q, k, v, do, lse, delta, dq, scale, n, d, h, w, radius, ONLY=only, **cfg)
    _bwd_dkdv_kernel[grid](q, k, v, do, lse, delta, dk, dv, scale, n, d, h, w, radius, ONLY=only, **cfg)
    return dq, dk, dv


@_grid_attention_backward.register_fake
def _(do, q, k, v, o, lse, h, w, radius, only, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, h, w, radius, only, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.args = (h, w, radius, only, scale)


def _backward(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.fastad.grid_attention_backward(do, q, k, v, o, lse, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


_grid_attention.register_autograd(_backward, setup_context=_setup_context)


def _config(q: torch.Tensor, w: int) -> dict:
    d = q.shape[3]
    return dict(
        BLOCK_M=64 if q.is_cuda else 16,
        BLOCK_N=max(16, min(64, triton.next_power_of_2(w))),  # one grid row (or a part) per key block
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        # float32 products (no TF32) for float32 inputs, like the reference; bfloat16 tiles are also
        # widened under the interpreter, whose bfloat16 tl.dot is wrong
        F32=q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and not q.is_cuda),
    )


# ----------------------------------------------------------------------------------------------------
# linear attention (Dinomaly)


def _phi(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.elu(x) + 1


def linear_attention_reference(q, k, v, eps: float = 0.0):
    """Oracle of :func:`linear_attention`, written as Dinomaly's LinearAttention2 (einsums)."""
    _validate_linear(q, k, v, eps)
    q, k = _phi(q), _phi(k)
    kv = torch.einsum("...sd,...se->...de", k, v)
    z = 1.0 / (torch.einsum("...nd,...d->...n", q, k.sum(dim=-2)) + eps)
    return torch.einsum("...de,...nd,...n->...ne", kv, q, z)


def linear_attention(q, k, v, eps: float = 0.0):
    """Dinomaly's linear attention: phi(u) = elu(u) + 1 on q and k (no 1/sqrt(d) scale),
    out_i = phi(q_i)^T KV / (phi(q_i) . sum_s phi(k_s) + eps) with KV = sum_s phi(k_s) v_s^T per head.

    Args:
        q, k, v: (batch, heads, N, head_dim) float16, bfloat16, float32 or float64, one shape and dtype.
        eps: added to the denominator (Dinomaly: 0; its README suggests 1e-6 if the loss turns NaN).
    Returns:
        (batch, heads, N, head_dim) in the input dtype, differentiable with respect to q, k and v.
    """
    _validate_linear(q, k, v, eps)
    if _triton.use_triton(q):
        return torch.ops.fastad.linear_attention(q, k, v, float(eps))[0]
    # PyTorch path: the authors' einsums, in float32 for 16-bit inputs as the kernel computes
    cdt = compute_dtype(q)
    return linear_attention_reference(q.to(cdt), k.to(cdt), v.to(cdt), eps).to(q.dtype)


def _validate_linear(q, k, v, eps) -> None:
    _check_qkv(q, k, v)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


@torch.library.custom_op("fastad::linear_attention", mutates_args=())
def _linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, KV (B, H, d, d) float32, sum_s phi(k_s) (B, H, d) float32)."""
    _require_kernels(q)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, nh, n, d = q.shape
    out = torch.empty_like(q)
    kv = torch.empty((b, nh, d, d), dtype=torch.float32, device=q.device)
    ksum = torch.empty((b, nh, d), dtype=torch.float32, device=q.device)
    _linear_fwd_kernel[(b * nh,)](q, k, v, out, kv, ksum, eps, n, d, **_linear_config(q))
    return out, kv, ksum


@_linear_attention.register_fake
def _(q, k, v, eps):
    b, nh, _, d = q.shape
    return torch.empty_like(q), q.new_empty((b, nh, d, d), dtype=torch.float32), q.new_empty((b, nh, d), dtype=torch.float32)


@torch.library.custom_op("fastad::linear_attention_backward", mutates_args=())
def _linear_attention_backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, ksum: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _require_kernels(q)
    do, q, k, v = do.contiguous(), q.contiguous(), k.contiguous(), v.contiguous()
    b, nh, n, d = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _linear_bwd_kernel[(b * nh,)](q, k, v, do, kv, ksum, dq, dk, dv, eps, n, d, **_linear_config(q))
    return dq, dk, dv


@_linear_attention_backward.register_fake
def _(do, q, k, v, kv, ksum, eps):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _linear_setup_context(ctx, inputs, output):
    q, k, v, eps = inputs
    ctx.save_for_backward(q, k, v, output[1], output[2])
    ctx.eps = eps


def _linear_backward(ctx, do, dkv, dksum):
    q, k, v, kv, ksum = ctx.saved_tensors
    return (*torch.ops.fastad.linear_attention_backward(do, q, k, v, kv, ksum, ctx.eps), None)


_linear_attention.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def _linear_config(q: torch.Tensor) -> dict:
    return dict(
        BLOCK_N=64 if q.is_cuda else 16,
        BLOCK_D=max(16, triton.next_power_of_2(q.shape[3])),
        F32=q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and not q.is_cuda),
    )


if _triton.HAS_TRITON:

    @triton.jit
    def _band(first, last, H, W, R, ONLY: tl.constexpr):
        """Grid rows and columns [r_lo, r_hi] x [c_lo, c_hi] reachable from the windows of the tokens
        first..last (row-major indices): the window band for local attention, all cells otherwise."""
        if ONLY:
            r0 = first // W
            r1 = last // W
            r_lo = tl.maximum(r0 - R, 0)
            r_hi = tl.minimum(r1 + R, H - 1)
            c_lo = tl.where(r0 == r1, tl.maximum(first % W - R, 0), 0)
            c_hi = tl.where(r0 == r1, tl.minimum(last % W + R, W - 1), W - 1)
        else:
            r_lo = 0
            r_hi = H - 1
            c_lo = 0
            c_hi = W - 1
        return r_lo, r_hi, c_lo, c_hi

    @triton.jit
    def _dot(a, b, F32: tl.constexpr):
        if F32:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _ld(ptr, mask, F32: tl.constexpr):
        x = tl.load(ptr, mask=mask, other=0.0)
        if F32:
            x = x.to(tl.float32)
        return x

    @triton.jit
    def _allowed(rows_m, cols_m, rows_n, cols_n, valid, R, ONLY: tl.constexpr):
        inside = (tl.abs(rows_m[:, None] - rows_n[None, :]) <= R) & (tl.abs(cols_m[:, None] - cols_n[None, :]) <= R)
        if ONLY:
            return inside & valid
        return (~inside) & valid

    @triton.jit
    def _row_tile(A, B, base, r, c0, c_hi, W, D, offs_d, dm, BLOCK_N: tl.constexpr, F32: tl.constexpr):
        """Rows of A and B for the grid cells (r, c0 .. c0 + BLOCK_N - 1), cut at column c_hi."""
        cols = c0 + tl.arange(0, BLOCK_N)
        valid = cols <= c_hi
        ptrs = base + (r * W + cols)[:, None] * D + offs_d[None, :]
        mask = valid[:, None] & dm[None, :]
        return _ld(A + ptrs, mask, F32), _ld(B + ptrs, mask, F32), cols, valid

    @triton.jit
    def _fwd_kernel(
        Q, K, V, O, LSE, scale, N, D, H, W, R,
        ONLY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, F32: tl.constexpr,
    ):  # fmt: skip
        bh = tl.program_id(1)
        first = tl.program_id(0) * BLOCK_M
        offs_m = first + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mm = offs_m < N
        dm = offs_d < D
        base = bh * N * D
        q = _ld(Q + base + offs_m[:, None] * D + offs_d[None, :], mm[:, None] & dm[None, :], F32)
        rows_m = offs_m // W
        cols_m = offs_m % W
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        r_lo, r_hi, c_lo, c_hi = _band(first, tl.minimum(first + BLOCK_M, N) - 1, H, W, R, ONLY)
        for kr in range(r_lo, r_hi + 1):
            for c0 in range(c_lo, c_hi + 1, BLOCK_N):
                k, v, cols_n, cn = _row_tile(K, V, base, kr, c0, c_hi, W, D, offs_d, dm, BLOCK_N, F32)
                s = _dot(q, tl.trans(k), F32) * scale
                ok = _allowed(rows_m, cols_m, kr + tl.zeros([BLOCK_N], dtype=tl.int32), cols_n, cn[None, :], R, ONLY)
                s = tl.where(ok, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
                p = tl.exp(s - m_safe[:, None])
                alpha = tl.exp(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, F32)
                m_i = m_new
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        store_rounded(O + base + offs_m[:, None] * D + offs_d[None, :], out, mm[:, None] & dm[None, :])
        tl.store(LSE + bh * N + offs_m, tl.where(empty, float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i))), mask=mm)

    @triton.jit
    def _bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, scale, N, D, H, W, R,
        ONLY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, F32: tl.constexpr,
    ):  # fmt: skip
        bh = tl.program_id(1)
        first = tl.program_id(0) * BLOCK_M
        offs_m = first + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mm = offs_m < N
        dm = offs_d < D
        base = bh * N * D
        qd_mask = mm[:, None] & dm[None, :]
        q = _ld(Q + base + offs_m[:, None] * D + offs_d[None, :], qd_mask, F32)
        do = _ld(DO + base + offs_m[:, None] * D + offs_d[None, :], qd_mask, F32)
        lse = tl.load(LSE + bh * N + offs_m, mask=mm, other=float("inf"))
        delta = tl.load(DELTA + bh * N + offs_m, mask=mm, other=0.0)
        rows_m = offs_m // W
        cols_m = offs_m % W
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        r_lo, r_hi, c_lo, c_hi = _band(first, tl.minimum(first + BLOCK_M, N) - 1, H, W, R, ONLY)
        for kr in range(r_lo, r_hi + 1):
            for c0 in range(c_lo, c_hi + 1, BLOCK_N):
                k, v, cols_n, cn = _row_tile(K, V, base, kr, c0, c_hi, W, D, offs_d, dm, BLOCK_N, F32)
                s = _dot(q, tl.trans(k), F32) * scale
                ok = _allowed(rows_m, cols_m, kr + tl.zeros([BLOCK_N], dtype=tl.int32), cols_n, cn[None, :], R, ONLY)
                p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
                dp = _dot(do, tl.trans(v), F32)
                ds = p * (dp - delta[:, None])
                dq += _dot(ds.to(k.dtype), k, F32)
        store_rounded(DQ + base + offs_m[:, None] * D + offs_d[None, :], dq * scale, qd_mask)

    @triton.jit
    def _bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, scale, N, D, H, W, R,
        ONLY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, F32: tl.constexpr,
    ):  # fmt: skip
        # one block of BLOCK_M keys; the queries that can see them lie in the same (symmetric) band
        bh = tl.program_id(1)
        first = tl.program_id(0) * BLOCK_M
        offs_k = first + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        km = offs_k < N
        dm = offs_d < D
        base = bh * N * D
        kd_mask = km[:, None] & dm[None, :]
        k = _ld(K + base + offs_k[:, None] * D + offs_d[None, :], kd_mask, F32)
        v = _ld(V + base + offs_k[:, None] * D + offs_d[None, :], kd_mask, F32)
        rows_k = offs_k // W
        cols_k = offs_k % W
        dk = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        r_lo, r_hi, c_lo, c_hi = _band(first, tl.minimum(first + BLOCK_M, N) - 1, H, W, R, ONLY)
        for qr in range(r_lo, r_hi + 1):
            for c0 in range(c_lo, c_hi + 1, BLOCK_N):
                q, do, cols_q, cq = _row_tile(Q, DO, base, qr, c0, c_hi, W, D, offs_d, dm, BLOCK_N, F32)
                offs_q = qr * W + cols_q
                lse = tl.load(LSE + bh * N + offs_q, mask=cq, other=float("inf"))
                delta = tl.load(DELTA + bh * N + offs_q, mask=cq, other=0.0)
                # transposed scores: keys x queries
                st = _dot(k, tl.trans(q), F32) * scale
                ok = _allowed(rows_k, cols_k, qr + tl.zeros([BLOCK_N], dtype=tl.int32), cols_q, cq[None, :], R, ONLY)
                pt = tl.where(ok, tl.exp(st - lse[None, :]), 0.0)
                dv += _dot(pt.to(do.dtype), do, F32)
                dpt = _dot(v, tl.trans(do), F32)
                dst = pt * (dpt - delta[None, :])
                dk += _dot(dst.to(q.dtype), q, F32)
        store_rounded(DK + base + offs_k[:, None] * D + offs_d[None, :], dk * scale, kd_mask)
        store_rounded(DV + base + offs_k[:, None] * D + offs_d[None, :], dv, kd_mask)

    @triton.jit
    def _elu1(x):
        return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))

    @triton.jit
    def _linear_fwd_kernel(
        Q, K, V, O, KV, KSUM, eps, N, D,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, F32: tl.constexpr,
    ):  # fmt: skip
        bh = tl.program_id(0)
        base = bh * N * D
        offs_d = tl.arange(0, BLOCK_D)
        dm = offs_d < D
        kv = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
        ksum = tl.zeros([BLOCK_D], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            m = (offs_n < N)[:, None] & dm[None, :]
            k = _ld(K + base + offs_n[:, None] * D + offs_d[None, :], m, F32)
            v = _ld(V + base + offs_n[:, None] * D + offs_d[None, :], m, F32)
            pk = tl.where(m, _elu1(k.to(tl.float32)), 0.0)  # padding rows must not add phi(0) = 1
            kv += _dot(tl.trans(pk).to(v.dtype), v, F32)
            ksum += tl.sum(pk, 0)
        dd = offs_d[:, None] * D + offs_d[None, :]
        tl.store(KV + bh * D * D + dd, kv, mask=dm[:, None] & dm[None, :])
        tl.store(KSUM + bh * D + offs_d, ksum, mask=dm)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            m = (offs_n < N)[:, None] & dm[None, :]
            q = _ld(Q + base + offs_n[:, None] * D + offs_d[None, :], m, F32)
            pq = tl.where(m, _elu1(q.to(tl.float32)), 0.0)
            num = _dot(pq, kv, True)
            den = tl.where(offs_n < N, tl.sum(pq * ksum[None, :], 1) + eps, 1.0)  # padding rows: no 0 / 0
            store_rounded(O + base + offs_n[:, None] * D + offs_d[None, :], num / den[:, None], m)

    @triton.jit
    def _linear_bwd_kernel(
        Q, K, V, DO, KV, KSUM, DQ, DK, DV, eps, N, D,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, F32: tl.constexpr,
    ):  # fmt: skip
        bh = tl.program_id(0)
        base = bh * N * D
        offs_d = tl.arange(0, BLOCK_D)
        dm = offs_d < D
        dd = offs_d[:, None] * D + offs_d[None, :]
        kv = tl.load(KV + bh * D * D + dd, mask=dm[:, None] & dm[None, :], other=0.0)
        ksum = tl.load(KSUM + bh * D + offs_d, mask=dm, other=0.0)
        dkv = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
        dksum = tl.zeros([BLOCK_D], dtype=tl.float32)
        # queries: out = num / den, num = phi(q) KV, den = phi(q) . ksum + eps
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            m = (offs_n < N)[:, None] & dm[None, :]
            ptrs = base + offs_n[:, None] * D + offs_d[None, :]
            q = _ld(Q + ptrs, m, F32).to(tl.float32)
            do = _ld(DO + ptrs, m, F32).to(tl.float32)
            pq = tl.where(m, _elu1(q), 0.0)
            num = _dot(pq, kv, True)
            den = tl.where(offs_n < N, tl.sum(pq * ksum[None, :], 1) + eps, 1.0)
            dnum = do / den[:, None]
            dden = -tl.sum(dnum * num, 1) / den
            dpq = _dot(dnum, tl.trans(kv), True) + dden[:, None] * ksum[None, :]
            dq = dpq * tl.where(q > 0, 1.0, tl.exp(tl.minimum(q, 0.0)))
            store_rounded(DQ + ptrs, dq, m)
            dkv += _dot(tl.trans(pq), dnum, True)
            dksum += tl.sum(dden[:, None] * pq, 0)
        # keys and values: KV = sum_s phi(k_s) v_s^T, ksum = sum_s phi(k_s)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            m = (offs_n < N)[:, None] & dm[None, :]
            ptrs = base + offs_n[:, None] * D + offs_d[None, :]
            k = _ld(K + ptrs, m, F32).to(tl.float32)
            v = _ld(V + ptrs, m, F32).to(tl.float32)
            pk = tl.where(m, _elu1(k), 0.0)
            dpk = _dot(v, tl.trans(dkv), True) + dksum[None, :]
            store_rounded(DK + ptrs, dpk * tl.where(k > 0, 1.0, tl.exp(tl.minimum(k, 0.0))), m)
            store_rounded(DV + ptrs, _dot(pk, dkv, True), m)
