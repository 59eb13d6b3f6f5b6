import math

import numpy as np
import pytest
import torch
from conftest import DEVICES
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from fastad.metrics import (
    METRICS,
    RankedScores,
    aupro,
    aupro_reference,
    auroc,
    average_precision,
    compute_metrics,
    f1_max,
    label_regions,
)


def _sk_f1max(y, s):
    p, r, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.nanmax(2 * p * r / (p + r)))


def _scores(n, levels, dtype=torch.float32):
    y = torch.randint(0, 2, (n,))
    y[0], y[1] = 0, 1
    s = torch.randn(n) + y if levels is None else torch.randint(0, levels, (n,)).float() + y  # ties
    return s.to(dtype), y


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,levels", [(2, None), (3, 1), (100, None), (1000, 5), (50000, 50), (20000, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_ranking_metrics_equal_sklearn(device, n, levels, dtype):
    s, y = _scores(n, levels, dtype)
    yn, sn = y.numpy(), s.double().numpy()
    s, y = s.to(device), y.to(device)
    assert auroc(s, y) == pytest.approx(roc_auc_score(yn, sn), abs=1e-12)
    assert average_precision(s, y) == pytest.approx(average_precision_score(yn, sn), abs=1e-12)
    assert f1_max(s, y) == pytest.approx(_sk_f1max(yn, sn), abs=1e-12)


def test_ranking_edge_cases():
    # negative zero ties with zero; negative scores; a single anomalous sample
    s = torch.tensor([-0.0, 0.0, -1.5, 2.0, 0.0, -3.0])
    y = torch.tensor([1, 0, 0, 1, 0, 0])
    assert auroc(s, y) == pytest.approx(roc_auc_score(y.numpy(), s.numpy()), abs=1e-12)
    assert average_precision(s, y.bool()) == pytest.approx(average_precision_score(y.numpy(), s.numpy()), abs=1e-12)
    one = torch.tensor([0, 0, 1, 0])
    assert auroc(torch.tensor([0.1, 0.2, 0.9, 0.3]), one) == 1.0
    assert average_precision(torch.tensor([0.1, 0.2, 0.9, 0.3]), one) == 1.0
    # all tied: AUROC 0.5, AP = prevalence
    assert auroc(torch.ones(10), torch.arange(10) % 2) == 0.5
    assert average_precision(torch.ones(10), torch.arange(10) < 3) == pytest.approx(0.3)


def test_ranking_errors():
    with pytest.raises(ValueError, match="both classes"):
        auroc(torch.rand(5), torch.zeros(5))
    with pytest.raises(ValueError, match="at least one anomalous"):
        average_precision(torch.rand(5), torch.zeros(5))
    with pytest.raises(ValueError, match="NaN or inf"):
        auroc(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="differ in size"):
        auroc(torch.rand(3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="empty"):
        auroc(torch.rand(0), torch.zeros(0))
    with pytest.raises(ValueError, match="0 or 1"):
        auroc(torch.rand(3), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="floating"):
        auroc(torch.arange(3), torch.tensor([0, 1, 1]))


def _blobs(n, h, w, regions_per_image, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    for i in range(n // 2, n):
        for _ in range(regions_per_image):
            y0, x0 = int(torch.randint(0, h - 2, (1,), generator=g)), int(torch.randint(0, w - 2, (1,), generator=g))
            dy, dx = (int(v) for v in torch.randint(1, 6, (2,), generator=g))
            masks[i, y0 : y0 + dy, x0 : x0 + dx] = True
    return masks


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("regions_per_image", [1, 6])
@pytest.mark.parametrize("levels", [None, 7])
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_equals_per_threshold_reference(device, regions_per_image, levels, limit):
    masks = _blobs(8, 17, 23, regions_per_image)
    masks[-1] = False  # an anomalous image with an empty mask (MTD has such)
    noise = torch.rand(masks.shape) if levels is None else torch.randint(0, levels, masks.shape) / levels
    maps = noise + 0.4 * masks
    want = aupro_reference(maps, masks, limit)
    got = aupro(maps.to(device), masks.to(device), limit)
    assert got == pytest.approx(want, abs=1e-10)


def test_label_regions_connectivity():
    masks = torch.zeros(2, 5, 5, dtype=torch.bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: one region (8-connectivity)
    masks[0, 3, 3] = True  # a second region
    masks[1, 0, 0] = True  # same place, other image: its own region
    labels, n = label_regions(masks)
    assert n == 3
    assert labels[0, 0, 0] == labels[0, 1, 1] != labels[0, 3, 3]
    assert labels[1, 0, 0] not in (labels[0, 0, 0], labels[0, 3, 3], 0)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        label_regions(masks[0])


def test_aupro_perfect_and_hand_checked():
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[1, :2, :2] = True
    assert aupro(masks.float(), masks) == pytest.approx(1.0)
    # one region of 4 pixels; two of its pixels score above every normal pixel, the other two below
    # all: PRO = 0.5 for every FPR < 1 -> area 0.5 up to 0.3
    maps = torch.full((2, 4, 4), 0.5)
    maps[1, 0, 0] = maps[1, 0, 1] = 1.0
    maps[1, 1, 0] = maps[1, 1, 1] = 0.0
    assert aupro(maps, masks) == pytest.approx(0.5)
    assert aupro_reference(maps, masks) == pytest.approx(0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_compute_metrics(device):
    masks = _blobs(10, 16, 16, 3)
    maps = (torch.rand(masks.shape) + 0.5 * masks).to(device)
    masks = masks.to(device)
    scores = maps.amax((1, 2))
    labels = masks.flatten(1).any(1)
    res = compute_metrics(scores, labels, maps, masks)
    assert set(res) == {*METRICS, "mad"}
    px = RankedScores(maps, masks)
    assert res["pixel_auroc"] == px.auroc() and res["pixel_ap"] == px.average_precision()
    assert res["pixel_f1max"] == px.f1_max() and res["pixel_aupro"] == aupro(maps, masks)
    assert res["image_auroc"] == auroc(scores, labels)
    assert res["mad"] == pytest.approx(sum(res[k] for k in METRICS) / 7)
    image_only = compute_metrics(scores, labels)
    assert math.isnan(image_only["pixel_auroc"])
    assert image_only["mad"] == pytest.approx((res["image_auroc"] + res["image_ap"] + res["image_f1max"]) / 3)


def test_compute_metrics_undefined_and_bad_input():
    maps = torch.rand(4, 8, 8)
    normal = torch.zeros(4, 8, 8, dtype=torch.bool)
    with pytest.warns(RuntimeWarning, match="undefined"):
        res = compute_metrics(maps.amax((1, 2)), torch.zeros(4), maps, normal)  # an all-normal test set
    assert all(math.isnan(res[k]) for k in METRICS) and math.isnan(res["mad"])
    with pytest.raises(ValueError, match="both maps and masks"):
        compute_metrics(maps.amax((1, 2)), torch.tensor([0, 1, 0, 1]), maps)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        compute_metrics(maps.amax((1, 2)), torch.tensor([0, 1, 0, 1]), maps, normal[:, :4])
    with pytest.raises(ValueError, match="4 maps for 3 image scores"):
        compute_metrics(torch.rand(3), torch.tensor([0, 1, 0]), maps, normal)
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(maps, normal, fpr_limit=0.0)
