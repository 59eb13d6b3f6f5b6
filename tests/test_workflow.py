"""The benchmark user's workflow (#34): sweeps over models and datasets in one command, the report
(plots and a self-contained report.html), and ``fastad predict`` with the threshold a run stores."""
import base64
import csv
import html.parser
import io
import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_DINOMALY, cli_error, write_defect_images
from fastad.cli import main

SMALL = ["--set", "image_size=64", "--set", "crop_fraction=1", "--no-cache"]


@pytest.fixture(scope="module")
def strips(tmp_path_factory):
    """A one-class folder dataset (MVTec layout): 8 train, 4 + 4 test images with masks."""
    root = tmp_path_factory.mktemp("folder") / "strips"
    write_defect_images(root / "train" / "good", root / "test" / "good", root / "test" / "hole",
                        root / "ground_truth" / "hole", mask_suffix="_mask")
    return root


def _rows(out) -> list[dict]:
    return json.loads((Path(out) / "results.json").read_text())


def _metrics(row: dict) -> dict:
    return {k: v for k, v in row.items() if k.startswith(("image_", "pixel_")) or k in ("mad", "n_test", "class")}


def _decoded_pngs(folder: Path) -> list[Path]:
    pngs = sorted(folder.glob("*.png"))
    for p in pngs:
        with Image.open(p) as im:
            im.load()
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100, p
    return pngs


@pytest.fixture(scope="module")
def sweep(strips, tmp_path_factory):
    """A 2-model x 2-dataset sweep with --report, and the four separate runs it must equal."""
    base = tmp_path_factory.mktemp("sweep")
    data = ["synthetic", f"folder:{strips}"]
    argv = ["run", "--model", "patchcore,padim", *(a for d in data for a in ("--data", d)), *SMALL,
            "--out", str(base / "sweep"), "--report", "--overlays", "2"]
    assert main(argv) == 0
    separate = {}
    for model in ("patchcore", "padim"):
        for d in data:
            out = base / f"{model}-{d.partition(':')[0]}"
            assert main(["run", "--model", model, "--data", d, *SMALL, "--out", str(out), "--overlays", "0"]) == 0
            separate[(model, d.partition(":")[0])] = _rows(out)
    return base / "sweep", separate


def test_a_sweep_gives_the_separate_runs_metrics_and_one_table_per_dataset(sweep):
    out, separate = sweep
    rows = _rows(out)
    assert [(r["dataset"], r["model"], r["class"]) for r in rows] == [
        ("synthetic", "patchcore", "synthetic"), ("synthetic", "padim", "synthetic"),
        ("folder", "patchcore", "strips"), ("folder", "padim", "strips")]
    for r in rows:
        (alone,) = separate[(r["model"], r["dataset"])]
        assert _metrics(r) == _metrics(alone), (r["model"], r["dataset"])
    text = (out / "results.md").read_text()
    assert text.startswith("# fastad sweep: patchcore, padim on synthetic, folder:")
    for dataset in ("synthetic", "folder"):
        section = text.split(f"## {dataset}\n")[1]
        head = section.split("\n")[1]
        assert head == ("| class | patchcore I-AUROC | patchcore P-AUROC | patchcore mAD | padim I-AUROC | "
                        "padim P-AUROC | padim mAD |")
        assert "| model | fit s | test img/s |" in section and f"![{dataset}](plots/{dataset}.png)" in section
    # the summary cells are the rows' metrics, then each (model, dataset)'s own table follows
    cell = f"| strips | {100 * rows[2]['image_auroc']:.2f} | {100 * rows[2]['pixel_auroc']:.2f} | {100 * rows[2]['mad']:.2f} |"
    assert cell in text
    assert text.index("## fastad patchcore on synthetic (separate)") > text.index("## folder\n")


def test_the_report_plots_come_from_the_metrics_scores(sweep):
    out, _ = sweep
    rows = _rows(out)
    pngs = _decoded_pngs(out / "plots")
    assert [p.name for p in pngs] == sorted(["synthetic.png", "folder.png", *(f"{r['model']}-{r['dataset']}-{r['class']}.png"
                                                                              for r in rows)])
    for r in rows:
        data = json.loads((out / "plots" / f"{r['model']}-{r['dataset']}-{r['class']}.json").read_text())
        # the ROC drawn is the one the image AUROC integrates; the histogram holds every test image
        auc = float(np.trapezoid(data["tpr"], data["fpr"]))
        assert math.isclose(auc, r["image_auroc"], rel_tol=0, abs_tol=1e-12)
        n_anomalous = round(r["n_test"] / 2)  # the synthetic and the folder test sets are half anomalous
        assert (sum(data["normal"]), sum(data["anomalous"])) == (r["n_test"] - n_anomalous, n_anomalous)
        assert data["threshold"] == r["image_threshold"] and data["edges"][0] <= r["image_threshold"] <= data["edges"][-1]
    overlays = [p for r in rows for p in r["overlays"]]
    assert len(overlays) == 8 and all((out / p).is_file() for p in overlays)


