"""Inference throughput of Dinomaly and MiniMaxAD at batch 16 (images/s), fastad vs the authors' way.

    pytest bench/test_recon_bench.py -s --benchmark-columns=min,mean,rounds
    FASTAD_BENCH_DEVICE=cuda pytest bench/test_recon_bench.py -s

Paper architectures with random weights (throughput does not depend on the values): Dinomaly ViT-B/14
with registers at 392 px, MiniMaxAD UniRepLKNet-N at 256 px. "fastad" is the model as shipped
(linear attention through the fused op; on a CUDA device the Triton kernel); "authors" is the same
model with the authors' computations: LinearAttention2's einsums, and their map pipeline
(per-level F.cosine_similarity, interpolation, a 5x5 Gaussian conv, top-1% mean). The image
throughput is batch 16 / min time; the ratio table (authors / fastad) is printed at the end.
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


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {
        "Dinomaly ViT-B/14 392px": Dinomaly(weights="random").to(DEVICE).eval(),
        "MiniMaxAD UniRepLKNet-N 256px": MiniMaxAD(weights="random").to(DEVICE).eval(),
    }


@pytest.mark.parametrize("impl", ["fastad", "authors"])
@pytest.mark.parametrize("name", ["Dinomaly ViT-B/14 392px", "MiniMaxAD UniRepLKNet-N 256px"])
def test_inference_throughput(benchmark, models, monkeypatch, name, impl):
    model = models[name]
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
    print(f"\n\ninference throughput, batch {BATCH}, device {DEVICE}")
    print("| model | fastad img/s | authors' way img/s | speed-up |")
    print("|---|---|---|---|")
    for name in dict.fromkeys(k[0] for k in _times):
        f, a = _times.get((name, "fastad")), _times.get((name, "authors"))
        if f and a:
            print(f"| {name} | {BATCH / f:.1f} | {BATCH / a:.1f} | {a / f:.2f}x |")
