"""Exact k-th value and quantile of a whole tensor (or of every row along a dim), of any size, without
sorting, and without a host read on the GPU.

The Triton path is a radix select: the float32 values are mapped to order-preserving uint32 keys,
and each pass histograms the next digit of the keys that still match the prefix found so far, one
histogram per program. Three passes of 11 bits (2048 bins) where Triton builds histograms with
shared-memory atomics (from 3.8), four of 8 bits where it uses warp ballots, whose cost grows with the
bins (see :data:`_SCHEDULES`). After each pass one small program per row scans the row's histogram and
picks the bin that holds the rank, on the device: the passes run back to back and nothing is read by
the host (the same select is graph-capturable).
The first pass also counts NaN/inf, so checking the input costs no extra read. After the last pass
the bin holding the rank *is* the value; the next larger value (needed by the interpolation of
:func:`quantile`) is almost always in the same histogram, else one more pass (a masked min) finds it,
a pass that every row whose next value was found skips on the device.

``dim=`` selects along one dimension for every row in one launch per pass (per-image or per-level
quantiles); ``nonfinite='raise'`` (default) reads the NaN/inf count once, after every pass is
enqueued, and raises; ``nonfinite='nan'`` never reads it and returns NaN for a row holding NaN/inf,
so a training step that mines hard points with the select stays free of host syncs (its loss is
then NaN, which the training loop's device-side guard reports at its iteration).

Off the Triton path (CPU without ``TRITON_INTERPRET=1``, float64) :func:`select_rank` uses
``torch.kthvalue`` and :func:`quantile` is ``torch.quantile`` (a sort where an older torch refuses
more than 2**24 elements): neither has a size limit.

:func:`quantile` reproduces ``torch.quantile(x, q)`` (linear interpolation) bit for bit: ``q`` is
rounded to the input dtype, the rank ``q * (n - 1)`` is taken as the installed torch takes it (float64
from torch 2.14; the input dtype before, as in torch 2.11, which also refuses more than 2**24
elements: there fastad keeps float64) and ``torch.lerp`` interpolates in the input dtype.
16-bit inputs are computed, and returned, in float32.

With ``group`` (a torch.distributed process group of several processes) each rank passes its shard
and all get the value of the whole: a radix select over order-preserving integer keys (16 bits per
pass: two passes for float32, four for float64) whose histograms are all-reduced, so the result is
bit-identical to ``torch.quantile`` / ``kthvalue`` of the concatenation. A shard may be empty. That
path reads each histogram on the host (the collectives do anyway) and always raises on NaN/inf.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .. import distributed
from ._checks import check_nonfinite, check_tensor, compute_dtype
from ._triton import max_programs, tl, triton
from . import dispatch
from .dispatch import HAS_TRITON, implementation

__all__ = ["quantile", "quantile_reference", "select_rank", "select_rank_reference"]

# (shift, bits) of each radix pass, most significant first, for each way Triton lowers tl.histogram
# (the pass's PTX for sm_90, instructions per element of a 4096-element block; bench/RESULTS.md,
# session 45). From Triton 3.8 one shared-memory atomic per element, nearly flat in the bin count
# (26 at 2048 bins, 22 at 256): three passes of 11 bits read the input least. Before 3.8 (the GPU
# image's 3.6) warp ballots whose cost grows with bins / 32 (336 at 2048 bins, 93 at 256), so the
# pass is compute-bound: four passes of 8 bits do 2.7x less work than three of 11.
_SCHEDULES = {"atomic": ((21, 11), (10, 11), (0, 10)), "ballot": ((24, 8), (16, 8), (8, 8), (0, 8))}
_MAX_NUMEL = 2**31 - 1  # int32 offsets within a row in the kernels
# per-row select state, int32 (keys are uint32 bit patterns): the key prefix found so far, the rank
# left inside it, the next larger key (sign-flipped, for the int32 atomic min) and "scan needed"
_PREFIX, _RANK, _NEXT, _SCAN, _STATE = 0, 1, 2, 3, 4


@functools.cache
def _schedule() -> str:
    """The radix passes the installed Triton runs fastest: 'atomic' (Triton >= 3.8) or 'ballot'."""
    return "atomic" if dispatch.triton_version() >= (3, 8) else "ballot"


def _bins(passes) -> int:
    return 1 << max(bits for _, bits in passes)


# ----------------------------------------------------------------------------------------------------
# references


def select_rank_reference(x: torch.Tensor, rank: int, *, dim: int | None = None) -> torch.Tensor:
    """Oracle of :func:`select_rank`: ``sort(x.flatten())[rank]`` (or along ``dim``) in the compute dtype."""
    check_tensor("x", x)
    d = _check_dim(x, dim)
    _check_rank(rank, x.numel() if d is None else x.shape[d])
    if d is None:
        return torch.sort(x.flatten().to(compute_dtype(x))).values[rank]
    return torch.sort(x.to(compute_dtype(x)), dim=d).values.select(d, rank)


def quantile_reference(x: torch.Tensor, q: float, *, dim: int | None = None) -> torch.Tensor:
    """Oracle of :func:`quantile`: ``torch.quantile(x.flatten(), q)`` (or ``torch.quantile(x, q, dim)``),
    or, where the installed torch refuses the size (before 2.14: more than 2**24 elements), the same
    computation by a full sort."""
    check_tensor("x", x)
    _check_q("q", q)
    d = _check_dim(x, dim)
    rows = x.to(compute_dtype(x)).flatten() if d is None else x.to(compute_dtype(x)).movedim(d, -1)
    try:
        return torch.quantile(rows, q, dim=-1)
    except RuntimeError:  # "quantile() input tensor is too large"
        return _sorted_quantile(rows, q)


def _sorted_quantile(rows: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile along the last dim by a full sort."""
    s = torch.sort(rows, dim=-1).values
    lo, hi, w = _ranks(q, s.shape[-1], s.dtype)
    return torch.lerp(s[..., lo], s[..., hi], torch.full_like(s[..., lo], w))


