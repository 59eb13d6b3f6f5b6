"""PatchCore's kNN scoring on real embeddings: fastad's ``FeatureBank.search`` (a bfloat16 GEMM on
CPUs with AVX512-BF16/AMX, else float32, finds candidates; they are re-scored exactly in float64) vs
the installed anomalib 2.7's ``PatchcoreModel.nearest_neighbors`` (float32 ``euclidean_dist`` and
``min``) and the built-in a user would write (``torch.cdist`` from a float32 GEMM, then ``topk``), on the bank and test patches of a 1% PatchCore fitted on MVTec AD bottle (16 test images
at 224 px: 12,544 queries, bank 1,638 x 1,024). The floor is compute: the GEMM's 2 Q N D flops at
the rate of a large square GEMM of the same dtype measured in the same run.

    python -m pytest bench/test_feature_bank_bench.py -s
"""
from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest
import torch

from fastad.ops import FeatureBank, feature_bank
from mvtec_data import mvtec_root

DATA = mvtec_root()
DEVICE = os.environ.get("FASTAD_BENCH_DEVICE", "cpu")


def _sync():
    if DEVICE == "cuda":  # kernels run asynchronously: time them to completion
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def bottle():
    """(bank (1638, 1024), queries (12544, 1024)) float32 of a 1% PatchCore fitted on bottle."""
    if not (DATA / "bottle").is_dir():
        pytest.skip(f"MVTec AD bottle not found under {DATA}")
    from fastad.data import mvtec
    from fastad.engine import fit_model

    model, _ = fit_model("patchcore", mvtec(DATA, "bottle", "train"), coreset_ratio=0.01)
    test = mvtec(DATA, "bottle", "test")
    images = torch.stack([test[i]["image"] for i in range(0, 80, 5)])
    with torch.no_grad():
        emb, _ = model.embed(model.check_images(images))
    return model.bank.memory_bank.clone().to(DEVICE), emb.reshape(-1, emb.shape[-1]).contiguous().to(DEVICE)


def _gemm_rate(dtype: torch.dtype) -> float:
    """FLOP/s of a 4096 x 1024 x 4096 GEMM in ``dtype`` on the bench device, best of 3."""
    a, b = torch.randn(4096, 1024, device=DEVICE).to(dtype), torch.randn(1024, 4096, device=DEVICE).to(dtype)
    a @ b
    _sync()
    best = min(_seconds(lambda: (a @ b, _sync())) for _ in range(3))
    return 2 * 4096 * 1024 * 4096 / best


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _anomalib_search(bank):
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    owner = SimpleNamespace(memory_bank=bank, euclidean_dist=PatchcoreModel.euclidean_dist)
    return lambda q: PatchcoreModel.nearest_neighbors(owner, q, 1)


@pytest.mark.parametrize("impl", ["fastad", "fastad_float32_gemm", "anomalib_2.7", "torch_cdist_topk"])
def test_knn_scoring(benchmark, bottle, impl):
    bank, queries = bottle
    if impl == "torch_cdist_topk":  # the built-in a user would write: a float32 GEMM-based cdist, then topk
        search = lambda q: torch.cdist(q, bank, compute_mode="use_mm_for_euclid_dist").topk(1, largest=False)  # noqa: E731
    elif impl == "anomalib_2.7":
        pytest.importorskip("anomalib")
        search = _anomalib_search(bank)
    else:
        index = FeatureBank(bank.shape[1], gemm="float32" if impl == "fastad_float32_gemm" else "auto")
        index.add(bank)
        search = lambda q: index.search(q, 1)  # noqa: E731
    out = benchmark.pedantic(lambda: (search(queries), _sync())[0], rounds=5, iterations=1, warmup_rounds=1)
    best = benchmark.stats.stats.min
    flops = 2 * queries.shape[0] * bank.shape[0] * bank.shape[1]
    dtype = torch.bfloat16 if impl == "fastad" and DEVICE == "cpu" and feature_bank.CPU_HAS_BF16_DOT else torch.float32
    rate = _gemm_rate(dtype)
    floor = flops / rate
    benchmark.extra_info.update(seconds=best, gemm_dtype=str(dtype), gemm_flops_per_s=rate, floor_s=floor)
    print(f"\n{impl} ({DEVICE}): {best * 1e3:.1f} ms for {queries.shape[0]} queries x {bank.shape[0]} x {bank.shape[1]}; "
          f"GEMM floor ({dtype}, {rate / 1e9:.0f} GFLOP/s measured) {floor * 1e3:.1f} ms: {best / floor:.2f}x")
    # the nearest entry is the float64 search's: fastad exactly, anomalib within float32 rounding
    d64 = torch.cdist(queries.double().cpu(), bank.double().cpu()).pow(2)
    want = d64.min(1)
    if impl in ("anomalib_2.7", "torch_cdist_topk"):
        dist, idx = out[0].double().cpu().pow(2).reshape(-1), out[1].cpu()
        assert float((dist - want.values).abs().max()) < 1e-3 * float(want.values.max())
    else:
        dist, idx = out[0][:, 0].double().cpu(), out[1][:, 0].cpu()
        assert torch.equal(idx, want.indices)
        assert bool(((dist - want.values).abs() <= want.values * 2.0**-23).all())  # float32 rounding of it
