"""Window-masked and linear attention: fastad's kernels vs the dense baselines, same data, same run.

    FASTAD_BENCH_DEVICE=cuda pytest bench/test_attention_bench.py -s --benchmark-columns=min,mean,rounds

Masked attention (forward + backward) against ``F.scaled_dot_product_attention`` with a dense
(N, N) boolean mask, the mask built once outside the timed loop: grids 16x16 (RLR stage 3, 8 heads x
64), 32x32 (stage 2, 8 x 32), 64x64 (stage 1, 8 x 16) with RLR's windows 5 / 7 / 11, and Dinomaly's
28x28 (12 heads x 64, window 7). Linear attention (forward + backward) against Dinomaly's einsum
``LinearAttention2`` at batch 16, 12 heads, 789 tokens, 64 dims. On the CPU fastad runs its PyTorch
path (the kernels are Triton); the numbers that matter are the GPU ones. On CUDA the peak memory of
each case is recorded in ``extra_info``. The ratio table is printed at the end.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from fastad.ops import linear_attention, linear_attention_reference, local_window_attention, neighbour_masked_attention
from fastad.ops import window_mask

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


@pytest.mark.parametrize("impl", ["fastad", "sdpa_dense_mask"])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("side,heads,dim,window", GRIDS)
def test_masked_attention(benchmark, impl, kind, side, heads, dim, window):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(BATCH, heads, side * side, dim, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    if impl == "fastad":
        fn = lambda a, b, c: KINDS[kind](a, b, c, (side, side), window)  # noqa: E731
    else:
        inside = window_mask((side, side), window, DEVICE)
        allowed = inside if kind == "local" else ~inside
        fn = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=allowed)  # noqa: E731
    out = _timed(benchmark, fn, (q, k, v))
    assert out.shape == q.shape
    _times[(f"{kind} {side}x{side} w{window}", impl)] = benchmark.stats.stats.min


@pytest.mark.parametrize("impl", ["fastad", "dinomaly_einsum"])
def test_linear_attention(benchmark, impl):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(16, 12, 789, 64, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    out = _timed(benchmark, linear_attention if impl == "fastad" else linear_attention_reference, (q, k, v))
    assert out.shape == q.shape
    _times[("linear 16x12x789x64", impl)] = benchmark.stats.stats.min


def teardown_module(module):
    lines = ["", f"attention speed-up of fastad on {DEVICE} (batch {BATCH} for the masked cases), fwd+bwd min times:"]
    for case in dict.fromkeys(c for c, _ in _times):
        impls = {i: t for (c, i), t in _times.items() if c == case}
        if "fastad" in impls and len(impls) == 2:
            ((base, t_base),) = ((i, t) for i, t in impls.items() if i != "fastad")
            lines.append(
                f"  {case}: fastad {impls['fastad'] * 1e3:.2f} ms, {base} {t_base * 1e3:.2f} ms, "
                f"{t_base / impls['fastad']:.2f}x"
            )
    print("\n".join(lines))
