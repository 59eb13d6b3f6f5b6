import json
import os
import shutil

import pytest
import torch

import fastad
from fastad.cli import main


def test_cli_run_default(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res[0]["class"] == "synthetic" and res[0]["image_auroc"] > 0.9
    assert "image AUROC" in capsys.readouterr().out


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
