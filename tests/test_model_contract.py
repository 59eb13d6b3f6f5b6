"""Every registered model follows the one contract of fastad.models.base: fit on a fastad Dataset,
forward -> AnomalyOutput with maps at the input size, save -> load_checkpoint in a fresh process ->
identical scores, ``fastad run`` on the synthetic data, clear errors for bad input. A new registry
entry without a tiny configuration here fails ``test_every_registered_model_has_a_tiny_configuration``."""
import contextlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import TINY_DINOMALY, cli_error
from fastad import AnomalyModel, AnomalyOutput, create_model, load_checkpoint
from fastad.cli import main
from fastad.data import SyntheticDataset
from fastad.models import MODELS
from fastad.ops import dispatch

# small, fast settings; each keeps the model's own image geometry rules
TINY = {
    "patchcore": dict(image_size=64, crop_fraction=1.0),
    "padim": dict(image_size=64, crop_fraction=1.0),
    "dinomaly": dict(TINY_DINOMALY, train_batch_size=4, iterations=2, warmup_iters=1, map_size=28, p_ramp=2),
    "minimaxad": dict(encoder="efficientnet_lite0", weights="random", image_size=64, train_batch_size=4, iterations=2),
    "rlr": dict(weights="random", image_size=64, depth=1, iterations=2, train_batch_size=2),
    "fod": dict(weights="random", image_size=64, depth=1, iterations=2, train_batch_size=2),
    "adpretrain": dict(weights="random", image_size=64, num_references=16, iterations=2, train_batch_size=4),
    "featurenorm": dict(weights="random", image_size=64, num_references=16, project=False),
}
NAMES = sorted(MODELS)
# FeatureNorm's other scorers keep a memory bank / Gaussians: their save and load are checked too
VARIANTS = {"featurenorm-patchcore": ("featurenorm", {"scorer": "patchcore"}), "featurenorm-padim": ("featurenorm", {"scorer": "padim"})}


@pytest.fixture(autouse=True)
def _torch_paths(monkeypatch):
    # the interpreter would run the Triton kernels (tested on their own): the ops' PyTorch paths here
    monkeypatch.setitem(dispatch.settings, "triton", False)


def _fitted(name):
    torch.manual_seed(0)
    name, extra = VARIANTS.get(name, (name, {}))
    model = create_model(name, **TINY[name], **extra)
    train = SyntheticDataset("train", 6, size=model.image_size)
    if name == "adpretrain":  # pretraining needs labelled images with anomalies
        train = torch.utils.data.ConcatDataset([train, SyntheticDataset("test", 4, size=model.image_size, seed=1)])
    with pytest.warns(UserWarning) if name == "featurenorm" and TINY[name].get("project", True) else contextlib.nullcontext():
        model.fit(train)
    return model


def _images(model, n=3):
    ds = SyntheticDataset("test", n, size=model.image_size)
    return torch.stack([ds[i]["image"] for i in range(n)])


def test_every_registered_model_has_a_tiny_configuration():
    assert sorted(TINY) == NAMES
    for name, cls in MODELS.items():
        assert issubclass(cls, AnomalyModel) and cls.registry_name == name
        assert cls.__module__.split(".")[-1] == name  # one file per model, named after it


@pytest.mark.parametrize("name", NAMES)
def test_config_is_captured_once_and_rebuilds_the_model(name):
    model = create_model(name, **TINY[name])
    config = model.config
    assert json.loads(json.dumps(config)) == config  # plain values
    h, w = model.image_size
    assert model.transform().crop == (h, w)
    rebuilt = create_model(name, **config)
    assert rebuilt.config == config
    assert [k for k, _ in rebuilt.state_dict().items()] == [k for k, _ in model.state_dict().items()]


