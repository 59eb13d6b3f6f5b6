import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through the interpreter; this must precede the first triton import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the fixed dispatch rule: every test runs the kernels it names whatever the load (a measured choice
# depends on timing); tests/test_dispatch.py turns measuring on, with its cache in a file of this run
os.environ["FASTAD_AUTOTUNE"] = "0"
os.environ["FASTAD_AUTOTUNE_CACHE"] = os.path.join(tempfile.mkdtemp(prefix="fastad-autotune-"), "autotune.json")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "bench"))  # bench/baselines.py: the authors'-style loops


# the small ViT and Dinomaly architecture the model tests build (random weights); tests add their training settings
TINY_VIT = {"depth": 4, "embed_dim": 48, "num_heads": 3}
TINY_DINOMALY = dict(encoder="dinov2reg_vit_small_14", weights="random", encoder_layers=[0, 1, 2, 3],
                     groups=[[0, 1], [2, 3]], decoder_depth=4, encoder_kwargs=TINY_VIT, image_size=56)


@pytest.fixture(autouse=True)
def _own_image_cache(tmp_path_factory, monkeypatch):
    """Each test its own preprocessed-image cache folder (never the user's; no test sees another's files)."""
    monkeypatch.setenv("FASTAD_CACHE_DIR", str(tmp_path_factory.mktemp("fastad-cache")))


def shared(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test with the reason."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not present at {p} (see ../shared/data/README.md)")
    return p


def write_defect_images(train, test_good, bad, masks, n_train=8, n_test=4, mask_suffix="", size=64):
    """A tiny seeded defect set on disk: ``n_train`` normal images in ``train``; ``n_test`` normal
    images in ``test_good`` and as many anomalous ones in ``bad`` (a red 14-px square on the same
    noisy gradient texture), each with its 0/255 mask ``masks/<name><mask_suffix>.png``."""
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(0)
    for d in (train, test_good, bad, masks):
        Path(d).mkdir(parents=True, exist_ok=True)

    def texture():
        base = np.tile(np.linspace(60, 180, size, dtype=np.float64), (size, 1))
        return np.clip(base[..., None] + g.normal(0, 8, (size, size, 3)), 0, 255)

    for i in range(n_train):
        Image.fromarray(texture().astype(np.uint8)).save(Path(train) / f"{i:03d}.png")
    for i in range(n_test):
        Image.fromarray(texture().astype(np.uint8)).save(Path(test_good) / f"{i:03d}.png")
        img, mask = texture(), np.zeros((size, size), np.uint8)
        y, x = g.integers(4, size - 20, 2)
        img[y : y + 14, x : x + 14] = [250, 30, 30]
        mask[y : y + 14, x : x + 14] = 255
        Image.fromarray(img.astype(np.uint8)).save(Path(bad) / f"{i:03d}.png")
        Image.fromarray(mask).save(Path(masks) / f"{i:03d}{mask_suffix}.png")


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["triton", "torch"])
def path(request, monkeypatch):
    """Runs a test once through an op's Triton kernels and once through its PyTorch path."""
    from fastad.ops import dispatch

    if request.param == "triton" and not dispatch.HAS_TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.setitem(dispatch.settings, "triton", request.param == "triton")
    return request.param


def assert_close_to_oracle(got: torch.Tensor, oracle: torch.Tensor, baseline: torch.Tensor, *, scale: float | None = None,
                           factor: float = 2.0, ulps: float = 8.0, what: str = "") -> None:
    """The flash-attention test rule, instead of a constant tolerance tuned on one CPU: a kernel's
    largest error against a float64 ``oracle`` may be at most ``factor`` times the largest error of
    the same computation done by PyTorch in the kernel's own precision (``baseline``, e.g. the
    reference in float32), plus ``ulps`` roundings of the problem's magnitude ``scale`` (default: the
    oracle's largest value) in ``got``'s dtype: the floor for results that cancel to ~0 (a softmax
    over one key has zero q/k gradients, which a fused backward reaches only up to rounding).
    Whatever SIMD/BLAS path a machine takes moves the baseline's error along with the kernel's."""
    assert got.shape == oracle.shape == baseline.shape, (what, got.shape, oracle.shape, baseline.shape)
    o = oracle.detach().double()
    err = (got.detach().double() - o).abs().max().item()
    base = (baseline.detach().double() - o).abs().max().item()
    magnitude = o.abs().max().item() if scale is None else scale
    floor = ulps * torch.finfo(got.dtype).eps * max(magnitude, torch.finfo(got.dtype).tiny)
    if os.environ.get("FASTAD_TOL_LOG"):  # to study the margins: FASTAD_TOL_LOG=file pytest ...
        with open(os.environ["FASTAD_TOL_LOG"], "a") as f:
            f.write(f"{err / (factor * base + floor):.3f} {what} {got.dtype} {err:.3e} {base:.3e} {magnitude:.3e} "
                    f"{os.environ.get('PYTEST_CURRENT_TEST')}\n")
    assert err <= factor * base + floor, f"{what}: error {err:.3e} > {factor} x PyTorch's {base:.3e} + {floor:.3e}"


def skip_unless_runs(path: str, device: str) -> None:
    """Skip when ``path`` would not really run on ``device`` (Triton on the CPU needs the interpreter)."""
    from fastad.ops import dispatch

    if path == "triton" and device == "cpu" and not dispatch.TRITON_INTERPRET:
        pytest.skip("Triton kernels run on CPU tensors only with TRITON_INTERPRET=1")


def cli_error(capsys, argv: list[str]) -> str:
    """Run ``fastad`` in-process on ``argv``: it must fail with exit status 2 and exactly one line
    ``fastad: error: ...`` on stderr (no traceback), returned."""
    from fastad.cli import main

    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fastad: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (rc, err)
    return lines[0]
