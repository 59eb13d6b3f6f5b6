"""Fit a model on normal images, score a test set, compute the metrics, time each stage."""
from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .metrics import compute_metrics
from .models import create_model


def _loader(ds: Dataset, batch_size: int, num_workers: int, desc: str):
    """Batches of ``ds`` in order, with a progress bar on a terminal (none in logs)."""
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    return tqdm(loader, desc=desc, unit="batch", leave=False, disable=None)


@torch.no_grad()
def predict(model, ds: Dataset, batch_size: int = 16, num_workers: int = 0):
    """Scores (N,), maps (N, H, W), labels (N,) and masks (N, H, W) of a dataset, on the CPU."""
    scores, maps, labels, masks = [], [], [], []
    for batch in _loader(ds, batch_size, num_workers, "predict"):
        s, m = model(batch["image"])
        mask = batch["mask"]
        if mask.shape != m.shape:  # the contract: maps at the input size
            raise ValueError(f"{type(model).__name__} returned maps of shape {tuple(m.shape)} for masks of shape "
                             f"{tuple(mask.shape)}; a fastad model returns maps at the input image size")
        scores.append(s.cpu())
        maps.append(m.cpu())
        labels.append(torch.as_tensor(batch["label"]))
        masks.append(mask)
    return torch.cat(scores), torch.cat(maps), torch.cat(labels), torch.cat(masks)


def fit_model(model, train: Dataset, *, device: str = "cpu", num_workers: int = 0, **model_kwargs):
    """Fit ``model`` (a model, or a registered name created with ``model_kwargs``) on ``train`` on
    ``device``. Returns (model, seconds). Every model takes the Dataset and batches it its own way."""
    if isinstance(model, str):
        model = create_model(model, **model_kwargs)
    model = model.to(device)
    t0 = time.perf_counter()
    model.fit(train, num_workers=num_workers)
    return model, time.perf_counter() - t0


def score(model, test_set: Dataset, *, batch_size: int = 16, num_workers: int = 0) -> tuple[dict, tuple]:
    """Score ``test_set`` and compute :func:`fastad.metrics.compute_metrics` (NaN where a level has a
    single class, e.g. no anomalous pixel).

    Returns:
        (results, predictions): the metrics, ``mad``, ``n_test``, ``predict_s``, ``images_per_s``
        and ``metrics_s``; and :func:`predict`'s (scores, maps, labels, masks).
    """
    t0 = time.perf_counter()
    predictions = predict(model, test_set, batch_size, num_workers)
    t1 = time.perf_counter()
    scores, maps, labels, masks = predictions
    metrics = compute_metrics(scores, labels, maps, masks)
    t2 = time.perf_counter()
    results = {
        **metrics,
        "n_test": len(test_set),
        "predict_s": t1 - t0,
        "images_per_s": len(test_set) / max(t1 - t0, 1e-9),
        "metrics_s": t2 - t1,
    }
    return results, predictions


def evaluate(
    model_name: str,
    train: Dataset,
    test_set: Dataset,
    *,
    device: str = "cpu",
    batch_size: int = 16,
    num_workers: int = 0,
    **model_kwargs,
) -> dict:
    """Fit ``model_name`` on ``train``, evaluate on ``test_set``: the dict of :func:`score` plus
    ``model``, ``n_train``, ``fit_s`` and ``model_obj`` (the fitted model)."""
    model, fit_s = fit_model(model_name, train, device=device, num_workers=num_workers, **model_kwargs)
    res, _ = score(model, test_set, batch_size=batch_size, num_workers=num_workers)
    return {"model": model_name, **res, "n_train": len(train), "fit_s": fit_s, "model_obj": model}
