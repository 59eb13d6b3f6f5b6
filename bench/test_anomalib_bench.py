"""anomalib's own PatchCore, fit + test through anomalib's Engine on MVTec AD bottle, with anomalib's
sampler and kNN (the installed anomalib) vs fastad's inside (fastad.integrations.anomalib), in one run:
same backbone and weights (fastad's offline EfficientNet-Lite0, stages 2 and 3), same pre-processing,
same coreset ratio. Reports fit, coreset and test times, their ratios, and the AUROCs side by side.

    python -m pytest bench/test_anomalib_bench.py --benchmark-only -s
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("anomalib")
from anomalib.data import MVTecAD  # noqa: E402
from anomalib.engine import Engine  # noqa: E402
import anomalib.metrics as am  # noqa: E402
from anomalib.metrics import Evaluator  # noqa: E402
from anomalib.models import Patchcore as AnomalibPatchcore  # noqa: E402

from fastad.integrations import anomalib as fa  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec"
RATIO = float(os.environ.get("FASTAD_BENCH_CORESET", "0.01"))


def _run(cls, metrics, root):
    model = cls(backbone="tf_efficientnet_lite0", layers=[2, 3], pre_trained=False, coreset_sampling_ratio=RATIO,
                evaluator=Evaluator(test_metrics=metrics), visualizer=False)
    fa.load_offline_lite0(model)
    timed = {}
    subsample = model.model.subsample_embedding

    def coreset(ratio):  # times the coreset step inside anomalib's fit
        t = time.perf_counter()
        subsample(ratio)
        timed["coreset_s"] = time.perf_counter() - t

    model.model.subsample_embedding = coreset
    datamodule = MVTecAD(root=DATA, category="bottle", train_batch_size=32, eval_batch_size=32, num_workers=0)
    engine = Engine(default_root_dir=root, logger=False, accelerator="cpu", devices=1, enable_progress_bar=False)
    t = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    timed["fit_s"] = time.perf_counter() - t
    t = time.perf_counter()
    results = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    timed["test_s"] = time.perf_counter() - t
    timed["bank"] = len(model.model.memory_bank)
    return timed, results


def _metrics(module):
    """Image AUROC, pixel AUROC and AUPRO of ``module`` (anomalib.metrics or fastad's drop-ins)."""
    return [module.AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            module.AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_"),
            module.AUPRO(fields=["anomaly_map", "gt_mask"])]


@pytest.mark.skipif(not (DATA / "bottle").is_dir(), reason="needs ../shared/data/mvtec/bottle")
def test_anomalib_patchcore_bottle(benchmark, tmp_path):
    theirs, their_results = _run(AnomalibPatchcore, _metrics(am), tmp_path / "a")
    ours_holder = {}

    def run():
        ours_holder["out"] = _run(fa.Patchcore, _metrics(fa), tmp_path / "b")

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    ours, our_results = ours_holder["out"]
    rows = {
        "anomalib 2.7 (its sampler, kNN, metrics)": (theirs, their_results),
        "anomalib 2.7 + fastad inside": (ours, our_results),
    }
    print(f"\nMVTec bottle, coreset {RATIO:.0%}, Lite0 stages 2+3, {torch.get_num_threads()} threads")
    print("| run | bank | fit s | coreset s | test s | image AUROC | pixel AUROC | AUPRO |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (t, r) in rows.items():
        print(f"| {name} | {t['bank']} | {t['fit_s']:.1f} | {t['coreset_s']:.1f} | {t['test_s']:.1f} | "
              f"{r['image_AUROC']:.4f} | {r['pixel_AUROC']:.4f} | {r['AUPRO']:.4f} |")
    ratios = {k: theirs[k] / ours[k] for k in ("fit_s", "coreset_s", "test_s")}
    print("ratios anomalib / fastad-inside:", {k: round(v, 2) for k, v in ratios.items()})
    benchmark.extra_info.update(ratio=RATIO, threads=torch.get_num_threads(), anomalib=theirs, fastad_inside=ours,
                                speedups=ratios, anomalib_metrics=their_results, fastad_metrics=our_results)
    assert theirs["bank"] == ours["bank"]


@pytest.mark.skipif(not (DATA / "bottle").is_dir(), reason="needs ../shared/data/mvtec/bottle")
def test_inference_images_per_second(benchmark, tmp_path):
    """Test time per image, 1% coreset, same Lite0 weights, one run: anomalib's own Patchcore inference
    (its 152-d stage-2+3 embedding, its kNN; the bank selected with fastad's sampler so the fit is
    short; `Engine.test`: predict + post-processing + its metrics) vs fastad's PatchCore
    (1024-d embedding of the same stages, FeatureBank kNN, sigma-4 map; `engine.score`: predict +
    the seven metrics). Both read and decode the same 83 PNGs."""
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel as AnomalibPatchcoreModel

    from fastad.data import mvtec
    from fastad.engine import fit_model, score

    model = fa.Patchcore(backbone="tf_efficientnet_lite0", layers=[2, 3], pre_trained=False,
                         coreset_sampling_ratio=RATIO, visualizer=False)
    fa.load_offline_lite0(model)
    datamodule = MVTecAD(root=DATA, category="bottle", train_batch_size=32, eval_batch_size=32, num_workers=0)
    engine = Engine(default_root_dir=tmp_path, logger=False, accelerator="cpu", devices=1, enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)
    model.model.__class__ = AnomalibPatchcoreModel  # anomalib's own inference on that bank
    t = time.perf_counter()
    engine.test(model=model, datamodule=datamodule, verbose=False)
    anomalib_s = time.perf_counter() - t
    n_test = len(datamodule.test_data)

    fastad_model, _ = fit_model("patchcore", mvtec(DATA, "bottle", "train"), coreset_ratio=RATIO)
    test_set = mvtec(DATA, "bottle", "test")
    out = {}
    benchmark.pedantic(lambda: out.update(r=score(fastad_model, test_set)[0]), rounds=1, iterations=1)
    r = out["r"]
    fastad_s = r["predict_s"] + r["metrics_s"]
    print(f"\nbottle test, {n_test} images, coreset {RATIO:.0%}, {torch.get_num_threads()} threads: anomalib 2.7 "
          f"{n_test / anomalib_s:.1f} images/s (bank {len(model.model.memory_bank)} x {model.model.memory_bank.shape[1]}), "
          f"fastad {r['n_test'] / fastad_s:.1f} images/s (predict {r['images_per_s']:.1f} images/s, bank "
          f"{len(fastad_model.bank.memory_bank)} x {fastad_model.bank.memory_bank.shape[1]}); "
          f"ratio {anomalib_s / n_test / (fastad_s / r['n_test']):.2f}x")
    benchmark.extra_info.update(anomalib_images_per_s=n_test / anomalib_s, fastad_images_per_s=r["n_test"] / fastad_s,
                                fastad_predict_images_per_s=r["images_per_s"])
    assert n_test == r["n_test"]
