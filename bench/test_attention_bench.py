"""Window-masked and linear attention: fastad's kernels vs the dense baselines, same data, same run.

    FASTAD_BENCH_DEVICE=cuda pytest bench/test_attention_bench.py -s --benchmark-columns=min,mean,rounds

Masked attention (forward + backward) against ``F.scaled_dot_product_attention`` with a dense
(N, N) boolean mask, the mask built once outside the timed loop: grids 16x16 (RLR stage 3, 8 heads x
64), 32x32 (stage 2, 8 x 32), 64x64 (stage 1, 8 x 16) with RLR's windows 5 / 7 / 11, and Dinomaly's
28x28 (12 heads x 64, window 7). Linear attention (forward + backward) against Dinomaly's einsum
``LinearAttention2`` at batch 16, 12 heads, 789 tokens, 64 dims. On the CPU fastad runs its PyTorch
path (the kernels are Triton); the numbers that matter are the GPU ones. On CUDA the peak memory of
each case is recorded in ``extra_info``, with its useful FLOPs (``flops``: 4 N K d per head and
pass for K attended keys, the backward counted as 2.5 forwards; bench/gpu_report.py turns them into
TFLOP/s) and, for linear attention, the bytes it must move (``bytes``). ``fastad`` is the op as users
call it (on CUDA the measuring dispatcher picks the fastest of the Triton kernels, FlexAttention and
the PyTorch path); ``fastad_kernels`` (CUDA only) forces the Triton kernels, ``flex`` (CUDA only)
fastad's FlexAttention path (compiled ``flex_attention``, the window rule as its ``mask_mod``, a cached
``BlockMask``). ``sdpa_unmasked`` is dense attention without a mask: the ceiling for the neighbour mask
(a dense flash kernel). The ratio table is printed at the end.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from fastad.ops import linear_attention, linear_attention_reference, local_window_attention, neighbour_masked_attention
from fastad.ops import dispatch, window_mask

DEVICE = os.environ.get("FASTAD_BENCH_DEVICE", "cpu")
BATCH = int(os.environ.get("FASTAD_BENCH_BATCH", "4" if DEVICE == "cuda" else "1"))
_times: dict = {}

# (grid side, heads, head_dim, window)
GRIDS = [(16, 8, 64, 5), (28, 12, 64, 7), (32, 8, 32, 7), (64, 8, 16, 11)]
KINDS = {"neighbour": neighbour_masked_attention, "local": local_window_attention}


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _timed(benchmark, fn, inputs):
    def run():
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
        _sync()
        return out

    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    if DEVICE == "cuda":
        benchmark.extra_info["peak_memory_MiB"] = torch.cuda.max_memory_allocated() / 2**20
    benchmark.extra_info.update(device=DEVICE, batch=BATCH)
    return out


FASTAD = ["fastad", "fastad_kernels", "flex"] if DEVICE == "cuda" else ["fastad"]


def _kernels(fn, **paths):
    """``fn`` with one path forced (no measuring dispatcher): the Triton kernels by default."""
    def forced(*args):
        with dispatch.kernels(**(paths or {"triton": True})):
            return fn(*args)
    return forced


def _flops(n: int, keys: int, dim: int, heads: int) -> float:
    """Useful FLOPs of attention forward + backward: 4 N K d per head forward, 2.5x that backward."""
    return 3.5 * 4 * n * keys * dim * heads * BATCH


@pytest.mark.parametrize("impl", [*FASTAD, "sdpa_dense_mask", "sdpa_unmasked"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("side,heads,dim,window", GRIDS)
def test_masked_attention(benchmark, impl, kind, side, heads, dim, window):
    if impl == "flex" and os.environ.get("FASTAD_FLEX") == "0":
        pytest.skip("FASTAD_FLEX=0 (gpu_check.sh --quick: FlexAttention's compile time does not fit its 10 minutes)")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(BATCH, heads, side * side, dim, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    inside = window_mask((side, side), window, "cpu")
    keys = int(inside.sum()) if kind == "local" else int((~inside).sum())  # attended (query, key) pairs
    benchmark.extra_info["flops"] = _flops(1, keys, dim, heads)
    if impl.startswith("fastad") or impl == "flex":
        fn = lambda a, b, c: KINDS[kind](a, b, c, (side, side), window)  # noqa: E731
        fn = {"fastad_kernels": _kernels(fn), "flex": _kernels(fn, triton=False, flex=True)}.get(impl, fn)
    elif impl == "sdpa_unmasked":
        fn = F.scaled_dot_product_attention
    else:
        inside = window_mask((side, side), window, DEVICE)
        allowed = inside if kind == "local" else ~inside
        fn = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=allowed)  # noqa: E731
    out = _timed(benchmark, fn, (q, k, v))
    assert out.shape == q.shape
    _times[(f"{kind} {side}x{side} w{window}", impl)] = benchmark.stats.stats.min


@pytest.mark.parametrize("impl", [*FASTAD, "dinomaly_einsum"])
def test_linear_attention(benchmark, impl):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(16, 12, 789, 64, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    # forward reads q, k, v and writes out; backward reads q, k, v, dout and writes dq, dk, dv
    benchmark.extra_info.update(bytes=11 * q.numel() * q.element_size(), flops=3 * 4 * q.numel() * q.shape[-1])
    fn = {"fastad": linear_attention, "fastad_kernels": _kernels(linear_attention)}.get(impl, linear_attention_reference)
    if impl == "flex":
        pytest.skip("linear attention has no FlexAttention path")
    out = _timed(benchmark, fn, (q, k, v))
    assert out.shape == q.shape
    _times[("linear 16x12x789x64", impl)] = benchmark.stats.stats.min


def teardown_module(module):
    lines = ["", f"attention speed-up of fastad on {DEVICE} (batch {BATCH} for the masked cases), fwd+bwd min times:"]
    for case in dict.fromkeys(c for c, _ in _times):
        impls = {i: t for (c, i), t in _times.items() if c == case}
        if "fastad" not in impls:
            continue
        for base, t_base in impls.items():
            if base != "fastad":
                lines.append(f"  {case}: fastad {impls['fastad'] * 1e3:.2f} ms, {base} {t_base * 1e3:.2f} ms, "
                             f"{t_base / impls['fastad']:.2f}x")
    print("\n".join(lines))
