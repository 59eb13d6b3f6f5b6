"""Inference throughput of Dinomaly and MiniMaxAD at batch 16 (images/s), fastad vs the authors' way.

    pytest bench/test_recon_bench.py -s --benchmark-columns=min,mean,rounds
    FASTAD_BENCH_DEVICE=cuda pytest bench/test_recon_bench.py -s

Paper architectures with random weights (throughput does not depend on the values): Dinomaly ViT-B/14
with registers at 392 px, MiniMaxAD UniRepLKNet-N at 256 px. "fastad" is the model as shipped
(linear attention through the fused op; on a CUDA device the Triton kernel); "authors" is the same
model with the authors' computations: LinearAttention2's einsums, and their map pipeline
(per-level F.cosine_similarity, interpolation, a 5x5 Gaussian conv, top-1% mean). The image
throughput is batch 16 / min time, image scores and maps included; the ratio table (authors / fastad)
is printed at the end. fastad's rows also run at precision='bf16' and compiled (compile=True; on the
CPU only with FASTAD_BENCH_COMPILE=1: compiling these networks there takes minutes).
"""
import os

import pytest
import torch

from fastad.models import Dinomaly, MiniMaxAD
from fastad.ops import dispatch

DEVICE = os.environ.get("FASTAD_BENCH_DEVICE", "cpu")
BATCH = 16
_times: dict = {}


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


NAMES = ["Dinomaly ViT-B/14 392px", "MiniMaxAD UniRepLKNet-N 256px"]
IMPLS = ["fastad", "authors", "fastad bf16", "fastad compiled", "fastad bf16 compiled"]
# FASTAD_BENCH_COMPILE=0 leaves them out on CUDA too (gpu_check.sh --quick)
COMPILE = os.environ.get("FASTAD_BENCH_COMPILE", "1" if DEVICE == "cuda" else "0") == "1"
_models: dict = {}


def _model(name, impl):
    precision = "bf16" if "bf16" in impl else "fp32"
    key = (name, precision, "compiled" in impl)
    if key not in _models:
        torch.manual_seed(0)
        cls = Dinomaly if name.startswith("Dinomaly") else MiniMaxAD
        _models[key] = cls(weights="random", precision=precision, compile="compiled" in impl).to(DEVICE).eval()
    return _models[key]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", NAMES)
def test_inference_throughput(benchmark, monkeypatch, name, impl):
    if "compiled" in impl and not COMPILE:
        pytest.skip("compiled rows: FASTAD_BENCH_COMPILE=1, the default on CUDA (minutes of compiling)")
    model = _model(name, impl)
    size = 392 if name.startswith("Dinomaly") else 256
    x = torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    if impl == "authors":
        monkeypatch.setitem(dispatch.settings, "triton", False)  # the ops' PyTorch path: the authors' einsums

    def run():
        with torch.inference_mode():
            out = model(x)
        _sync()
        return out

    rounds = 3 if DEVICE == "cuda" else 1
    scores, maps = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    assert scores.shape == (BATCH,) and torch.isfinite(maps).all()
    benchmark.extra_info.update(device=DEVICE, threads=torch.get_num_threads(), images_per_s=BATCH / benchmark.stats.stats.min)
    _times[(name, impl)] = benchmark.stats.stats.min


def teardown_module(module):
    if not _times:
        return
    print(f"\n\ninference throughput (scores and maps), batch {BATCH}, device {DEVICE}")
    print("| model | way | img/s | vs the authors' way |")
    print("|---|---|---|---|")
    for name in dict.fromkeys(k[0] for k in _times):
        a = _times.get((name, "authors"))
        for impl in IMPLS:
            t = _times.get((name, impl))
            if t:
                print(f"| {name} | {impl} | {BATCH / t:.1f} | {f'{a / t:.2f}x' if a else '-'} |")
