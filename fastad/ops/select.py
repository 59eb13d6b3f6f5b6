"""Exact k-th value and quantile of a whole tensor, of any size, without sorting it.

The Triton path is a three-pass radix select: the float32 values are mapped to order-preserving
uint32 keys, and each pass histograms 11 (then 11, then 10) bits of the keys that still match the
prefix found so far, 2048 bins, keeping one histogram per program in registers. The first pass also
counts NaN/inf, so checking the input costs no extra read. After the last pass the bin holding the
rank *is* the value; the next larger value (needed by the interpolation of :func:`quantile`) is
almost always in the same histogram, else one masked min finds it.

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
bit-identical to ``torch.quantile`` / ``kthvalue`` of the concatenation. A shard may be empty.
"""
from __future__ import annotations

import functools

import math

import torch

from .. import distributed
from ._checks import check_tensor, compute_dtype
from ._triton import max_programs, tl, triton
from .dispatch import HAS_TRITON, implementation

__all__ = ["quantile", "quantile_reference", "select_rank", "select_rank_reference"]

_PASSES = ((21, 11), (10, 11), (0, 10))  # (shift, bits) of each radix pass, most significant first
_BINS = 2048
_MAX_NUMEL = 2**31 - 1  # int32 offsets in the kernels


# ----------------------------------------------------------------------------------------------------
# references


def select_rank_reference(x: torch.Tensor, rank: int) -> torch.Tensor:
    """Oracle of :func:`select_rank`: ``sort(x.flatten())[rank]`` in the compute dtype."""
    check_tensor("x", x)
    _check_rank(rank, x.numel())
    return torch.sort(x.flatten().to(compute_dtype(x))).values[rank]


def quantile_reference(x: torch.Tensor, q: float) -> torch.Tensor:
    """Oracle of :func:`quantile`: ``torch.quantile(x.flatten(), q)``, or, where the installed torch
    refuses the size (before 2.14: more than 2**24 elements), the same computation by a full sort."""
    check_tensor("x", x)
    _check_q("q", q)
    flat = x.flatten().to(compute_dtype(x))
    try:
        return torch.quantile(flat, q)
    except RuntimeError:  # "quantile() input tensor is too large"
        return _sorted_quantile(flat, q)


def _sorted_quantile(flat: torch.Tensor, q: float) -> torch.Tensor:
    s = torch.sort(flat).values
    lo, hi, w = _ranks(q, s.numel(), s.dtype)
    return torch.lerp(s[lo], s[hi], w.to(s.device))


# ----------------------------------------------------------------------------------------------------
# public ops


@torch.compiler.disable  # host-side radix passes: runs eagerly inside compiled code
def select_rank(x: torch.Tensor, rank: int, *, group=None) -> torch.Tensor:
    """The ``rank``-th smallest value (0-based) of all elements of ``x``.

    Args:
        x: floating tensor of any shape and size (< 2**31 elements on the Triton path), finite.
        rank: 0 <= rank < x.numel().
        group: torch.distributed process group: ``x`` is this rank's shard (may be empty), ``rank``
            counts over all shards, every rank gets the same value.
    Returns:
        0-d tensor on ``x.device``; float32 for 16-bit and float32 inputs, float64 for float64.
    """
    if distributed.active(group):
        flat, n = _prepare_shard(x, group)
        _check_rank(rank, n)
        return _shard_select(flat, rank, group)
    flat = _prepare(x)
    _check_rank(rank, flat.numel())
    if implementation(flat, triton=True) == "triton":
        return _radix_select(flat, rank, square=False)[0]
    check_tensor("x", flat)  # the finiteness check the radix pass does on the Triton path
    return torch.kthvalue(flat.to(compute_dtype(x)), rank + 1).values


