"""The user's own data: image-level-only sets, masks for some defect types, list files with mixed image
modes, the ImageFolder layout, --classes and --data-opt for every kind, and the validation pass."""
import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score

from conftest import cli_error
from fastad import create_model
from fastad.cli import main
from fastad.data import ImageTransform, folder, imagefolder, listfile
from fastad.engine import score
from fastad.metrics import compute_metrics

SMALL = ["--model", "padim", "--set", "image_size=64", "--set", "crop_fraction=1", "--overlays", "0"]


def _image(path, rng, defect=False, size=(60, 80), mode="RGB"):
    """A noisy texture (H x W = size), with a bright block where ``defect``; returns the block's mask."""
    h, w = size
    arr = (rng.random((h, w, 3)) * 80 + 60).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    if defect:
        y, x = int(rng.integers(5, h - 20)), int(rng.integers(5, w - 25))
        arr[y : y + 12, x : x + 18] = 250
        mask[y : y + 12, x : x + 18] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr)
    if mode == "L":
        img = img.convert("L")
    elif mode == "RGBA":
        img = img.convert("RGBA")
    elif mode == "I;16":
        img = Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 257)
    elif mode == "P":
        img = img.convert("P")
    img.save(path)
    return mask


def _folder(root, masks_for=("scratch", "dent"), n_train=6, seed=0):
    """An MVTec-layout class: train/good, test/good, test/scratch, test/dent; masks only for ``masks_for``."""
    rng = np.random.default_rng(seed)
    for i in range(n_train):
        _image(root / f"train/good/{i:03d}.png", rng)
    for i in range(3):
        _image(root / f"test/good/{i:03d}.png", rng)
    for defect in ("scratch", "dent"):
        for i in range(3):
            mask = _image(root / f"test/{defect}/{i:03d}.png", rng, defect=True)
            if defect in masks_for:
                (root / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(root / f"ground_truth/{defect}/{i:03d}_mask.png")
    return root


def _fitted(train):
    torch.manual_seed(0)
    return create_model("padim", image_size=64, crop_fraction=1.0).fit(train)


def test_folder_without_ground_truth_gives_image_metrics_only(tmp_path):
    root = _folder(tmp_path / "cells", masks_for=())
    t = ImageTransform(64, 64)
    test = folder(root, "test", t)
    assert test.counts() == {"normal": 3, "anomalous": 6, "anomalous_with_mask": 0}
    assert test[0]["has_mask"] is False and test[0]["mask"].sum() == 0 and test[0]["label"] == 1  # test/dent/000
    res, (scores, _, labels, _, has_mask) = score(_fitted(folder(root, "train", t)), test)
    assert res["image_auroc"] == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-12)
    assert res["image_ap"] == pytest.approx(average_precision_score(labels.numpy(), scores.numpy()), abs=1e-12)
    assert all(math.isnan(res[k]) for k in res if k.startswith("pixel_") and k not in ("pixel_images", "pixel_note"))
    assert res["pixel_images"] == 0 and "n/a" in res["pixel_note"] and res["mad_of"] == "image metrics"
    assert res["mad"] == pytest.approx((res["image_auroc"] + res["image_ap"] + res["image_f1max"]) / 3)
    # the command line: null in results.json, n/a and the reason in results.md
    out = tmp_path / "out"
    assert main(["run", "--data", f"folder:{root}", *SMALL, "--out", str(out)]) == 0
    row = json.loads((out / "results.json").read_text())[0]
    assert row["pixel_auroc"] is None and row["pixel_aupro"] is None and row["image_auroc"] is not None
    table = (out / "results.md").read_text()
    assert "| n/a |" in table and "no anomalous test image has a pixel mask" in table


def test_masks_for_one_of_two_defect_types(tmp_path):
    root = _folder(tmp_path / "part", masks_for=("scratch",))
    t = ImageTransform(64, 64)
    test = folder(root, "test", t)
    assert test.counts() == {"normal": 3, "anomalous": 6, "anomalous_with_mask": 3}
    res, (scores, maps, labels, masks, has_mask) = score(_fitted(folder(root, "train", t)), test)
    assert has_mask.tolist() == [False] * 3 + [True] * 6  # test/dent (no masks), test/good, test/scratch (masks)
    assert res["pixel_images"] == 6
    keep = has_mask
    want = compute_metrics(scores[keep], labels[keep], maps[keep], masks[keep])
    for k in ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro"):
        assert res[k] == want[k]
    assert "over the 6 of 9 test images" in res["pixel_note"] and res["mad_of"] == "image and pixel metrics"
    assert res["image_auroc"] == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-12)


