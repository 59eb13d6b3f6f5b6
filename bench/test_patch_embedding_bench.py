"""PatchCore's patch embedding (3x3 neighbourhoods, coarse level resized, adaptive pools to 1024):
fastad's blocked-convolution form vs the official unfold / resize / pool pipeline (the authors' steps,
re-implemented in fastad as ``PatchEmbedding.reference``), in one run, with the machine's measured
copy bandwidth and the bytes the blocked form moves (its floor).

    python -m pytest bench/test_patch_embedding_bench.py --benchmark-only -s
"""
from __future__ import annotations

import os

import pytest
import torch

from baselines import memory_bandwidth
from fastad.models.components.memory_bank import PatchEmbedding

CASES = {  # backbone levels at 224 px: channels and grids of the stride-8 and stride-16 stages
    "efficientnet_lite0": ((40, 28), (112, 14)),
    "wide_resnet50_2": ((512, 28), (1024, 14)),
}
BATCH = 16
DEVICE = os.environ.get("FASTAD_BENCH_DEVICE", "cpu")
_rows = {}


def _sync():
    if DEVICE == "cuda":  # kernels run asynchronously: time them to completion
        torch.cuda.synchronize()


def _bytes_moved(levels, target=1024) -> int:
    """What the blocked form must read and write at least: the features once, the (B, h, w, target)
    output zero-filled and accumulated once per level, a coarse level's (B, rows, h_l, w_l) block
    outputs and their resized copy (half of the rows each for two levels)."""
    (c0, g0), *coarse = levels
    out = BATCH * g0 * g0 * target * 4
    total = sum(BATCH * c * g * g * 4 for c, g in levels) + out * (1 + 2 * len(levels))
    for _, g in coarse:
        rows = target // len(levels)
        total += BATCH * rows * (g * g + 2 * g0 * g0) * 4
    return total


@pytest.mark.parametrize("impl", ["fastad", "official"])
@pytest.mark.parametrize("backbone", list(CASES))
def test_patch_embedding(benchmark, backbone, impl):
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(BATCH, c, s, s, generator=g).to(DEVICE) for c, s in CASES[backbone]]
    pe = PatchEmbedding().to(DEVICE)
    embed = pe.forward if impl == "fastad" else pe.reference

    def fn(f):
        out = embed(f)
        _sync()
        return out

    with torch.no_grad():
        fn(feats)
        benchmark.pedantic(lambda: fn(feats), rounds=5, iterations=1, warmup_rounds=1)
    _rows[(backbone, impl)] = benchmark.stats.stats.min
    benchmark.extra_info.update(backbone=backbone, batch=BATCH, device=DEVICE, threads=torch.get_num_threads())
    if impl == "official" and (backbone, "fastad") in _rows:
        fast, slow = _rows[(backbone, "fastad")], _rows[(backbone, "official")]
        bw = memory_bandwidth("copy", DEVICE, mib=512)
        floor = _bytes_moved(CASES[backbone]) / bw
        print(f"\n{backbone}, {BATCH} images at 224 px, {DEVICE}, {torch.get_num_threads()} threads: fastad {fast * 1e3:.1f} ms, "
              f"official pipeline {slow * 1e3:.1f} ms ({slow / fast:.2f}x); copy bandwidth {bw / 1e9:.1f} GB/s, "
              f"bytes floor {floor * 1e3:.1f} ms ({fast / floor:.2f}x of it)")
        benchmark.extra_info.update(speedup=slow / fast, bandwidth_gbs=bw / 1e9, floor_s=floor)
