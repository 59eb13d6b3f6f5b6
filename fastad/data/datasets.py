"""Datasets of (image, mask, label) items. Each item is a dict:
``image`` (3, H, W) float32, ``mask`` (H, W) float32 in {0, 1}, ``label`` int (1 = anomalous),
``class_name`` str, ``path`` str. Bad data raises an error naming the file."""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .transforms import ImageTransform

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Sample:
    path: str
    label: int
    mask_path: str | None
    class_name: str


def _open(path: str) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
        return img
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None


class AnomalyDataset(Dataset):
    """Loads samples lazily. Normal images get an all-zero mask; every defect image needs a readable
    mask of its own size (an empty mask file, as MTD has four, is fine: the image stays anomalous)."""

    def __init__(self, samples: list[Sample], transform: ImageTransform | None = None):
        if not samples:
            raise ValueError("dataset has no images")
        self.samples = samples
        self.transform = transform or ImageTransform()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        img = _open(s.path)
        image = self.transform.image(img)
        if s.label == 0:
            mask = torch.zeros(image.shape[-2:])
        else:
            m = _open(s.mask_path)
            if m.size != img.size:
                raise ValueError(f"mask {s.mask_path} is {m.size[0]}x{m.size[1]} but image {s.path} is {img.size[0]}x{img.size[1]}")
            mask = self.transform.mask(m)
        return {"image": image, "mask": mask, "label": s.label, "class_name": s.class_name, "path": s.path}

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([s.label for s in self.samples])


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _folder_samples(base: Path, split: str, class_name: str, good: str, mask_for, layout: str) -> list[Sample]:
    """``base/split/<good>`` normal, every other ``base/split/<defect>`` anomalous with ``mask_for(defect, path)``."""
    _check_split(split)
    if not (base / split).is_dir():
        raise FileNotFoundError(f"no {layout} split folder {base / split}")
    samples = []
    for defect in sorted(d.name for d in (base / split).iterdir() if d.is_dir()):
        for p in _images(base / split / defect):
            if defect == good:
                samples.append(Sample(str(p), 0, None, class_name))
                continue
            mask = mask_for(defect, p)
            if mask is None or not mask.is_file():
                raise FileNotFoundError(f"missing mask {mask or base / 'ground_truth' / defect / p.stem} for defect image {p}")
            samples.append(Sample(str(p), 1, str(mask), class_name))
    if not samples:
        raise ValueError(f"no images under {base / split} (class {class_name!r})")
    return samples


def folder(
    root: str | os.PathLike,
    split: str,
    transform: ImageTransform | None = None,
    class_name: str | None = None,
    layout: str = "folder-layout",
) -> AnomalyDataset:
    """The generic (MVTec-style) folder layout of one class: ``root/train/good``, ``root/test/good``,
    ``root/test/<defect>``, ``root/ground_truth/<defect>/<name>_mask.png``."""
    base = Path(root)
    name = class_name or base.name
    return AnomalyDataset(
        _folder_samples(base, split, name, "good", lambda d, p: base / "ground_truth" / d / f"{p.stem}_mask.png", layout),
        transform,
    )


def mvtec(root: str | os.PathLike, category: str, split: str, transform: ImageTransform | None = None) -> AnomalyDataset:
    """MVTec AD layout: ``root/category/{train/good, test/<defect>, ground_truth/<defect>/<name>_mask.png}``.
    MPDD uses the same layout."""
    return folder(Path(root) / category, split, transform, category, "MVTec AD")


def btad(root: str | os.PathLike, category: str, split: str, transform: ImageTransform | None = None) -> AnomalyDataset:
    """BTAD layout: ``root/category/{train/ok, test/ok, test/ko, ground_truth/ko/<name>.<png|bmp>}``."""
    base = Path(root) / category

    def mask_for(defect: str, p: Path) -> Path | None:
        masks = base / "ground_truth" / defect
        found = [m for m in _images(masks) if m.stem == p.stem] if masks.is_dir() else []
        return found[0] if found else None

    return AnomalyDataset(_folder_samples(base, split, category, "ok", mask_for, "BTAD"), transform)


