"""The preprocessed-image cache (fastad.data.cache): items bit-identical to decoding, every damaged,
foreign, truncated or stale file rebuilt with a warning, the size cap, concurrent writers, and
training / the command line with and without it."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader
from torch.utils.data._utils.collate import default_collate

from conftest import ROOT, TINY_DINOMALY, write_defect_images
from fastad.data import ImageTransform, folder
from fastad.data.cache import CachedBatch, CachedDataset, batch_source, cached
from fastad.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def _defect_folder(root: Path, size=64) -> Path:
    write_defect_images(root / "train" / "good", root / "test" / "good", root / "test" / "hole",
                        root / "ground_truth" / "hole", n_train=6, n_test=3, mask_suffix="_mask", size=size)
    return root


def _same_items(a, b):
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), (i, k)
            else:
                assert x[k] == y[k], (i, k)


# an aspect-keeping resize with a crop: the cache must store the pixels after both
TRANSFORM = ImageTransform((48, 40), (40, 32), aspect="keep", resample="bicubic")


@pytest.mark.parametrize("split", ["train", "test"])
def test_cached_items_are_bit_identical_to_decoding(tmp_path, split):
    ds = folder(_defect_folder(tmp_path / "d"), split, TRANSFORM)
    c = cached(ds, tmp_path / "cache")
    assert isinstance(c, CachedDataset) and c.header["masks"] == (split == "test")
    _same_items(ds, c)
    _same_items(ds, cached(ds, tmp_path / "cache"))  # reopened


def test_normalise_is_the_uncached_float32_formula():
    # the formula ImageTransform.image had before the cache: numpy float32 / 255, then torch
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 29, 3), dtype=np.uint8))
    t = ImageTransform(33, 31)
    pixels = np.asarray(img.resize((33, 33), Image.BILINEAR).crop((1, 1, 32, 32)))  # torchvision's crop offsets
    x = torch.from_numpy(np.asarray(pixels, dtype=np.float32) / 255.0).permute(2, 0, 1)
    old = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.equal(t.image(img), old)
    batch = t.normalise(torch.from_numpy(np.stack([pixels, pixels])))  # a batch: the same values
    assert torch.equal(batch[1], old)


def test_a_second_open_reads_the_file_without_rewriting_it(tmp_path, capsys):
    ds = folder(_defect_folder(tmp_path / "d"), "test", TRANSFORM)
    first = cached(ds, tmp_path / "cache")
    assert "image cache: wrote" in capsys.readouterr().out
    inode = os.stat(first.path).st_ino
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = cached(folder(tmp_path / "d", "test", TRANSFORM), tmp_path / "cache")
    assert again.path == first.path and os.stat(again.path).st_ino == inode and capsys.readouterr().out == ""
    # another transform is another file
    other = cached(folder(tmp_path / "d", "test", ImageTransform(32, 32)), tmp_path / "cache")
    assert other.path != first.path and len(list((tmp_path / "cache").glob("*.fadcache"))) == 2


def _damage(c: CachedDataset, how: str, other: str | None = None):
    data = bytearray(Path(c.path).read_bytes())
    if how == "truncated":
        data = data[: len(data) - 100]
    elif how == "longer":
        data += b"\0" * 10
    elif how == "garbage":
        data = bytearray(b"not a cache at all")
    elif how == "record":  # the last byte before the checksums (the last mask's) flipped
        data[c._layout.crcs - 1] ^= 0xFF
    elif how == "foreign":
        data = bytearray(Path(other).read_bytes())
    Path(c.path).write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "longer", "garbage", "record", "foreign"])
def test_a_damaged_or_foreign_file_is_rebuilt_with_a_warning(tmp_path, how):
    ds = folder(_defect_folder(tmp_path / "d"), "test", TRANSFORM)
    c = cached(ds, tmp_path / "cache")
    foreign = cached(folder(tmp_path / "d", "train", TRANSFORM), tmp_path / "cache2").path
    _damage(c, how, foreign)
    with pytest.warns(RuntimeWarning, match="rebuilding it"):
        again = cached(ds, tmp_path / "cache")
    assert again.path == c.path and not again.corrupt_records()
    _same_items(ds, again)


def test_a_record_damaged_during_a_run_is_decoded_from_its_file(tmp_path):
    ds = folder(_defect_folder(tmp_path / "d"), "test", TRANSFORM)
    c = cached(ds, tmp_path / "cache")
    c.views()  # mapped: the run has started
    with open(c.path, "r+b") as f:  # the file changes under it (one byte of record 2's image)
        f.seek(c._layout.images + 2 * c._layout.image_bytes + 7)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.warns(RuntimeWarning, match="record 2 .* fails its checksum"):
        item = c[2]
    ref = ds[2]
    assert torch.equal(item["image"], ref["image"]) and torch.equal(item["mask"], ref["mask"])
    assert not os.path.exists(c.path)  # removed: the next run rebuilds it
    _same_items(ds, c)  # the other records are still read, and the bad one decoded


def test_a_changed_image_makes_a_new_file_and_removes_the_stale_one(tmp_path, capsys):
    root = _defect_folder(tmp_path / "d")
    c = cached(folder(root, "train", TRANSFORM), tmp_path / "cache")
    target = root / "train" / "good" / "002.png"
    Image.fromarray(np.full((64, 64, 3), 7, np.uint8)).save(target)
    os.utime(target, ns=(os.stat(target).st_atime_ns, os.stat(target).st_mtime_ns + 10**9))
    ds = folder(root, "train", TRANSFORM)
    new = cached(ds, tmp_path / "cache")
    assert new.path != c.path and not os.path.exists(c.path)
    assert "removed the stale" in capsys.readouterr().out
    _same_items(ds, new)
    assert torch.equal(new[2]["image"], TRANSFORM.image(Image.open(target)))


def test_the_size_cap(tmp_path, capsys):
    root = _defect_folder(tmp_path / "d")
    train, test = folder(root, "train", TRANSFORM), folder(root, "test", TRANSFORM)
    with pytest.warns(RuntimeWarning, match=r"over the cache's cap .* --cache-max-gb"):
        assert cached(train, tmp_path / "cache", max_bytes=1000) is train  # read uncached
    assert not list((tmp_path / "cache").glob("*"))
    a = cached(train, tmp_path / "cache")
    need = os.path.getsize(cached(test, tmp_path / "probe").path)
    cap = os.path.getsize(a.path) + need - 1  # room for either file, not for both
    b = cached(test, tmp_path / "cache", max_bytes=cap)
    assert "removed the least recently used" in capsys.readouterr().out
    assert not os.path.exists(a.path) and os.path.exists(b.path)


def test_an_unwritable_folder_reads_uncached_with_a_warning(tmp_path):
    ds = folder(_defect_folder(tmp_path / "d"), "train", TRANSFORM)
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder should be")
    with pytest.warns(RuntimeWarning, match="cannot write"):
        assert cached(ds, blocker / "cache") is ds


def test_a_missing_image_is_the_datas_error(tmp_path):
    root = _defect_folder(tmp_path / "d")
    ds = folder(root, "train", TRANSFORM)
    os.remove(root / "train" / "good" / "001.png")
    with pytest.raises(FileNotFoundError, match="image file not found: .*001.png"):
        cached(ds, tmp_path / "cache")


WRITER = """
import sys
from fastad.data import ImageTransform, folder
from fastad.data.cache import cached
ds = folder(sys.argv[1], "test", ImageTransform(96, 80))
c = cached(ds, sys.argv[2], workers=1, verbose=False)
print(c.path)
"""


def test_concurrent_writers_leave_one_whole_file(tmp_path):
    root = _defect_folder(tmp_path / "d", size=160)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(tmp_path / "cache")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    paths = {o[0].strip() for o in outs}
    assert len(paths) == 1 and sorted(os.listdir(tmp_path / "cache")) == [Path(paths.pop()).name]  # no temporary left
    ds = folder(root, "test", ImageTransform(96, 80))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # intact: not rebuilt
        c = cached(ds, tmp_path / "cache")
    _same_items(ds, c)


def test_dataloader_workers_map_the_file_themselves(tmp_path):
    ds = folder(_defect_folder(tmp_path / "d"), "test", TRANSFORM)
    c = cached(ds, tmp_path / "cache")
    c.views()
    got = list(DataLoader(c, batch_size=4, num_workers=2))
    want = list(DataLoader(ds, batch_size=4))
    for x, y in zip(got, want):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"]) and x["path"] == y["path"]


def test_gathered_batches_equal_the_collated_items(tmp_path):
    root = _defect_folder(tmp_path / "d")
    train, test = (cached(folder(root, s, TRANSFORM), tmp_path / "cache") for s in ("train", "test"))
    data = ConcatDataset([train, test])  # the unified setting's training set
    gather = batch_source(data, "cpu")
    rows = [9, 0, 5, 11, 7]
    got, want = gather(rows), default_collate([data[j] for j in rows])
    assert isinstance(got, CachedBatch) and got.keys() == want.keys()
    for k in want:
        if isinstance(want[k], torch.Tensor):
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
        else:
            assert got[k] == want[k], k
    assert batch_source(folder(root, "train", TRANSFORM), "cpu") is None  # uncached: the DataLoader


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_resident_batches_on_the_gpu_equal_the_host_ones(tmp_path):
    ds = cached(folder(_defect_folder(tmp_path / "d"), "test", TRANSFORM), tmp_path / "cache")
    resident, host = batch_source(ds, "cuda"), batch_source(ds, "cuda", resident_bytes=0)
    assert resident.resident is not None and host.resident is None
    rows = [3, 1, 4, 1, 5]
    a, b, ref = resident(rows), host(rows), default_collate([ds[j] for j in rows])
    assert a["image"].is_cuda and torch.equal(a["image"].cpu(), ref["image"]) and torch.equal(b["image"].cpu(), ref["image"])
    assert torch.equal(a["mask"].cpu(), ref["mask"])


def test_training_on_the_cache_is_bit_identical(tmp_path):
    from fastad.models import create_model

    root = _defect_folder(tmp_path / "d")
    fits = []
    for use_cache in (False, True):
        torch.manual_seed(0)
        model = create_model("dinomaly", **{**TINY_DINOMALY, "iterations": 4, "warmup_iters": 1, "train_batch_size": 4})
        train = folder(root, "train", model.transform())
        model.fit(cached(train, tmp_path / "cache") if use_cache else train, progress=False)
        fits.append(model)
    plain, fast = fits
    assert plain.loss_history == fast.loss_history and len(plain.loss_history) == 4
    for (k, a), b in zip(plain.state_dict().items(), fast.state_dict().values()):
        assert torch.equal(a, b), k


def _run(args):
    from fastad.cli import main

    assert main(args) == 0


def test_command_line_cache_and_no_cache_give_the_same_results(tmp_path, capsys):
    root = _defect_folder(tmp_path / "d")
    base = ["run", "--data", f"folder:{root}", "--overlays", "0", "--set", "coreset_ratio=0.5"]
    cache = tmp_path / "cache"
    _run([*base, "--out", str(tmp_path / "a"), "--cache", str(cache)])
    assert capsys.readouterr().out.count("image cache: wrote") == 2  # train and test
    files = sorted(os.listdir(cache))
    _run([*base, "--out", str(tmp_path / "b"), "--cache", str(cache)])
    assert "image cache: wrote" not in capsys.readouterr().out and sorted(os.listdir(cache)) == files
    _run([*base, "--out", str(tmp_path / "c"), "--no-cache", "--cache", str(tmp_path / "unused")])
    assert not (tmp_path / "unused").exists()
    rows = [json.loads((tmp_path / o / "results.json").read_text())[0] for o in "abc"]
    metrics = [{k: v for k, v in r.items() if k.startswith(("image_", "pixel_"))} for r in rows]
    assert metrics[0] == metrics[1] == metrics[2]