class _Images(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources, self.external = [], []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name == "src" and tag == "img":
                self.sources.append(value)
            elif name in ("src", "href") or (tag == "link"):
                self.external.append((tag, name, value))


def _browser() -> str | None:
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome", "chrome") if shutil.which(b)), None)


def test_report_html_embeds_every_picture_and_fetches_nothing(sweep, tmp_path):
    out, _ = sweep
    page = (out / "report.html").read_text()
    parser = _Images()
    parser.feed(page)
    rows = _rows(out)
    # 2 dataset plots, 4 job plots, 8 overlays: every one embedded, each the file's own bytes
    assert len(parser.sources) == 2 + 4 + 8 and not parser.external
    files = [out / "plots" / f"{d}.png" for d in ("synthetic", "folder")]
    files += [q for r in rows for q in [out / "plots" / f"{r['model']}-{r['dataset']}-{r['class']}.png",
                                        *(out / p for p in r["overlays"])]]
    embedded = sorted(base64.b64decode(s.split(",", 1)[1]) for s in parser.sources)
    assert all(s.startswith("data:image/png;base64,") for s in parser.sources)
    assert embedded == sorted(f.read_bytes() for f in files)
    assert "://" not in page.replace("data:image/png;base64,", "") and "<script" not in page
    browser = _browser()
    if browser is None:
        pytest.skip("no headless Chromium installed: report.html not rendered (CI installs chromium when it can)")
    shot = tmp_path / "shot.png"
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=1200,1600", f"--screenshot={shot}", (out / "report.html").as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert pixels.shape[0] >= 1000 and len(colours) > 50  # text, tables and plots drawn, not a blank page


def test_a_sharded_sweep_merges_to_the_serial_sweep(sweep, strips, tmp_path):
    out, _ = sweep
    sharded = tmp_path / "sharded"
    argv = ["run", "--model", "patchcore,padim", "--data", "synthetic", "--data", f"folder:{strips}", *SMALL,
            "--out", str(sharded), "--overlays", "0"]
    assert main([*argv, "--shard", "0/2"]) == 0 and main([*argv, "--shard", "1/2"]) == 0
    assert sorted(p.name for p in (sharded / "jobs").iterdir()) == sorted(
        f"{m}-{d}-{c}.json" for m in ("patchcore", "padim") for d, c in (("synthetic", "synthetic"), ("folder", "strips")))
    assert main(["merge", str(sharded)]) == 0
    assert [_metrics(r) for r in _rows(sharded)] == [_metrics(r) for r in _rows(out)]
    merged, serial = (sharded / "results.md").read_text(), (out / "results.md").read_text()
    assert merged.split("\n")[0] == serial.split("\n")[0]
    assert merged.count("| **mean** |") == serial.count("| **mean** |") and "## folder" in merged


def test_sweep_arguments(strips, tmp_path, capsys):
    assert "unknown model 'nope'" in cli_error(capsys, ["run", "--model", "patchcore,nope"])
    assert "dinomaly is not one of the models run" in cli_error(capsys, ["run", "--set", "dinomaly.iterations=3"])
    assert "several data specs are named synthetic" in cli_error(capsys, ["run", "--data", "synthetic", "--data", "synthetic"])
    # MODEL.KEY=VALUE reaches that model only (padim has no coreset)
    out = tmp_path / "o"
    assert main(["run", "--model", "patchcore,padim", *SMALL, "--set", "patchcore.coreset_ratio=0.5", "--out", str(out),
                 "--overlays", "0"]) == 0
    rows = _rows(out)
    assert rows[0]["set_args"]["coreset_ratio"] == 0.5 and "coreset_ratio" not in rows[1]["set_args"]


# -- fastad predict ----------------------------------------------------------------------------------------------
def _fitted(tmp_path, strips, model: str, extra: list[str]) -> Path:
    ckpt = tmp_path / "ckpt"
    assert main(["run", "--model", model, "--data", f"folder:{strips}", *extra, "--no-cache", "--overlays", "0",
                 "--checkpoint-dir", str(ckpt)]) == 0
    return ckpt / f"{model}-strips.safetensors"


def _inputs(strips, tmp_path) -> Path:
    folder = tmp_path / "new"
    (folder / "sub").mkdir(parents=True)
    for i, p in enumerate(sorted((strips / "test").rglob("*.png"))):
        shutil.copy(p, (folder / "sub" if i % 2 else folder) / f"{p.parent.name}-{p.name}")
    return folder


def _predictions(out) -> list[dict]:
    with open(Path(out) / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("model", ["patchcore", "dinomaly"])
def test_predict_scores_as_the_model_and_labels_at_the_stored_threshold(model, strips, tmp_path, monkeypatch, capsys):
    from fastad.data import AnomalyDataset, Sample
    from fastad.metrics import compute_metrics
    from fastad.metrics.calibration import normalise
    from fastad.models import load_checkpoint
    from fastad.ops import dispatch

    monkeypatch.setitem(dispatch.settings, "triton", False)  # the ops' PyTorch paths (no interpreter)
    extra = ["--set", "image_size=64", "--set", "crop_fraction=1"] if model == "patchcore" else \
        [a for k, v in TINY_DINOMALY.items() for a in ("--set", f"{k}={json.dumps(v)}")] + \
        ["--set", "iterations=2", "--set", "warmup_iters=1", "--set", "train_batch_size=4"]
    path = _fitted(tmp_path, strips, model, extra)
    saved = load_checkpoint(path)
    cal = saved.calibration
    assert cal["protocol"] == "fastad" and cal["n_images"] == 8 and cal["map_min"] <= cal["map_max"]
    folder = _inputs(strips, tmp_path)
    out = tmp_path / "pred"
    assert main(["predict", str(path), str(folder), "--out", str(out), "--overlays", "3"]) == 0
    rows = _predictions(out)
    paths = [r["path"] for r in rows]
    assert sorted(paths) == sorted(str(p) for p in folder.rglob("*.png"))
    # the scores are model(x) of the same images
    images = torch.stack([AnomalyDataset([Sample(p, 0, None, "x")], saved.transform())[0]["image"] for p in paths])
    with torch.no_grad():
        scores, maps = saved(images)
    assert [float(r["score"]) for r in rows] == scores.tolist()
    threshold = cal["image_threshold"]
    assert [r["label"] for r in rows] == ["anomalous" if s >= threshold else "normal" for s in scores.tolist()]
    expected = normalise(scores.double(), threshold, cal["image_min"], cal["image_max"])
    assert [float(r["normalised_score"]) for r in rows] == pytest.approx(expected.tolist(), abs=5e-7)
    # the stored threshold is the F1-optimal one of the test set: labels there give the image F1-max
    labels = torch.tensor(["hole" in p for p in paths])
    f1 = compute_metrics(scores, labels)["image_f1max"]
    predicted = scores.double() >= threshold
    tp = int((predicted & labels).sum())
    assert math.isclose(2 * tp / (int(predicted.sum()) + int(labels.sum())), f1, abs_tol=1e-12)
    # maps: raw float32 .npy equal to the model's maps; 16-bit PNGs of the normalised maps
    for i, r in enumerate(rows):
        png, npy = r["maps"].split()
        assert torch.equal(torch.from_numpy(np.load(out / npy)), maps[i].float())
        with Image.open(out / png) as im:
            assert im.mode.startswith("I;16") or im.mode == "I"
            stored = np.asarray(im).astype(np.float64) / 65535
        pt = cal["pixel_threshold"]
        want = normalise(maps[i].double(), pt, cal["map_min"], cal["map_max"]).numpy()
        assert np.abs(stored - want).max() <= 0.5 / 65535 + 1e-12
    assert len(_decoded_pngs(out / "overlays")) == 3
    # --threshold overrides the stored one
    out2 = tmp_path / "pred2"
    median = float(scores.median())
    assert main(["predict", str(path), str(folder), "--out", str(out2), "--threshold", str(median), "--maps", "none",
                 "--overlays", "0"]) == 0
    assert [r["label"] for r in _predictions(out2)] == ["anomalous" if s >= median else "normal" for s in scores.tolist()]
    assert not (out2 / "maps").exists()


def test_predict_lists_bad_inputs_and_works_without_a_stored_threshold(strips, tmp_path, capsys, monkeypatch):
    from fastad.models import create_model
    from fastad.data import SyntheticDataset

    folder = _inputs(strips, tmp_path)
    (folder / "broken.png").write_bytes(b"not a png")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{folder / 'good-000.png'}\n{tmp_path / 'missing.png'}\n")
    model = create_model("patchcore", image_size=64, crop_fraction=1.0).fit(SyntheticDataset("train", 4, size=64))
    model.save(tmp_path / "raw.safetensors")  # saved by code, never evaluated: no threshold
    msg = cli_error(capsys, ["predict", str(tmp_path / "raw.safetensors"), str(folder), str(listing),
                             str(tmp_path / "*.nothing"), "--out", str(tmp_path / "p")])
    assert "3 input problem(s)" in msg and "broken.png" in msg and "missing.png" in msg and "*.nothing" in msg
    assert not (tmp_path / "p" / "predictions.csv").exists()
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "raw.safetensors"), str(folder), str(listing), "--out", str(tmp_path / "p"),
                 "--skip-bad-images", "--overlays", "0"]) == 0
    captured = capsys.readouterr()
    assert "holds no stored threshold" in captured.out and "give --threshold" in captured.out
    assert "skipped 2 input(s)" in captured.err
    rows = _predictions(tmp_path / "p")
    assert len(rows) == 8 and all(r["label"] == "" and r["normalised_score"] == "" and float(r["score"]) > 0 for r in rows)
    # --precision reaches the loaded model (its encoder under bf16 autocast)
    import fastad.models

    seen = {}
    real = fastad.models.load_checkpoint
    monkeypatch.setattr(fastad.models, "load_checkpoint", lambda *a, **kw: seen.update(kw) or real(*a, **kw))
    assert main(["predict", str(tmp_path / "raw.safetensors"), str(folder / "good-000.png"), "--out", str(tmp_path / "b"),
                 "--precision", "bf16", "--overlays", "0"]) == 0
    assert seen["precision"] == "bf16" and len(_predictions(tmp_path / "b")) == 1
    # a truncated checkpoint is one line
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "raw.safetensors").read_bytes()[:100])
    assert "truncated or corrupt" in cli_error(capsys, ["predict", str(tmp_path / "cut.safetensors"), str(folder),
                                                        "--out", str(tmp_path / "q")])


