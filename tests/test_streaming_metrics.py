"""Streaming metric classes: the same numbers as compute_metrics on the concatenation of the batches,
with torchmetrics (one process and two gloo ranks synced by torchmetrics) and without it."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastad import distributed
from fastad.metrics import AUPRO, AUROC, AnomalyMetrics, AveragePrecision, F1Max, compute_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data(seed=0, n=14, size=20):
    """Image scores and maps with many ties, some normal images, one anomalous image without a mask."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 5, (n,), generator=g).double() / 4
    labels = torch.arange(n) % 3 != 0
    maps = torch.randint(0, 9, (n, size, size), generator=g).float() / 8
    masks = (torch.rand(n, size, size, generator=g) > 0.85) & labels[:, None, None]
    has_mask = torch.ones(n, dtype=torch.bool)
    has_mask[1] = False
    return scores, labels, maps, masks, has_mask


def _batches(n, sizes=(5, 1, 6)):
    start = 0
    for b in sizes:
        yield slice(start, min(start + b, n))
        start += b
    if start < n:
        yield slice(start, n)


@pytest.mark.parametrize("seed", [0, 1])
def test_anomaly_metrics_equal_compute_metrics(seed):
    scores, labels, maps, masks, has_mask = _data(seed)
    m = AnomalyMetrics()
    for s in _batches(len(scores)):
        # (B, 1, H, W) maps, float16 scores and {0, 1} integer masks are accepted as anomalib gives them
        m.update(scores[s].half() if seed else scores[s], labels[s].long(), maps[s].unsqueeze(1), masks[s].int(),
                 has_mask=has_mask[s])
    got = m.compute()
    want = compute_metrics(scores.half().float() if seed else scores.float(), labels, maps, masks,
                           has_mask=has_mask)
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == torch.float64 and float(got[k]) == v, k
    m.reset()
    with pytest.raises(ValueError, match="before any update"):
        m.compute()


def test_single_metrics_equal_compute_metrics():
    scores, labels, maps, masks, _ = _data(3)
    want = compute_metrics(scores.float(), labels, maps, masks)
    image = {"image_auroc": AUROC(), "image_ap": AveragePrecision(), "image_f1max": F1Max()}
    pixel = {"pixel_auroc": AUROC(), "pixel_ap": AveragePrecision(), "pixel_f1max": F1Max(), "pixel_aupro": AUPRO()}
    for s in _batches(len(scores)):
        for metric in image.values():
            metric.update(scores[s], labels[s])
        for metric in pixel.values():
            metric.update(maps[s], masks[s])
    # the result's dtype follows the input: float64 scores give the float64 value, float32 maps it rounded
    for k, metric in {**image, **pixel}.items():
        got, dtype = metric.compute(), scores.dtype if k.startswith("image") else maps.dtype
        assert got.dtype == dtype and float(got) == float(torch.tensor(want[k], dtype=dtype)), k


def test_image_only_and_state_is_one_compact_copy():
    scores, labels, maps, masks, _ = _data(4)
    m = AnomalyMetrics()
    for s in _batches(len(scores)):
        m.update(scores[s], labels[s])
    got, want = m.compute(), compute_metrics(scores.float(), labels)
    assert all(float(got[k]) == v or (math.isnan(v) and math.isnan(float(got[k]))) for k, v in want.items())
    # stored: float32 copies (not views of the caller's tensors) and bool masks
    m = AnomalyMetrics()
    big = torch.rand(4, 2, 8, 8)
    m.update(torch.rand(4), torch.tensor([0, 1, 0, 1]), big[:, :1], torch.ones(4, 1, 8, 8, dtype=torch.long))
    assert m.maps[0].dtype == torch.float32 and m.masks[0].dtype == torch.bool
    assert m.maps[0].untyped_storage().nbytes() == 4 * 8 * 8 * 4


def test_bad_input_is_refused():
    m = AnomalyMetrics()
    with pytest.raises(ValueError, match="NaN or inf"):
        m.update(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="0 or 1"):
        m.update(torch.tensor([0.1, 0.2]), torch.tensor([0, 2]))
    with pytest.raises(TypeError, match="floating"):
        m.update(torch.tensor([1, 2]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="differ in size"):
        m.update(torch.rand(3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="both maps and masks"):
        m.update(torch.rand(2), torch.tensor([0, 1]), maps=torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        m.update(torch.rand(2), torch.tensor([0, 1]), torch.rand(2, 4, 4), torch.zeros(2, 4, 5))
    m.update(torch.rand(2), torch.tensor([0, 1]), torch.rand(2, 4, 4), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="every batch or in none"):
        m.update(torch.rand(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="fpr_limit"):
        AUPRO(fpr_limit=0)
    with pytest.raises(ValueError, match="before any update"):
        AUROC().compute()


def _rank(rank, world, data):
    scores, labels, maps, masks, has_mask = data
    share = slice(*distributed.shard_range(len(scores), rank, world))
    m, auroc = AnomalyMetrics(), AUROC()
    m.update(scores[share], labels[share], maps[share], masks[share], has_mask=has_mask[share])
    auroc.update(maps[share], masks[share])
    # compute() syncs through torchmetrics' all_gather over the default (gloo) group
    return {k: float(v) for k, v in m.compute().items()}, auroc.compute()


def test_two_ranks_sync_through_torchmetrics():
    pytest.importorskip("torchmetrics")
    data = _data(5, n=11)
    want = compute_metrics(data[0].float(), *data[1:4], has_mask=data[4])
    all_pixels = compute_metrics(data[0].float(), *data[1:4])["pixel_auroc"]  # AUROC() has no has_mask
    for got, pixel_auroc in distributed.spawn(_rank, 2, data):  # AUROC() of float32 maps: float32
        assert got == want and pixel_auroc.dtype == torch.float32
        assert float(pixel_auroc) == float(torch.tensor(all_pixels, dtype=torch.float32))


def test_without_torchmetrics_same_numbers():
    script = textwrap.dedent("""
        import json, sys, torch
        sys.modules["torchmetrics"] = None  # as if it were not installed
        sys.path.insert(0, sys.argv[1])
        from tests.test_streaming_metrics import _batches, _data
        from fastad.metrics import AnomalyMetrics, AUROC, compute_metrics
        from fastad.metrics.streaming import _Metric
        scores, labels, maps, masks, has_mask = _data(2)
        m = AnomalyMetrics()
        for s in _batches(len(scores)):
            m.update(scores[s], labels[s], maps[s], masks[s], has_mask=has_mask[s])
        try:
            AUROC(dist_sync_on_step=True)
            refused = False
        except TypeError:
            refused = True
        print(json.dumps({"base": _Metric.__module__, "refused": refused,
                          "got": {k: float(v) for k, v in m.compute().items()},
                          "want": compute_metrics(scores.float(), labels, maps, masks, has_mask=has_mask)}))
    """)
    out = subprocess.run([sys.executable, "-c", script, ROOT], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["base"] == "fastad.metrics.streaming" and res["refused"]
    assert res["got"] == res["want"]
