"""Quantile hard-mining losses: MiniMaxAD's ADCLoss and Dinomaly's hard-mining global cosine loss.

Both pick the hardest points of a map by a quantile or top-k threshold. The authors' code sorts the
whole map (``torch.quantile``, ``torch.topk``) and builds the selection with several full-size
temporaries; here the threshold comes from :mod:`fastad.ops.select` (exact radix select), and each
loss reads its inputs in one fused Triton pass forward and writes the gradient in one pass backward.
Without Triton (CPU without ``TRITON_INTERPRET=1``) the same steps run as PyTorch expressions.

The ``*_reference`` functions are the authors' formulations (spec sections 4.5 and 5.5) and are the
test oracles.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._checks import check_nonfinite, check_same_device, check_tensor, compute_dtype
from ._triton import max_programs, tl, triton
from . import dispatch
from .dispatch import HAS_TRITON, implementation

if HAS_TRITON:
    from ._triton import store_rounded
from .. import distributed
from .select import (_check_q, _finish, _quantile_rows, _select_rows, _values, quantile,
                     quantile_reference, select_rank)

__all__ = ["adc_loss", "adc_loss_reference", "hard_mining_cosine_loss", "hard_mining_cosine_loss_reference"]

_COS_EPS = 1e-8  # torch.nn.CosineSimilarity's default, clamps each norm


# ----------------------------------------------------------------------------------------------------
# MiniMaxAD ADCLoss


def _check_adc(maps: torch.Tensor, p_hard: float, p_lim: float) -> None:
    check_tensor("maps", maps, finite=False)  # finiteness is checked by the first select pass
    if maps.numel() < 2:
        raise ValueError(f"maps needs at least 2 elements (the loss uses their std), got shape {tuple(maps.shape)}")
    _check_q("p_hard", p_hard, open_=True)
    _check_q("p_lim", p_lim, open_=True)


def adc_loss_reference(maps: torch.Tensor, p_hard: float = 0.9999, p_lim: float = 0.9995) -> torch.Tensor:
    """MiniMaxAD's ADCLoss as in the authors' code (spec 5.5), with a full sort for each quantile.

    Same arguments and result as :func:`adc_loss`.
    """
    _check_adc(maps, p_hard, p_lim)
    s = maps.float() if maps.dtype in (torch.float16, torch.bfloat16) else maps
    sigma = torch.std(s)
    s2 = s**2
    tau = quantile_reference(s.detach(), p_hard) - sigma.detach() ** 2
    if int((s2 >= tau).sum()) < s.numel() * (1 - p_lim):
        tau = quantile_reference(s2.detach(), p_lim) - sigma.detach() ** 2
    return s2[s2 >= tau].mean()


@torch.compiler.disable  # data-dependent thresholds: runs eagerly inside compiled code
def adc_loss(maps: torch.Tensor, p_hard: float = 0.9999, p_lim: float = 0.9995, *, nonfinite: str = "raise",
             group=None) -> torch.Tensor:
    """MiniMaxAD's adaptive contraction hard-mining loss (ADCLoss, the -fr variant).

    With S = ``maps``, sigma = std(S) (unbiased, whole batch) and tau = quantile(S, p_hard) - sigma**2:
    if fewer than ``numel * (1 - p_lim)`` points have S**2 >= tau, tau = quantile(S**2, p_lim) - sigma**2.
    The loss is the mean of S**2 over the points with S**2 >= tau; the others get no gradient.

    Without ``group`` nothing is read by the host (with ``nonfinite='nan'``): both thresholds are
    computed on the device and one pass counts and sums the tail of each, the branch is a select
    on the device.

    Args:
        maps: (B, H, W) (any shape) floating map S, the summed per-level ``1 - cos`` of MiniMaxAD. 16-bit
            maps are computed in float32.
        p_hard: primary mining quantile, in (0, 1).
        p_lim: lower-bound mining quantile, in (0, 1).
        nonfinite: 'raise' (ValueError when ``maps`` holds NaN/inf: one host read) or 'nan' (no host
            read; the loss is NaN, and its gradient zero, when ``maps`` holds NaN/inf). Training uses
            'nan': its device-side guard names the iteration.
        group: torch.distributed process group of a data-parallel step (None: this process): each
            rank passes its slice of the batch; sigma, both quantiles (distributed select) and the
            hard points' count are taken over the global batch, and the result is this rank's
            term such that the sum over ranks of (its share of the points) x (term) is the global
            loss, like the per-sample means of the other losses (sigma from float64 sums there). That
            path reads counts on the host (the collectives do anyway) and always raises on NaN/inf.
    Returns:
        0-d loss, float32 (float64 for float64 maps), differentiable with respect to ``maps``.
    """
    _check_adc(maps, p_hard, p_lim)
    check_nonfinite(nonfinite)
    if distributed.active(group):
        return _ADCLoss.apply(maps, p_hard, p_lim, nonfinite, group)
    return dispatch.run("adc_loss", maps, lambda: _ADCLoss.apply(maps, p_hard, p_lim, nonfinite, None), triton=True,
                        key=(dispatch.bucket(maps.numel()),), grad_inputs=(maps,))


class _ADCLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, maps, p_hard, p_lim, nonfinite, group):
        flat = maps.detach().contiguous().view(-1)
        if group is not None:
            return _ADCLoss._forward_global(ctx, maps, flat, p_hard, p_lim, group)
        n = flat.numel()
        var = torch.std(flat.to(compute_dtype(flat))) ** 2  # as the reference
        # both thresholds, unconditionally: choosing on the host would read the count back; the
        # quantile's first radix pass also counts NaN/inf (S**2 is finite where S is)
        q_hard, bad = _quantile_rows(flat.view(1, -1), p_hard, square=False)
        q_lim, _ = _quantile_rows(flat.view(1, -1), p_lim, square=True)
        taus = torch.cat([q_hard, q_lim]) - var
        counts, totals = _square_tail(flat, taus)
        # count < n * (1 - p_lim) for an integer count is count < ceil(n * (1 - p_lim))
        low = counts[0] < math.ceil(n * (1 - p_lim))
        tau, count, total = (torch.where(low, t[1], t[0]) for t in (taus, counts, totals))
        loss = _finish((total / count).to(var.dtype).reshape(1), bad, nonfinite, "maps")[0]
        ctx.save_for_backward(flat, tau, count)
        ctx.shape, ctx.impl = maps.shape, dispatch.current()
        return loss

    @staticmethod
    def _forward_global(ctx, maps, flat, p_hard, p_lim, group):
        device = distributed.collective_device(group)
        values = flat.to(compute_dtype(flat))
        sums = torch.tensor([values.numel(), values.double().sum()], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(sums, group=group)
        n = int(sums[0])
        mean = sums[1] / n
        dev2 = ((values.double() - mean.to(values.device)) ** 2).sum().reshape(1).to(device)
        torch.distributed.all_reduce(dev2, group=group)
        var = (dev2[0] / (n - 1)).to(values.dtype).to(values.device)  # unbiased, as torch.std
        tau = quantile(values, p_hard, group=group) - var  # the select rejects NaN/inf on every rank

        def tail(tau):  # (global count, this rank's sum) of the hard points
            counts, totals = _square_tail(flat, tau.reshape(1))
            count = counts.to(device)
            torch.distributed.all_reduce(count, group=group)
            return int(count), totals[0]

        count, total = tail(tau)
        if count < n * (1 - p_lim):
            tau = quantile(_values(flat, True), p_lim, group=group) - var
            count, total = tail(tau)
        share = flat.numel() / n  # the caller weights this rank's term by its share of the batch
        weight = torch.tensor(count * share, dtype=torch.float64, device=flat.device)
        ctx.save_for_backward(flat, tau, weight)
        ctx.shape, ctx.impl = maps.shape, None
        return (total / weight).to(var.dtype)

    @staticmethod
    def backward(ctx, grad):
        with dispatch.forced(ctx.impl):  # the forward's implementation
            return _ADCLoss._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        flat, tau, count = ctx.saved_tensors
        scale = (grad / count.to(grad.dtype)).reshape(1)
        if implementation(flat, triton=True) == "triton":
            out = torch.empty_like(flat)
            n = flat.numel()
            cfg = _ELEMENTWISE["adc_backward"]
            _adc_backward_kernel[(triton.cdiv(n, cfg["BLOCK"]),)](flat, out, scale, n, tau, **cfg)
        else:
            s = flat.to(scale.dtype)
            out = torch.where(s * s >= tau, 2 * s * scale, 0).to(flat.dtype)
        return out.view(ctx.shape), None, None, None, None


def _square_tail(flat: torch.Tensor, taus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of one or two thresholds ``taus`` (k,) on the device: (counts (k,) int64, float64 sums
    (k,)) of S**2 over the points with S**2 >= tau (S**2 in the compute dtype), one read of ``flat``,
    no host read."""
    k = taus.numel()
    if implementation(flat, triton=True) == "triton":
        n = flat.numel()
        cfg = {**_ELEMENTWISE["square_tail"], **({} if flat.is_cuda else {"BLOCK": 65536})}
        grid = max(1, min(triton.cdiv(n, cfg["BLOCK"]), max_programs(flat)))
        counts = torch.empty((2, grid), dtype=torch.int32, device=flat.device)
        sums = torch.empty((2, grid), dtype=torch.float32, device=flat.device)
        two = taus.to(torch.float32).reshape(-1).expand(2).contiguous() if k == 1 else taus.to(torch.float32)
        _square_tail_kernel[(grid,)](flat, n, two, counts, sums, **cfg)
        # per-program partials summed in a fixed order: deterministic
        return counts.sum(1, dtype=torch.int64)[:k], sums.double().sum(1)[:k]
    s2 = flat.to(taus.dtype) ** 2
    counts, sums = [], []
    for tau in taus.reshape(-1):  # 0-d device tensors: no host read
        keep = s2 >= tau
        counts.append(keep.sum())
        sums.append(torch.where(keep, s2, 0).double().sum())
    return torch.stack(counts), torch.stack(sums)


