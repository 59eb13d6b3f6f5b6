"""fastad inside anomalib 2.x: the KCenterGreedy drop-in, anomalib's Patchcore through its own Engine
with fastad's coreset and kNN, and the metric classes against anomalib's."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("anomalib")
import anomalib.metrics as am  # noqa: E402
from anomalib.data import Folder, ImageBatch  # noqa: E402
from anomalib.engine import Engine  # noqa: E402
from anomalib.metrics import Evaluator  # noqa: E402
from anomalib.models import Patchcore as AnomalibPatchcore  # noqa: E402
from anomalib.models.components import KCenterGreedy as AnomalibKCenterGreedy  # noqa: E402

from conftest import write_defect_images  # noqa: E402
from fastad.integrations import anomalib as fa  # noqa: E402
from fastad.ops import greedy_coreset  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps


def _clustered(n=600, d=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(6, d, generator=g) * 4
    x = centers[torch.randint(0, 6, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)
    x[100:140] = x[0]  # duplicates
    return x


def test_sampler_is_greedy_coreset_with_anomalibs_contract():
    x = _clustered()
    ours, theirs = fa.KCenterGreedy(x, sampling_ratio=0.1), AnomalibKCenterGreedy(x, sampling_ratio=0.1)
    assert ours.coreset_size == theirs.coreset_size == 60 and ours.n_observations == 600
    idx = ours.select_coreset_idxs()
    assert isinstance(idx, list) and all(type(i) is int for i in idx)
    assert idx == greedy_coreset(x, 60).tolist()
    coreset = ours.sample_coreset()
    assert coreset.dtype == x.dtype and torch.equal(coreset, x[idx])
    assert torch.equal(coreset, fa.KCenterGreedy(x, 0.1).sample_coreset())  # a function of the seed only
    assert fa.KCenterGreedy(x, 0.1, seed=3).select_coreset_idxs() == greedy_coreset(x, 60, seed=3).tolist()
    # anomalib's contract on the embeddings anomalib stores: (N, ...) rows flattened
    assert fa.KCenterGreedy(x.reshape(600, 6, 8), 0.1).select_coreset_idxs() == idx
    with pytest.raises(ValueError, match="coreset_size must be a positive integer"):
        fa.KCenterGreedy(x, sampling_ratio=0.001)
    with pytest.raises(ValueError, match="coreset_size must be a positive integer"):
        AnomalibKCenterGreedy(x, sampling_ratio=0.001)
    with pytest.raises(ValueError, match="at most 1.0"):
        fa.KCenterGreedy(x, sampling_ratio=1.5)


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
        super().subsample_embedding(sampling_ratio)


def _fit(cls, datamodule, root, ratio, state=None):
    torch.manual_seed(0)  # the random backbone: the same weights for both models (also loaded below)
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
    # the memory bank is fastad's greedy_coreset of the embeddings anomalib stored, anomalib's size
    seen = ours.model.seen
    assert torch.equal(ours.model.memory_bank, seen[greedy_coreset(seen, int(len(seen) * 0.1))])
    assert ours.model.memory_bank.shape == theirs.model.memory_bank.shape

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