@torch.compiler.disable  # host-side radix passes: runs eagerly inside compiled code
def quantile(x: torch.Tensor, q: float, *, group=None) -> torch.Tensor:
    """``torch.quantile(x, q)`` over all elements (linear interpolation), exact, for any size.

    Args:
        x: floating tensor of any shape, finite.
        q: quantile in [0, 1].
        group: torch.distributed process group: ``x`` is this rank's shard (may be empty) and every
            rank gets the quantile of all shards together.
    Returns:
        0-d tensor on ``x.device``; float32 for 16-bit and float32 inputs, float64 for float64.
    """
    _check_q("q", q)
    if distributed.active(group):
        flat, n = _prepare_shard(x, group)
        lo, hi, w = _ranks(q, n, flat.dtype)
        v_lo = _shard_select(flat, lo, group)
        v_hi = v_lo if hi == lo else _shard_select(flat, hi, group)
        return torch.lerp(v_lo, v_hi, w.to(v_lo.device))
    flat = _prepare(x)
    return _quantile(flat, q, square=False)


def _quantile(flat: torch.Tensor, q: float, square: bool) -> torch.Tensor:
    """Quantile of ``flat`` (or of ``flat**2`` with ``square``); ``flat`` is 1-D and contiguous."""
    if implementation(flat, triton=True) != "triton":
        return quantile_reference(_values(flat, square), q)
    lo, hi, w = _ranks(q, flat.numel(), torch.float32)
    v_lo, last_hist, bin_rank = _radix_select(flat, lo, square)
    v_hi = v_lo if hi == lo else _next_from_hist(v_lo, last_hist, bin_rank)
    if v_hi is None:
        v_hi = _next_value(_values(flat, square), v_lo, lo)
    return torch.lerp(v_lo, v_hi, w.to(v_lo.device))


# ----------------------------------------------------------------------------------------------------
# validation and shared arithmetic


def _prepare(x: torch.Tensor) -> torch.Tensor:
    check_tensor("x", x, finite=False)  # finiteness: in the first radix pass, or on the torch path
    return x.contiguous().view(-1)


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


def _ranks(q: float, n: int, dtype: torch.dtype):
    """torch.quantile's ranks: q rounded to ``dtype``, rank = q * (n - 1), lo/hi = its floor/ceil and
    the weight rank - lo in ``dtype``. torch >= 2.14 forms the rank in float64; older torch forms it
    in ``dtype`` (and refuses n > 2**24, where fastad keeps float64: a float32 rank is then off by
    whole positions), so the installed torch's arithmetic is detected once and followed."""
    qt = torch.tensor(q, dtype=dtype)
    if n - 1 <= 2**24 and not _torch_ranks_in_float64():
        rank = qt * (n - 1)
        lo, hi = int(rank.floor()), int(rank.ceil())
        return lo, hi, rank - lo
    rank = qt.double() * (n - 1)
    lo, hi = int(rank.floor()), int(rank.ceil())
    return lo, hi, (rank - lo).to(dtype)


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


def _next_value(values: torch.Tensor, v: torch.Tensor, rank: int) -> torch.Tensor:
    """sorted(values)[rank + 1] given v = sorted(values)[rank]."""
    if int((values <= v).sum()) > rank + 1:
        return v
    return torch.where(values > v, values, torch.full_like(values, math.inf)).amin()


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
# Triton radix select


def _key_to_value(key: int) -> float:
    bits = key ^ 0x80000000 if key & 0x80000000 else ~key & 0xFFFFFFFF
    return torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32).item()