# ----------------------------------------------------------------------------------------------------
# Dinomaly hard-mining global cosine loss


def _pairs(enc_feats, dec_feats) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(enc_feats, torch.Tensor) and isinstance(dec_feats, torch.Tensor):
        enc_feats, dec_feats = [enc_feats], [dec_feats]
    if not isinstance(enc_feats, Sequence) or not isinstance(dec_feats, Sequence):
        raise TypeError("enc_feats and dec_feats must both be tensors or both sequences of tensors")
    if len(enc_feats) != len(dec_feats) or not enc_feats:
        raise ValueError(f"need as many encoder as decoder groups (>= 1), got {len(enc_feats)} and {len(dec_feats)}")
    for i, (a, b) in enumerate(zip(enc_feats, dec_feats)):
        check_tensor(f"enc_feats[{i}]", a, finite=False)  # non-finite values surface in the point distances
        check_tensor(f"dec_feats[{i}]", b, finite=False)
        if a.dim() != 4 or a.shape != b.shape:
            raise ValueError(
                f"group {i}: encoder and decoder features must both be (B, C, H, W) of one shape, "
                f"got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        check_same_device(enc=a, dec=b)
    return list(zip(enc_feats, dec_feats))


def _check_p(p: float, factor: float, n_points: int) -> int:
    """Validates p and factor; returns Dinomaly's k = int(n_points * (1 - p))."""
    _check_q("p", p, high=1.0)
    if p >= 1:
        raise ValueError(f"p must be in [0, 1), got {p}")
    _check_q("factor", factor, high=float("inf"))
    k = int(n_points * (1 - p))
    if k < 1:
        raise ValueError(f"p={p} keeps no hard point among {n_points} (int(N * (1 - p)) = 0); lower p")
    return k


def hard_mining_cosine_loss_reference(enc_feats, dec_feats, p: float, factor: float = 0.1) -> torch.Tensor:
    """Dinomaly's ``global_cosine_hm_percent`` as in the authors' code (spec 4.5): a full top-k for
    the threshold and a backward hook on the decoder features. Same arguments and result as
    :func:`hard_mining_cosine_loss`."""
    pairs = _pairs(enc_feats, dec_feats)
    cos = torch.nn.CosineSimilarity()
    loss = 0
    for a, b in pairs:
        a = a.detach()
        b = b.view_as(b)  # a fresh node to hook, so no hook is left on the caller's tensor
        with torch.no_grad():
            point_dist = 1 - cos(a, b).unsqueeze(1)
        k = _check_p(p, factor, point_dist.numel())
        thresh = torch.topk(point_dist.reshape(-1), k=k)[0][-1]
        loss = loss + torch.mean(1 - cos(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)))
        if b.requires_grad:
            easy = (point_dist < thresh).expand_as(b)
            b.register_hook(lambda g, easy=easy: g if g is None else torch.where(easy, g * factor, g))
    return loss / len(pairs)


