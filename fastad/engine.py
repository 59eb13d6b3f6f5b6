"""Fit a model on normal images, score a test set, compute the metrics, time each stage."""
from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader, Dataset

from .metrics import compute_metrics
from .models import create_model


def _loader(ds: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)


@torch.no_grad()
def predict(model, ds: Dataset, batch_size: int = 16, num_workers: int = 0):
    """Scores (N,), maps (N, H, W), labels (N,) and masks (N, H, W) of a dataset, on the CPU."""
    scores, maps, labels, masks = [], [], [], []
    for batch in _loader(ds, batch_size, num_workers):
        s, m = model(batch["image"])
        scores.append(s.cpu())
        maps.append(m.cpu())
        labels.append(torch.as_tensor(batch["label"]))
        masks.append(batch["mask"])
    return torch.cat(scores), torch.cat(maps), torch.cat(labels), torch.cat(masks)


def evaluate(
    model_name: str,
    train: Dataset,
    test: Dataset,
    *,
    device: str = "cpu",
    batch_size: int = 16,
    num_workers: int = 0,
    **model_kwargs,
) -> dict:
    """Fit ``model_name`` on ``train``, evaluate on ``test``.

    Returns a dict with the seven metrics of :func:`fastad.metrics.compute_metrics` and ``mad`` (NaN
    where a level has a single class, e.g. no anomalous pixel), ``fit_s``, ``predict_s``,
    ``images_per_s``, ``metrics_s`` and the model.
    """
    model = create_model(model_name, **model_kwargs).to(device)
    t0 = time.perf_counter()
    model.fit(_loader(train, batch_size, num_workers))
    t1 = time.perf_counter()
    scores, maps, labels, masks = predict(model, test, batch_size, num_workers)
    t2 = time.perf_counter()
    metrics = compute_metrics(scores, labels, maps, masks)
    t3 = time.perf_counter()
    return {
        "model": model_name,
        **metrics,
        "n_train": len(train),
        "n_test": len(test),
        "fit_s": t1 - t0,
        "predict_s": t2 - t1,
        "images_per_s": len(test) / max(t2 - t1, 1e-9),
        "metrics_s": t3 - t2,
        "model_obj": model,
    }