def test_list_file_with_mixed_image_modes(tmp_path):
    rng = np.random.default_rng(1)
    rows = []
    for i, mode in enumerate(["RGB", "L", "RGBA", "I;16", "P", "RGB"]):
        _image(tmp_path / "imgs" / f"n{i}.png", rng, mode=mode)
        rows.append({"path": f"imgs/n{i}.png", "label": "good"})
    for i, mode in enumerate(["L", "I;16", "RGBA"]):
        mask = _image(tmp_path / "imgs" / f"d{i}.png", rng, defect=True, mode=mode)
        row = {"path": f"imgs/d{i}.png", "label": "defect"}
        if i == 0:
            Image.fromarray(mask).save(tmp_path / "imgs" / "d0_mask.png")
            row["mask"] = "imgs/d0_mask.png"
        rows.append(row)
    listing = tmp_path / "cells.csv"
    listing.write_text("path,label,mask\n" + "".join(f"{r['path']},{r['label']},{r.get('mask', '')}\n" for r in rows))
    t = ImageTransform(64, 64)
    train, test = listfile(listing, "train", t), listfile(listing, "test", t)
    assert len(train) + len(test) == 9 and all(s.label == 0 for s in train.samples)
    assert test.counts()["anomalous"] == 3 and test.counts()["anomalous_with_mask"] == 1
    for ds in (train, test):
        for i in range(len(ds)):
            assert ds[i]["image"].shape == (3, 64, 64) and torch.isfinite(ds[i]["image"]).all()
    # a 16-bit image is its 8-bit source scaled by 255 / 65535: the same pixels as the greyscale copy
    grey = Image.open(tmp_path / "imgs" / "n3.png")
    assert grey.mode.startswith("I")
    src8 = np.asarray(Image.fromarray((np.asarray(grey).astype(np.uint32) // 257).astype(np.uint8)).convert("RGB"))
    torch.testing.assert_close(t.image(grey), t.image(Image.fromarray(src8)), rtol=0, atol=0)
    # JSON lists with a split column, and the command line
    js = tmp_path / "cells.json"
    js.write_text(json.dumps([{**r, "split": "train" if r["path"].startswith("imgs/n") and i < 4 else "test"}
                              for i, r in enumerate(rows)]))
    assert [len(listfile(js, s)) for s in ("train", "test")] == [4, 5]
    assert main(["run", "--data", f"list:{listing}", *SMALL, "--out", str(tmp_path / "out")]) == 0
    row = json.loads((tmp_path / "out" / "results.json").read_text())[0]
    assert row["class"] == "cells" and row["n_test"] == len(test) and row["pixel_images"] == len(test) - 2
    with pytest.raises(ValueError, match="line 2: label 'maybe'"):
        bad = tmp_path / "bad.csv"
        bad.write_text("path,label\nimgs/n0.png,maybe\n")
        listfile(bad, "train")


def test_imagefolder_layout_and_its_options(tmp_path, capsys):
    rng = np.random.default_rng(2)
    root = tmp_path / "solar"
    for i in range(10):
        _image(root / "good" / f"{i}.png", rng)
    for d in ("crack", "finger"):
        for i in range(2):
            _image(root / d / f"{i}.png", rng, defect=True)
    train, test = imagefolder(root, "train"), imagefolder(root, "test")
    assert (len(train), test.counts()) == (8, {"normal": 2, "anomalous": 4, "anomalous_with_mask": 0})
    assert not {s.path for s in train.samples} & {s.path for s in test.samples}
    assert len(imagefolder(root, "train", test_good=0.5)) == 5
    out = tmp_path / "out"
    assert main(["run", "--data", f"imagefolder:{root}", "--data-opt", "test_good=0.5", *SMALL, "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())[0]["n_test"] == 9
    assert "--data-opt json_dir is not an option of imagefolder data; its options: good, seed, test_good" in \
        cli_error(capsys, ["run", "--data", f"imagefolder:{root}", "--data-opt", "json_dir=x", *SMALL])


def test_classes_are_honoured_for_folder_and_mtd(tmp_path, capsys):
    root = _folder(tmp_path / "widget")
    assert main(["run", "--data", f"folder:{root}", "--classes", "widget", *SMALL, "--out", str(tmp_path / "o")]) == 0
    assert re.search("--classes gadget not found .*available: widget", cli_error(capsys, ["run", "--data", f"folder:{root}", "--classes", "gadget", *SMALL]))
    rng = np.random.default_rng(3)
    mtd_root = tmp_path / "mtd"
    for i in range(4):
        _image(mtd_root / "MT_Free/Imgs" / f"f{i}.jpg", rng)
    mask = _image(mtd_root / "MT_Crack/Imgs/c0.jpg", rng, defect=True)
    Image.fromarray(mask).save(mtd_root / "MT_Crack/Imgs/c0.png")
    (mtd_root / "mtd_train_filenames.txt").write_text("f0.jpg\nf1.jpg\nf2.jpg\n")
    assert main(["run", "--data", f"mtd:{mtd_root}", "--classes", "mtd", *SMALL, "--out", str(tmp_path / "m")]) == 0
    assert "mtd: train 3 normal, 0 anomalous (0 with pixel masks); test 1 normal, 1 anomalous (1 with pixel masks)" in capsys.readouterr().out
    assert "--classes bottle not found" in cli_error(capsys, ["run", "--data", f"mtd:{mtd_root}", "--classes", "bottle", *SMALL])


def test_realiad_options_from_the_command_line(tmp_path, capsys):
    rng = np.random.default_rng(4)
    img = tmp_path / "imgs256/audiojack"
    items = {"train": [], "test": []}
    for i in range(4):
        _image(img / f"S{i}/OK/a.jpg", rng)
        items["train" if i < 3 else "test"].append({"image_path": f"S{i}/OK/a.jpg", "mask_path": None, "anomaly_class": "OK"})
    for i in range(2):
        mask = _image(img / f"D{i}/NG/QS/b.jpg", rng, defect=True)
        Image.fromarray(mask).save(img / f"D{i}/NG/QS/b.png")
        items["test"].append({"image_path": f"D{i}/NG/QS/b.jpg", "mask_path": f"D{i}/NG/QS/b.png", "anomaly_class": "QS"})
    (tmp_path / "my_jsons").mkdir()
    (tmp_path / "my_jsons/audiojack.json").write_text(json.dumps(items))
    out = tmp_path / "out"
    assert main(["run", "--data", f"realiad:{tmp_path}", "--data-opt", "json_dir=my_jsons", "--data-opt", "image_dir=imgs256",
                 *SMALL, "--out", str(out)]) == 0
    row = json.loads((out / "results.json").read_text())[0]
    assert row["class"] == "audiojack" and row["n_test"] == 3 and row["pixel_images"] == 3
    assert "no realiad classes" in cli_error(capsys, ["run", "--data", f"realiad:{tmp_path}", *SMALL])  # the default realiad_jsons/ is absent


def test_validation_lists_every_problem_before_any_model_work(tmp_path, capsys):
    root = _folder(tmp_path / "broken")
    (root / "train/good/000.png").write_bytes(b"not an image")
    (root / "train/good/001.png").write_bytes(b"")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "ground_truth/scratch/000_mask.png")
    (root / "ground_truth/dent/001_mask.png").write_bytes(b"garbage")
    (root / "ground_truth/dent/002_mask.png").unlink()
    out = tmp_path / "out"
    msg = cli_error(capsys, ["run", "--data", f"folder:{root}", *SMALL, "--out", str(out)])  # one line, exit 2
    assert msg.startswith("fastad: error: 5 problem(s) in the data:") and msg.endswith("or pass --skip-bad-images)")
    for part in ("cannot read image", "train/good/000.png", "001.png is an empty file", "is 10x10 but image",
                 "cannot read mask", "mask file not found: ", "ground_truth/dent/002_mask.png"):
        assert part in msg, part
    assert not (out / "results.json").exists()  # stopped before any model work

    # skipped: the run completes without the five images and records them
    assert main(["run", "--data", f"folder:{root}", *SMALL, "--out", str(out), "--skip-bad-images"]) == 0
    captured = capsys.readouterr()
    assert "warning: broken: skipped 5 bad image(s)" in captured.err
    assert "broken: train 4 normal, 0 anomalous (0 with pixel masks); test 3 normal, 3 anomalous (3 with pixel masks)" in captured.out
    row = json.loads((out / "results.json").read_text())[0]
    assert row["n_train"] == 4 and row["n_test"] == 6
    skipped = row["skipped_images"]
    assert len(skipped) == 5 and sum(s.startswith("train: ") for s in skipped) == 2, skipped
    assert any("scratch/000.png" in s for s in skipped) and any("dent/002" in s for s in skipped)


def test_adpretrain_refuses_anomalies_without_masks(tmp_path):
    from torch.utils.data import ConcatDataset

    root = _folder(tmp_path / "c", masks_for=("scratch",))
    t = ImageTransform(64, 64)
    m = create_model("adpretrain", weights="random", image_size=64, num_references=16, iterations=3, train_batch_size=4)
    with pytest.raises(ValueError, match="needs a pixel mask for every anomalous image; none for .*dent"):
        m.fit(ConcatDataset([folder(root, "train", t), folder(root, "test", t)]))
