import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through the interpreter; this must precede the first triton import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "bench"))  # bench/baselines.py: the authors'-style loops


def shared(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test with the reason."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not present at {p} (see ../shared/data/README.md)")
    return p


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["triton", "torch"])
def path(request, monkeypatch):
    """Runs a test once through an op's Triton kernels and once through its PyTorch path."""
    from fastad.ops import _triton

    if request.param == "triton" and not _triton.HAS_TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.setattr(_triton, "enabled", request.param == "triton")
    return request.param


def skip_unless_runs(path: str, device: str) -> None:
    """Skip when ``path`` would not really run on ``device`` (Triton on the CPU needs the interpreter)."""
    from fastad.ops import _triton

    if path == "triton" and device == "cpu" and not _triton.INTERPRET:
        pytest.skip("Triton kernels run on CPU tensors only with TRITON_INTERPRET=1")
