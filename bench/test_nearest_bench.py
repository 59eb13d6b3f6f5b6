"""Nearest-reference matching (ADPretrain/ResAD residual features, FOD's coreset references): fastad vs
the authors' way (cosine: normalise, one dense (N x M) float32 similarity matrix, argmax; l2: the
float32 ``torch.cdist`` + argmin a user would write), on 8-shot banks of ViT-sized tokens.
``extra_info['flops']`` is the GEMM's 2 N M C (bench/gpu_report.py prints TFLOP/s against the peak).

Columns: ``fastad`` (the dispatcher's choice; on CUDA the measuring rule), ``fastad_gemm`` (the GEMM
path: a float32 GEMM's candidates re-scored in float64 by Triton) and ``fastad_extension`` (the
float64 warp-per-query CUDA kernel), both forced and on CUDA only; every fastad column is float64-exact."""
import os

import pytest
import torch
import torch.nn.functional as F

from fastad.ops import dispatch, nearest_reference

DEVICE = os.environ.get("FASTAD_BENCH_DEVICE", "cpu")
FORCED = {"fastad_gemm": dict(extension=False), "fastad_extension": dict(triton=False)}


def authors_match(x, bank, metric):
    if metric == "cosine":
        idx = (F.normalize(x, dim=1) @ F.normalize(bank, dim=1).T).argmax(1)  # (N, M) materialised
    else:
        idx = torch.cdist(x, bank).argmin(1)
    return x - bank[idx]


@pytest.mark.parametrize("impl", ["fastad", "fastad_gemm", "fastad_extension", "authors"])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("n,m,c", [(16 * 256, 8 * 256, 768), (32 * 256, 8 * 256, 1024)])
def test_nearest(benchmark, impl, metric, n, m, c):
    if impl in FORCED and DEVICE != "cuda":
        pytest.skip("the forced columns compare the two CUDA paths (on the CPU the GEMM path's Triton runs interpreted)")
    g = torch.Generator().manual_seed(0)
    x, bank = torch.randn(n, c, generator=g).to(DEVICE), torch.randn(m, c, generator=g).to(DEVICE)
    if impl == "authors":
        match = lambda: authors_match(x, bank, metric)  # noqa: E731
    else:
        def match():
            with dispatch.kernels(**FORCED.get(impl, {})):
                return nearest_reference(x, bank, metric=metric)[2]

    def fn():
        out = match()
        if DEVICE == "cuda":  # kernels run asynchronously: time them to completion
            torch.cuda.synchronize()
        return out

    out = benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    assert out.shape == x.shape
    benchmark.extra_info.update(device=DEVICE, flops=2 * n * m * c)