def _listed(image: Path, normal: bool, mask: Path | None, category: str, listing: Path) -> Sample:
    """A sample of a split file; a defect image must name its mask."""
    if normal:
        return Sample(str(image), 0, None, category)
    if mask is None:
        raise FileNotFoundError(f"missing mask for defect image {image} in {listing}")
    return Sample(str(image), 1, str(mask), category)


def _listed_dataset(samples: list[Sample], split: str, category: str, listing: Path, transform) -> AnomalyDataset:
    if not samples:
        raise ValueError(f"no {split} images of class {category!r} in {listing}")
    return AnomalyDataset(samples, transform)


def visa(root: str | os.PathLike, category: str, split: str, transform: ImageTransform | None = None) -> AnomalyDataset:
    """VisA with its one-class split: ``root/split_csv/1cls.csv`` (columns object, split, label, image,
    mask; label ``normal`` or ``anomaly``; paths relative to ``root``)."""
    _check_split(split)
    base = Path(root)
    listing = base / "split_csv" / "1cls.csv"
    if not listing.is_file():
        raise FileNotFoundError(f"missing VisA split file {listing}")
    samples = []
    with open(listing, newline="") as f:
        for row in csv.DictReader(f):
            if row["object"] != category or row["split"] != split:
                continue
            mask = base / row["mask"] if row.get("mask") else None
            samples.append(_listed(base / row["image"], row["label"] == "normal", mask, category, listing))
    return _listed_dataset(samples, split, category, listing, transform)


def realiad(
    root: str | os.PathLike,
    category: str,
    split: str,
    transform: ImageTransform | None = None,
    json_dir: str = "realiad_jsons",
    image_dir: str = "realiad_1024",
) -> AnomalyDataset:
    """Real-IAD with its JSON splits: ``root/<json_dir>/<category>.json`` holds ``train`` and ``test``
    lists of {image_path, mask_path, anomaly_class}, paths relative to ``root/<image_dir>/<category>``;
    ``anomaly_class`` ``OK`` is normal. ``json_dir="realiad_jsons_fuiad_0.0"`` etc. select the other
    splits, ``image_dir="realiad_256"`` the smaller images."""
    _check_split(split)
    base = Path(root)
    listing = base / json_dir / f"{category}.json"
    if not listing.is_file():
        raise FileNotFoundError(f"missing Real-IAD split file {listing}")
    images = base / image_dir / category
    samples = []
    for item in json.loads(listing.read_text()).get(split, []):
        mask = images / item["mask_path"] if item.get("mask_path") else None
        normal = item.get("anomaly_class", "OK") == "OK"
        samples.append(_listed(images / item["image_path"], normal, mask, category, listing))
    return _listed_dataset(samples, split, category, listing, transform)


def mtd(root: str | os.PathLike, split: str, transform: ImageTransform | None = None) -> AnomalyDataset:
    """Magnetic Tile Defects with the DifferNet split: train = the MT_Free files listed in
    ``mtd_train_filenames.txt``; test = the other MT_Free images plus every defect image (each with
    a same-name ``.png`` mask).

    Default transform: resize to 224 x 224 without cropping, as DifferNet resizes the whole tile.
    The tiles are small and defects (Break, Fray) often touch the border, so MVTec's 256 -> 224
    center crop would cut them off (PatchCore measured 0.805 image AUROC with the crop, 0.885
    without, 1% coreset)."""
    base = Path(root)
    transform = transform or ImageTransform(224, 224)
    listing = base / "mtd_train_filenames.txt"
    if not listing.is_file():
        raise FileNotFoundError(f"missing DifferNet split file {listing}")
    train_names = {line.strip() for line in listing.read_text().splitlines() if line.strip()}
    free = sorted((base / "MT_Free" / "Imgs").glob("*.jpg"))
    if split == "train":
        samples = [Sample(str(p), 0, None, "mtd") for p in free if p.name in train_names]
    elif split == "test":
        samples = [Sample(str(p), 0, None, "mtd") for p in free if p.name not in train_names]
        for d in sorted(base.glob("MT_*")):
            if d.name == "MT_Free":
                continue
            for p in sorted((d / "Imgs").glob("*.jpg")):
                mask = p.with_suffix(".png")
                if not mask.is_file():
                    raise FileNotFoundError(f"missing mask {mask} for defect image {p}")
                samples.append(Sample(str(p), 1, str(mask), "mtd"))
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return AnomalyDataset(samples, transform)
