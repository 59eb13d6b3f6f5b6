"""fastad inside anomalib 2.x: the KCenterGreedy drop-in, anomalib's Patchcore through its own Engine
with fastad's coreset and kNN, and the metric classes against anomalib's."""
from __future__ import annotations

import math

import numpy as np

import pytest
import torch

pytest.importorskip("anomalib")
import anomalib.metrics as am  # noqa: E402
from anomalib.data import Folder, ImageBatch  # noqa: E402
from anomalib.engine import Engine  # noqa: E402
from anomalib.metrics import Evaluator  # noqa: E402
from anomalib.metrics.base import AnomalibMetric  # noqa: E402
from anomalib.models import Patchcore as AnomalibPatchcore  # noqa: E402
from anomalib.models.components import KCenterGreedy as AnomalibKCenterGreedy  # noqa: E402

from conftest import write_defect_images  # noqa: E402
from fastad.integrations import anomalib as fa  # noqa: E402
from fastad import metrics  # noqa: E402
from fastad.ops import greedy_coreset  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps


def _clustered(n=600, d=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(6, d, generator=g) * 4
    x = centers[torch.randint(0, 6, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)
    x[100:140] = x[0]  # duplicates
    return x


def test_sampler_patchcore_rule_is_greedy_coreset_with_anomalibs_contract():
    x = _clustered()
    ours, theirs = fa.KCenterGreedy(x, sampling_ratio=0.1, start="patchcore"), AnomalibKCenterGreedy(x, sampling_ratio=0.1)
    assert ours.coreset_size == theirs.coreset_size == 60 and ours.n_observations == 600
    idx = ours.select_coreset_idxs()
    assert isinstance(idx, list) and all(type(i) is int for i in idx)
    assert idx == greedy_coreset(x, 60).tolist()
    coreset = ours.sample_coreset()
    assert coreset.dtype == x.dtype and torch.equal(coreset, x[idx])
    assert torch.equal(coreset, fa.KCenterGreedy(x, 0.1, start="patchcore").sample_coreset())  # a function of the seed
    assert fa.KCenterGreedy(x, 0.1, start="patchcore", seed=3).select_coreset_idxs() == greedy_coreset(x, 60, seed=3).tolist()
    # (N, ...) rows flattened
    assert fa.KCenterGreedy(x.reshape(600, 6, 8), 0.1, start="patchcore").select_coreset_idxs() == idx
    for start in ("anomalib", "patchcore"):
        with pytest.raises(ValueError, match="coreset_size must be a positive integer"):
            fa.KCenterGreedy(x, sampling_ratio=0.001, start=start)
    with pytest.raises(ValueError, match="coreset_size must be a positive integer"):
        AnomalibKCenterGreedy(x, sampling_ratio=0.001)
    with pytest.raises(ValueError, match="at most 1.0"):
        fa.KCenterGreedy(x, sampling_ratio=1.5, start="patchcore")
    with pytest.raises(ValueError, match="start must be one of"):
        fa.KCenterGreedy(x, 0.1, start="random")


def _seeded(seed):
    """anomalib's sampler draws from torch's and NumPy's global RNGs (its projection) and torch's (its start)."""
    torch.manual_seed(seed)
    np.random.seed(seed)


def _first_difference(ours: list, theirs: list) -> int:
    return next((j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))


def _rounding_decided(features: torch.Tensor, selected: list, ours: int, theirs: int) -> bool:
    """At the step after ``selected``: is anomalib's pick ``theirs`` as far (within float32 rounding of
    its distances) from the selected points as fastad's exact float64 pick ``ours``?"""
    f = features.double()
    d = torch.cdist(f, f[selected]).min(1).values
    tol = 8 * torch.finfo(torch.float32).eps * float(f.norm(dim=1).max())  # |x - c| in float32, |x|, |c| <= max
    return bool(d[ours] == d.max()) and bool(d[theirs] >= d[ours] - tol)


@pytest.mark.parametrize("shape, ratio", [((600, 48), 0.1), ((600, 48), 0.5), ((300, 4, 4), 0.2)])
def test_sampler_follows_anomalibs_rule_by_default(shape, ratio):
    x = _clustered(n=shape[0], d=math.prod(shape[1:])).reshape(shape)
    _seeded(7)
    theirs = AnomalibKCenterGreedy(x, sampling_ratio=ratio)
    want = theirs.select_coreset_idxs()
    _seeded(7)
    ours = fa.KCenterGreedy(x, sampling_ratio=ratio)
    got = ours.select_coreset_idxs()
    assert torch.equal(ours.features, theirs.features)  # anomalib's projection, drawn as anomalib draws it
    assert got[0] == want[0] and len(got) == len(want) == ours.coreset_size  # its start, kept in the coreset
    assert len(set(got)) == len(got)
    j = _first_difference(got, want)
    if j < len(got):  # only where anomalib repeats an index or its float32 distances decide the step
        assert want[j] in want[:j] or _rounding_decided(ours.features, got[:j], got[j], want[j]), (j, got[j], want[j])
    assert j >= min(len(got), 20)  # clustered data: the first picks are far apart
    _seeded(7)
    assert torch.equal(ours.sample_coreset(), x[got])  # selects again, from the same draws


def test_sampler_keeps_every_row_once_where_anomalib_repeats():
    x = _clustered(n=200, d=16)  # rows 100..139 repeat row 0
    _seeded(1)
    want = AnomalibKCenterGreedy(x, sampling_ratio=1.5).select_coreset_idxs()
    _seeded(1)
    ours = fa.KCenterGreedy(x, sampling_ratio=1.5)  # anomalib accepts a ratio above 1: so does the drop-in
    got = ours.select_coreset_idxs()
    assert ours.coreset_size == 300 and len(want) == 300 and len(set(want)) < 200  # anomalib repeats rows
    assert sorted(got) == list(range(200))  # every row, once
    j = _first_difference(got, want)
    assert j >= 150 and (want[j] in want[:j] or _rounding_decided(ours.features, got[:j], got[j], want[j]))


def _folder(root):
    """8 normal training images, 4 normal and 4 anomalous test images with masks (a bright square)."""
    write_defect_images(root / "good", root / "test_good", root / "bad", root / "masks")
    return Folder(name="tiny", root=root, normal_dir="good", abnormal_dir="bad", normal_test_dir="test_good",
                  mask_dir="masks", train_batch_size=4, eval_batch_size=4, num_workers=0, seed=0)


def _evaluator():
    """anomalib's metrics and fastad's side by side, on the same predictions."""
    test_metrics = []
    for cls in (am.AUROC, fa.AUROC, am.AUPR, fa.AUPR, am.F1Max, fa.F1Max):
        src = "anomalib_" if cls.__module__.startswith("anomalib") else "fastad_"
        test_metrics.append(cls(fields=["pred_score", "gt_label"], prefix=src + "image_"))
        test_metrics.append(cls(fields=["anomaly_map", "gt_mask"], prefix=src + "pixel_"))
    test_metrics += [am.AUPRO(fields=["anomaly_map", "gt_mask"], prefix="anomalib_"),
                     fa.AUPRO(fields=["anomaly_map", "gt_mask"], prefix="fastad_")]
    return Evaluator(test_metrics=test_metrics)


class _Recording(fa.PatchcoreModel):
    """Keeps the embeddings the coreset is selected from (test only)."""

    def subsample_embedding(self, sampling_ratio, embeddings=None):
        self.seen = torch.vstack(self.embedding_store).clone()
        self.rng = torch.get_rng_state(), np.random.get_state()  # what the sampler draws from
        super().subsample_embedding(sampling_ratio)


def _fit(cls, datamodule, root, ratio, state=None):
    _seeded(0)  # the random backbone: the same weights for both models (also loaded below); the samplers' draws
    model = cls(backbone="resnet18", layers=["layer2", "layer3"], pre_trained=False, coreset_sampling_ratio=ratio,
                evaluator=_evaluator(), visualizer=False)
    if state is not None:
        model.model.feature_extractor.load_state_dict(state)
    if cls is fa.Patchcore:
        model.model.__class__ = _Recording
    engine = Engine(default_root_dir=root, logger=False, accelerator="cpu", devices=1, enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    results = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    return model, results


@pytest.mark.slow
def test_anomalib_patchcore_through_its_engine_with_fastad_inside(tmp_path):
    datamodule = _folder(tmp_path / "data")
    theirs, their_results = _fit(AnomalibPatchcore, datamodule, tmp_path / "a", 0.1)
    state = theirs.model.feature_extractor.state_dict()
    ours, our_results = _fit(fa.Patchcore, datamodule, tmp_path / "b", 0.1, state)
    assert isinstance(ours.model, fa.PatchcoreModel) and isinstance(ours, AnomalibPatchcore)
    # the memory bank is the drop-in sampler's selection (anomalib's rule, from the RNG state anomalib's
    # sampler drew from) of the embeddings anomalib stored: anomalib's bank wherever float32 rounding
    # does not decide a step (both fits drew the same numbers, so it is anomalib's own bank here)
    seen = ours.model.seen
    torch.set_rng_state(ours.model.rng[0]), np.random.set_state(ours.model.rng[1])
    want = AnomalibKCenterGreedy(seen, sampling_ratio=0.1).select_coreset_idxs()
    torch.set_rng_state(ours.model.rng[0]), np.random.set_state(ours.model.rng[1])
    sampler = fa.KCenterGreedy(seen, sampling_ratio=0.1)
    got = sampler.select_coreset_idxs()
    assert torch.equal(ours.model.memory_bank, seen[got]) and torch.equal(theirs.model.memory_bank, seen[want])
    j = _first_difference(got, want)
    assert j == len(got) or want[j] in want[:j] or _rounding_decided(sampler.features, got[:j], got[j], want[j])
    assert ours.model.memory_bank.shape == theirs.model.memory_bank.shape
    # PatchCore's own rule on request
    patchcore = fa.Patchcore(backbone="resnet18", layers=["layer2", "layer3"], pre_trained=False, coreset_start="patchcore")
    assert patchcore.model.coreset_start == "patchcore" and ours.model.coreset_start == "anomalib"
    with pytest.raises(ValueError, match="coreset_start must be one of"):
        fa.Patchcore(backbone="resnet18", pre_trained=False, coreset_start="first")

    # fastad's metric classes inside anomalib's Evaluator, on the same predictions as anomalib's
    for results in (their_results, our_results):
        for name in ("image_AUROC", "pixel_AUROC", "image_AUPR", "pixel_AUPR", "image_F1Max", "pixel_F1Max", "AUPRO"):
            a, f = results[f"anomalib_{name}"], results[f"fastad_{name}"]
            assert math.isfinite(a) and abs(a - f) <= 1e-6, (name, a, f)
    # both coresets find the (easy) defects
    for results in (their_results, our_results):
        assert results["anomalib_image_AUROC"] == 1.0 and results["anomalib_pixel_AUROC"] > 0.95

    # where the algorithms agree (one memory bank), anomalib's forward and the fastad-backed one agree
    bank = theirs.model.memory_bank
    ours.model.memory_bank = bank.clone()
    ours.model.eval(), theirs.model.eval()
    g = torch.Generator().manual_seed(1)
    queries = bank[torch.randint(0, len(bank), (300,), generator=g)]
    queries = queries + 0.2 * bank.std() * torch.randn(queries.shape, generator=g)
    d_ours, i_ours = ours.model.nearest_neighbors(queries, 9)
    d_theirs, i_theirs = theirs.model.nearest_neighbors(queries, 9)
    one_ours, one_theirs = ours.model.nearest_neighbors(queries, 1), theirs.model.nearest_neighbors(queries, 1)
    assert [t.shape for t in one_ours] == [t.shape for t in one_theirs] == [(300,), (300,)]  # anomalib's (n,)
    assert [t.dtype for t in one_ours] == [t.dtype for t in one_theirs]
    assert torch.equal(one_ours[0], d_ours[:, 0]) and torch.equal(one_ours[1], i_ours[:, 0])
    # tolerance: the error of anomalib's own float32 computation of the same distances (vs float64)
    ten = torch.cdist(queries.double(), bank.double()).topk(10, largest=False).values  # one beyond the 9 asked
    exact = ten[:, :9]
    tol = float(4 * (d_theirs.double() - exact).abs().max() + 4 * EPS32 * exact.max())
    assert float((d_ours.double() - exact).abs().max()) <= tol
    # a neighbour's rank is decided where the distances around it are further apart than rounding;
    # the 9th also needs the gap to the 10th (which either search may otherwise return instead)
    clear = (ten[:, 1:] - ten[:, :-1]) > 2 * tol
    decided = clear[:, :9].clone()
    decided[:, 1:] &= clear[:, :8]
    assert decided[:, 0].sum() > 250 and torch.equal(i_ours[decided], i_theirs[decided])
    # whole forward on test images: maps are convex combinations (blur, bilinear) of patch distances,
    # so they differ by at most tol (+ their own rounding); the re-weighted image score w * s with
    # w = 1 - softmax weight of the distances moves by at most tol * (2 s + 1)
    images = torch.cat([b.image for b in datamodule.test_dataloader()])
    images = torch.nn.functional.interpolate(images, size=(224, 224), mode="bilinear")
    with torch.no_grad():
        out_ours, out_theirs = ours.model(images), theirs.model(images)
    amap = out_theirs.anomaly_map
    assert float((out_ours.anomaly_map - amap).abs().max()) <= tol + 8 * EPS32 * float(amap.abs().max())
    s = out_theirs.pred_score
    assert bool(((out_ours.pred_score - s).abs() <= tol * (2 * s.abs() + 1) + 8 * EPS32 * s.abs()).all())


def _random_batches(seed, n_batches=3, b=5, size=24):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        out.append(ImageBatch(
            image=torch.zeros(b, 3, size, size),
            pred_score=torch.randint(0, 4, (b,), generator=g).float() / 3,  # heavy ties
            gt_label=torch.tensor([0, 1, 0, 1, i % 2]).bool(),
            anomaly_map=torch.randint(0, 7, (b, size, size), generator=g).float() * 0.25,
            gt_mask=torch.rand(b, size, size, generator=g) > 0.85,
        ))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", ["AUROC", "AUPR", "F1Max", "AUPRO"])
def test_metric_classes_equal_anomalibs(name, seed):
    pairs = []
    for fields in (["pred_score", "gt_label"], ["anomaly_map", "gt_mask"]):
        if name == "AUPRO" and fields[0] == "pred_score":
            continue
        pairs.append((getattr(fa, name)(fields=fields), getattr(am, name)(fields=fields)))
    for batch in _random_batches(seed):
        for ours, theirs in pairs:
            ours.update(batch)
            theirs.update(batch)
    for ours, theirs in pairs:
        assert ours.name == theirs.name
        a, f = float(theirs.compute()), float(ours.compute())
        assert abs(a - f) <= 1e-6, (name, a, f)
        ours.reset()
        with pytest.raises(ValueError, match="before any update"):
            ours.compute()


def test_metric_classes_follow_anomalib_strict_rules():
    batch = _random_batches(0, 1)[0]
    batch.gt_mask = None
    loose = fa.AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False)
    loose.update(batch)
    assert loose.compute() is None and loose.name == "pixel_AUROC"
    strict = fa.AUROC(fields=["anomaly_map", "gt_mask"])
    with pytest.raises(ValueError, match="gt_mask"):
        strict.update(batch)


# ----------------------------------------------------------------------------------------------------
# the metrics' contract, call by call against anomalib's own classes


def _pair(name, fields=("pred_score", "gt_label"), **kw):
    return getattr(fa, name)(fields=list(fields), **kw), getattr(am, name)(fields=list(fields), **kw)


def _image_batches(seed, n_batches=3, b=7, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [ImageBatch(image=torch.zeros(b, 3, 8, 8),
                       pred_score=(torch.randint(0, 9, (b,), generator=g).float() / 8 * scale).to(dtype),
                       gt_label=torch.rand(b, generator=g) > 0.5 if i else torch.tensor([0, 1] * (b // 2) + [1]).bool())
            for i in range(n_batches)]


def _both(ours, theirs, batches):
    for batch in batches:
        ours.update(batch)
        theirs.update(batch)
    return ours.compute(), theirs.compute()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["AUROC", "AUPR", "F1Max"])
def test_results_are_float32_as_anomalibs(name, dtype):
    f, a = _both(*_pair(name), _image_batches(0, dtype=dtype))
    assert f.dtype == a.dtype == torch.float32 and f.shape == a.shape == ()
    assert torch.allclose(f, a) and torch.isclose(f, a)  # no "Double did not match Float"
    f, a = _both(*_pair("AUPRO", ("anomaly_map", "gt_mask")), _random_batches(1))
    assert f.dtype == a.dtype == torch.float32 and torch.allclose(f, a, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_f1max_threshold_is_anomalibs(seed, dtype):
    ours, theirs = _pair("F1Max")
    f, a = _both(ours, theirs, _image_batches(seed, dtype=dtype))
    assert torch.allclose(f, a)
    # ImageBatch stores pred_score as float32: the threshold is float32 on both
    assert ours.threshold.dtype == theirs.threshold.dtype == torch.float32
    assert torch.equal(ours.threshold, theirs.threshold)
    # called with tensors (as torchmetrics users do), the threshold keeps the predictions' dtype
    preds = torch.cat([b.pred_score for b in _image_batches(seed)]).to(dtype)
    target = torch.cat([b.gt_label for b in _image_batches(seed)])
    ours, theirs = fa.F1Max(fields=["pred_score", "gt_label"]), am.F1Max(fields=["pred_score", "gt_label"])
    for metric in (ours, theirs):  # the tensor update under AnomalibMetric's batch update
        super(AnomalibMetric, metric).update(preds, target)
    f, a = ours.compute(), theirs.compute()
    assert f.dtype == a.dtype == torch.float32 and torch.allclose(f, a)
    assert ours.threshold.dtype == theirs.threshold.dtype == dtype and torch.equal(ours.threshold, theirs.threshold)
    # anomalib's docstring example
    ours, theirs = _pair("F1Max")
    batch = ImageBatch(image=torch.zeros(4, 3, 8, 8), pred_score=torch.tensor([0.1, 0.4, 0.35, 0.8]),
                       gt_label=torch.tensor([0, 0, 1, 1]))
    f, a = _both(ours, theirs, [batch])
    assert float(f) == pytest.approx(0.8) and torch.allclose(f, a) and float(ours.threshold) == float(theirs.threshold) == pytest.approx(0.35)


@pytest.mark.parametrize("name", ["AUROC", "AUPR", "F1Max", "AUPRO"])
def test_bool_and_integer_predictions_as_anomalib_takes_them(name):
    fields = ("anomaly_map", "gt_mask") if name == "AUPRO" else ("pred_label", "gt_label")
    g = torch.Generator().manual_seed(3)
    for kind in (torch.bool, torch.long):
        ours, theirs = _pair(name, fields)
        if name == "AUPRO":
            batch = ImageBatch(image=torch.zeros(3, 3, 16, 16), anomaly_map=(torch.rand(3, 16, 16, generator=g) > 0.6).to(kind),
                               gt_mask=torch.rand(3, 16, 16, generator=g) > 0.8)
        else:
            batch = ImageBatch(image=torch.zeros(6, 3, 8, 8), pred_label=torch.tensor([1, 0, 1, 1, 0, 0]).to(kind),
                               gt_label=torch.tensor([1, 0, 0, 1, 1, 0]).bool())
        try:
            theirs.update(batch)
            want = theirs.compute()
        except Exception as exc:  # anomalib refuses: so does the drop-in, with the same exception type
            with pytest.raises(type(exc)):
                ours.update(batch)
            continue
        ours.update(batch)
        got = ours.compute()
        assert got.dtype == want.dtype and torch.allclose(got, want, rtol=1e-5), (kind, got, want)
        if name == "F1Max":
            assert ours.threshold.dtype == theirs.threshold.dtype and float(ours.threshold) == float(theirs.threshold)


@pytest.mark.parametrize("name", ["AUROC", "AUPR"])
def test_logits_get_anomalibs_per_batch_sigmoid(name):
    # a batch outside [0, 1] goes through a sigmoid (torchmetrics' rule); scores above ~17 saturate and tie
    for scale in (1.0, 6.0, 40.0):
        f, a = _both(*_pair(name), _image_batches(4, scale=scale) + _image_batches(5))
        assert torch.allclose(f, a), (scale, f, a)
    # F1Max takes raw scores (anomalib's F1Max has no sigmoid): its threshold is a raw score
    ours, theirs = _pair("F1Max")
    batch = ImageBatch(image=torch.zeros(5, 3, 8, 8), pred_score=torch.tensor([2.0, 5.0, 30.0, 40.0, 25.0]),
                       gt_label=torch.tensor([0, 0, 1, 1, 0]))
    f, a = _both(ours, theirs, [batch])
    assert float(f) == float(a) == 1.0 and float(ours.threshold) == float(theirs.threshold) == 30.0


def _binned_batches(seed, n=(7, 9, 5)):
    g = torch.Generator().manual_seed(seed)
    grid = torch.linspace(0, 1, 11)  # predictions on the thresholds themselves, and between them
    out = []
    for b in n:
        p = torch.where(torch.rand(b, generator=g) > 0.5, grid[torch.randint(0, 11, (b,), generator=g)], torch.rand(b, generator=g))
        out.append(ImageBatch(image=torch.zeros(b, 3, 4, 4), pred_score=p, gt_label=torch.rand(b, generator=g) > 0.4))
    return out


@pytest.mark.parametrize("thresholds", [2, 11, 100, [0.0, 0.3, 0.5, 0.9, 1.0], [0.9, 0.1, 0.5], torch.linspace(0, 1, 7)])
@pytest.mark.parametrize("name", ["AUROC", "AUPR"])
def test_binned_mode_is_torchmetrics(name, thresholds):
    ours, theirs = _pair(name, thresholds=thresholds)
    f, a = _both(ours, theirs, _binned_batches(0))
    assert torch.equal(ours.confmat, theirs.confmat)  # the same confusion matrices at every threshold
    assert torch.equal(f, a) and f.dtype == torch.float32
    assert list(ours.state_dict()) == list(theirs.state_dict())


def test_binned_confusion_matrix_past_torchmetrics_vectorised_size():
    # above 50k predictions torchmetrics loops over the thresholds; the counts are the same
    g = torch.Generator().manual_seed(2)
    batch = ImageBatch(image=torch.zeros(1, 3, 4, 4), anomaly_map=torch.rand(3, 200, 200, generator=g).round(decimals=2),
                       gt_mask=torch.rand(3, 200, 200, generator=g) > 0.7)
    ours, theirs = _pair("AUROC", ("anomaly_map", "gt_mask"), thresholds=64)
    f, a = _both(ours, theirs, [batch])
    assert torch.equal(ours.confmat, theirs.confmat) and torch.equal(f, a)


@pytest.mark.parametrize("name", ["AUROC", "AUPR"])
def test_ignore_index_validate_args_and_argument_errors(name):
    # ImageBatch stores gt_label as bool, so ignore_index matters where torchmetrics users call
    # update(preds, target) with tensors (AnomalibMetric's batch update calls that one)
    g = torch.Generator().manual_seed(6)
    preds, target = torch.rand(40, generator=g), torch.randint(0, 2, (40,), generator=g)
    target[::7] = -1

    def tensors(metric, p=preds, t=target):
        super(AnomalibMetric, metric).update(p, t)
        return metric.compute()

    for kw in ({"ignore_index": -1}, {"ignore_index": -1, "thresholds": 9}, {"ignore_index": -1, "validate_args": False}):
        ours, theirs = _pair(name, **kw)
        f, a = tensors(ours), tensors(theirs)
        assert f.dtype == a.dtype == torch.float32 and torch.allclose(f, a), kw
        keep = target != -1
        assert torch.allclose(f, tensors(_pair(name, **{k: v for k, v in kw.items() if k != "ignore_index"})[0],
                                         preds[keep], target[keep]))  # the ignored entries dropped
    # anomalib's (torchmetrics') argument and input checks, with the same exception types
    for bad in ({"thresholds": 1}, {"thresholds": [0.5, 2.0]}, {"thresholds": torch.ones(2, 2)}, {"ignore_index": 0.5}):
        with pytest.raises(ValueError):
            getattr(am, name)(fields=["pred_score", "gt_label"], **bad)
        with pytest.raises(ValueError):
            getattr(fa, name)(fields=["pred_score", "gt_label"], **bad)
    for ours_or_theirs in _pair(name):
        with pytest.raises(RuntimeError, match="Detected the following values"):  # -1 without ignore_index
            tensors(ours_or_theirs)
        with pytest.raises(ValueError, match="floating"):
            tensors(ours_or_theirs, torch.tensor([1, 0]), torch.tensor([1, 0]))


def _figure_content(fig):
    ax = fig.axes[0]
    return {"title": ax.get_title(), "labels": (ax.get_xlabel(), ax.get_ylabel()), "limits": (ax.get_xlim(), ax.get_ylim()),
            "legend": [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else None,
            "lines": [torch.as_tensor(line.get_xydata(), dtype=torch.float64) for line in ax.lines],
            "styles": [(line.get_color(), line.get_linestyle(), line.get_linewidth()) for line in ax.lines]}


@pytest.mark.parametrize("name, fields, thresholds", [("AUROC", ("pred_score", "gt_label"), None),
                                                     ("AUROC", ("anomaly_map", "gt_mask"), None),
                                                     ("AUROC", ("pred_score", "gt_label"), 20),
                                                     ("AUPR", ("pred_score", "gt_label"), None),
                                                     ("AUPR", ("anomaly_map", "gt_mask"), None),
                                                     ("AUPRO", ("anomaly_map", "gt_mask"), None)])
def test_generate_figure_draws_anomalibs_figure(name, fields, thresholds):
    import matplotlib.pyplot as plt

    kw = {} if thresholds is None else {"thresholds": thresholds}
    ours, theirs = _pair(name, fields, **kw)
    _both(ours, theirs, _random_batches(2))
    (fig_o, title_o), (fig_t, title_t) = ours.generate_figure(), theirs.generate_figure()
    got, want = _figure_content(fig_o), _figure_content(fig_t)
    assert title_o == title_t and {k: v for k, v in got.items() if k != "lines"} == {k: v for k, v in want.items() if k != "lines"}
    assert len(got["lines"]) == len(want["lines"])
    for a, b in zip(got["lines"], want["lines"]):  # the same points, within anomalib's float32 cumulative sums
        assert a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-5)
    plt.close(fig_o), plt.close(fig_t)
    if name == "AUPR":
        with pytest.raises(ValueError, match="thresholds=None"):
            fa.AUPR(fields=list(fields), thresholds=5).generate_figure()


def test_aupro_keeps_fpr_limit_in_its_state_dict():
    ours, theirs = _pair("AUPRO", ("anomaly_map", "gt_mask"), fpr_limit=0.2)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["fpr_limit"]
    assert torch.equal(ours.state_dict()["fpr_limit"], theirs.state_dict()["fpr_limit"])
    # a checkpoint of a custom evaluator reloads the same way: the limit comes from the state
    reloaded_ours, reloaded_theirs = _pair("AUPRO", ("anomaly_map", "gt_mask"))
    reloaded_ours.load_state_dict(theirs.state_dict())
    reloaded_theirs.load_state_dict(ours.state_dict())
    f, a = _both(reloaded_ours, reloaded_theirs, _random_batches(0))
    assert float(reloaded_ours.fpr_limit) == pytest.approx(0.2) and torch.allclose(f, a, rtol=1e-5)
    f2, _ = _both(*_pair("AUPRO", ("anomaly_map", "gt_mask"), fpr_limit=0.2), _random_batches(0))
    assert torch.equal(f, f2)


def test_fastads_own_metric_classes_follow_the_input():
    g = torch.Generator().manual_seed(8)
    scores, labels = torch.rand(50, generator=g), torch.rand(50, generator=g) > 0.5
    for dtype, want in ((torch.float16, torch.float32), (torch.float32, torch.float32), (torch.float64, torch.float64)):
        for cls in (metrics.AUROC, metrics.AveragePrecision, metrics.F1Max):
            m = cls()
            m.update(scores.to(dtype), labels)
            assert m.compute().dtype == want, (cls, dtype)
        m = metrics.AUPRO()
        m.update(torch.rand(2, 8, 8, generator=g).to(dtype), torch.rand(2, 8, 8, generator=g) > 0.7)
        assert m.compute().dtype == want
    f1 = metrics.F1Max()
    f1.update(scores, labels)
    value = f1.compute()
    best = max(((scores >= t) & labels).sum() * 2 / ((scores >= t).sum() + labels.sum()) for t in scores)
    assert float(value) == pytest.approx(float(best)) and f1.threshold.dtype == torch.float32
    assert float(value) == pytest.approx(float(((scores >= f1.threshold) & labels).sum() * 2
                                               / ((scores >= f1.threshold).sum() + labels.sum())))
    # thresholded (bool) predictions are scores of 0 and 1
    m, ref = metrics.F1Max(), metrics.F1Max()
    m.update(scores > 0.5, labels)
    ref.update((scores > 0.5).float(), labels)
    assert torch.equal(m.compute(), ref.compute()) and torch.equal(m.threshold, ref.threshold)
    with pytest.raises(TypeError, match="floating"):
        metrics.AUROC().update(torch.tensor([1, 0]), torch.tensor([1, 0]))
