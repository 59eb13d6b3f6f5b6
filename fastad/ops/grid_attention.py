"""Attention restricted by a p x p window on the token grid, without an N x N score matrix or mask.

* :func:`neighbour_masked_attention`: a query may NOT attend to keys inside its window (UniAD's
  neighbour mask; RLR's MLKA). A query whose window covers the whole grid has no key left: its
  output and its gradients are defined as 0 (the dense-mask softmax would give NaN).
* :func:`local_window_attention`: a query attends ONLY to keys inside its window (RLR's LCA).

The window of the query at grid cell (i, j) holds the key cells (i', j') with |i - i'| <= p // 2 and
|j - j'| <= p // 2, clipped at the borders, the query's own cell included (spec sections 2.2, 7):
:func:`window_mask`, also used by FOD's windowed nearest-feature search. Queries and keys lie on the
same (H, W) grid, flattened row-major: N = H * W.

The Triton kernels are flash-attention style (online softmax, the log-sum-exp saved for a backward
pass that recomputes the probabilities). Local attention: each block of queries (or, backward, of
keys) is a 2-D tile of the grid (TH rows x TW columns, NATTEN's token order without moving the
tokens) and walks only the band of cells its windows can reach, flattened into key tiles, so that it
costs O(N p^2 d) instead of O(N^2 d); the host picks TW per shape to compute the fewest pairs
(:func:`_tiling`). Neighbour mask: flat 64-token tiles over the whole
sequence (grid rows need not fit a tile), each classified from its grid rows: a tile outside every
window of the block is all allowed and runs without the mask, the few that meet the window band get
the mask. The mask itself is computed from indices. The ``*_reference`` functions build the dense
mask as the authors' code does. Off the kernels (:mod:`fastad.ops.dispatch`) the ops run PyTorch's
``scaled_dot_product_attention`` with the dense boolean mask: the same results, at the baselines'
speed and memory. On CUDA a third candidate of the measuring dispatcher is FlexAttention (compiled
``flex_attention`` with the window rule as its ``mask_mod`` and a cached ``BlockMask``: tiles outside
the band are skipped, tiles wholly inside it run without the mask).
"""
from __future__ import annotations

import collections
import functools
import math

import torch
import torch.nn.functional as F

from ._checks import check_qkv
from ._triton import tl, triton
from . import dispatch
from .dispatch import HAS_TRITON, implementation, require_triton

if HAS_TRITON:
    from ._triton import dot, load, store_rounded

__all__ = [
    "local_window_attention",
    "local_window_attention_reference",
    "neighbour_masked_attention",
    "neighbour_masked_attention_reference",
    "window_mask",
]

# FlashAttention-style tiles of head dim up to 128 for 16-bit inputs, 64 for float32 (exact IEEE
# products: a 128-wide float32 tile overflows sm_120's shared memory; fastad.ops.compile_check);
# larger heads take the PyTorch path
TRITON_MAX_HEAD_DIM = 128
TRITON_MAX_HEAD_DIM_F32 = 64


def _max_head_dim(dtype: torch.dtype) -> int:
    return TRITON_MAX_HEAD_DIM_F32 if dtype == torch.float32 else TRITON_MAX_HEAD_DIM


def window_mask(grid: tuple[int, int], window: int, device=None) -> torch.Tensor:
    """(N, N) bool, True where key n lies in the ``window x window`` neighbourhood of query m
    (N = H * W row-major cells of ``grid`` = (H, W); clipped at the borders)."""
    h, w = grid
    r = window // 2
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    return ((ys[:, None] - ys[None]).abs() <= r) & ((xs[:, None] - xs[None]).abs() <= r)


def _validate(q, k, v, grid, window, scale, nonfinite="raise") -> tuple[int, int, float]:
    check_qkv(q, k, v, nonfinite)
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


