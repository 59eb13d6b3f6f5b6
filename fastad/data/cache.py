"""Preprocessed-image cache: decode and resize every image once, then read model-ready pixels.

The first pass over a dataset at a given transform writes its images as they are after resize and
crop (uint8, (H, W, 3)) and its binarised masks ((H, W), uint8 {0, 1}) into one file, which every
later epoch, run, resumed class and model with the same transform memory-maps. Normalisation runs
on read (:meth:`ImageTransform.normalise`, the same float32 operations as the uncached path), so
results are bit-identical with and without the cache.

One file per (file list with sizes and mtimes, transform, fastad / Pillow version), named
``<dataset id>-<key>.fadcache`` under :func:`default_dir`. Layout: 8 magic bytes, the header length
(uint64 little-endian) and a JSON header (what the key covers), then from a 4 KiB boundary the
images, the masks (when the dataset has any mask file) and one CRC-32 per record (image then mask
bytes). A file is written under a temporary name and renamed when complete, so concurrent writers
of one cache (two runs, two ranks) never leave a half file: the last rename wins and both are whole.
A file that is not a fastad cache, holds another dataset (a foreign key), is shorter or longer than
its header says (truncated) or has a record whose checksum fails is rebuilt with a warning; a
record that fails its checksum later (the file changed under a run) is decoded from its source
instead, with a warning, and the file is removed so that the next run rebuilds it. When an image or
mask changes (size or mtime), its dataset gets a new key: the stale file of the same dataset id is
removed when the new one is written. The folder is capped (``max_bytes``): least recently used
cache files are removed to make room, and a dataset larger than the cap is not cached (a warning
says how large it is and which setting raises the cap).

Training (:func:`batch_source`) gathers whole batches from the cache: on CUDA the training images
stay on the device when they fit (``resident_bytes``), otherwise batches are gathered on the host
into pinned memory and copied without blocking.
"""
from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
import uuid
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .datasets import AnomalyDataset

__all__ = ["CachedBatch", "CachedDataset", "batch_source", "cached", "default_dir", "DEFAULT_MAX_BYTES"]

MAGIC = b"FADCACHE"
FORMAT = 1
ALIGN = 4096
SUFFIX = ".fadcache"
DEFAULT_MAX_BYTES = 50 * 2**30  # the folder's cap: 50 GiB (MVTec AD at 392 px is about 1.5 GiB)


def default_dir() -> str:
    """``$FASTAD_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastad/images``, else ``~/.cache/fastad/images``."""
    if os.environ.get("FASTAD_CACHE_DIR"):
        return os.environ["FASTAD_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastad", "images")


def _stat(path: str, what: str) -> list:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def _header(dataset: AnomalyDataset) -> dict:
    """What the cache file of ``dataset`` must hold: every file with its size and mtime, the transform
    and the versions whose code decides the pixels."""
    import PIL

    from .. import __version__

    files = [[*_stat(s.path, "image"), *(_stat(s.mask_path, "mask") if s.mask_path else [None, None, None])]
             for s in dataset.samples]
    h, w = dataset.transform.crop
    return {"format": FORMAT, "fastad": __version__, "pillow": PIL.__version__, "transform": dataset.transform.describe(),
            "n": len(files), "height": h, "width": w, "masks": any(s.mask_path for s in dataset.samples), "files": files}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _name(header: dict, raw: bytes) -> str:
    """``<dataset id>-<key>``: the id covers the paths and the transform, the key everything (``raw``:
    the encoded header)."""
    ident = _digest({"paths": [[f[0], f[3]] for f in header["files"]], "transform": header["transform"]})[:16]
    return f"{ident}-{hashlib.sha256(raw).hexdigest()[:32]}"