# ----------------------------------------------------------------------------------------------------
# public ops


@torch.compiler.disable  # Triton launches with host-side arguments: runs eagerly inside compiled code
def select_rank(x: torch.Tensor, rank: int, *, dim: int | None = None, nonfinite: str = "raise",
                group=None) -> torch.Tensor:
    """The ``rank``-th smallest value (0-based) of all elements of ``x``, or of every row along ``dim``.

    Args:
        x: floating tensor of any shape and size (< 2**31 elements per row on the Triton path).
        rank: 0 <= rank < x.numel() (with ``dim``: < x.shape[dim]).
        dim: None (all elements) or the dimension to select along, for every other index at once.
        nonfinite: 'raise' (ValueError when ``x`` holds NaN/inf: one host read) or 'nan' (no host read;
            NaN for each row that holds NaN/inf).
        group: torch.distributed process group: ``x`` is this rank's shard (may be empty), ``rank``
            counts over all shards, every rank gets the same value (no ``dim``; always 'raise').
    Returns:
        0-d tensor (with ``dim``: x.shape without ``dim``) on ``x.device``; float32 for 16-bit and
        float32 inputs, float64 for float64.
    """
    check_nonfinite(nonfinite)
    if distributed.active(group):
        _no_dim_with_group(dim)
        flat, n = _prepare_shard(x, group)
        _check_rank(rank, n)
        return _shard_select(flat, rank, group)
    rows, shape = _rows(x, dim)
    _check_rank(rank, rows.shape[1])
    value, bad = _select_rows(rows, rank, square=False)
    return _finish(value, bad, nonfinite).reshape(shape)


