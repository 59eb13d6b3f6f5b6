"""Fit a model on normal images, score a test set, compute the metrics, time each stage."""
from __future__ import annotations

import contextlib
import math
import time

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import distributed
from .data.cache import batch_source
from .faults import memory_stage
from .metrics import compute_metrics
from .models import create_model


def _batches(model, ds: Dataset, batch_size: int, num_workers: int):
    """(images on the model's device, batch) of ``ds`` in order, with a progress bar on a terminal
    (none in logs), without a host read: cached pixels are gathered as training gathers them (on
    CUDA resident on the device when they fit; normalised there; finite by construction), other
    sets are collated by a DataLoader (pinned on CUDA), checked on the host copy
    (:meth:`~fastad.models.base.AnomalyModel.validate_images`) and sent with a non-blocking copy."""
    device = model.device
    source = batch_source(ds, device)
    if source is not None:
        starts = range(0, len(ds), batch_size)
        for start in tqdm(starts, desc="predict", unit="batch", leave=False, disable=None):
            batch = source(list(range(start, min(start + batch_size, len(ds)))))
            yield batch["image"], batch
        return
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    for batch in tqdm(loader, desc="predict", unit="batch", leave=False, disable=None):
        model.validate_images(batch["image"])
        yield batch["image"].to(device, non_blocking=device.type == "cuda"), batch


@torch.no_grad()
def predict(model, ds: Dataset, batch_size: int = 16, num_workers: int = 0, group=None):
    """Scores (N,), maps (N, H, W), labels (N,), masks (N, H, W) and has_mask (N,) bool (False: an
    anomalous image without pixel ground truth) of a dataset, on the CPU.

    With ``group`` (torch.distributed) each rank scores its contiguous share of ``ds`` in whole
    batches (no image twice, none padded; the same batches as one process) and every rank gets all
    predictions in dataset order."""
    if not distributed.active(group):
        return _predict(model, ds, batch_size, num_workers)
    from .models.base import shard

    part = shard(ds, group, batch_size)  # whole batches: each image scored in the batch one process uses
    placeholders = 0
    if getattr(model, "collective", False):  # a collective forward (PatchCore, sharded bank): as many calls everywhere
        calls = math.ceil(len(part) / batch_size)
        most = torch.tensor([calls], device=distributed.collective_device(group))
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX, group=group)
        placeholders = int(most) - calls
    local = _predict(model, part, batch_size, num_workers, placeholders, ds)
    device = distributed.collective_device(group)
    return tuple(distributed.gather_rows(t.to(device), group).cpu() for t in local)


def _predict(model, ds: Dataset, batch_size: int, num_workers: int, placeholders: int = 0, whole: Dataset | None = None):
    """predict() of this process's images; then ``placeholders`` forward calls on ``whole``'s first
    image whose results are dropped (a rank whose share of a collective forward has run out), and
    empty tensors for an empty share of ``whole``."""
    scores, maps, labels, masks, has_mask = [], [], [], [], []
    cuda = model.device.type == "cuda"  # other devices copy back blocking: no stream to wait on below
    for images, batch in _batches(model, ds, batch_size, num_workers):
        # FeatureNorm's references are checked by its forward, on the device
        extra = {"references": batch["references"]} if "references" in batch else {}
        with memory_stage("inference", "lower --batch-size"), (contextlib.nullcontext() if extra else model.checked_inputs()):
            s, m = model(images, **extra)
        mask = batch["mask"]
        if mask.shape != m.shape:  # the contract: maps at the input size
            raise ValueError(f"{type(model).__name__} returned maps of shape {tuple(m.shape)} for masks of shape "
                             f"{tuple(mask.shape)}; a fastad model returns maps at the input image size")
        # non-blocking device-to-host copies (into pinned memory): the next batch is read and sent
        # while the device still works on this one; they have all landed after the synchronize below
        scores.append(s.to("cpu", non_blocking=cuda))
        maps.append(m.to("cpu", non_blocking=cuda))
        labels.append(torch.as_tensor(batch["label"]))
        masks.append(mask.to("cpu", non_blocking=cuda))
        has_mask.append(torch.as_tensor(batch.get("has_mask", torch.ones(len(mask), dtype=torch.bool)), dtype=torch.bool))
    if cuda:
        torch.cuda.synchronize(model.device)
    for _ in range(placeholders):
        with memory_stage("inference", "lower --batch-size"):
            model(whole[0]["image"].unsqueeze(0))
    if not scores and whole is not None:
        return _empty_predictions(whole)
    return torch.cat(scores), torch.cat(maps), torch.cat(labels), torch.cat(masks), torch.cat(has_mask)