def test_a_unified_run_stores_one_calibration_of_all_classes(tmp_path):
    from test_cli_and_build import _two_class_mvtec

    from fastad.metrics.calibration import calibrate, normalise
    from fastad.models import load_checkpoint

    root = _two_class_mvtec(tmp_path / "data")
    ckpt = tmp_path / "ckpt"
    assert main(["run", "--data", f"mvtec:{root}", "--setting", "unified", "--coreset-ratio", "1.0", "--no-cache",
                 "--checkpoint-dir", str(ckpt), "--out", str(tmp_path / "o"), "--overlays", "0"]) == 0
    model = load_checkpoint(ckpt / "patchcore-unified.safetensors")
    assert model.calibration["n_images"] == 4 and "all classes" in model.calibration["source"]
    rows = _rows(tmp_path / "o")
    assert {r["class"] for r in rows} == {"aa", "bb"}
    # calibrate() itself: the F1-optimal threshold and the statistics
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    cal = calibrate(scores, labels)
    assert cal["image_threshold"] == 0.35 and (cal["image_min"], cal["image_max"]) == (0.1, 0.8)
    assert cal["pixel_threshold"] is None and cal["map_min"] is None
    with pytest.raises(ValueError, match="finite"):
        calibrate(torch.tensor([float("nan")]), torch.tensor([1]))
    # anomalib's normalisation: the threshold at 0.5, the span of the statistics over 1, clipped
    x = torch.tensor([0.1, 0.35, 0.6, 2.0], dtype=torch.float64)
    assert normalise(x, 0.35, 0.1, 0.8).tolist() == pytest.approx([0.5 - 0.25 / 0.7, 0.5, 0.5 + 0.25 / 0.7, 1.0], abs=1e-15)
    assert normalise(x, 0.35, 0.5, 0.5).tolist() == [0.0, 0.5, 1.0, 1.0]  # no spread: which side of the threshold
    assert normalise(x.float(), 0.35, 0.1, 0.8).dtype == torch.float32
    with pytest.raises(ValueError, match="hi >= lo"):
        normalise(x, 0.35, 1.0, 0.0)
