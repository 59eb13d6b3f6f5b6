import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastad.data import ImageTransform, SyntheticDataset, btad, folder, mtd, mvtec, realiad, visa
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
    ds = mvtec(root, "cls", "test")  # listed by validate() with the other problems, and an error on reading
    assert [p for p in ds.validate() if "000_mask.png" in p] == [f"mask file not found: {root / 'cls/ground_truth/crack/000_mask.png'}"]
    with pytest.raises(FileNotFoundError, match="mask file not found: .*000_mask.png"):
        ds[0]
    _write(root / "cls/ground_truth/crack/000_mask.png", size=(10, 10), mode="L")
    with pytest.raises(ValueError, match="mask .*000_mask.png is 10x10"):
        mvtec(root, "cls", "test")[0]
    (root / "cls/train/good/000.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image .*000.png"):
        mvtec(root, "cls", "train")[0]
    with pytest.raises(FileNotFoundError, match="no MVTec AD split folder"):
        mvtec(root, "nope", "train")
    (root / "empty/train/good").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images under .*empty/train .*'empty'"):
        mvtec(root, "empty", "train")


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


def test_folder_and_mpdd_layout(tmp_path):
    root = _mvtec_fixture(tmp_path)
    ds = folder(root / "cls", "test", ImageTransform(32, 24))
    assert ds.labels.tolist() == [1, 0] and ds[0]["class_name"] == "cls"
    assert folder(root / "cls", "train", class_name="x")[0]["class_name"] == "x"


def test_btad_layout(tmp_path):
    _write(tmp_path / "01/train/ok/0000.bmp")
    _write(tmp_path / "01/test/ok/0001.bmp")
    _write(tmp_path / "01/test/ko/0002.bmp")
    _write(tmp_path / "01/ground_truth/ko/0002.png", value=255, mode="L")
    test = btad(tmp_path, "01", "test", ImageTransform(32, 24))
    assert test.labels.tolist() == [1, 0] and test[0]["mask"].min() == 1 and test[1]["mask"].sum() == 0
    assert len(btad(tmp_path, "01", "train")) == 1
    (tmp_path / "01/ground_truth/ko/0002.png").unlink()
    assert btad(tmp_path, "01", "test").validate() == [f"mask file not found: {tmp_path / '01/ground_truth/ko/0002.png'}"]


def test_visa_layout(tmp_path):
    _write(tmp_path / "candle/Data/Images/Normal/000.JPG")
    _write(tmp_path / "candle/Data/Images/Normal/001.JPG")
    _write(tmp_path / "candle/Data/Images/Anomaly/100.JPG")
    _write(tmp_path / "candle/Data/Masks/Anomaly/100.png", value=255, mode="L")
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv/1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,train,normal,candle/Data/Images/Normal/000.JPG,\n"
        "candle,test,normal,candle/Data/Images/Normal/001.JPG,\n"
        "candle,test,anomaly,candle/Data/Images/Anomaly/100.JPG,candle/Data/Masks/Anomaly/100.png\n"
        "pcb1,test,normal,pcb1/x.JPG,\n"
    )
    test = visa(tmp_path, "candle", "test", ImageTransform(32, 24))
    assert test.labels.tolist() == [0, 1] and test[1]["mask"].min() == 1
    assert len(visa(tmp_path, "candle", "train")) == 1
    with pytest.raises(ValueError, match="no train images of class 'pcb1'"):
        visa(tmp_path, "pcb1", "train")
    with pytest.raises(FileNotFoundError, match="1cls.csv"):
        visa(tmp_path / "nope", "candle", "test")


def test_realiad_layout(tmp_path):
    img = tmp_path / "realiad_1024/audiojack"
    _write(img / "S0001/OK/a.jpg")
    _write(img / "S0002/NG/QS/b.jpg")
    _write(img / "S0002/NG/QS/b.png", value=255, mode="L")
    (tmp_path / "realiad_jsons").mkdir()
    (tmp_path / "realiad_jsons/audiojack.json").write_text(json.dumps({
        "train": [{"image_path": "S0001/OK/a.jpg", "mask_path": None, "anomaly_class": "OK"}],
        "test": [
            {"image_path": "S0001/OK/a.jpg", "mask_path": None, "anomaly_class": "OK"},
            {"image_path": "S0002/NG/QS/b.jpg", "mask_path": "S0002/NG/QS/b.png", "anomaly_class": "QS"},
        ],
    }))
    test = realiad(tmp_path, "audiojack", "test", ImageTransform(32, 24))
    assert test.labels.tolist() == [0, 1] and test[1]["mask"].min() == 1 and test[1]["class_name"] == "audiojack"
    with pytest.raises(FileNotFoundError, match="audiojack.json"):
        realiad(tmp_path, "audiojack", "test", json_dir="other")
    with pytest.raises(ValueError, match="split must be"):
        realiad(tmp_path, "audiojack", "val")
