import json
import os
import shutil

import pytest
import torch

import fastad
from conftest import cli_error
from fastad.cli import main


def test_cli_run_default(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res[0]["class"] == "synthetic" and res[0]["image_auroc"] > 0.9
    out = capsys.readouterr().out
    assert "image AUROC" in out
    # --device auto (the default): the first line names the device it chose and the kernels that run there
    first = out.splitlines()[0]
    if torch.cuda.is_available():
        assert first.startswith("device cuda:0 (") and "extension (CUDA)" in first and "PyTorch" in first
    else:
        assert first.startswith("device cpu: ") and "PyTorch" in first
        assert ("extension (C++)" in first) == fastad.ops.dispatch.HAS_EXTENSION


def test_device_auto_follows_what_torch_sees(monkeypatch):
    from fastad.distributed import resolve_device

    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_auto_runs_on_the_gpu(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("device cuda:0 (")


def test_extension_is_built():
    from fastad import _C

    assert hasattr(torch.ops.fastad, "kcenter_greedy") and hasattr(torch.ops.fastad, "nearest_reference")
    # CI sets FASTAD_EXPECT_CUDA=1: torch is a CUDA build and nvcc is there, so the CUDA
    # sources must have been compiled into fastad._C even without a GPU.
    if os.environ.get("FASTAD_EXPECT_CUDA") == "1":
        assert torch.version.cuda and shutil.which("nvcc")
        assert _C.cuda_compiled, "fastad._C was built without its CUDA kernels"


def test_public_api():
    assert {"PatchCore", "PaDiM", "create_model", "ops"} <= set(fastad.__all__)


def _two_class_mvtec(root):
    from PIL import Image

    g = torch.Generator().manual_seed(0)

    def write(path, mode="RGB", value=None):
        path.parent.mkdir(parents=True, exist_ok=True)
        shape = (48, 48, 3) if mode == "RGB" else (48, 48)
        arr = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8) if value is None else torch.full(shape, value, dtype=torch.uint8)
        Image.fromarray(arr.numpy()).save(path)

    for cls in ("aa", "bb"):
        for i in range(2):
            write(root / cls / f"train/good/{i}.png")
        write(root / cls / "test/good/0.png")
        write(root / cls / "test/dent/0.png")
        write(root / cls / "ground_truth/dent/0_mask.png", mode="L", value=255)
    return root


@pytest.mark.parametrize("setting", ["separate", "unified"])
def test_cli_results_table(tmp_path, setting):
    root = _two_class_mvtec(tmp_path / "data")
    out = tmp_path / "out"
    assert main(["run", "--data", f"mvtec:{root}", "--setting", setting, "--coreset-ratio", "1.0", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["class"] for r in rows] == ["aa", "bb"] and all(r["setting"] == setting for r in rows)
    table = (out / "results.md").read_text()
    assert "| aa |" in table and "| bb |" in table and "| **mean** |" in table and "AUPRO" in table
    pngs = sorted(p.name for p in (out / "overlays").iterdir())
    assert pngs == [f"{c}_{k}.png" for c in ("aa", "bb") for k in ("0_anomalous", "1_normal")]
    if setting == "unified":  # one fit shared by both classes
        assert rows[0]["fit_s"] == rows[1]["fit_s"]


def test_cli_bad_data(tmp_path, capsys):
    assert "unknown data kind 'nope'" in cli_error(capsys, ["run", "--data", "nope:/x"])
    assert "is not a folder" in cli_error(capsys, ["run", "--data", f"mvtec:{tmp_path / 'missing'}"])
    assert "no mvtec classes" in cli_error(capsys, ["run", "--data", f"mvtec:{tmp_path}"])


def test_cli_bench_runs_a_suite():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "fastad.cli", "bench", "-k", "test_quantile and 1048576"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "0"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 passed" in out.stdout and "quantile 0.9999, 1M: fastad" in out.stdout  # fastad and two baselines


def test_a_checkpoint_from_before_an_argument_existed_is_reused(tmp_path, capsys):
    """A checkpoint written before an argument was added (here PatchCore's ``bank``) still matches a
    run that leaves the new argument at its default; another value of it is refused."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    argv = ["run", "--set", "image_size=64", "--set", "crop_fraction=1.0", "--overlays", "0",
            "--checkpoint-dir", str(tmp_path)]
    assert main(argv) == 0
    path = tmp_path / "patchcore-synthetic.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["fastad"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del meta["config"]["bank"]  # as an older fastad wrote it
    save_file(tensors, str(path), metadata={"fastad": json.dumps(meta)})
    capsys.readouterr()
    assert main(argv) == 0
    assert "loaded the fitted model" in capsys.readouterr().out
    assert "bank differ" in cli_error(capsys, [*argv, "--set", "bank=sharded"])
