"""Nearest-reference matching (ADPretrain/ResAD residual features): fastad vs the authors' way
(normalise, one dense (N x M) similarity matrix, argmax: the float32 GEMM + argmax a user would write),
on 8-shot banks of ViT-sized tokens. ``extra_info['flops']`` is the GEMM's 2 N M C (bench/gpu_report.py
prints TFLOP/s). On CUDA the measuring dispatcher picks between the extension and the float64 reference,
both float64-exact."""
import os

import pytest
import torch
import torch.nn.functional as F

from fastad.ops import nearest_reference

DEVICE = os.environ.get("FASTAD_BENCH_DEVICE", "cpu")


def authors_cosine_match(x, bank):
    sim = F.normalize(x, dim=1) @ F.normalize(bank, dim=1).T  # (N, M) materialised
    idx = sim.argmax(1)
    return x - bank[idx]


@pytest.mark.parametrize("impl", ["fastad", "authors"])
@pytest.mark.parametrize("n,m,c", [(16 * 256, 8 * 256, 768), (32 * 256, 8 * 256, 1024)])
def test_nearest_cosine(benchmark, impl, n, m, c):
    g = torch.Generator().manual_seed(0)
    x, bank = torch.randn(n, c, generator=g).to(DEVICE), torch.randn(m, c, generator=g).to(DEVICE)
    match = (lambda: nearest_reference(x, bank, metric="cosine")[2]) if impl == "fastad" else (lambda: authors_cosine_match(x, bank))

    def fn():
        out = match()
        if DEVICE == "cuda":  # kernels run asynchronously: time them to completion
            torch.cuda.synchronize()
        return out

    out = benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    assert out.shape == x.shape
    benchmark.extra_info.update(device=DEVICE, flops=2 * n * m * c)