@pytest.mark.parametrize("name", NAMES + sorted(VARIANTS))
def test_fit_forward_save_and_load_in_a_fresh_process(name, tmp_path):
    model = _fitted(name).eval()
    x = _images(model)
    out = model(x)
    assert isinstance(out, AnomalyOutput)
    scores, maps = out
    assert scores.shape == (3,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert maps.shape == (3, *model.image_size) == (3, *x.shape[-2:]) and maps.dtype == torch.float32
    path = tmp_path / "model.safetensors"
    model.save(path)
    assert not (tmp_path / "model.safetensors.tmp").exists()
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys, torch; from fastad import load_checkpoint; from fastad.ops import dispatch; "
            "dispatch.settings['triton'] = False; m = load_checkpoint(sys.argv[1]).eval(); "
            "s, mp = m(torch.load(sys.argv[2])); torch.save((s, mp), sys.argv[3])")
    subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "x.pt"), str(tmp_path / "out.pt")], check=True,
                   env={**os.environ, "TRITON_INTERPRET": "0"})
    s2, m2 = torch.load(tmp_path / "out.pt")
    assert torch.equal(s2, scores) and torch.equal(m2, maps)  # bit-identical in another process
    # and in this one, through the model's own loader
    base, extra = VARIANTS.get(name, (name, {}))
    again = create_model(base, **TINY[base], **extra).load_checkpoint(path).eval()
    assert torch.equal(again(x).scores, scores)


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_is_a_clear_error(name):
    model = _fitted(name)
    x = _images(model, 2)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(x[:, :1])  # one channel
    with pytest.raises(ValueError, match="NaN or inf"):
        model(torch.where(torch.arange(x.numel()).view_as(x) == 5, float("nan"), x))
    with pytest.raises(TypeError, match="floating"):
        model((x * 100).to(torch.uint8))
    with pytest.raises(ValueError, match="empty"):
        model(x[:0])
    fresh = create_model(name, **TINY[name])
    with pytest.raises(ValueError, match="empty dataset"):
        fresh.fit(torch.utils.data.Subset(SyntheticDataset("train", 2, size=fresh.image_size), []))


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_errors_name_the_file(name, tmp_path):
    model = create_model(name, **TINY[name])
    truncated = tmp_path / "t.safetensors"
    model.save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(ValueError, match="t.safetensors"):
        load_checkpoint(truncated)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_checkpoint(tmp_path / "missing.safetensors")
    other = "padim" if name != "padim" else "patchcore"
    path = tmp_path / "other.safetensors"
    create_model(other, **TINY[other]).save(path)
    with pytest.raises(ValueError, match=rf"holds a \w+ checkpoint \({other}\)"):
        model.load_checkpoint(path)