@torch.compiler.disable  # data-dependent thresholds: runs eagerly inside compiled code
def hard_mining_cosine_loss(enc_feats, dec_feats, p: float, factor: float = 0.1, *, nonfinite: str = "raise",
                            group=None) -> torch.Tensor:
    """Dinomaly's global cosine loss with hard mining (``global_cosine_hm_percent``).

    For each group: d = 1 - cos(a, b) along channels at every point (no gradient); thresh = the k-th
    largest d over the whole batch, k = int(numel(d) * (1 - p)); loss = mean over samples of
    1 - cos(flatten(a_n), flatten(b_n)); in the backward pass the gradient at points with d < thresh
    (the easy ones) is multiplied by ``factor``. The result is the mean over groups.

    Args:
        enc_feats: (B, C, H, W) encoder features, or a sequence of them (one per group). Treated as
            constants (the encoder is frozen): no gradient flows to them.
        dec_feats: decoder features, same shapes. Any floating dtype; computed in float32 (float64 stays
            float64).
        p: hard-mining fraction in [0, 1); Dinomaly ramps it from 0 to 0.9. p = 0 down-weights nothing.
        factor: gradient multiplier of the easy points (Dinomaly: 0.1).
        nonfinite: 'raise' (ValueError when the features give a NaN/inf point distance: one host
            read per group) or 'nan' (no host read: the threshold stays on the device and the loss
            is NaN). Training uses 'nan': its device-side guard names the iteration.
        group: torch.distributed process group of a data-parallel step (None: this process): each
            rank passes its slice of the batch; the threshold is taken over the global batch (a
            distributed select, which reads on the host and always raises on NaN/inf); the result
            is this rank's mean, to be weighted by its share.
    Returns:
        0-d loss, differentiable with respect to ``dec_feats``.
    """
    pairs = _pairs(enc_feats, dec_feats)
    check_nonfinite(nonfinite)
    batch = pairs[0][0].shape[0]
    if distributed.active(group):  # the threshold counts the points of the global batch
        total = torch.tensor([batch], device=distributed.collective_device(group))
        torch.distributed.all_reduce(total, group=group)
        batch = int(total)
    # validated before any pass over the features; k = int(B * H * W * (1 - p)) hard points per group
    ks = [_check_p(p, factor, batch * a[0, 0].numel()) for a, _ in pairs]
    if distributed.active(group):
        terms = [_HardMiningCosine.apply(a.detach(), b, k, factor, nonfinite, group) for (a, b), k in zip(pairs, ks)]
        return sum(terms) / len(terms)

    def loss():
        terms = [_HardMiningCosine.apply(a.detach(), b, k, factor, nonfinite, None) for (a, b), k in zip(pairs, ks)]
        return sum(terms) / len(terms)

    key = tuple(dispatch.bucket(n) for _, b in pairs for n in (b.shape[0], b.shape[1], b[0, 0].numel()))
    return dispatch.run("hard_mining_cosine_loss", pairs[0][1], loss, triton=True, key=key,
                        grad_inputs=[b for _, b in pairs])


