"""Coreset selection: fastad vs the loops users run today, same data, same run.

    pytest bench/test_coreset_bench.py --benchmark-columns=min,mean,rounds
    FASTAD_BENCH_SIZES=20000 pytest bench/...   # only the smaller size

Each case times the whole selection (projection included) on N x 1536 float32 features (the
anomalib WRN-50 layer2+layer3 width). Baselines: ``anomalib_2.7`` (the installed anomalib's own
KCenterGreedy; skipped without anomalib), ``anomalib_style_reimpl`` (a re-implementation in
anomalib's style: sparse JL projection, pairwise_distance loop; not the package) and
``patchcore_inspection_reimpl`` (the authors' ApproximateGreedyCoresetSampler loop written their
way: 128-d Linear projection, matmul-distance loop, the algorithm fastad reproduces). The ratio
table is printed at the end (baseline time / fastad time, measured in this run).
"""
import os

import pytest
import torch
from baselines import anomalib_installed_sampler, anomalib_style_sampler, patchcore_inspection_sampler

from fastad.ops import greedy_coreset

SIZES = [int(s) for s in os.environ.get("FASTAD_BENCH_SIZES", "20000,100000").split(",")]
RATIOS = [0.01, 0.1]
DEVICE = os.environ.get("FASTAD_BENCH_DEVICE", "cpu")
_times: dict = {}


def _features(n):
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, 1536, generator=g).to(DEVICE)


IMPLS = {
    "fastad": lambda x, r: greedy_coreset(x, ratio=r),
    "anomalib_2.7": anomalib_installed_sampler,
    "patchcore_inspection_reimpl": patchcore_inspection_sampler,
    "anomalib_style_reimpl": anomalib_style_sampler,
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("n", SIZES)
def test_coreset(benchmark, impl, n, ratio):
    if impl == "anomalib_2.7":
        pytest.importorskip("anomalib")
    x = _features(n)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    def run():
        out = IMPLS[impl](x, ratio)
        sync()
        return out

    rounds = 3 if n * ratio <= 2000 else 1  # the 100k baselines run for minutes per round
    out = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    assert out.numel() == int(n * ratio) and len(set(out.tolist())) == out.numel()
    benchmark.extra_info.update(device=DEVICE, n=n, ratio=ratio, threads=torch.get_num_threads())
    _times[(n, ratio, impl)] = benchmark.stats.stats.min


def teardown_module(module):
    lines = ["", f"coreset speed-up of fastad on {DEVICE} ({torch.get_num_threads()} threads), min times:"]
    for n in SIZES:
        for r in RATIOS:
            t = {impl: _times.get((n, r, impl)) for impl in IMPLS}
            if t["fastad"] is None:
                continue
            ratios = "  ".join(
                f"vs {impl}: {t[impl] / t['fastad']:.1f}x ({t[impl]:.2f}s)" for impl in IMPLS if impl != "fastad" and t[impl]
            )
            lines.append(f"N={n:>6} ratio={r:<4} fastad {t['fastad']:.2f}s  {ratios}")
    print("\n".join(lines))