@pytest.mark.parametrize("name", NAMES)
def test_fastad_run_on_synthetic_data(name, tmp_path):
    sets = [arg for k, v in TINY[name].items() for arg in ("--set", f"{k}={json.dumps(v)}")]
    code = "import sys; from fastad.ops import dispatch; dispatch.settings['triton'] = False; from fastad.cli import main; sys.exit(main(sys.argv[1:]))"
    out = subprocess.run([sys.executable, "-c", code, "run", "--model", name, *sets, "--out", str(tmp_path), "--overlays", "1"],
                         capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert out.returncode == 0, out.stdout + out.stderr
    rows = json.loads((tmp_path / "results.json").read_text())
    assert rows[0]["model"] == name and rows[0]["n_test"] == 32 and rows[0]["image_auroc"] is not None


def _strip_folder(root):
    """A tiny MVTec-layout class of 100 x 60 (W x H) strip images: 4 train, 2 good and 2 defective test."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for rel in ["train/good/0", "train/good/1", "train/good/2", "train/good/3", "test/good/0", "test/good/1",
                "test/scratch/0", "test/scratch/1"]:
        img = (rng.random((60, 100, 3)) * 60 + 100).astype(np.uint8)
        if "scratch" in rel:
            img[20:30, 40:70] = 255
            mask = np.zeros((60, 100), np.uint8)
            mask[20:30, 40:70] = 255
            (root / "ground_truth/scratch").mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(root / f"ground_truth/scratch/{rel[-1]}_mask.png")
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / f"{rel}.png")
    return root


def test_image_size_reaches_the_data_without_a_crop(tmp_path):
    """A non-square resolution, set from the command line, is what the model sees (no crop)."""
    model = create_model("patchcore", image_size=[48, 80], crop_fraction=1.0)
    assert model.resize_size == (48, 80) and model.transform().crop == (48, 80)
    root = _strip_folder(tmp_path / "strips")
    assert main(["run", "--model", "patchcore", "--data", f"folder:{root}", "--set", "image_size=[48,80]", "--set",
                 "crop_fraction=1", "--set", "coreset_ratio=0.5", "--out", str(tmp_path / "out"), "--overlays", "0"]) == 0
    row = json.loads((tmp_path / "out" / "results.json").read_text())[0]
    assert row["image_size"] == row["resize_size"] == [48, 80] and row["n_test"] == 4
    assert row["image_auroc"] == 1.0  # the bright scratch is far from every training patch
    # the recipe's default keeps its crop: 224 seen, 256 resized
    assert create_model("patchcore").resize_size == (256, 256)


def test_python_dash_m_fastad():
    out = subprocess.run([sys.executable, "-m", "fastad", "run", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--model" in out.stdout


def test_unknown_setting_is_one_line(capsys):
    assert re.search("--set for patchcore.*colour", cli_error(capsys, ["run", "--model", "patchcore", "--set", "colour=1"]))


def test_image_size_rules():
    with pytest.raises(ValueError, match="multiples of 14"):
        create_model("dinomaly", **{**TINY["dinomaly"], "image_size": 50})
    with pytest.raises(ValueError, match="crop_fraction"):
        create_model("padim", crop_fraction=1.5)
    # the offline hybrid encoder has a 16-px patch: its default size is a multiple of 16
    assert create_model("dinomaly", encoder="efficientnet_lite0", weights="random", encoder_kwargs={"depth": 10}).image_size == (384, 384)
    rlr = create_model("rlr", **TINY["rlr"])
    with pytest.raises(ValueError, match="image_size"):
        rlr(torch.zeros(1, 3, 96, 96))


def test_format_1_checkpoints_still_load(tmp_path):
    """Files of the previous format (trained models only, class name as 'model', RLR/FOD's
    'input_size', ADPretrain's downstream arguments) load, with a warning for what no longer exists."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    def as_format_1(src, dst, name, config):
        with safe_open(str(src), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = json.loads(f.metadata()["fastad"])
        meta.update(format="fastad-checkpoint-1", model=name, config=config)
        for key in ("class", "fastad"):
            meta.pop(key)
        save_file(tensors, str(dst), metadata={"fastad": json.dumps(meta)})

    torch.manual_seed(0)
    rlr = create_model("rlr", **TINY["rlr"]).fit(SyntheticDataset("train", 4, size=64)).eval()
    rlr.save(tmp_path / "new.safetensors")
    old = {k: v for k, v in rlr.config.items() if k not in ("image_size", "crop_fraction")} | {"input_size": 64}
    as_format_1(tmp_path / "new.safetensors", tmp_path / "rlr1.safetensors", "RLR", old)
    loaded = load_checkpoint(tmp_path / "rlr1.safetensors").eval()
    x = _images(rlr)
    assert loaded.image_size == (64, 64) and loaded.iteration == rlr.iteration
    assert torch.equal(loaded(x).maps, rlr(x).maps)

    adp = create_model("adpretrain", **TINY["adpretrain"])
    adp.save(tmp_path / "adp.safetensors")
    old = dict(adp.config, scorer="featurenorm", project=True, pretrained=None, coreset_ratio=0.1)
    as_format_1(tmp_path / "adp.safetensors", tmp_path / "adp1.safetensors", "ADPretrain", old)
    with pytest.warns(UserWarning, match="scorer"):
        assert type(load_checkpoint(tmp_path / "adp1.safetensors")).__name__ == "ADPretrain"
    fn = create_model("featurenorm", **{**TINY["featurenorm"], "project": True, "pretrained": str(tmp_path / "adp1.safetensors")})
    assert torch.equal(fn.projectors[0].reference, adp.projectors[0].reference)