class _Layout:
    """Byte offsets of a cache file's parts."""

    def __init__(self, header: dict, header_bytes: int):
        n, h, w = header["n"], header["height"], header["width"]
        self.image_bytes, self.mask_bytes = h * w * 3, h * w if header["masks"] else 0
        self.images = -(-(16 + header_bytes) // ALIGN) * ALIGN
        self.masks = self.images + n * self.image_bytes
        self.crcs = self.masks + n * self.mask_bytes
        self.size = self.crcs + 4 * n


def _encode(header: dict) -> bytes:
    return json.dumps(header, sort_keys=True).encode()


def _read_header(path: str) -> tuple[dict | None, str]:
    """(the header, '') or (None, why the file is not usable)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if len(head) < 16 or head[:8] != MAGIC:
                return None, "it is not a fastad image cache"
            length = int.from_bytes(head[8:], "little")
            raw = f.read(length)
        if len(raw) != length:
            return None, "it is truncated (its header is incomplete)"
        return json.loads(raw), ""
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return None, f"it cannot be read ({exc})"


class CachedDataset(AnomalyDataset):
    """An :class:`AnomalyDataset` whose pixels come from its cache file (same items, bit for bit).

    Every record read is checked against its CRC-32; a failing one is decoded from its source
    file instead (module docstring). Picklable for DataLoader workers: each process maps the file.
    """

    def __init__(self, dataset: AnomalyDataset, path: str, header: dict, layout: _Layout):
        super().__init__(dataset.samples, dataset.transform)
        self.path, self.header, self._layout = path, header, layout
        self._views = None
        self._bad = False

    def __getstate__(self):
        return {**self.__dict__, "_views": None}

    @property
    def nbytes(self) -> int:
        """Bytes of the images and masks."""
        return self._layout.size - self._layout.images - 4 * len(self)

    def views(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Read-only memory-mapped (N, H, W, 3) images, (N, H, W) masks (None: no mask file in the
        dataset) and (N,) uint32 checksums."""
        if self._views is None:
            lay, h, w, n = self._layout, self.header["height"], self.header["width"], len(self)
            mm = np.memmap(self.path, dtype=np.uint8, mode="r", shape=(lay.size,))
            images = mm[lay.images : lay.masks].reshape(n, h, w, 3)
            masks = mm[lay.masks : lay.crcs].reshape(n, h, w) if lay.mask_bytes else None
            self._views = images, masks, mm[lay.crcs : lay.size].view("<u4")
        return self._views

    def corrupt_records(self) -> list[int]:
        """Indices of the records whose checksum fails."""
        images, masks, crcs = self.views()
        return [i for i in range(len(self)) if _crc(images[i], None if masks is None else masks[i]) != crcs[i]]

    def pixels(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        h, w = self.header["height"], self.header["width"]
        image, mask = np.empty((h, w, 3), np.uint8), np.zeros((h, w), np.uint8)
        self.read_into(i, image, mask)
        return image, mask if self.samples[i].mask_path is not None else None

    def read_into(self, i: int, image: np.ndarray, mask: np.ndarray) -> None:
        """Copy record ``i`` into ``image`` (H, W, 3) and ``mask`` (H, W) uint8 (zeros where the
        dataset has no mask file), checked against its checksum; a failing record is decoded from
        its source instead."""
        images, masks, crcs = self.views()
        image[...] = images[i]
        if masks is not None:
            mask[...] = masks[i]
        if _crc(image, None if masks is None else mask) != crcs[i]:
            self._drop(f"record {i} ({self.samples[i].path}) fails its checksum")
            good, good_mask = AnomalyDataset.pixels(self, i)
            image[...] = good
            mask[...] = 0 if good_mask is None else good_mask

    def _drop(self, why: str) -> None:
        """Warn once and remove the file (the next run rebuilds it); reads go on from the sources
        where a record fails."""
        if not self._bad:
            self._bad = True
            warnings.warn(f"image cache {self.path}: {why}; that image is decoded from its file, and the cache "
                          "file is removed (the next run rebuilds it)", RuntimeWarning, stacklevel=3)
            with contextlib.suppress(OSError):
                os.remove(self.path)


def _crc(image: np.ndarray, mask: np.ndarray | None) -> int:
    c = zlib.crc32(np.ascontiguousarray(image))
    return c if mask is None else zlib.crc32(np.ascontiguousarray(mask), c)


def _usable(path: str, header: dict, lay: _Layout) -> str:
    """'' if ``path`` is a complete, intact cache of ``header`` (laid out as ``lay``), else why not."""
    found, why = _read_header(path)
    if found is None:
        return why
    if found != header:
        return "it holds another dataset or transform (a foreign file)"
    size = os.path.getsize(path)
    expected = lay.size
    if size != expected:
        return f"it is {'truncated' if size < expected else 'longer than its header says'} ({size} of {expected} bytes)"
    return ""


def _make_room(folder: Path, name: str, need: int, max_bytes: int) -> bool:
    """Remove this dataset's stale files, then least recently used cache files until ``need`` more
    bytes fit under ``max_bytes``; False (and a warning) when the dataset alone is over the cap."""
    if need > max_bytes:
        warnings.warn(f"image cache: this dataset needs {need / 2**30:.2f} GiB, over the cache's cap of "
                      f"{max_bytes / 2**30:.2f} GiB; it is read from its image files (raise the cap with "
                      "--cache-max-gb or the max_bytes argument)", RuntimeWarning, stacklevel=3)
        return False
    ident = name.split("-")[0]
    others = []
    for p in folder.glob(f"*{SUFFIX}"):
        if p.name == name + SUFFIX:
            continue
        if p.name.startswith(ident + "-"):
            print(f"image cache: removed the stale {p} (its images or the software changed)", flush=True)
            with contextlib.suppress(OSError):
                p.unlink()
            continue
        with contextlib.suppress(OSError):
            others.append((p.stat().st_mtime, p.stat().st_size, p))
    total = sum(size for _, size, _ in others)
    for _, size, p in sorted(others):
        if total + need <= max_bytes:
            break
        print(f"image cache: removed the least recently used {p} ({size / 2**30:.2f} GiB) to stay under the "
              f"{max_bytes / 2**30:.2f} GiB cap", flush=True)
        with contextlib.suppress(OSError):
            p.unlink()
        total -= size
    return True


def _fill(dataset: AnomalyDataset, header: dict, lay: _Layout, tmp: Path, workers: int) -> None:
    """Decode every sample into the records (and checksums) of the mapped file ``tmp``."""
    mm = np.memmap(tmp, dtype=np.uint8, mode="r+", shape=(lay.size,))
    n, h, w = header["n"], header["height"], header["width"]
    images = mm[lay.images : lay.masks].reshape(n, h, w, 3)
    masks = mm[lay.masks : lay.crcs].reshape(n, h, w) if lay.mask_bytes else None
    crcs = mm[lay.crcs : lay.size].view("<u4")

    def one(i: int) -> None:  # Pillow releases the GIL while it decodes and resizes
        image, mask = dataset.pixels(i)
        images[i] = image
        if masks is not None:
            masks[i] = 0 if mask is None else mask
        crcs[i] = _crc(images[i], None if masks is None else masks[i])

    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(one, range(n)))
    mm.flush()


def _write(dataset: AnomalyDataset, header: dict, raw: bytes, lay: _Layout, path: Path, workers: int) -> None:
    """Decode every sample into a temporary file beside ``path`` (``raw``: the encoded header), then
    rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + len(raw).to_bytes(8, "little") + raw)
            f.truncate(lay.size)
        _fill(dataset, header, lay, tmp, workers)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def cached(dataset, cache_dir: str | os.PathLike | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES,
           workers: int | None = None, verbose: bool = True):
    """``dataset`` read through its cache file (built now if missing or unusable).

    Args:
        dataset: an :class:`AnomalyDataset`; anything else (the synthetic set, a wrapper) is returned
            as it is.
        cache_dir: the cache folder (default :func:`default_dir`), created if needed.
        max_bytes: cap of the folder's cache files (module docstring).
        workers: decoding threads of the first pass (default: the CPUs).
        verbose: print a line when a cache file is written.

    Returns:
        A :class:`CachedDataset` with the same items, or ``dataset`` itself where it cannot be cached
        (over the cap, or the folder cannot be written: a warning says why).

    Raises:
        FileNotFoundError / ValueError naming the image or mask that is missing or unreadable (as
        reading it uncached would).
    """
    if not isinstance(dataset, AnomalyDataset) or isinstance(dataset, CachedDataset):
        return dataset
    folder = Path(cache_dir or default_dir())
    header = _header(dataset)
    raw = _encode(header)  # once: a large dataset's header is megabytes of JSON
    lay = _Layout(header, len(raw))
    name = _name(header, raw)
    path = folder / (name + SUFFIX)
    if path.exists():
        why = _usable(str(path), header, lay)
        if not why:
            ds = CachedDataset(dataset, str(path), header, lay)
            bad = ds.corrupt_records()
            if not bad:
                with contextlib.suppress(OSError):
                    os.utime(path)  # recently used: kept when the cap evicts
                return ds
            why = f"{len(bad)} record(s) fail their checksum (the first: {dataset.samples[bad[0]].path})"
        warnings.warn(f"image cache {path}: {why}; rebuilding it", RuntimeWarning, stacklevel=2)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not _make_room(folder, name, lay.size, max_bytes):
            return dataset
        _write(dataset, header, raw, lay, path, workers or os.cpu_count() or 1)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) and exc.filename is None:  # an image: the data's error
            raise
        warnings.warn(f"image cache: cannot write {path}: {exc.strerror or exc}; the images are read from their "
                      "files (choose another folder with --cache DIR, or --no-cache)", RuntimeWarning, stacklevel=2)
        return dataset
    if verbose:
        print(f"image cache: wrote {path} ({len(dataset)} images, {lay.size / 2**20:.1f} MiB)", flush=True)
    return CachedDataset(dataset, str(path), header, lay)


class CachedBatch(dict):
    """A collated batch gathered from cached uint8 pixels (finite by construction: the models skip
    their NaN/inf check of the images, a host read)."""


class _Source:
    """Batches of cached datasets (one, or the parts of a ConcatDataset) by global index."""

    def __init__(self, parts: list[CachedDataset], device: torch.device, resident_bytes: int):
        self.parts, self.device = parts, device
        self.starts = [0]
        for p in parts:
            self.starts.append(self.starts[-1] + len(p))
        self.transform = parts[0].transform
        self.samples = [s for p in parts for s in p.samples]
        self.resident = None
        total = sum(p.nbytes for p in parts)
        if device.type == "cuda" and total <= resident_bytes:
            self.resident = self._upload()

    def _read_into(self, j: int, image: np.ndarray, mask: np.ndarray) -> None:
        k = bisect.bisect_right(self.starts, j) - 1
        self.parts[k].read_into(j - self.starts[k], image, mask)

    def _upload(self):
        """Every image and mask on the device (checked once, here)."""
        images, masks = [], []
        for p in self.parts:
            bad = p.corrupt_records()
            if bad:
                return None  # read through pixels(): each bad record from its source
            im, mk, _ = p.views()
            images.append(torch.from_numpy(np.array(im)))
            masks.append(torch.from_numpy(np.array(mk)) if mk is not None else torch.zeros(len(p), *im.shape[1:3], dtype=torch.uint8))
        return torch.cat(images).to(self.device), torch.cat(masks).to(self.device)

    def __call__(self, indices: list[int]) -> CachedBatch:
        if self.resident is not None:
            idx = torch.tensor(indices).pin_memory().to(self.device, non_blocking=True)  # a pageable copy would sync
            images, masks = self.resident[0][idx], self.resident[1][idx].to(torch.float32)
        else:  # straight from the mapped file into (pinned) batch buffers
            h, w = self.parts[0].header["height"], self.parts[0].header["width"]
            if self.device.type == "cuda":  # page-locked host buffers: the copies below do not block
                images = torch.empty((len(indices), h, w, 3), dtype=torch.uint8, pin_memory=True)
                masks = torch.zeros((len(indices), h, w), dtype=torch.uint8, pin_memory=True)
                image_rows, mask_rows = images.numpy(), masks.numpy()  # views of host memory
            else:
                image_rows, mask_rows = np.empty((len(indices), h, w, 3), np.uint8), np.zeros((len(indices), h, w), np.uint8)
                images, masks = torch.from_numpy(image_rows), torch.from_numpy(mask_rows)
            for k, j in enumerate(indices):
                self._read_into(j, image_rows[k], mask_rows[k])
            images = images.to(self.device, non_blocking=True)
            masks = masks.to(self.device, non_blocking=True).to(torch.float32)
        samples = [self.samples[j] for j in indices]
        return CachedBatch(image=self.transform.normalise(images), mask=masks,
                           has_mask=torch.tensor([s.has_mask for s in samples]),
                           label=torch.tensor([s.label for s in samples]),
                           class_name=[s.class_name for s in samples], path=[s.path for s in samples])


def batch_source(data, device: torch.device | str, resident_bytes: int | None = None):
    """A function ``indices -> CachedBatch`` (the same batch a DataLoader would collate, on
    ``device``) when ``data`` is a :class:`CachedDataset` or a ConcatDataset of them with one
    transform; else None. On CUDA the images stay on the device when they take at most
    ``resident_bytes`` (default: a quarter of the device's free memory)."""
    parts = list(getattr(data, "datasets", [data]))
    if not parts or not all(isinstance(p, CachedDataset) for p in parts):
        return None
    if any(p.transform.describe() != parts[0].transform.describe() for p in parts):
        return None
    device = torch.device(device)
    if resident_bytes is None:
        resident_bytes = torch.cuda.mem_get_info(device)[0] // 4 if device.type == "cuda" else 0
    return _Source(parts, device, resident_bytes)
