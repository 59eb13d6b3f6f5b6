"""The README's "Use fastad inside anomalib / Lightning" snippets run as they stand: each in a fresh
interpreter, in a directory whose ../shared/data/mvtec holds a tiny MVTec-layout class (the anomalib
snippet's data)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import write_defect_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _snippet(name: str) -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    m = re.search(rf"<!-- snippet: {name} -->\n```python\n(.*?)```", text, re.S)
    assert m, f"README has no snippet {name!r}"
    return m.group(1)


def _tiny_mvtec(root):
    base = root / "bottle"
    write_defect_images(base / "train/good", base / "test/good", base / "test/broken", base / "ground_truth/broken",
                        n_test=3, mask_suffix="_mask")


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