@torch.compiler.disable  # Triton launches with host-side arguments: runs eagerly inside compiled code
def quantile(x: torch.Tensor, q: float, *, dim: int | None = None, nonfinite: str = "raise",
             group=None) -> torch.Tensor:
    """``torch.quantile(x, q)`` over all elements (or ``torch.quantile(x, q, dim)``), linear
    interpolation, exact, for any size.

    Args:
        x: floating tensor of any shape.
        q: quantile in [0, 1].
        dim: None (all elements) or the dimension to take the quantile along, for every row at once.
        nonfinite: 'raise' (ValueError when ``x`` holds NaN/inf: one host read) or 'nan' (no host read;
            NaN for each row that holds NaN/inf).
        group: torch.distributed process group: ``x`` is this rank's shard (may be empty) and every
            rank gets the quantile of all shards together (no ``dim``; always 'raise').
    Returns:
        0-d tensor (with ``dim``: x.shape without ``dim``) on ``x.device``; float32 for 16-bit and
        float32 inputs, float64 for float64.
    """
    _check_q("q", q)
    check_nonfinite(nonfinite)
    if distributed.active(group):
        _no_dim_with_group(dim)
        flat, n = _prepare_shard(x, group)
        lo, hi, w = _ranks(q, n, flat.dtype)
        v_lo = _shard_select(flat, lo, group)
        v_hi = v_lo if hi == lo else _shard_select(flat, hi, group)
        return torch.lerp(v_lo, v_hi, torch.full_like(v_lo, w))
    rows, shape = _rows(x, dim)
    value, bad = _quantile_rows(rows, q, square=False)
    return _finish(value, bad, nonfinite).reshape(shape)


def _quantile(flat: torch.Tensor, q: float, square: bool, nonfinite: str = "raise") -> torch.Tensor:
    """0-d quantile of 1-D ``flat`` (or of ``flat**2`` with ``square``), in the compute dtype."""
    value, bad = _quantile_rows(flat.reshape(1, -1), q, square)
    return _finish(value, bad, nonfinite)[0]


def _select_rows(rows: torch.Tensor, rank: int, square: bool):
    """(value (R,), NaN/inf count (R,)) of the rank-th smallest of each row of ``rows`` (or its square),
    on the implementation :func:`fastad.ops.dispatch.run` picks (both paths are bit-identical)."""
    key = (dispatch.bucket(rows.shape[0]), dispatch.bucket(rows.shape[1]), square)
    return dispatch.run("select_rank", rows, lambda: _select_rows_on(rows, rank, square), triton=True, key=key)


def _select_rows_on(rows: torch.Tensor, rank: int, square: bool):
    if implementation(rows, triton=True) == "triton":
        state, bad = _radix_select(rows, rank, square, nxt=False)
        return _radix_values(state, nxt=False)[:, 0], bad
    v = _values(rows, square)
    return torch.kthvalue(v, rank + 1, dim=-1).values, _bad(v)


def _quantile_rows(rows: torch.Tensor, q: float, square: bool):
    """(quantile (R,), NaN/inf count (R,)) of each row of ``rows`` (or its square), on the implementation
    :func:`fastad.ops.dispatch.run` picks (both paths are bit-identical)."""
    key = (dispatch.bucket(rows.shape[0]), dispatch.bucket(rows.shape[1]), square)
    return dispatch.run("quantile", rows, lambda: _quantile_rows_on(rows, q, square), triton=True, key=key)


def _quantile_rows_on(rows: torch.Tensor, q: float, square: bool):
    if implementation(rows, triton=True) != "triton":
        v = _values(rows, square)
        try:
            value = torch.quantile(v, q, dim=-1)
        except RuntimeError:  # "quantile() input tensor is too large"
            value = _sorted_quantile(v, q)
        return value, _bad(v)
    lo, hi, w = _ranks(q, rows.shape[1], torch.float32)
    state, bad = _radix_select(rows, lo, square, nxt=hi != lo)
    values = _radix_values(state, nxt=hi != lo)
    v_lo = values[:, 0]
    v_hi = values[:, 1] if hi != lo else v_lo
    # the weight as a fill, not a host-to-device copy (a copy would not be capturable)
    return torch.lerp(v_lo, v_hi, torch.full_like(v_lo, w)), bad


def _finish(value: torch.Tensor, bad: torch.Tensor, nonfinite: str, name: str = "x") -> torch.Tensor:
    """``value`` (R,) with the rows whose NaN/inf flag or count ``bad`` (R,) is not zero raised ('raise': the
    one host read, after every pass is enqueued) or set to NaN ('nan': no host read)."""
    if nonfinite == "raise":
        if int(bad.sum()):
            raise ValueError(f"{name} contains NaN or inf values; expected finite values")
        return value
    return torch.where(bad > 0, torch.full_like(value, math.nan), value)


