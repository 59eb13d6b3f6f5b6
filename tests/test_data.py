import numpy as np
import pytest
import torch
from PIL import Image

from fastad.data import ImageTransform, SyntheticDataset, mtd, mvtec
from conftest import shared


def _write(path, size=(40, 30), value=128, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0], 3) if mode == "RGB" else (size[1], size[0]), value, np.uint8)
    Image.fromarray(arr).save(path)


def _mvtec_fixture(root):
    _write(root / "cls/train/good/000.png")
    _write(root / "cls/test/good/000.png")
    _write(root / "cls/test/crack/000.png")
    _write(root / "cls/ground_truth/crack/000_mask.png", value=255, mode="L")
    return root


def test_mvtec_layout(tmp_path):
    root = _mvtec_fixture(tmp_path)
    test = mvtec(root, "cls", "test", ImageTransform(32, 24))
    assert len(test) == 2 and test.labels.tolist() == [1, 0]
    item = test[0]
    assert item["image"].shape == (3, 24, 24) and item["mask"].shape == (24, 24) and item["mask"].min() == 1
    assert item["class_name"] == "cls" and item["path"].endswith("crack/000.png")
    assert test[1]["mask"].sum() == 0


def test_bad_data_names_the_file(tmp_path):
    root = _mvtec_fixture(tmp_path)
    (root / "cls/ground_truth/crack/000_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match="000_mask.png"):
        mvtec(root, "cls", "test")
    _write(root / "cls/ground_truth/crack/000_mask.png", size=(10, 10), mode="L")
    with pytest.raises(ValueError, match="mask .*000_mask.png is 10x10"):
        mvtec(root, "cls", "test")[0]
    (root / "cls/train/good/000.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image .*000.png"):
        mvtec(root, "cls", "train")[0]
    with pytest.raises(FileNotFoundError, match="no MVTec AD split folder"):
        mvtec(root, "nope", "train")


def test_synthetic_is_deterministic_and_labelled():
    a, b = SyntheticDataset("test", 4, 64), SyntheticDataset("test", 4, 64)
    assert torch.equal(a[1]["image"], b[1]["image"]) and a[1]["label"] == 1 and a[1]["mask"].sum() > 0
    assert a[0]["label"] == 0 and a[0]["mask"].sum() == 0
    assert not torch.equal(SyntheticDataset("train", 1, 64)[0]["image"], a[0]["image"])


def test_mtd_split_sizes():
    root = shared("mtd")
    train, test = mtd(root, "train"), mtd(root, "test")
    assert len(train) == 761 and len(test) == 191 + 392
    assert int(test.labels.sum()) == 392
