"""Dinomaly's linear attention (``LinearAttention2``: kernel feature map elu + 1) in Triton, the d x d
state kept in registers. The sequence of each (batch, head) is split into chunks so that every
launch has a few waves of programs (a program per (batch, head) left most SMs idle at Dinomaly's
16 x 12 heads): forward, one launch sums each chunk's phi(k)^T v and phi(k), a fixed-order sum adds
the chunks, one launch writes the outputs; backward, one launch per chunk for dq and the chunk's part
of dKV, a sum, one launch for dk and dv. Off the kernels (:mod:`fastad.ops.dispatch`) it runs the
authors' einsums."""
from __future__ import annotations

import math

import torch

from ._checks import check_qkv, compute_dtype
from ._triton import max_programs, tl, triton
from . import dispatch
from .dispatch import HAS_TRITON, implementation, require_triton

if HAS_TRITON:
    from ._triton import dot, load, store_rounded

__all__ = ["linear_attention", "linear_attention_reference"]

# the d x d state lives in registers: up to 64 it compiles without spills on sm_80..sm_120 (checked by
# fastad.ops.compile_check); larger heads take the einsums (GEMMs)
TRITON_MAX_HEAD_DIM = 64


def _phi(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.elu(x) + 1


def linear_attention_reference(q, k, v, eps: float = 0.0):
    """Oracle of :func:`linear_attention`, written as Dinomaly's LinearAttention2 (einsums)."""
    _validate_linear(q, k, v, eps, "raise")
    return _einsums(q, k, v, eps)


def _einsums(q, k, v, eps):
    q, k = _phi(q), _phi(k)
    kv = torch.einsum("...sd,...se->...de", k, v)
    z = 1.0 / (torch.einsum("...nd,...d->...n", q, k.sum(dim=-2)) + eps)
    return torch.einsum("...de,...nd,...n->...ne", kv, q, z)


def linear_attention(q, k, v, eps: float = 0.0, *, nonfinite: str = "raise"):
    """Dinomaly's linear attention: phi(u) = elu(u) + 1 on q and k (no 1/sqrt(d) scale),
    out_i = phi(q_i)^T KV / (phi(q_i) . sum_s phi(k_s) + eps) with KV = sum_s phi(k_s) v_s^T per head.

    Args:
        q, k, v: (batch, heads, N, head_dim) float16, bfloat16, float32 or float64, one shape and dtype.
        eps: added to the denominator (Dinomaly: 0; its README suggests 1e-6 if the loss turns NaN).
        nonfinite: 'raise' (ValueError for NaN/inf in q, k or v: a scan and one host read) or 'nan'
            (no scan, no host read: NaN/inf reach the output; how the models train).
    Returns:
        (batch, heads, N, head_dim) in the input dtype, differentiable with respect to q, k and v.
    """
    _validate_linear(q, k, v, eps, nonfinite)
    key = (dispatch.bucket(q.shape[0] * q.shape[1]), dispatch.bucket(q.shape[2]), q.shape[3])
    return dispatch.run("linear_attention", q, lambda: _linear_attention_on(q, k, v, eps),
                        triton=q.shape[3] <= TRITON_MAX_HEAD_DIM, key=key, grad_inputs=(q, k, v))


def _linear_attention_on(q, k, v, eps):
    if implementation(q, triton=True) == "triton":
        return torch.ops.fastad.linear_attention(q, k, v, float(eps))[0]
    # PyTorch path: the authors' einsums, in float32 for 16-bit inputs as the kernel computes
    cdt = compute_dtype(q)
    return _einsums(q.to(cdt), k.to(cdt), v.to(cdt), eps).to(q.dtype)


def _validate_linear(q, k, v, eps, nonfinite) -> None:
    check_qkv(q, k, v, nonfinite)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


@torch.library.custom_op("fastad::linear_attention", mutates_args=())
def _linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, KV (B, H, d, d) float32, sum_s phi(k_s) (B, H, d) float32)."""
    _require_kernel(q)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, nh, n, d = q.shape
    cfg, chunk = _linear_config(q.dtype, d, q.is_cuda), _linear_chunk(b * nh, n, q)
    grid = (b * nh, triton.cdiv(n, chunk))
    out = torch.empty_like(q)
    kv = torch.empty((b * nh, grid[1], d, d), dtype=torch.float32, device=q.device)
    ksum = torch.empty((b * nh, grid[1], d), dtype=torch.float32, device=q.device)
    _linear_state_kernel[grid](k, v, kv, ksum, n, d, chunk, **cfg)
    kv, ksum = _sum_chunks(kv).reshape(b, nh, d, d), _sum_chunks(ksum).reshape(b, nh, d)
    _linear_out_kernel[grid](q, out, kv, ksum, eps, n, d, chunk, **cfg)
    return out, kv, ksum


@_linear_attention.register_fake
def _(q, k, v, eps):  # contiguous, as the kernel's outputs (torch.compile checks the strides)
    b, nh, _, d = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((b, nh, d, d), dtype=torch.float32), q.new_empty((b, nh, d), dtype=torch.float32)


@torch.library.custom_op("fastad::linear_attention_backward", mutates_args=())
def _linear_attention_backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, ksum: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _require_kernel(q)
    do, q, k, v = do.contiguous(), q.contiguous(), k.contiguous(), v.contiguous()
    kv, ksum = kv.contiguous(), ksum.contiguous()
    b, nh, n, d = q.shape
    cfg, chunk = _linear_config(q.dtype, d, q.is_cuda), _linear_chunk(b * nh, n, q)
    grid = (b * nh, triton.cdiv(n, chunk))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dkv = torch.empty((b * nh, grid[1], d, d), dtype=torch.float32, device=q.device)
    dksum = torch.empty((b * nh, grid[1], d), dtype=torch.float32, device=q.device)
    _linear_dq_kernel[grid](q, do, kv, ksum, dq, dkv, dksum, eps, n, d, chunk, **cfg)
    dkv, dksum = _sum_chunks(dkv), _sum_chunks(dksum)
    _linear_dkdv_kernel[grid](k, v, dkv, dksum, dk, dv, n, d, chunk, **cfg)
    return dq, dk, dv


@_linear_attention_backward.register_fake
def _(do, q, k, v, kv, ksum, eps):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(k, memory_format=torch.contiguous_format), torch.empty_like(v, memory_format=torch.contiguous_format)


def _linear_setup_context(ctx, inputs, output):
    q, k, v, eps = inputs
    ctx.save_for_backward(q, k, v, output[1], output[2])
    ctx.eps = eps


def _linear_backward(ctx, do, dkv, dksum):
    q, k, v, kv, ksum = ctx.saved_tensors
    return (*torch.ops.fastad.linear_attention_backward(do, q, k, v, kv, ksum, ctx.eps), None)


_linear_attention.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def _require_kernel(q: torch.Tensor) -> None:
    require_triton(q)
    if q.shape[3] > TRITON_MAX_HEAD_DIM:
        raise ValueError(f"the linear attention kernels take head dims up to {TRITON_MAX_HEAD_DIM}, got {q.shape[3]}; "
                         "call fastad.ops.linear_attention, which takes the einsum path for larger heads")


_MIN_CHUNK = 64  # tokens per program at least: below that the d x d partial sums cost more than they spread


def _linear_chunk(bh: int, n: int, t: torch.Tensor) -> int:
    """Tokens per program: the n tokens of each of the ``bh`` (batch, head) pairs split into as many
    chunks (of at least 64 tokens, a multiple of the 16-token tile) as a few waves of the GPU's SMs
    need (:func:`max_programs`); one chunk when bh alone fills them."""
    chunks = max(1, min(n // _MIN_CHUNK, triton.cdiv(max_programs(t), bh)))
    return triton.cdiv(triton.cdiv(n, chunks), 16) * 16


def _sum_chunks(parts: torch.Tensor) -> torch.Tensor:
    """(bh, chunks, ...) float32 partial sums -> (bh, ...), in chunk order (deterministic)."""
    return parts[:, 0] if parts.shape[1] == 1 else parts.sum(1)


def _linear_config(dtype: torch.dtype, d: int, cuda: bool) -> dict:
    """Constexprs and launch options for head dim ``d`` (fastad.ops.compile_check compiles every CUDA one):
    16-token tiles over 8 warps keep the state and the tiles in registers (no spill at d = 64)."""
    return dict(
        BLOCK_N=16,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        F32=dtype == torch.float32 or (dtype == torch.bfloat16 and not cuda),
        num_warps=8, num_stages=3,
    )

if HAS_TRITON:

    @triton.jit
    def _elu1(x):  # NaN must stay NaN (as in elu): tl.minimum drops NaN unless told to propagate it
        return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)))

    # no scalar argument is specialised: one compiled variant per constexpr set (fastad.ops.compile_check).
    # Grid: (batch x heads, chunks); program (bh, c) takes the tokens [c CHUNK, (c + 1) CHUNK) of bh.

    @triton.jit
    def _elu1_grad(x):
        return tl.where(x > 0, 1.0, tl.exp(tl.minimum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)))

    @triton.jit
    def _load_state(S, SUM, bh, D, offs_d, dm):
        """(bh)'s d x d state and d-vector (float32, 0 outside D)."""
        dd = offs_d[:, None] * D + offs_d[None, :]
        return (tl.load(S + bh * D * D + dd, mask=dm[:, None] & dm[None, :], other=0.0),
                tl.load(SUM + bh * D + offs_d, mask=dm, other=0.0))

    @triton.jit
    def _store_part(S, SUM, s, ssum, D, offs_d, dm):
        """This program's (bh, chunk) partial state and d-vector into the (bh, chunks, ...) buffers."""
        part = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        dd = offs_d[:, None] * D + offs_d[None, :]
        tl.store(S + part * D * D + dd, s, mask=dm[:, None] & dm[None, :])
        tl.store(SUM + part * D + offs_d, ssum, mask=dm)

    @triton.jit(do_not_specialize=["N", "D", "CHUNK"])
    def _linear_state_kernel(
        K, V, KV, KSUM, N, D, CHUNK,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, F32: tl.constexpr,
    ):  # fmt: skip
        """This chunk's sum of phi(k_s) v_s^T (d x d) and of phi(k_s) (d), float32."""
        bh = tl.program_id(0)
        c = tl.program_id(1)
        base = bh * N * D
        offs_d = tl.arange(0, BLOCK_D)
        dm = offs_d < D
        kv = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
        ksum = tl.zeros([BLOCK_D], dtype=tl.float32)
        for n0 in range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, N), BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            m = (offs_n < N)[:, None] & dm[None, :]
            k = load(K + base + offs_n[:, None] * D + offs_d[None, :], m, F32)
            v = load(V + base + offs_n[:, None] * D + offs_d[None, :], m, F32)
            pk = tl.where(m, _elu1(k.to(tl.float32)), 0.0)  # padding rows must not add phi(0) = 1
            kv += dot(tl.trans(pk).to(v.dtype), v, F32)
            ksum += tl.sum(pk, 0)
        _store_part(KV, KSUM, kv, ksum, D, offs_d, dm)

    @triton.jit(do_not_specialize=["eps", "N", "D", "CHUNK"])
    def _linear_out_kernel(
        Q, O, KV, KSUM, eps, N, D, CHUNK,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, F32: tl.constexpr,
    ):  # fmt: skip
        """out = phi(q) KV / (phi(q) . ksum + eps) for this chunk's queries."""
        bh = tl.program_id(0)
        c = tl.program_id(1)
        base = bh * N * D
        offs_d = tl.arange(0, BLOCK_D)
        dm = offs_d < D
        kv, ksum = _load_state(KV, KSUM, bh, D, offs_d, dm)
        for n0 in range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, N), BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            m = (offs_n < N)[:, None] & dm[None, :]
            q = load(Q + base + offs_n[:, None] * D + offs_d[None, :], m, F32)
            pq = tl.where(m, _elu1(q.to(tl.float32)), 0.0)
            num = dot(pq, kv, True)
            den = tl.where(offs_n < N, tl.sum(pq * ksum[None, :], 1) + eps, 1.0)  # padding rows: no 0 / 0
            store_rounded(O + base + offs_n[:, None] * D + offs_d[None, :], num / den[:, None], m)

    @triton.jit(do_not_specialize=["eps", "N", "D", "CHUNK"])
    def _linear_dq_kernel(
        Q, DO, KV, KSUM, DQ, DKV, DKSUM, eps, N, D, CHUNK,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, F32: tl.constexpr,
    ):  # fmt: skip
        """dq of this chunk's queries (out = num / den, num = phi(q) KV, den = phi(q) . ksum + eps), and
        the chunk's parts of dKV = sum phi(q)^T dnum and dksum = sum dden phi(q)."""
        bh = tl.program_id(0)
        c = tl.program_id(1)
        base = bh * N * D
        offs_d = tl.arange(0, BLOCK_D)
        dm = offs_d < D
        kv, ksum = _load_state(KV, KSUM, bh, D, offs_d, dm)
        dkv = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
        dksum = tl.zeros([BLOCK_D], dtype=tl.float32)
        for n0 in range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, N), BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            m = (offs_n < N)[:, None] & dm[None, :]
            ptrs = base + offs_n[:, None] * D + offs_d[None, :]
            q = load(Q + ptrs, m, F32).to(tl.float32)
            do = load(DO + ptrs, m, F32).to(tl.float32)
            pq = tl.where(m, _elu1(q), 0.0)
            num = dot(pq, kv, True)
            den = tl.where(offs_n < N, tl.sum(pq * ksum[None, :], 1) + eps, 1.0)
            dnum = do / den[:, None]
            dden = -tl.sum(dnum * num, 1) / den
            dpq = dot(dnum, tl.trans(kv), True) + dden[:, None] * ksum[None, :]
            store_rounded(DQ + ptrs, dpq * _elu1_grad(q), m)
            dkv += dot(tl.trans(pq), dnum, True)
            dksum += tl.sum(dden[:, None] * pq, 0)
        _store_part(DKV, DKSUM, dkv, dksum, D, offs_d, dm)

    @triton.jit(do_not_specialize=["N", "D", "CHUNK"])
    def _linear_dkdv_kernel(
        K, V, DKV, DKSUM, DK, DV, N, D, CHUNK,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, F32: tl.constexpr,
    ):  # fmt: skip
        """dk, dv of this chunk's keys and values (KV = sum_s phi(k_s) v_s^T, ksum = sum_s phi(k_s))."""
        bh = tl.program_id(0)
        c = tl.program_id(1)
        base = bh * N * D
        offs_d = tl.arange(0, BLOCK_D)
        dm = offs_d < D
        dkv, dksum = _load_state(DKV, DKSUM, bh, D, offs_d, dm)
        for n0 in range(c * CHUNK, tl.minimum(c * CHUNK + CHUNK, N), BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            m = (offs_n < N)[:, None] & dm[None, :]
            ptrs = base + offs_n[:, None] * D + offs_d[None, :]
            k = load(K + ptrs, m, F32).to(tl.float32)
            v = load(V + ptrs, m, F32).to(tl.float32)
            pk = tl.where(m, _elu1(k), 0.0)
            dpk = dot(v, tl.trans(dkv), True) + dksum[None, :]
            store_rounded(DK + ptrs, dpk * _elu1_grad(k), m)
            store_rounded(DV + ptrs, dot(pk, dkv, True), m)
