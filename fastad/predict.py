"""``fastad predict CHECKPOINT INPUT... --out DIR``: score new images with a saved model.

Writes under ``--out``: ``predictions.csv`` (path, raw score, normalised score, label at the threshold,
map files), ``maps/`` (16-bit PNGs normalised as the scores, and/or raw float32 ``.npy``) and
``overlays/``. The threshold and the normalisation are those ``fastad run`` stored with the model
(:mod:`fastad.metrics.calibration`, anomalib's rule: the image F1-optimal threshold maps to 0.5);
``--threshold`` overrides the threshold. A model saved without them still gives raw scores.
"""
from __future__ import annotations

import csv
import glob
import os
import sys
from pathlib import Path

import numpy as np
import torch

from .data.datasets import IMAGE_SUFFIXES, AnomalyDataset, Sample
from .faults import UsageError

__all__ = ["collect_inputs", "predict_command", "predict_images"]

LIST_SUFFIXES = (".txt", ".csv", ".lst")
MAX_OVERLAYS = 100


def _listed(path: Path) -> list[str]:
    """The paths a list file names: one per line, or a CSV's ``path`` / ``image`` / first column;
    relative paths are read from the list file's folder."""
    with open(path, newline="") as f:
        lines = [line for line in f.read().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if path.suffix.lower() == ".csv" and lines:
        rows = list(csv.reader(lines))
        head = [c.strip().lower() for c in rows[0]]
        col = next((head.index(k) for k in ("path", "image", "image_path", "file") if k in head), None)
        rows = rows[1:] if col is not None else rows
        names = [r[col or 0].strip() for r in rows if r]
    else:
        names = [line.strip() for line in lines]
    return [n if os.path.isabs(n) else str(path.parent / n) for n in names]


def collect_inputs(inputs: list[str]) -> tuple[list[str], list[str]]:
    """(image paths in the order given, each once; what could not be used: one message each).
    An input is an image file, a folder (its images, recursively, sorted), a glob pattern or a list
    file (``.txt`` / ``.lst``: one path per line; ``.csv``: a ``path`` column, else the first)."""
    found, bad = [], []

    def add(path: str) -> None:
        if path not in found:
            found.append(path)

    for item in inputs:
        p = Path(item)
        if p.is_dir():
            images = sorted(str(q) for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
            if not images:
                bad.append(f"{item}: a folder without images ({', '.join(IMAGE_SUFFIXES)})")
            for q in images:
                add(q)
        elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
            listed = _listed(p)
            if not listed:
                bad.append(f"{item}: an empty list file")
            for q in listed:
                add(q)
        elif p.is_file() or not glob.has_magic(item):
            add(item)  # missing or unreadable files are found by the dataset's check
        else:
            matches = sorted(q for q in glob.glob(item, recursive=True) if Path(q).suffix.lower() in IMAGE_SUFFIXES)
            if not matches:
                bad.append(f"{item}: no image matches this pattern")
            for q in matches:
                add(q)
    return found, bad


def _names(paths: list[str]) -> list[str]:
    """A file name stem per input, unique (a repeated stem gets its position: NAME-2, NAME-3)."""
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        stem = Path(p).stem
        seen[stem] = seen.get(stem, 0) + 1
        out.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return out


@torch.no_grad()
def predict_images(model, paths: list[str], *, protocol: str = "fastad", batch_size: int = 16,
                   num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor, AnomalyDataset]:
    """Image scores (N,) float and anomaly maps (N, H, W) float on the CPU of the images at ``paths``
    (readable images; :func:`collect_inputs`), preprocessed by ``model.transform(protocol)``, in
    batches as ``fastad run`` scores a test set; and the dataset they were read from."""
    from .engine import predict

    model.eval()
    ds = AnomalyDataset([Sample(p, 0, None, "predict") for p in paths], model.transform(protocol))
    scores, maps, *_ = predict(model, model.prepare_test_set(ds), batch_size, num_workers)
    return scores, maps, ds


def _write_png16(path: str, values: torch.Tensor) -> None:
    from PIL import Image

    pixels = (values.double().clamp(0, 1) * 65535).round().to(torch.int32).numpy().astype(np.uint16)
    Image.fromarray(pixels).save(path, format="PNG")  # a uint16 array: a 16-bit greyscale PNG


def _write_npy(path: str, values: torch.Tensor) -> None:
    with open(path, "wb") as f:  # a file object: np.save adds no suffix
        np.save(f, values.float().numpy())


def predict_command(args) -> int:
    """``fastad predict``: load, check the inputs, score, write; one line per problem."""
    from . import distributed
    from .faults import atomic_write, check_writable, exclusive_folder
    from .metrics.calibration import normalise
    from .models import load_checkpoint
    from .overlays import save_overlay
    from .runs import _device_line

    kinds = {k.strip() for k in args.maps.split(",") if k.strip()}
    kinds = {"png", "npy"} if kinds == {"both"} else set() if kinds == {"none"} else kinds
    if not kinds <= {"png", "npy"}:
        raise UsageError(f"--maps expects png, npy, both or none (or png,npy), got {args.maps!r}")
    device = distributed.resolve_device(args.device)
    print(f"device {_device_line(device)}", flush=True)
    runtime = {"precision": args.precision} if args.precision != "fp32" else {}
    if args.compile:
        runtime["compile"] = args.compile
    model = load_checkpoint(args.checkpoint, device=device, **runtime)
    cal = model.calibration or {}
    threshold = args.threshold if args.threshold is not None else cal.get("image_threshold")
    if not cal:
        print(f"{args.checkpoint} holds no stored threshold or normalisation (saved before fastad run evaluated it): "
              "writing raw scores" + (", labels at --threshold" if threshold is not None else "; give --threshold to "
                                      "label images"), flush=True)
    elif args.threshold is None and threshold is None:
        print(f"{args.checkpoint}: no image threshold was stored (its test set had one class); give --threshold to "
              "label images", flush=True)
    paths, bad = collect_inputs(args.inputs)
    if paths:
        probe = AnomalyDataset([Sample(p, 0, None, "predict") for p in paths])
        problems = probe.problems()
        bad += [msg for _, msg in problems]
        unreadable = {s.path for s, _ in problems}
        paths = [p for p in paths if p not in unreadable]
    if bad and not args.skip_bad_images:
        raise UsageError(f"{len(bad)} input problem(s): " + "; ".join(bad) + " (fix them or pass --skip-bad-images)")
    if bad:
        print(f"warning: skipped {len(bad)} input(s): " + "; ".join(bad), file=sys.stderr, flush=True)
    if not paths:
        raise UsageError("no readable image among the inputs")
    check_writable(args.out, "--out")
    with exclusive_folder(args.out, "--out"):
        scores, maps, ds = predict_images(model, paths, protocol=cal.get("protocol", "fastad"),
                                          batch_size=args.batch_size, num_workers=args.num_workers)
        have_stats = "image_min" in cal
        normalised = None
        if have_stats and threshold is not None:
            normalised = normalise(scores, threshold, cal["image_min"], cal["image_max"])
        labels = (scores.double() >= threshold) if threshold is not None else None
        # maps: anomalib's rule (the pixel threshold, else the image one, with the maps' statistics);
        # without stored statistics the 16-bit PNGs span this run's maps
        map_threshold = cal.get("pixel_threshold") if cal.get("pixel_threshold") is not None else threshold
        if cal.get("map_min") is not None and map_threshold is not None:
            map_values = normalise(maps.double(), map_threshold, cal["map_min"], cal["map_max"])
        else:
            lo, hi = float(maps.min()), float(maps.max())
            map_values = (maps.double() - lo) / (hi - lo) if hi > lo else torch.zeros_like(maps, dtype=torch.float64)
        names = _names(paths)
        map_dir = os.path.join(args.out, "maps")
        if kinds:
            os.makedirs(map_dir, exist_ok=True)
        files = []
        for i, name in enumerate(names):
            written = []
            if "png" in kinds:
                target = os.path.join(map_dir, f"{name}.png")
                atomic_write(target, lambda tmp, i=i: _write_png16(tmp, map_values[i]))
                written.append(os.path.relpath(target, args.out))
            if "npy" in kinds:
                target = os.path.join(map_dir, f"{name}.npy")
                atomic_write(target, lambda tmp, i=i: _write_npy(tmp, maps[i]))
                written.append(os.path.relpath(target, args.out))
            files.append(" ".join(written))
        n_overlays = min(len(paths), MAX_OVERLAYS) if args.overlays is None else max(args.overlays, 0)
        if n_overlays:
            folder = os.path.join(args.out, "overlays")
            os.makedirs(folder, exist_ok=True)
            lo, hi = float(maps.min()), float(maps.max())
            for i in torch.argsort(scores, descending=True)[:n_overlays].tolist():
                verdict = "" if labels is None else (" anomalous" if labels[i] else " normal")
                save_overlay(ds[i]["image"], maps[i], os.path.join(folder, f"{names[i]}.png"),
                             title=f"score {float(scores[i]):.4g}{verdict}", lo=lo, hi=hi)
        rows = [["path", "score", "normalised_score", "label", "maps"]]
        for i, p in enumerate(paths):
            rows.append([p, repr(float(scores[i])), "" if normalised is None else f"{float(normalised[i]):.6f}",
                         "" if labels is None else ("anomalous" if labels[i] else "normal"), files[i]])

        def write_csv(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows(rows)

        atomic_write(os.path.join(args.out, "predictions.csv"), write_csv)
    flagged = "" if labels is None else f", {int(labels.sum())} anomalous at threshold {threshold:.6g}"
    print(f"scored {len(paths)} image(s){flagged}; wrote {os.path.join(args.out, 'predictions.csv')}", flush=True)
    return 0