def _bad(v: torch.Tensor) -> torch.Tensor:
    """(R,) int32, 1 where a row of ``v`` holds NaN/inf: its min or max is then not finite (aminmax
    propagates NaN), one vectorised pass where counting isfinite took ~30x longer on the CPU."""
    # one row: the flat reduction (ATen's single-row dim reduction runs ~10x slower on the CPU)
    lo, hi = torch.aminmax(v.reshape(-1)) if v.shape[0] == 1 else torch.aminmax(v, dim=-1)
    return (~(torch.isfinite(lo) & torch.isfinite(hi))).to(torch.int32)


# ----------------------------------------------------------------------------------------------------
# validation and shared arithmetic


def _rows(x: torch.Tensor, dim: int | None) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(R, n) contiguous rows of ``x`` (one row of all elements without ``dim``), and the result shape."""
    check_tensor("x", x, finite=False)  # finiteness: in the first radix pass, or on the torch path
    d = _check_dim(x, dim)
    if d is None:
        return x.contiguous().view(1, -1), ()
    shape = x.shape[:d] + x.shape[d + 1 :]
    return x.movedim(d, -1).reshape(-1, x.shape[d]).contiguous(), tuple(shape)


def _check_dim(x: torch.Tensor, dim) -> int | None:
    if dim is None:
        return None
    if isinstance(dim, bool) or not isinstance(dim, int) or not -max(x.dim(), 1) <= dim < max(x.dim(), 1):
        raise ValueError(f"dim must be None or an int in [{-x.dim()}, {x.dim()}) for a {x.dim()}-d tensor, got {dim!r}")
    return dim % max(x.dim(), 1) if x.dim() else None


def _no_dim_with_group(dim) -> None:
    if dim is not None:
        raise ValueError("dim= is not supported with group= (the shards' select is over all elements)")


def _check_rank(rank: int, n: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__}")
    if not 0 <= rank < n:
        raise ValueError(f"rank={rank} must be in [0, {n}) for a tensor of {n} elements")


def _check_q(name: str, q: float, *, low: float = 0.0, high: float = 1.0, open_: bool = False) -> None:
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not math.isfinite(q):
        raise ValueError(f"{name} must be a finite number, got {q!r}")
    inside = low < q < high if open_ else low <= q <= high
    if not inside:
        bounds = f"({low}, {high})" if open_ else f"[{low}, {high}]"
        raise ValueError(f"{name} must be in {bounds}, got {q}")


def _ranks(q: float, n: int, dtype: torch.dtype) -> tuple[int, int, float]:
    """torch.quantile's ranks: q rounded to ``dtype``, rank = q * (n - 1), lo/hi = its floor/ceil and
    the weight rank - lo in ``dtype`` (returned as the Python float of that value). torch >= 2.14
    forms the rank in float64; older torch forms it in ``dtype`` (and refuses n > 2**24, where fastad
    keeps float64: a float32 rank is then off by whole positions), so the installed torch's arithmetic
    is detected once and followed. NumPy scalars do the rounding: host arithmetic, no tensor read."""
    f = np.float64 if dtype == torch.float64 else np.float32
    qt = f(q)
    if n - 1 <= 2**24 and not _torch_ranks_in_float64():
        rank = qt * f(n - 1)  # n - 1 <= 2**24 is exact in float32
        lo, hi = int(np.floor(rank)), int(np.ceil(rank))
        return lo, hi, float(rank - f(lo))
    rank = float(qt) * (n - 1)
    lo, hi = math.floor(rank), math.ceil(rank)
    return lo, hi, float(f(rank - lo))


@functools.cache
def _torch_ranks_in_float64() -> bool:
    """Whether the installed torch.quantile forms q * (n - 1) in float64 (torch >= 2.14) or in the
    input dtype: for [0]*6 + [1] and q = 0.9995 the two weights differ (0.99699986 vs 0.99699974)."""
    x = torch.zeros(7)
    x[6] = 1.0
    q = torch.tensor(0.9995)
    w64 = (q.double() * 6 - 5).float()
    return bool(torch.equal(torch.quantile(x, 0.9995), torch.lerp(x[5], x[6], w64)))


def _values(flat: torch.Tensor, square: bool) -> torch.Tensor:
    v = flat.to(compute_dtype(flat))
    return v * v if square else v


# ----------------------------------------------------------------------------------------------------
# radix select over shards (torch ops; the histograms are all-reduced)

_SHARD_BITS = 16


def _prepare_shard(x: torch.Tensor, group) -> tuple[torch.Tensor, int]:
    """(this shard flattened in the compute dtype, elements of all shards); checks finiteness of all."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got {x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    flat = x.reshape(-1).to(compute_dtype(x))
    counts = torch.tensor([flat.numel(), int((~torch.isfinite(flat)).sum())], dtype=torch.int64,
                          device=distributed.collective_device(group))
    torch.distributed.all_reduce(counts, group=group)
    n, bad = counts.tolist()
    if n == 0:
        raise ValueError("x is empty on every rank; expected at least one element")
    if bad:
        raise ValueError(f"x contains {bad} NaN or inf values over all ranks; expected finite values")
    return flat, n


