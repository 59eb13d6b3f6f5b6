"""The README's "Use fastad inside anomalib / Lightning" snippets run as they stand: each in a fresh
interpreter, in a directory whose ../shared/data/mvtec holds a tiny MVTec-layout class (the anomalib
snippet's data)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _snippet(name: str) -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    m = re.search(rf"<!-- snippet: {name} -->\n```python\n(.*?)```", text, re.S)
    assert m, f"README has no snippet {name!r}"
    return m.group(1)


def _tiny_mvtec(root, size=64):
    g = np.random.default_rng(0)
    base = root / "bottle"
    for sub in ("train/good", "test/good", "test/broken", "ground_truth/broken"):
        (base / sub).mkdir(parents=True)

    def texture():
        img = np.tile(np.linspace(60, 180, size), (size, 1))[..., None] + g.normal(0, 8, (size, size, 3))
        return np.clip(img, 0, 255)

    for i in range(8):
        Image.fromarray(texture().astype(np.uint8)).save(base / "train/good" / f"{i:03d}.png")
    for i in range(3):
        Image.fromarray(texture().astype(np.uint8)).save(base / "test/good" / f"{i:03d}.png")
        img, mask = texture(), np.zeros((size, size), np.uint8)
        y, x = g.integers(4, size - 20, 2)
        img[y : y + 14, x : x + 14] = [250, 30, 30]
        mask[y : y + 14, x : x + 14] = 255
        Image.fromarray(img.astype(np.uint8)).save(base / "test/broken" / f"{i:03d}.png")
        Image.fromarray(mask).save(base / "ground_truth/broken" / f"{i:03d}_mask.png")


@pytest.mark.parametrize("name", ["anomalib", "lightning", "ops"])
def test_readme_snippet_runs(name, tmp_path):
    if name == "anomalib":
        pytest.importorskip("anomalib")
    if name == "lightning":
        pytest.importorskip("lightning")
    _tiny_mvtec(tmp_path / "shared" / "data" / "mvtec")
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", _snippet(name)], cwd=work, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    if name == "anomalib":  # image AUROC, pixel AUROC, AUPRO of the obvious defects
        values = [float(v) for v in last.split()]
        assert values[0] == 1.0 and values[1] > 0.9 and values[2] > 0.5, last
    elif name == "lightning":
        assert "'image_auroc': 1.0" in last and "pixel_aupro" in last, last
    else:
        assert last.startswith("torch.Size([200, 256])"), last