class _HardMiningCosine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, k, factor, nonfinite, group):
        bsz, c = a.shape[:2]
        a3, b3 = (t.reshape(bsz, c, -1) for t in (a, b))
        a3, b3 = (t if t.stride(2) == 1 else t.contiguous() for t in (a3, b3))  # the kernels read points contiguously
        dot, na, nb = _point_stats(a3, b3)  # (B, P) each, float32 or float64
        point_dist = 1 - dot / (na.sqrt().clamp_min(_COS_EPS) * nb.sqrt().clamp_min(_COS_EPS))
        if distributed.active(group):  # the select checks finiteness on all ranks together
            n = torch.tensor([point_dist.numel()], device=distributed.collective_device(group))
            torch.distributed.all_reduce(n, group=group)
            thresh = select_rank(point_dist, int(n) - k, group=group)
            bad = None
        else:  # the select's first pass counts the NaN/inf distances: no separate check
            thresh, bad = _select_rows(point_dist.reshape(1, -1), point_dist.numel() - k, square=False)
            thresh = thresh[0]
        # per-sample global cosine from the per-point sums (float64 for the long reduction)
        dot_n, na_n, nb_n = dot.double().sum(1), na.double().sum(1).sqrt(), nb.double().sum(1).sqrt()
        na_n, nb_n = na_n.clamp_min(_COS_EPS), nb_n.clamp_min(_COS_EPS)
        cos_n = dot_n / (na_n * nb_n)
        ctx.save_for_backward(a3, b3, point_dist, thresh, cos_n, na_n, nb_n)
        ctx.factor, ctx.shape, ctx.impl = factor, b.shape, dispatch.current()
        loss = (1 - cos_n).mean().to(dot.dtype)
        if bad is None:
            return loss
        return _finish(loss.reshape(1), bad, nonfinite, "enc_feats or dec_feats (1 - cos at each point)")[0]

    @staticmethod
    def backward(ctx, grad):
        with dispatch.forced(ctx.impl):  # the forward's implementation
            return _HardMiningCosine._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        a3, b3, point_dist, thresh, cos_n, na_n, nb_n = ctx.saved_tensors
        bsz = a3.shape[0]
        # d(1 - cos_n)/db = -a / (|a||b|) + cos_n * b / |b|^2, times grad / B
        g = grad.double() / bsz
        coef_a = (-g / (na_n * nb_n)).to(point_dist.dtype)
        coef_b = (g * cos_n / nb_n**2).to(point_dist.dtype)
        scale = torch.ones_like(point_dist).masked_fill_(point_dist < thresh, ctx.factor)
        if implementation(b3, triton=True) == "triton":
            out = torch.empty(b3.shape, dtype=b3.dtype, device=b3.device)
            _cosine_grad_kernel[_point_grid(b3)](
                a3, b3, out, coef_a, coef_b, scale, b3.shape[1], b3.shape[2], *_strides(a3, b3), **_POINT_CONFIG
            )
        else:
            cdt = point_dist.dtype
            out = (coef_a[:, None, None] * a3.to(cdt) + coef_b[:, None, None] * b3.to(cdt)) * scale[:, None]
            out = out.to(b3.dtype)
        return None, out.view(ctx.shape), None, None, None, None