def _signed_keys(flat: torch.Tensor) -> torch.Tensor:
    """int64 keys whose signed order is the float order of ``flat`` (float32 or float64)."""
    if flat.dtype == torch.float64:
        bits = flat.view(torch.int64)
        return torch.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)
    bits = flat.view(torch.int32).long()
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _shard_select(flat: torch.Tensor, rank: int, group) -> torch.Tensor:
    total = 64 if flat.dtype == torch.float64 else 32
    keys = _signed_keys(flat).to(distributed.collective_device(group))
    prefix = 0
    for shift in range(total - _SHARD_BITS, -1, -_SHARD_BITS):
        if shift == total - _SHARD_BITS:  # the top digit is signed: shift it to [0, 2**16)
            digits = (keys >> shift) + (1 << (_SHARD_BITS - 1))
        else:
            digits = (keys[(keys >> (shift + _SHARD_BITS)) == prefix] >> shift) & ((1 << _SHARD_BITS) - 1)
        hist = torch.bincount(digits, minlength=1 << _SHARD_BITS)
        torch.distributed.all_reduce(hist, group=group)
        cum = torch.cumsum(hist.cpu(), 0)
        b = int(torch.searchsorted(cum, rank, right=True))
        rank -= int(cum[b - 1]) if b else 0
        prefix = b - (1 << (_SHARD_BITS - 1)) if shift == total - _SHARD_BITS else (prefix << _SHARD_BITS) | b
    bits = prefix ^ 0x7FFFFFFFFFFFFFFF if prefix < 0 and total == 64 else prefix ^ 0x7FFFFFFF if prefix < 0 else prefix
    value = torch.tensor([bits], dtype=torch.int64)
    value = value.view(torch.float64) if total == 64 else value.to(torch.int32).view(torch.float32)
    return value[0].to(flat.device)


# ----------------------------------------------------------------------------------------------------
# Triton radix select: every pass, pick and scan enqueued back to back, the state on the device


