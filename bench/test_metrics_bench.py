"""Evaluation metrics: fastad's seven metrics at once vs anomalib 2.x's AUROC + AUPRO + F1-max run one
after the other, on 100 anomaly maps of 256 x 256 (half of them with 1-4 round defects).

    pip install anomalib      # the baseline, in the benchmark environment only
    pytest bench/test_metrics_bench.py -s --benchmark-columns=min,mean,rounds

fastad sorts the pixels once (an integer radix sort of order-preserving keys), labels the regions
once and derives pixel AUROC, AP, F1-max and AUPRO (plus the image metrics) from the cumulative
counts; anomalib sorts the same pixels in each metric and computes AUPRO from per-region curves.
The values are checked against each other; the ratio is printed at the end.
"""
import os
import warnings

import pytest
import torch

from fastad.metrics import compute_metrics

DEVICE = os.environ.get("FASTAD_BENCH_DEVICE", "cpu")
_times: dict = {}
_values: dict = {}


def _test_set(n=100, size=256):
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n // 2, n):
        for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
            cy, cx, r = (int(v) for v in torch.randint(20, size - 20, (3,), generator=g))
            masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= (r % 25 + 3) ** 2
    maps = torch.rand(n, size, size, generator=g) + 0.6 * masks
    return maps.to(DEVICE), masks.to(DEVICE)


def _anomalib(maps, masks):
    from anomalib.metrics.aupro import _AUPRO
    from anomalib.metrics.auroc import _AUROC
    from anomalib.metrics.f1_score import _F1Max

    out = {}
    for name, metric, args in (
        ("pixel_auroc", _AUROC(), (maps.flatten(), masks.flatten().int())),
        ("pixel_aupro", _AUPRO(fpr_limit=0.3), (maps, masks.int())),
        ("pixel_f1max", _F1Max(), (maps.flatten(), masks.flatten().int())),
    ):
        metric.update(*args)
        out[name] = float(metric.compute())
    return out


@pytest.mark.parametrize("impl", ["fastad", "anomalib"])
def test_metrics(benchmark, impl):
    maps, masks = _test_set()
    if impl == "anomalib":
        pytest.importorskip("anomalib.metrics")
        warnings.filterwarnings("ignore")

        def run():
            return _anomalib(maps, masks)
    else:

        def run():
            return compute_metrics(maps.amax((1, 2)), masks.flatten(1).any(1), maps, masks)

    out = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(device=DEVICE, threads=torch.get_num_threads(), **out)
    _times[impl] = benchmark.stats.stats.min
    _values[impl] = out


def teardown_module(module):
    if len(_times) < 2:
        return
    a, f = _values["anomalib"], _values["fastad"]
    for k in a:  # the same numbers (anomalib computes in float32)
        assert abs(a[k] - f[k]) < 1e-5, (k, a[k], f[k])
    print(
        f"\nmetrics on {DEVICE} ({torch.get_num_threads()} threads), 100 maps of 256x256: fastad (7 metrics) "
        f"{_times['fastad'] * 1e3:.1f} ms, anomalib AUROC + AUPRO + F1-max {_times['anomalib'] * 1e3:.1f} ms, "
        f"{_times['anomalib'] / _times['fastad']:.2f}x"
    )