def neighbour_masked_attention(q, k, v, grid, window, scale=None, *, nonfinite: str = "raise"):
    """Softmax attention in which no query attends to the keys inside its own ``window``.

    Args:
        q, k, v: (batch, heads, N, head_dim) float16, bfloat16, float32 or float64, one shape and
            dtype; N = H * W tokens of the grid in row-major order.
        grid: (H, W) of the token grid.
        window: odd window side p (UniAD 7; RLR 11 / 7 / 5 on 64 / 32 / 16 grids).
        scale: score scale, default 1 / sqrt(head_dim) (nn.MultiheadAttention's).
        nonfinite: 'raise' (ValueError for NaN/inf in q, k or v: a scan and one host read) or 'nan'
            (no scan, no host read: NaN/inf reach the output; how the models train).
    Returns:
        (batch, heads, N, head_dim) in the input dtype; rows with no key left are 0. Differentiable
        with respect to q, k and v.
    """
    return _grid_attention_dispatch(q, k, v, grid, window, scale, nonfinite, only=False)


def local_window_attention(q, k, v, grid, window, scale=None, *, nonfinite: str = "raise"):
    """Softmax attention in which every query attends only to the keys inside its own ``window``.

    Same arguments and result as :func:`neighbour_masked_attention`; every query sees at least its
    own cell, so no row is empty.
    """
    return _grid_attention_dispatch(q, k, v, grid, window, scale, nonfinite, only=True)


def _grid_attention_dispatch(q, k, v, grid, window, scale, nonfinite, only: bool):
    h, w, scale = _validate(q, k, v, grid, window, scale, nonfinite)
    op = "local_window_attention" if only else "neighbour_masked_attention"
    key = (dispatch.bucket(q.shape[0] * q.shape[1]), h, w, window, q.shape[3])
    kinds = dict(triton=q.shape[3] <= _max_head_dim(q.dtype), flex=_flex_head_dim(q.shape[3]))
    return dispatch.run(op, q, lambda: _grid_attention_on(q, k, v, h, w, window, scale, only, kinds),
                        key=key, grad_inputs=(q, k, v), **kinds)


