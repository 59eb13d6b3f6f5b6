"""Datasets of (image, mask, label) items. Each item is a dict:
``image`` (3, H, W) float32, ``mask`` (H, W) float32 in {0, 1}, ``has_mask`` bool (False for an
anomalous image without pixel ground truth: its mask is all zeros and pixel metrics leave it out),
``label`` int (1 = anomalous), ``class_name`` str, ``path`` str. Bad data raises an error naming the
file; :meth:`AnomalyDataset.validate` lists every problem of a dataset at once without decoding."""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .transforms import ImageTransform

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Sample:
    """One image: ``mask_path`` is None for a normal image (all-zero mask) and for an anomalous image
    without pixel ground truth (image-level label only)."""

    path: str
    label: int
    mask_path: str | None
    class_name: str

    @property
    def has_mask(self) -> bool:
        return self.label == 0 or self.mask_path is not None


def _open(path: str, what: str = "image") -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
        return img
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read {what} {path}: {exc}") from None


class AnomalyDataset(Dataset):
    """Loads samples lazily. Normal images get an all-zero mask; a defect image's mask must be
    readable and of its own size (an empty mask file, as MTD has four, is fine: the image stays
    anomalous); a defect image without a mask path is image-level only."""

    def __init__(self, samples: list[Sample], transform: ImageTransform | None = None):
        if not samples:
            raise ValueError("dataset has no images")
        self.samples = samples
        self.transform = transform or ImageTransform()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        image, mask = self.pixels(i)
        return self.item(i, image, mask)

    def pixels(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Sample ``i`` decoded and preprocessed, before normalisation: the (H, W, 3) uint8 image and
        the (H, W) uint8 {0, 1} mask (None: no mask file, all zeros). What :mod:`fastad.data.cache` stores."""
        s = self.samples[i]
        img = _open(s.path)
        image = self.transform.image_pixels(img)
        if s.mask_path is None:
            return image, None
        m = _open(s.mask_path, "mask")
        if m.size != img.size:
            raise ValueError(f"mask {s.mask_path} is {m.size[0]}x{m.size[1]} but image {s.path} is {img.size[0]}x{img.size[1]}")
        return image, self.transform.mask_pixels(m)

    def item(self, i: int, image: np.ndarray, mask: np.ndarray | None) -> dict:
        """The item dict of sample ``i`` from its :meth:`pixels`."""
        s = self.samples[i]
        x = self.transform.normalise(image)
        m = torch.zeros(x.shape[-2:]) if mask is None else torch.from_numpy(mask.astype(np.float32))
        return {"image": x, "mask": m, "has_mask": s.has_mask, "label": s.label, "class_name": s.class_name,
                "path": s.path}

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([s.label for s in self.samples])

    def counts(self) -> dict[str, int]:
        """Numbers of ``normal``, ``anomalous`` and ``anomalous_with_mask`` images."""
        anomalous = [s for s in self.samples if s.label]
        return {"normal": len(self.samples) - len(anomalous), "anomalous": len(anomalous),
                "anomalous_with_mask": sum(s.mask_path is not None for s in anomalous)}

    def problems(self) -> list[tuple[Sample, str]]:
        """(sample, what is wrong) for every bad file of the list, without decoding pixels: a
        missing, empty or unreadable image (its header), a missing, empty or unreadable mask, a mask
        whose size differs from its image's."""
        found = []
        for s in self.samples:
            mine: list[str] = []
            size = _header(s.path, "image", mine)
            if s.mask_path is not None:
                msize = _header(s.mask_path, "mask", mine)
                if size and msize and size != msize:
                    mine.append(f"mask {s.mask_path} is {msize[0]}x{msize[1]} but image {s.path} is {size[0]}x{size[1]}")
            found += [(s, p) for p in mine]
        return found

    def validate(self) -> list[str]:
        """The messages of :meth:`problems` (empty: every file looks readable)."""
        return [p for _, p in self.problems()]

    def without(self, bad: list[Sample]) -> AnomalyDataset:
        """This dataset less the samples ``bad`` (same transform). Raises ValueError if none is left."""
        drop = set(bad)
        kept = [s for s in self.samples if s not in drop]
        if not kept:
            raise ValueError(f"no image is left after skipping {len(drop)} bad one(s)")
        return AnomalyDataset(kept, self.transform)


def _header(path: str, what: str, problems: list[str]) -> tuple[int, int] | None:
    """(W, H) from the file's header, or None after appending what is wrong to ``problems``."""
    try:
        if os.path.getsize(path) == 0:
            problems.append(f"{what} {path} is an empty file")
            return None
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError:
        problems.append(f"{what} file not found: {path}")
    except (UnidentifiedImageError, OSError) as exc:
        problems.append(f"cannot read {what} {path}: {exc}")
    return None


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _mvtec_mask(base: Path):
    """``mask_for`` of the MVTec-style layouts: ``base/ground_truth/<defect>/<name>_mask.png``."""
    return lambda defect, p: base / "ground_truth" / defect / f"{p.stem}_mask.png"


def _defect_folder_samples(images: Path, base: Path, class_name: str, good: str, mask_for) -> list[Sample]:
    """``images/<good>`` normal, every other ``images/<defect>`` anomalous with ``mask_for(defect, path)``
    where ``base/ground_truth/<defect>`` exists; a defect type without that folder is image-level."""
    samples = []
    for defect in sorted(d.name for d in images.iterdir() if d.is_dir() and d.name != "ground_truth"):
        masked = (base / "ground_truth" / defect).is_dir()
        for p in _images(images / defect):
            if defect == good:
                samples.append(Sample(str(p), 0, None, class_name))
                continue
            # a masked defect type needs a mask for every image: a missing one is reported by validate()
            # (and on reading), never turned into an image-level label
            mask = mask_for(defect, p) if masked else None
            samples.append(Sample(str(p), 1, None if mask is None else str(mask), class_name))
    return samples


def _folder_samples(base: Path, split: str, class_name: str, good: str, mask_for, layout: str) -> list[Sample]:
    """The samples of ``base/split`` (:func:`_defect_folder_samples`)."""
    _check_split(split)
    if not (base / split).is_dir():
        raise FileNotFoundError(f"no {layout} split folder {base / split}")
    samples = _defect_folder_samples(base / split, base, class_name, good, mask_for)
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
    ``root/test/<defect>``, ``root/ground_truth/<defect>/<name>_mask.png``. A defect type without a
    ``ground_truth/<defect>`` folder (or a set without ``ground_truth/``) is image-level only."""
    base = Path(root)
    name = class_name or base.name
    return AnomalyDataset(
        _folder_samples(base, split, name, "good", _mvtec_mask(base), layout),
        transform,
    )


def mvtec(root: str | os.PathLike, category: str, split: str, transform: ImageTransform | None = None) -> AnomalyDataset:
    """MVTec AD layout: ``root/category/{train/good, test/<defect>, ground_truth/<defect>/<name>_mask.png}``.
    MPDD uses the same layout."""
    return folder(Path(root) / category, split, transform, category, "MVTec AD")


def btad(root: str | os.PathLike, category: str, split: str, transform: ImageTransform | None = None) -> AnomalyDataset:
    """BTAD layout: ``root/category/{train/ok, test/ok, test/ko, ground_truth/ko/<name>.<png|bmp>}``."""
    base = Path(root) / category

    def mask_for(defect: str, p: Path) -> Path:  # <name>.png or .bmp; a missing one is reported as .png
        masks = base / "ground_truth" / defect
        found = [m for m in _images(masks) if m.stem == p.stem] if masks.is_dir() else []
        return found[0] if found else masks / f"{p.stem}.png"

    return AnomalyDataset(_folder_samples(base, split, category, "ok", mask_for, "BTAD"), transform)


def _listed(image: Path, normal: bool, mask: Path | None, category: str, listing: Path) -> Sample:
    """A sample of a split file; a defect image without a mask is image-level only."""
    if normal:
        return Sample(str(image), 0, None, category)
    return Sample(str(image), 1, None if mask is None else str(mask), category)


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
                samples.append(Sample(str(p), 1, str(p.with_suffix(".png")), "mtd"))  # a missing mask: validate()
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return AnomalyDataset(samples, transform)


NORMAL_LABELS = {"0", "good", "normal", "ok", "false"}
ANOMALOUS_LABELS = {"1", "anomaly", "anomalous", "bad", "defect", "defective", "ng", "ko", "true"}


def _held_out_split(samples: list[Sample], split: str, test_good: float, seed: int, where: str) -> list[Sample]:
    """A split for data without one: test = every anomalous image plus a seeded ``test_good``
    fraction (at least one) of the normal images; train = the other normal images."""
    _check_split(split)
    if not 0 < test_good < 1:
        raise ValueError(f"test_good must lie in (0, 1), got {test_good!r}")
    normal = [s for s in samples if s.label == 0]
    if len(normal) < 2:
        raise ValueError(f"{where} has {len(normal)} normal images; at least 2 are needed (train and test)")
    n_test = min(len(normal) - 1, max(1, round(test_good * len(normal))))
    held = set(torch.randperm(len(normal), generator=torch.Generator().manual_seed(seed))[:n_test].tolist())
    if split == "train":
        return [s for i, s in enumerate(normal) if i not in held]
    test_normal = [s for i, s in enumerate(normal) if i in held]
    return test_normal + [s for s in samples if s.label]


def imagefolder(
    root: str | os.PathLike,
    split: str,
    transform: ImageTransform | None = None,
    class_name: str | None = None,
    good: str = "good",
    test_good: float = 0.2,
    seed: int = 0,
) -> AnomalyDataset:
    """An ImageFolder-style class without a split: ``root/<good>/*`` normal, every other folder
    ``root/<defect>/*`` anomalous (``root/ground_truth/<defect>/<name>_mask.png`` masks where that
    folder exists, else image-level). The test split is every defect image plus a seeded ``test_good``
    fraction of the good images; the train split the other good images."""
    base = Path(root)
    name = class_name or base.name
    if not (base / good).is_dir():
        raise FileNotFoundError(f"no normal-image folder {base / good} (the ImageFolder layout: {good}/ + one folder per defect)")
    samples = _defect_folder_samples(base, base, name, good, _mvtec_mask(base))
    return AnomalyDataset(_held_out_split(samples, split, test_good, seed, str(base)), transform)


def _list_rows(listing: Path) -> list[dict]:
    if not listing.is_file():
        raise FileNotFoundError(f"list file not found: {listing}")
    if listing.suffix.lower() == ".json":
        rows = json.loads(listing.read_text())
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{listing}: expected a JSON list of objects with 'path' and 'label'")
        return rows
    with open(listing, newline="") as f:
        return list(csv.DictReader(f))


def list_classes(listing: str | os.PathLike) -> list[str]:
    """The classes named by a list file's ``class`` column (one class, the file's stem, without it)."""
    listing = Path(listing)
    return sorted({str(r.get("class") or listing.stem) for r in _list_rows(listing)})


def listfile(
    listing: str | os.PathLike,
    split: str,
    transform: ImageTransform | None = None,
    class_name: str | None = None,
    test_good: float = 0.2,
    seed: int = 0,
) -> AnomalyDataset:
    """Images named by a CSV (with a header) or JSON (a list of objects) file, without copying them.

    Columns / keys: ``path`` and ``label`` (0 / 1, or good / normal / ok vs anomaly / bad / defect /
    ng / ...), optional ``mask`` (an anomalous image without one is image-level), ``split``
    (train / test; without it the split is made as :func:`imagefolder` does, per class, with
    ``test_good`` and ``seed``) and ``class`` (default: the file's stem; ``class_name`` keeps one
    class). Relative paths are relative to the list file's folder."""
    listing = Path(listing)
    base = listing.parent
    samples, has_split = [], None
    for i, row in enumerate(_list_rows(listing), start=2 if listing.suffix.lower() != ".json" else 1):
        where = f"{listing} {'line' if listing.suffix.lower() != '.json' else 'item'} {i}"
        if not row.get("path") or row.get("label") in (None, ""):
            raise ValueError(f"{where}: 'path' and 'label' are required, got {dict(row)}")
        label = str(row["label"]).strip().lower()
        if label not in NORMAL_LABELS | ANOMALOUS_LABELS:
            raise ValueError(f"{where}: label {row['label']!r} is neither normal ({sorted(NORMAL_LABELS)}) "
                             f"nor anomalous ({sorted(ANOMALOUS_LABELS)})")
        cls = str(row.get("class") or listing.stem)
        if class_name is not None and cls != class_name:
            continue
        row_split = str(row.get("split") or "").strip().lower() or None
        if has_split is None:
            has_split = row_split is not None
        if (row_split is not None) != has_split or (row_split is not None and row_split not in ("train", "test")):
            raise ValueError(f"{where}: split must be 'train' or 'test' on every row or on none, got {row.get('split')!r}")
        anomalous = label in ANOMALOUS_LABELS
        if anomalous and row_split == "train":
            raise ValueError(f"{where}: training images must be normal, got label {row['label']!r}")
        mask = base / row["mask"] if row.get("mask") else None
        s = Sample(str(base / row["path"]), int(anomalous), None if mask is None or not anomalous else str(mask), cls)
        samples.append((row_split, s))
    if not samples:
        raise ValueError(f"no images{'' if class_name is None else f' of class {class_name!r}'} in {listing}")
    if has_split:
        _check_split(split)
        chosen = [s for sp, s in samples if sp == split]
    else:
        chosen = []
        for cls in sorted({s.class_name for _, s in samples}):
            chosen += _held_out_split([s for _, s in samples if s.class_name == cls], split, test_good, seed, f"{listing} class {cls!r}")
    if not chosen:
        raise ValueError(f"no {split} images{'' if class_name is None else f' of class {class_name!r}'} in {listing}")
    return AnomalyDataset(chosen, transform)


def _tail(path: str, parts: int) -> tuple[str, ...]:
    return tuple(Path(path.replace("\\", "/")).parts[-parts:])


class WithReferences(Dataset):
    """A test set whose items also carry ``references``: (K, 3, H, W) float32, the K normal images a
    listing names for each test image (ADPretrain's per-image aligned references of FeatureNorm†),
    read with the test set's transform.

    ``listing`` maps a test image path to its reference image paths, as the authors' JSON files do
    with paths of their machine: both are matched by their last ``parts`` components (``class/split/
    defect/name``), references resolved under the test image's dataset root. Every test image must be
    listed, with the same K, and every reference must exist (ValueError otherwise)."""

    def __init__(self, dataset: AnomalyDataset, listing: dict[str, list[str]], parts: int = 4, where: str = "listing"):
        by_tail = {_tail(k, parts): v for k, v in listing.items()}
        self.dataset, self.references = dataset, []
        missing = [s.path for s in dataset.samples if _tail(s.path, parts) not in by_tail]
        if missing:
            raise ValueError(f"{where} lists no references for {len(missing)} of {len(dataset)} test images, e.g. "
                             f"{missing[0]} (matched by its last {parts} path parts)")
        for s in dataset.samples:
            root = Path(s.path).parents[parts - 1]
            refs = [root.joinpath(*_tail(r, parts)) for r in by_tail[_tail(s.path, parts)]]
            absent = [str(r) for r in refs if not r.is_file()]
            if absent:
                raise ValueError(f"{where}: reference image {absent[0]} of {s.path} not found")
            self.references.append([str(r) for r in refs])
        counts = {len(r) for r in self.references}
        if len(counts) != 1 or 0 in counts:
            raise ValueError(f"{where} must list the same number (>= 1) of references for every test image, got {sorted(counts)}")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        item["references"] = torch.stack([self.dataset.transform.image(_open(p)) for p in self.references[i]])
        return item

    def __getattr__(self, name):  # labels, samples, counts(), ...: the wrapped test set's
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def read_references(path: str | os.PathLike, class_name: str) -> tuple[dict[str, list[str]], str]:
    """(listing, its file) of ``path``: a JSON file {test image: [reference images]} or a folder of
    ``<class>.json`` such files (the authors' ``aligned/references/<dataset>/``)."""
    p = Path(path)
    f = p / f"{class_name}.json" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"aligned-reference list not found: {f}")
    try:
        listing = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{f} is not a JSON file: {exc}") from None
    if not isinstance(listing, dict) or not all(isinstance(v, list) and all(isinstance(x, str) for x in v)
                                                for v in listing.values()):
        raise ValueError(f"{f}: expected a JSON object {{test image path: [reference image paths]}}")
    return listing, str(f)
