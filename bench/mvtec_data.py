"""Where the benchmarks find MVTec AD bottle: ``$FASTAD_MVTEC``, else ``../shared/data/mvtec`` beside
the checkout; where neither holds it and ``FASTAD_BENCH_STANDIN=1`` (bench/gpu_check.sh sets it: a
lent GPU machine gets the checkout only, and bottle's 151 MB exceeds what a call may carry), a
synthetic stand-in with bottle's layout and image size: 900 x 900 RGB PNGs (a smooth random field
plus sensor-like noise, so that decoding costs about what a photograph's does), 64 training images,
16 good and 16 defective test images with masks. Timings on it measure the pipeline (decode, cache,
steps), not detection quality; rows from it say so (``standin()``)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec"
SIZE, N_TRAIN, N_TEST = 900, 64, 16


def standin() -> bool:
    """Whether the benchmarks run on the synthetic stand-in (no real bottle found, stand-in allowed)."""
    return not (_real() / "bottle").is_dir() and os.environ.get("FASTAD_BENCH_STANDIN") == "1"


def _real() -> Path:
    return Path(os.environ.get("FASTAD_MVTEC", SHARED))


def mvtec_root() -> Path:
    """The folder holding ``bottle`` (a missing one when there is none: the benchmarks skip)."""
    if not standin():
        return _real()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastad" / "bench-standin"
    if not (root / "bottle" / ".complete").exists():
        _write(root / "bottle")
    return root


def _image(g: np.random.Generator) -> np.ndarray:
    field = g.normal(size=(16, 16, 3)).astype(np.float32)
    field = np.kron(field, np.ones((SIZE // 16 + 1, SIZE // 16 + 1, 1), np.float32))[:SIZE, :SIZE]
    noise = g.normal(0.0, 3.0, size=(SIZE, SIZE, 3)).astype(np.float32)
    return np.clip(128 + 40 * field + noise, 0, 255).astype(np.uint8)


def _write(base: Path) -> None:
    from PIL import Image

    g = np.random.default_rng(0)
    for sub in ("train/good", "test/good", "test/broken", "ground_truth/broken"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for i in range(N_TRAIN):
        Image.fromarray(_image(g)).save(base / "train" / "good" / f"{i:03d}.png", compress_level=1)
    for i in range(N_TEST):
        Image.fromarray(_image(g)).save(base / "test" / "good" / f"{i:03d}.png", compress_level=1)
        img, mask, side = _image(g), np.zeros((SIZE, SIZE), np.uint8), SIZE // 9  # a 100 px defect at 900
        y, x = g.integers(side // 2, SIZE - 3 * side // 2, 2)
        img[y : y + side, x : x + side] = (250, 30, 30)
        mask[y : y + side, x : x + side] = 255
        Image.fromarray(img).save(base / "test" / "broken" / f"{i:03d}.png", compress_level=1)
        Image.fromarray(mask).save(base / "ground_truth" / "broken" / f"{i:03d}_mask.png")
    (base / ".complete").write_text("")