# constexprs and launch options of the CUDA launches (fastad.ops.compile_check compiles these)
_POINT_CONFIG = dict(BLOCK_C=32, BLOCK_P=64, num_warps=4, num_stages=3)
_ELEMENTWISE = {"square_tail": dict(BLOCK=2048, num_warps=4, num_stages=3),
                "adc_backward": dict(BLOCK=1024, num_warps=4, num_stages=3)}


def _point_grid(t: torch.Tensor):
    return (triton.cdiv(t.shape[2], _POINT_CONFIG["BLOCK_P"]), t.shape[0])


def _strides(a3: torch.Tensor, b3: torch.Tensor) -> tuple[int, ...]:
    """(B, C, P) strides of a3 and b3 without the last, which is 1 (the kernels are compiled for that)."""
    assert all(t.stride(2) == 1 or t.shape[2] == 1 for t in (a3, b3)), "the point kernels need contiguous points"
    return (*a3.stride()[:2], *b3.stride()[:2])


def _point_stats(a3: torch.Tensor, b3: torch.Tensor):
    """Per point (B, P): sum_c a*b, sum_c a*a, sum_c b*b, accumulated in float32 (float64 inputs: float64)."""
    if implementation(a3, triton=True) == "triton":
        bsz, c, n = a3.shape
        out = torch.empty((3, bsz, n), dtype=torch.float32, device=a3.device)
        _point_stats_kernel[_point_grid(a3)](a3, b3, out, c, n, *_strides(a3, b3), **_POINT_CONFIG)
        return out[0], out[1], out[2]
    cdt = compute_dtype(a3)
    a, b = a3.to(cdt), b3.to(cdt)
    return (a * b).sum(1), (a * a).sum(1), (b * b).sum(1)