def _grid_attention_on(q, k, v, h, w, window, scale, only: bool, kinds):
    name = implementation(q, **kinds)
    if name == "triton":
        return torch.ops.fastad.grid_attention(q, k, v, h, w, window // 2, only, scale)[0]
    if name == "flex":
        return flex_grid_attention(q, k, v, h, w, window, scale, only)
    # PyTorch path: SDPA (a fused CPU kernel) with the dense boolean mask
    keep, empty = _allowed_keys(h, w, window, only, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale).masked_fill(empty, 0)


# ----------------------------------------------------------------------------------------------------
# FlexAttention: PyTorch's compiled block-sparse flash kernel with the window rule as its mask_mod


def _flex_head_dim(d: int) -> bool:
    """Head dims the FlexAttention path takes: powers of two from 16 to 128 (its tiled kernel's)."""
    return 16 <= d <= 128 and d & (d - 1) == 0


def _window_mask_mod(w: int, radius: int, only: bool):
    """FlexAttention ``mask_mod`` of the window rule on a row-major grid ``w`` wide: True where query
    token ``qi`` may attend key token ``ki`` (inside its window for local attention, outside for the
    neighbour mask)."""
    def mask_mod(b, h, qi, ki):
        inside = ((qi // w - ki // w).abs() <= radius) & ((qi % w - ki % w).abs() <= radius)
        return inside if only else ~inside
    return mask_mod


@functools.lru_cache(maxsize=32)
def _block_mask(h: int, w: int, window: int, only: bool, device):
    """The cached ``BlockMask`` of a (grid, window, kind) on ``device``: which (query block, key block)
    tiles hold no allowed pair (skipped), only allowed pairs (no mask evaluated) or both."""
    from torch.nn.attention.flex_attention import create_block_mask

    n = h * w
    return create_block_mask(_window_mask_mod(w, window // 2, only), None, None, n, n, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_grid_attention(q, k, v, h: int, w: int, window: int, scale: float, only: bool, *, compiled: bool = True):
    """:func:`neighbour_masked_attention` (``only=False``) / :func:`local_window_attention` (``only=True``)
    through FlexAttention: q, k, v (batch, heads, N = h*w, d) of one floating dtype -> (batch, heads, N, d);
    a query with no key left gives 0 (FlexAttention's rule for an empty row, and fastad's).
    ``compiled=False`` runs FlexAttention's eager (dense, forward-only on the CPU) implementation, for
    tests of the mask off the GPU."""
    from torch.nn.attention.flex_attention import flex_attention

    mask = _block_mask(h, w, window, only, q.device)
    if not compiled:
        return flex_attention(q, k, v, block_mask=mask, scale=scale)
    # one compiled graph per (grid, window, kind, shape, dtype): more than dynamo's default 8 recompiles
    # of one function (RLR alone has 3 grids x 2 kinds), past which it would run FlexAttention's dense
    # eager fallback
    with torch._dynamo.config.patch(recompile_limit=max(256, torch._dynamo.config.recompile_limit)):
        return _compiled_flex()(q, k, v, block_mask=mask, scale=scale)


# ----------------------------------------------------------------------------------------------------
# the op: forward, backward, fake kernels, autograd


@torch.library.custom_op("fastad::grid_attention", mutates_args=())
def _grid_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int, w: int, radius: int, only: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    _require_kernel(q)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, nh, n, d = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((b, nh, n), dtype=torch.float32, device=q.device)
    cfg = _config(q.dtype, d, w, q.is_cuda, only)
    tw, tiles = _tiling(h, w, radius, only, cfg["BLOCK_M"], cfg["BLOCK_N"])
    _fwd_kernel[(tiles, b * nh)](q, k, v, o, lse, scale, n, d, h, w, radius, tw, ONLY=only, **cfg)
    return o, lse


@_grid_attention.register_fake
def _(q, k, v, h, w, radius, only, scale):  # contiguous, as the kernel's outputs (torch.compile checks the strides)
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("fastad::grid_attention_backward", mutates_args=())
def _grid_attention_backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    h: int, w: int, radius: int, only: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    _require_kernel(q)
    do, q, k, v = do.contiguous(), q.contiguous(), k.contiguous(), v.contiguous()
    b, nh, n, d = q.shape
    delta = (do.float() * o.float()).sum(-1)  # rowsum(dO * O), FlashAttention-2's D
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    cfg = _config(q.dtype, d, w, q.is_cuda, only)
    tw, tiles = _tiling(h, w, radius, only, cfg["BLOCK_M"], cfg["BLOCK_N"])
    grid = (tiles, b * nh)
    _bwd_dq_kernel[grid](q, k, v, do, lse, delta, dq, scale, n, d, h, w, radius, tw, ONLY=only, **cfg)
    _bwd_dkdv_kernel[grid](q, k, v, do, lse, delta, dk, dv, scale, n, d, h, w, radius, tw, ONLY=only, **cfg)
    return dq, dk, dv


@_grid_attention_backward.register_fake
def _(do, q, k, v, o, lse, h, w, radius, only, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(k, memory_format=torch.contiguous_format), torch.empty_like(v, memory_format=torch.contiguous_format)


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


def _require_kernel(q: torch.Tensor) -> None:
    require_triton(q)
    if q.shape[3] > _max_head_dim(q.dtype):
        raise ValueError(f"the grid attention kernels take {q.dtype} head dims up to {_max_head_dim(q.dtype)}, got {q.shape[3]}; "
                         "call the public op, which takes the PyTorch path for larger heads")


# CUDA tiles per (float32, BLOCK_D, BLOCK_N): (BLOCK_M, num_warps), the largest for which the forward
# and both backward kernels fit in registers on sm_80, sm_90, sm_100 and sm_120 (measured by
# fastad.ops.compile_check; float32 runs exact IEEE products and needs smaller tiles)
_CUDA_TILES = {
    (False, 16, 16): (64, 4), (False, 16, 32): (64, 4), (False, 16, 64): (64, 4),
    (False, 32, 16): (64, 4), (False, 32, 32): (64, 4), (False, 32, 64): (64, 4),
    (False, 64, 16): (64, 4), (False, 64, 32): (64, 8), (False, 64, 64): (32, 8),
    (False, 128, 16): (64, 8), (False, 128, 32): (32, 8),  # 64-wide key tiles at 128: at the register limit
    (True, 16, 16): (64, 4), (True, 16, 32): (64, 8), (True, 16, 64): (32, 4),
    (True, 32, 16): (64, 4), (True, 32, 32): (32, 4), (True, 32, 64): (32, 8),
    (True, 64, 16): (64, 8), (True, 64, 64): (32, 8),  # 32-wide key tiles spill: 16 or 64
}


def _config(dtype: torch.dtype, d: int, w: int, cuda: bool, only: bool = True) -> dict:
    """Constexprs and launch options for head dim ``d`` on a grid ``w`` wide, local (``only``) or
    neighbour-masked attention (fastad.ops.compile_check compiles every CUDA one)."""
    block_d = max(16, triton.next_power_of_2(d))
    # neighbour mask: flat 64-token key blocks; local: key blocks of the flattened band, sized by
    # the grid width (the band is about a grid row wide or narrower)
    block_n = max(16, min(64, triton.next_power_of_2(w))) if only else 64
    # float32 products (no TF32) for float32 inputs, like the reference; bfloat16 tiles are also
    # widened under the interpreter, whose bfloat16 tl.dot is wrong
    f32 = dtype == torch.float32 or (dtype == torch.bfloat16 and not cuda)
    if not cuda:
        return dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_D=block_d, F32=f32, num_warps=4, num_stages=3)
    if f32 and block_d == 64 and block_n == 32:
        block_n = 16
    if block_d == 128:
        block_n = min(block_n, 32)
    block_m, warps = _CUDA_TILES[(f32, block_d, block_n)]
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, F32=f32, num_warps=warps, num_stages=3)


def _band_sizes(n: int, tile: int, radius: int) -> collections.Counter:
    """How many tiles of ``tile`` cells along a grid side of ``n`` reach each band length (the cells
    their windows of radius ``radius`` cover, cut at the borders)."""
    return collections.Counter(min(min(t + tile, n) - 1 + radius, n - 1) - max(t - radius, 0) + 1
                               for t in range(0, n, tile))


def _pairs(h: int, w: int, radius: int, block_m: int, block_n: int, tw: int) -> int:
    """(query, key) pairs the local kernels compute on an h x w grid with tiles TW = ``tw`` wide:
    over the tiles, BLOCK_M x the band their windows reach rounded up to whole BLOCK_N key tiles."""
    rows, cols = _band_sizes(h, block_m // tw, radius), _band_sizes(w, tw, radius)
    return block_m * sum(nr * nc * triton.cdiv(br * bc, block_n) * block_n
                         for br, nr in rows.items() for bc, nc in cols.items())


@functools.lru_cache(maxsize=256)
def _tiling(h: int, w: int, radius: int, only: bool, block_m: int, block_n: int) -> tuple[int, int]:
    """(TW, programs per head) of the kernels. Neighbour mask: BLOCK_M consecutive tokens per program
    (TW unused). Local attention: 2-D tiles of TH = BLOCK_M // TW rows x TW columns, each walking the
    flattened band its windows reach in BLOCK_N-token key tiles; TW is the width for which the
    (query, key) pairs computed (:func:`_pairs`) are fewest (on ties the widest: longer contiguous
    rows). 64x64 grid, window 11, 64-token tiles: 8 x 8 tiles compute 384 keys per query where whole
    grid rows compute 704 (the window holds 121)."""
    if not only:
        return 1, triton.cdiv(h * w, block_m)
    # min keeps the first of equal counts: the widest
    tw = min(range(min(w, block_m), 0, -1), key=lambda t: _pairs(h, w, radius, block_m, block_n, t))
    return tw, triton.cdiv(h, block_m // tw) * triton.cdiv(w, tw)


if HAS_TRITON:

    @triton.jit
    def _window_tile(pid, H, W, R, TW, BLOCK_M: tl.constexpr):
        """Local attention's 2-D tile ``pid``: TH = BLOCK_M // TW grid rows x TW columns, row-major
        over the tiles (the last ones cut at the grid). Returns the tokens (row-major indices, their
        rows and columns, which slots hold one) and the band their windows reach: rows
        r_lo.. and columns c_lo.. c_lo + bw - 1, nb = rows x bw cells."""
        th = BLOCK_M // TW
        r0 = (pid // tl.cdiv(W, TW)) * th
        c0 = (pid % tl.cdiv(W, TW)) * TW
        i = tl.arange(0, BLOCK_M)
        rows = r0 + i // TW
        cols = c0 + i % TW
        valid = (i < th * TW) & (rows < H) & (cols < W)
        r_lo = tl.maximum(r0 - R, 0)
        c_lo = tl.maximum(c0 - R, 0)
        bw = tl.minimum(tl.minimum(c0 + TW, W) - 1 + R, W - 1) - c_lo + 1
        nb = (tl.minimum(tl.minimum(r0 + th, H) - 1 + R, H - 1) - r_lo + 1) * bw
        return rows * W + cols, valid, rows, cols, r_lo, c_lo, bw, nb

    @triton.jit
    def _band_tile(A, B, base, j0, r_lo, c_lo, bw, nb, W, D, offs_d, dm, BLOCK_N: tl.constexpr, F32: tl.constexpr):
        """Rows of A and B for the band cells j0 .. j0 + BLOCK_N - 1 (row-major over the band
        rectangle, cut at nb): one flat list, so no tile is wasted on a band narrower than a tile."""
        j = j0 + tl.arange(0, BLOCK_N)
        valid = j < nb
        rows = r_lo + j // bw
        cols = c_lo + j % bw
        offs = rows * W + cols
        ptrs = base + offs[:, None] * D + offs_d[None, :]
        mask = valid[:, None] & dm[None, :]
        return load(A + ptrs, mask, F32), load(B + ptrs, mask, F32), offs, rows, cols, valid

    @triton.jit
    def _allowed(rows_m, cols_m, rows_n, cols_n, valid, R, ONLY: tl.constexpr):
        inside = (tl.abs(rows_m[:, None] - rows_n[None, :]) <= R) & (tl.abs(cols_m[:, None] - cols_n[None, :]) <= R)
        if ONLY:
            return inside & valid
        return (~inside) & valid

    @triton.jit
    def _flat_tile(A, B, base, n0, N, D, offs_d, dm, BLOCK_N: tl.constexpr, F32: tl.constexpr):
        """Rows of A and B for the tokens n0 .. n0 + BLOCK_N - 1 (cut at N)."""
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = offs_n < N
        ptrs = base + offs_n[:, None] * D + offs_d[None, :]
        mask = valid[:, None] & dm[None, :]
        return load(A + ptrs, mask, F32), load(B + ptrs, mask, F32), offs_n, valid

    @triton.jit
    def _neighbour_masked(s, rows_m, cols_m, offs_n, valid, first, last, n0, N, W, R, BLOCK_N: tl.constexpr):
        """Scores (BLOCK_M, BLOCK_N) of the tokens first..last against the flat tile n0.. under the
        neighbour mask, -inf where not allowed. A tile whose grid rows are more than R from every row
        of the block is outside all their windows: every pair is allowed, no mask is evaluated."""
        n1 = tl.minimum(n0 + BLOCK_N, N) - 1
        if (n1 // W < first // W - R) | (n0 // W > last // W + R):
            out = tl.where(valid[None, :], s, float("-inf"))
        else:
            ok = _allowed(rows_m, cols_m, offs_n // W, offs_n % W, valid[None, :], R, False)
            out = tl.where(ok, s, float("-inf"))
        return out

    @triton.jit
    def _fwd_step(s, v, m_i, l_i, acc, F32: tl.constexpr):
        """One online-softmax step of masked scores s (-inf: not allowed) against the value tile v."""
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, F32)
        return m_new, l_i, acc

    @triton.jit
    def _dq_step(s, k, v, do, lse, delta, F32: tl.constexpr):
        """dS K of one key tile for the dq pass (s: masked scores, -inf: not allowed)."""
        p = tl.exp(s - lse[:, None])
        ds = p * (dot(do, tl.trans(v), F32) - delta[:, None])
        return dot(ds.to(k.dtype), k, F32)

    @triton.jit
    def _dkdv_step(st, q, do, v, lse_ptr, delta_ptr, offs_q, cq, F32: tl.constexpr):
        """(dS^T Q, P^T dO) of one query tile for the dk / dv pass (st: masked transposed scores)."""
        lse = tl.load(lse_ptr + offs_q, mask=cq, other=float("inf"))
        delta = tl.load(delta_ptr + offs_q, mask=cq, other=0.0)
        pt = tl.exp(st - lse[None, :])
        dst = pt * (dot(v, tl.trans(do), F32) - delta[None, :])
        return dot(dst.to(q.dtype), q, F32), dot(pt.to(do.dtype), do, F32)

    # no scalar argument is specialised (no variants for a value of 1 or a multiple of 16): one compiled
    # variant per constexpr set, as fastad.ops.compile_check compiles them
    _SCALARS = ["scale", "N", "D", "H", "W", "R", "TW"]

    @triton.jit
    def _tokens(pid, N, H, W, R, TW, ONLY: tl.constexpr, BLOCK_M: tl.constexpr):
        """The block of program ``pid``: local attention a 2-D tile (:func:`_window_tile`), the
        neighbour mask BLOCK_M consecutive tokens (first .. last). Returns (indices, valid, rows,
        cols, then the band (r_lo, c_lo, bw, nb) or (first, last, 0, 0))."""
        if ONLY:
            offs, valid, rows, cols, a, b, c, e = _window_tile(pid, H, W, R, TW, BLOCK_M)
        else:
            offs = pid * BLOCK_M + tl.arange(0, BLOCK_M)
            valid = offs < N
            rows = offs // W
            cols = offs % W
            a = pid * BLOCK_M
            b = tl.minimum(a + BLOCK_M, N) - 1
            c = 0
            e = 0
        return offs, valid, rows, cols, a, b, c, e

    @triton.jit(do_not_specialize=_SCALARS)
    def _fwd_kernel(
        Q, K, V, O, LSE, scale, N, D, H, W, R, TW,
        ONLY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, F32: tl.constexpr,
    ):  # fmt: skip
        bh = tl.program_id(1)
        offs_m, mm, rows_m, cols_m, b0, b1, bw, nb = _tokens(tl.program_id(0), N, H, W, R, TW, ONLY, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        dm = offs_d < D
        base = bh * N * D
        q = load(Q + base + offs_m[:, None] * D + offs_d[None, :], mm[:, None] & dm[None, :], F32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if ONLY:
            for j0 in range(0, nb, BLOCK_N):
                k, v, _, rows_n, cols_n, cn = _band_tile(K, V, base, j0, b0, b1, bw, nb, W, D, offs_d, dm, BLOCK_N, F32)
                s = dot(q, tl.trans(k), F32) * scale
                ok = _allowed(rows_m, cols_m, rows_n, cols_n, cn[None, :], R, ONLY)
                m_i, l_i, acc = _fwd_step(tl.where(ok, s, float("-inf")), v, m_i, l_i, acc, F32)
        else:
            for n0 in range(0, N, BLOCK_N):
                k, v, offs_n, cn = _flat_tile(K, V, base, n0, N, D, offs_d, dm, BLOCK_N, F32)
                s = dot(q, tl.trans(k), F32) * scale
                s = _neighbour_masked(s, rows_m, cols_m, offs_n, cn, b0, b1, n0, N, W, R, BLOCK_N)
                m_i, l_i, acc = _fwd_step(s, v, m_i, l_i, acc, F32)
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        store_rounded(O + base + offs_m[:, None] * D + offs_d[None, :], out, mm[:, None] & dm[None, :])
        tl.store(LSE + bh * N + offs_m, tl.where(empty, float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i))), mask=mm)

    @triton.jit(do_not_specialize=_SCALARS)
    def _bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, scale, N, D, H, W, R, TW,
        ONLY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, F32: tl.constexpr,
    ):  # fmt: skip
        bh = tl.program_id(1)
        offs_m, mm, rows_m, cols_m, b0, b1, bw, nb = _tokens(tl.program_id(0), N, H, W, R, TW, ONLY, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        dm = offs_d < D
        base = bh * N * D
        qd_mask = mm[:, None] & dm[None, :]
        q = load(Q + base + offs_m[:, None] * D + offs_d[None, :], qd_mask, F32)
        do = load(DO + base + offs_m[:, None] * D + offs_d[None, :], qd_mask, F32)
        lse = tl.load(LSE + bh * N + offs_m, mask=mm, other=float("inf"))
        delta = tl.load(DELTA + bh * N + offs_m, mask=mm, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if ONLY:
            for j0 in range(0, nb, BLOCK_N):
                k, v, _, rows_n, cols_n, cn = _band_tile(K, V, base, j0, b0, b1, bw, nb, W, D, offs_d, dm, BLOCK_N, F32)
                s = dot(q, tl.trans(k), F32) * scale
                ok = _allowed(rows_m, cols_m, rows_n, cols_n, cn[None, :], R, ONLY)
                dq += _dq_step(tl.where(ok, s, float("-inf")), k, v, do, lse, delta, F32)
        else:
            for n0 in range(0, N, BLOCK_N):
                k, v, offs_n, cn = _flat_tile(K, V, base, n0, N, D, offs_d, dm, BLOCK_N, F32)
                s = dot(q, tl.trans(k), F32) * scale
                s = _neighbour_masked(s, rows_m, cols_m, offs_n, cn, b0, b1, n0, N, W, R, BLOCK_N)
                dq += _dq_step(s, k, v, do, lse, delta, F32)
        store_rounded(DQ + base + offs_m[:, None] * D + offs_d[None, :], dq * scale, qd_mask)

    @triton.jit(do_not_specialize=_SCALARS)
    def _bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, scale, N, D, H, W, R, TW,
        ONLY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, F32: tl.constexpr,
    ):  # fmt: skip
        # one block of BLOCK_M keys (tiled as the queries are); the queries that can see them lie in
        # the same (symmetric) band
        bh = tl.program_id(1)
        offs_k, km, rows_k, cols_k, b0, b1, bw, nb = _tokens(tl.program_id(0), N, H, W, R, TW, ONLY, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        dm = offs_d < D
        base = bh * N * D
        kd_mask = km[:, None] & dm[None, :]
        k = load(K + base + offs_k[:, None] * D + offs_d[None, :], kd_mask, F32)
        v = load(V + base + offs_k[:, None] * D + offs_d[None, :], kd_mask, F32)
        dk = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if ONLY:
            for j0 in range(0, nb, BLOCK_N):
                q, do, offs_q, rows_q, cols_q, cq = _band_tile(Q, DO, base, j0, b0, b1, bw, nb, W, D, offs_d, dm, BLOCK_N, F32)
                st = dot(k, tl.trans(q), F32) * scale  # transposed scores: keys x queries
                ok = _allowed(rows_k, cols_k, rows_q, cols_q, cq[None, :], R, ONLY)
                ddk, ddv = _dkdv_step(tl.where(ok, st, float("-inf")), q, do, v, LSE + bh * N, DELTA + bh * N,
                                      offs_q, cq, F32)
                dk += ddk
                dv += ddv
        else:
            for n0 in range(0, N, BLOCK_N):
                q, do, offs_q, cq = _flat_tile(Q, DO, base, n0, N, D, offs_d, dm, BLOCK_N, F32)
                st = dot(k, tl.trans(q), F32) * scale
                st = _neighbour_masked(st, rows_k, cols_k, offs_q, cq, b0, b1, n0, N, W, R, BLOCK_N)
                ddk, ddv = _dkdv_step(st, q, do, v, LSE + bh * N, DELTA + bh * N, offs_q, cq, F32)
                dk += ddk
                dv += ddv
        store_rounded(DK + base + offs_k[:, None] * D + offs_d[None, :], dk * scale, kd_mask)
        store_rounded(DV + base + offs_k[:, None] * D + offs_d[None, :], dv, kd_mask)