def _radix_select(flat: torch.Tensor, rank: int, square: bool):
    """Returns (value, last pass histogram, rank within the value's bin) for ``flat`` (or its square)."""
    n = flat.numel()
    if n > _MAX_NUMEL:
        raise ValueError(f"x has {n} elements; the Triton select supports at most {_MAX_NUMEL}")
    block = _hist_config(0, square, flat.is_cuda)["BLOCK"]
    grid = (max(1, min(triton.cdiv(n, block), max_programs(flat))),)
    hist = torch.zeros((len(_PASSES), _BINS), dtype=torch.int32, device=flat.device)
    bad = torch.zeros(1, dtype=torch.int32, device=flat.device)
    prefix = 0
    for p, (shift, bits) in enumerate(_PASSES):
        _radix_hist_kernel[grid](flat, n, hist[p], bad, prefix, **_hist_config(p, square, flat.is_cuda))
        h = hist[p].cpu().long()
        if p == 0 and int(bad.item()):
            raise ValueError(f"x contains {int(bad.item())} NaN or inf values; expected finite values")
        cum = torch.cumsum(h, 0)
        b = int(torch.searchsorted(cum, rank, right=True))
        rank -= int(cum[b - 1]) if b else 0
        prefix = (prefix << bits) | b
    value = torch.tensor(_key_to_value(prefix), dtype=torch.float32, device=flat.device)
    return value, (prefix, h), rank


def _hist_config(p: int, square: bool, cuda: bool) -> dict:
    """Constexprs and launch options of radix pass ``p`` (the compile check lists the CUDA ones)."""
    shift, bits = _PASSES[p]
    return dict(SHIFT=shift, PREFIX_SHIFT=shift + bits, DIGIT_MASK=(1 << bits) - 1, FIRST=p == 0, SQUARE=square,
                BLOCK=4096 if cuda else 65536, BINS=_BINS, num_warps=4, num_stages=3)


def _next_from_hist(v: torch.Tensor, last, rank_in_bin: int):
    """The next sorted value after ``v`` from the last pass histogram, or None when it lies beyond it."""
    prefix, h = last
    b = prefix & ((1 << _PASSES[-1][1]) - 1)
    if rank_in_bin + 1 < int(h[b]):
        return v
    above = torch.nonzero(h[b + 1 :])
    if above.numel() == 0:
        return None
    key = prefix + 1 + int(above[0])
    return torch.tensor(_key_to_value(key), dtype=torch.float32, device=v.device)


if HAS_TRITON:

    @triton.jit
    def _ordered_keys(x, SQUARE: tl.constexpr):
        """float32 (or its square) -> uint32 keys whose unsigned order is the float order."""
        if SQUARE:
            x = x * x
        bits = x.to(tl.uint32, bitcast=True)
        flip = (bits >> 31) * 0x7FFFFFFF | 0x80000000  # negative: invert all bits; positive: set the sign
        return bits ^ flip

    # no scalar is specialised (a prefix of 1 would become a constexpr, which has no .to): one compiled
    # variant per constexpr set, as fastad.ops.compile_check compiles them
    @triton.jit(do_not_specialize=["n", "prefix"])
    def _radix_hist_kernel(
        x_ptr, n, hist_ptr, bad_ptr, prefix,
        SHIFT: tl.constexpr, PREFIX_SHIFT: tl.constexpr, DIGIT_MASK: tl.constexpr,
        FIRST: tl.constexpr, SQUARE: tl.constexpr, BLOCK: tl.constexpr, BINS: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        step = tl.num_programs(0) * BLOCK
        hist = tl.zeros([BINS], dtype=tl.int32)
        dropped = tl.zeros([BLOCK], dtype=tl.int32)
        bad = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(pid * BLOCK, n, step):
            offs = start + tl.arange(0, BLOCK)
            m = offs < n
            x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
            key = _ordered_keys(x, SQUARE)
            if FIRST:
                bad += ((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32)
            else:
                m = m & ((key >> PREFIX_SHIFT) == prefix.to(tl.uint32))
            digit = tl.where(m, (key >> SHIFT) & DIGIT_MASK, 0).to(tl.int32)
            hist += tl.histogram(digit, BINS)
            dropped += (~m).to(tl.int32)  # counted in bin 0 above; taken out below
        hist -= tl.where(tl.arange(0, BINS) == 0, tl.sum(dropped), 0)
        tl.atomic_add(hist_ptr + tl.arange(0, BINS), hist)
        if FIRST:
            tl.atomic_add(bad_ptr, tl.sum(bad))