def _empty_predictions(ds):
    """predict()'s five tensors for no image (an empty share of a distributed run), shaped like ``ds``'s."""
    mask = torch.as_tensor(ds[0]["mask"])
    empty = torch.zeros(0, *mask.shape)
    return torch.zeros(0), empty, torch.zeros(0, dtype=torch.long), empty.clone(), torch.zeros(0, dtype=torch.bool)


def fit_model(model, train: Dataset, *, device: str = "cpu", num_workers: int = 0, fit_options: dict | None = None,
              **model_kwargs):
    """Fit ``model`` (a model, or a registered name created with ``model_kwargs``) on ``train`` on
    ``device``; ``fit_options`` go to its ``fit`` (e.g. ``checkpoint``, ``on_nan`` for trained
    models). Returns (model, seconds). Every model takes the Dataset and batches it its own way."""
    if isinstance(model, str):
        model = create_model(model, **model_kwargs)
    model = model.to(device)
    t0 = time.perf_counter()
    model.fit(train, num_workers=num_workers, **(fit_options or {}))
    return model, time.perf_counter() - t0


def at_eval_size(maps: torch.Tensor, masks: torch.Tensor, size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, W) maps and masks brought to the protocol's ``size`` x ``size`` for the pixel metrics:
    maps bilinear (align_corners=False), masks nearest (Dinomaly's evaluation); unchanged for None."""
    if size is None or tuple(maps.shape[-2:]) == (size, size) or maps.numel() == 0:
        return maps, masks
    maps = torch.nn.functional.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    masks = torch.nn.functional.interpolate(masks[:, None].float(), size=(size, size), mode="nearest")[:, 0]
    return maps, masks


def score(model, test_set: Dataset, *, batch_size: int = 16, num_workers: int = 0, group=None,
          eval_size: int | None = None) -> tuple[dict, tuple]:
    """Score ``test_set`` and compute :func:`fastad.metrics.compute_metrics` (NaN where a level has a
    single class, e.g. no anomalous pixel). With ``group`` the images are scored on all ranks
    (:func:`predict`) and the metrics computed on rank 0; the other ranks return ``(None, predictions)``.
    ``eval_size``: the protocol's size for the pixel metrics (:func:`at_eval_size`; None: the input size).

    Returns:
        (results, predictions): the metrics, ``mad``, ``mad_of`` (which metrics ``mad`` averages),
        ``pixel_images`` (the images the pixel metrics use), ``pixel_note`` (why pixel metrics are
        missing or partial, else None), ``n_test``, ``predict_s``, ``images_per_s`` and ``metrics_s``;
        and :func:`predict`'s (scores, maps, labels, masks, has_mask).
    """
    test_set = model.prepare_test_set(test_set)
    t0 = time.perf_counter()
    predictions = predict(model, test_set, batch_size, num_workers, group=group)
    t1 = time.perf_counter()
    if distributed.rank(group) != 0:
        return None, predictions
    scores, maps, labels, masks, has_mask = predictions
    unmasked = int((~has_mask).sum())
    note = None
    if unmasked and unmasked == int((labels > 0).sum()):  # image-level data: no pixel metric to compute
        note = "no anomalous test image has a pixel mask (image-level labels only): pixel metrics n/a"
        metrics = compute_metrics(scores, labels)
    else:
        metrics = compute_metrics(scores, labels, *at_eval_size(maps, masks, eval_size), has_mask=has_mask)
    t2 = time.perf_counter()
    if unmasked and note is None:
        note = f"pixel metrics over the {int(has_mask.sum())} of {len(has_mask)} test images with pixel ground truth " \
               f"({unmasked} anomalous images have no mask)"
    pixel_defined = any(k.startswith("pixel") and not math.isnan(v) for k, v in metrics.items())
    results = {
        **metrics,
        "mad_of": "image and pixel metrics" if pixel_defined else "image metrics",
        "pixel_images": int(has_mask.sum()) if pixel_defined else 0,
        "pixel_note": note,
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