def _radix_select(rows: torch.Tensor, rank: int, square: bool, nxt: bool):
    """Runs the passes over each row of ``rows`` (R, n) (or its square); returns (state (R, _STATE) int32,
    NaN/inf count (R,) int32). ``nxt``: also find each row's next larger key (for the interpolation)."""
    r, n = rows.shape
    if n > _MAX_NUMEL:
        raise ValueError(f"x has {n} elements per row; the Triton select supports at most {_MAX_NUMEL}")
    cuda = rows.is_cuda
    passes = _SCHEDULES[_schedule()]
    block = _hist_config(passes, 0, square, cuda)["BLOCK"]
    grid = (max(1, min(triton.cdiv(n, block), max_programs(rows) // r)), r)
    hist = torch.zeros((len(passes), r, _bins(passes)), dtype=torch.int32, device=rows.device)
    bad = torch.zeros(r, dtype=torch.int32, device=rows.device)
    state = torch.zeros((r, _STATE), dtype=torch.int32, device=rows.device)
    state[:, _RANK] = rank
    for p in range(len(passes)):
        _radix_hist_kernel[grid](rows, n, hist[p], bad, state, **_hist_config(passes, p, square, cuda))
        _radix_pick_kernel[(r,)](hist[p], state, **_pick_config(passes, p, nxt))
    if nxt:
        _radix_next_kernel[grid](rows, n, state, **_next_config(square, cuda))
    return state, bad


def _radix_values(state: torch.Tensor, nxt: bool) -> torch.Tensor:
    """(R, 2) float32: each row's selected value and (with ``nxt``) the next larger one."""
    out = torch.empty((state.shape[0], 2), dtype=torch.float32, device=state.device)
    _radix_values_kernel[(state.shape[0],)](state, out, **_values_config(nxt))
    return out


# constexprs and launch options of each launch (the compile check lists the CUDA ones)
def _hist_config(passes, p: int, square: bool, cuda: bool) -> dict:
    shift, bits = passes[p]
    return dict(SHIFT=shift, PREFIX_SHIFT=shift + bits, DIGIT_MASK=(1 << bits) - 1, FIRST=p == 0, SQUARE=square,
                BLOCK=4096 if cuda else 65536, BINS=_bins(passes), STATE=_STATE, num_warps=4, num_stages=3)


def _pick_config(passes, p: int, nxt: bool) -> dict:
    last = p == len(passes) - 1
    return dict(BITS=passes[p][1], BINS=_bins(passes), STATE=_STATE, LAST=last, NEXT=nxt and last,
                num_warps=4, num_stages=1)


def _next_config(square: bool, cuda: bool) -> dict:
    return dict(SQUARE=square, BLOCK=4096 if cuda else 65536, STATE=_STATE, num_warps=4, num_stages=3)


def _values_config(nxt: bool) -> dict:
    return dict(NEXT=nxt, STATE=_STATE, num_warps=1, num_stages=1)


if HAS_TRITON:

    @triton.jit
    def _ordered_keys(x, SQUARE: tl.constexpr):
        """float32 (or its square) -> uint32 keys whose unsigned order is the float order."""
        if SQUARE:
            x = x * x
        bits = x.to(tl.uint32, bitcast=True)
        flip = (bits >> 31) * 0x7FFFFFFF | 0x80000000  # negative: invert all bits; positive: set the sign
        return bits ^ flip

    @triton.jit
    def _key_value(key):
        """The inverse of _ordered_keys: uint32 key -> float32."""
        flip = tl.where((key >> 31) == 1, 0x80000000, 0xFFFFFFFF).to(tl.uint32)
        return (key ^ flip).to(tl.float32, bitcast=True)

    # no scalar is specialised (an n of 1 would become a constexpr): one compiled variant per
    # constexpr set, as fastad.ops.compile_check compiles them
    @triton.jit(do_not_specialize=["n"])
    def _radix_hist_kernel(
        x_ptr, n, hist_ptr, bad_ptr, state_ptr,
        SHIFT: tl.constexpr, PREFIX_SHIFT: tl.constexpr, DIGIT_MASK: tl.constexpr,
        FIRST: tl.constexpr, SQUARE: tl.constexpr, BLOCK: tl.constexpr, BINS: tl.constexpr, STATE: tl.constexpr,
    ):  # fmt: skip
        """One radix pass over row program_id(1): histogram of the digit at SHIFT of the keys whose
        higher bits equal the row's prefix (all keys in the first pass, which also counts NaN/inf)."""
        pid = tl.program_id(0)
        row = tl.program_id(1)
        x_row = x_ptr + row.to(tl.int64) * n
        prefix = tl.load(state_ptr + row * STATE).to(tl.uint32, bitcast=True)
        step = tl.num_programs(0) * BLOCK
        hist = tl.zeros([BINS], dtype=tl.int32)
        bad = tl.zeros([], dtype=tl.int32)  # a scalar (a BLOCK-wide counter costs registers)
        for start in range(pid * BLOCK, n, step):
            offs = start + tl.arange(0, BLOCK)
            m = offs < n
            x = tl.load(x_row + offs, mask=m, other=0.0).to(tl.float32)
            key = _ordered_keys(x, SQUARE)
            if FIRST:
                bad += tl.sum(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32))
            else:
                m = m & ((key >> PREFIX_SHIFT) == prefix)
            hist += tl.histogram(((key >> SHIFT) & DIGIT_MASK).to(tl.int32), BINS, mask=m)
        tl.atomic_add(hist_ptr + row * BINS + tl.arange(0, BINS), hist)
        if FIRST:
            tl.atomic_add(bad_ptr + row, bad)

    @triton.jit
    def _radix_pick_kernel(
        hist_ptr, state_ptr,
        BITS: tl.constexpr, BINS: tl.constexpr, STATE: tl.constexpr, LAST: tl.constexpr, NEXT: tl.constexpr,
    ):  # fmt: skip
        """The bin of the row's histogram that holds its rank: appended to the prefix, the rank made
        relative to it. After the last pass with NEXT: the next larger key, from the same histogram
        when it is there, else the row is marked for _radix_next_kernel."""
        row = tl.program_id(0)
        idx = tl.arange(0, BINS)
        h = tl.load(hist_ptr + row * BINS + idx)
        rank = tl.load(state_ptr + row * STATE + 1)
        b = tl.sum((tl.cumsum(h, 0) <= rank).to(tl.int32), 0)
        rank -= tl.sum(tl.where(idx < b, h, 0), 0)
        base = tl.load(state_ptr + row * STATE).to(tl.uint32, bitcast=True) << BITS
        key = base | b.to(tl.uint32)
        tl.store(state_ptr + row * STATE, key.to(tl.int32, bitcast=True))
        tl.store(state_ptr + row * STATE + 1, rank)
        if LAST and NEXT:
            same = rank + 1 < tl.sum(tl.where(idx == b, h, 0), 0)  # another copy of the value
            above = tl.min(tl.where((idx > b) & (h > 0), idx, BINS), 0)
            nxt = tl.where(same, key, base | above.to(tl.uint32))
            scan = (same == 0) & (above == BINS)
            flipped = (nxt ^ 0x80000000).to(tl.int32, bitcast=True)  # signed order, for atomic_min
            tl.store(state_ptr + row * STATE + 2, tl.where(scan, 0x7FFFFFFF, flipped))
            tl.store(state_ptr + row * STATE + 3, scan.to(tl.int32))

    @triton.jit(do_not_specialize=["n"])
    def _radix_next_kernel(x_ptr, n, state_ptr, SQUARE: tl.constexpr, BLOCK: tl.constexpr, STATE: tl.constexpr):
        """For a row marked by the pick: the smallest key above the selected one (a masked min)."""
        row = tl.program_id(1)
        if tl.load(state_ptr + row * STATE + 3) != 0:
            x_row = x_ptr + row.to(tl.int64) * n
            key_lo = tl.load(state_ptr + row * STATE).to(tl.uint32, bitcast=True)
            best = tl.full([BLOCK], 0xFFFFFFFF, tl.uint32)
            for start in range(tl.program_id(0) * BLOCK, n, tl.num_programs(0) * BLOCK):
                offs = start + tl.arange(0, BLOCK)
                m = offs < n
                key = _ordered_keys(tl.load(x_row + offs, mask=m, other=0.0).to(tl.float32), SQUARE)
                best = tl.minimum(best, tl.where(m & (key > key_lo), key, 0xFFFFFFFF))
            flipped = (tl.min(best, 0) ^ 0x80000000).to(tl.int32, bitcast=True)
            tl.atomic_min(state_ptr + row * STATE + 2, flipped)

    @triton.jit
    def _radix_values_kernel(state_ptr, out_ptr, NEXT: tl.constexpr, STATE: tl.constexpr):
        """Row program_id(0)'s selected key (and next key) as float32 values."""
        row = tl.program_id(0)
        key = tl.load(state_ptr + row * STATE).to(tl.uint32, bitcast=True)
        tl.store(out_ptr + row * 2, _key_value(key))
        if NEXT:
            nxt = tl.load(state_ptr + row * STATE + 2).to(tl.uint32, bitcast=True) ^ 0x80000000
            tl.store(out_ptr + row * 2 + 1, _key_value(nxt))