if HAS_TRITON:

    # no scalar is specialised (no variants for a value of 1 or a multiple of 16): one compiled
    # variant per constexpr set, as fastad.ops.compile_check compiles them
    @triton.jit(do_not_specialize=["n"])
    def _square_tail_kernel(x_ptr, n, tau_ptr, count_ptr, sum_ptr, BLOCK: tl.constexpr):
        """Per program: count and sum of x**2 >= tau for both thresholds tau_ptr[0], tau_ptr[1]."""
        pid = tl.program_id(0)
        tau0 = tl.load(tau_ptr)
        tau1 = tl.load(tau_ptr + 1)
        count0 = tl.zeros([BLOCK], dtype=tl.int32)
        count1 = tl.zeros([BLOCK], dtype=tl.int32)
        total0 = tl.zeros([BLOCK], dtype=tl.float32)
        total1 = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
            sq = x * x
            keep0 = (offs < n) & (sq >= tau0)
            keep1 = (offs < n) & (sq >= tau1)
            count0 += keep0.to(tl.int32)
            count1 += keep1.to(tl.int32)
            total0 += tl.where(keep0, sq, 0.0)
            total1 += tl.where(keep1, sq, 0.0)
        grid = tl.num_programs(0)
        tl.store(count_ptr + pid, tl.sum(count0))
        tl.store(count_ptr + grid + pid, tl.sum(count1))
        tl.store(sum_ptr + pid, tl.sum(total0))
        tl.store(sum_ptr + grid + pid, tl.sum(total1))

    @triton.jit(do_not_specialize=["n"])
    def _adc_backward_kernel(x_ptr, out_ptr, scale_ptr, n, tau_ptr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr).to(tl.float32)
        tau = tl.load(tau_ptr).to(tl.float32)
        g = tl.where(x * x >= tau, 2 * x * scale, 0.0)
        store_rounded(out_ptr + offs, g, m)

    @triton.jit(do_not_specialize=["C", "P", "sab", "sac", "sbb", "sbc"])
    def _point_stats_kernel(
        a_ptr, b_ptr, out_ptr, C, P, sab, sac, sbb, sbc,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ):  # fmt: skip
        pb = tl.program_id(1)
        ps = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        pm = ps < P
        dot = tl.zeros([BLOCK_P], dtype=tl.float32)
        na = tl.zeros([BLOCK_P], dtype=tl.float32)
        nb = tl.zeros([BLOCK_P], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            m = (cs[:, None] < C) & pm[None, :]
            a = tl.load(a_ptr + pb * sab + cs[:, None] * sac + ps[None, :], mask=m, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + pb * sbb + cs[:, None] * sbc + ps[None, :], mask=m, other=0.0).to(tl.float32)
            dot += tl.sum(a * b, axis=0)
            na += tl.sum(a * a, axis=0)
            nb += tl.sum(b * b, axis=0)
        base = pb * P + ps
        nbp = tl.num_programs(1) * P
        tl.store(out_ptr + base, dot, mask=pm)
        tl.store(out_ptr + nbp + base, na, mask=pm)
        tl.store(out_ptr + 2 * nbp + base, nb, mask=pm)

    @triton.jit(do_not_specialize=["C", "P", "sab", "sac", "sbb", "sbc"])
    def _cosine_grad_kernel(
        a_ptr, b_ptr, out_ptr, coef_a_ptr, coef_b_ptr, scale_ptr, C, P, sab, sac, sbb, sbc,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ):  # fmt: skip
        pb = tl.program_id(1)
        ps = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        pm = ps < P
        ca = tl.load(coef_a_ptr + pb)
        cb = tl.load(coef_b_ptr + pb)
        scale = tl.load(scale_ptr + pb * P + ps, mask=pm, other=0.0)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            m = (cs[:, None] < C) & pm[None, :]
            a = tl.load(a_ptr + pb * sab + cs[:, None] * sac + ps[None, :], mask=m, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + pb * sbb + cs[:, None] * sbc + ps[None, :], mask=m, other=0.0).to(tl.float32)
            g = (ca * a + cb * b) * scale[None, :]
            store_rounded(out_ptr + pb * C * P + cs[:, None] * P + ps[None, :], g, m)
