"""Quantile hard mining: fastad's select and fused losses vs the authors' way, same data, same run.

    pytest bench/test_hard_mining_bench.py -s --benchmark-columns=min,mean,rounds
    FASTAD_BENCH_DEVICE=cuda pytest bench/...   # the Triton kernels (the CPU runs the torch path)

Baselines: ``torch.quantile`` (MiniMaxAD's thresholds; where the installed torch still refuses more
than 2**24 elements, the sort it would have to fall back to), ``torch.kthvalue`` (the built-in
k-th value a user would reach for: the lower of the two ranks the quantile needs), the same two
along a dim for a batch of per-image quantiles, and the authors' loss code
(``adc_loss_reference``: std, torch.quantile on S and S**2, boolean-mask mean; Dinomaly's
``global_cosine_hm_percent``: CosineSimilarity, topk threshold, gradient hook), forward + backward.
``fastad`` is the op as users call it (on CUDA the measuring dispatcher picks the faster of the
Triton kernels and the PyTorch path, both exact); ``fastad_kernels`` (CUDA only) forces the Triton
kernels. Each fastad row records the bytes its floor must move (``extra_info['bytes']``: the quantile
two reads of the input; a loss one read of its inputs forward, a read and a gradient write backward),
which bench/gpu_report.py turns into the distance to the bandwidth floor.
The ratio table (baseline min time / fastad min time) is printed at the end.
"""
import os

import pytest
import torch

from fastad.ops import (
    adc_loss,
    adc_loss_reference,
    hard_mining_cosine_loss,
    hard_mining_cosine_loss_reference,
    quantile,
    quantile_reference,
    select_rank,
)
from fastad.ops import dispatch

DEVICE = os.environ.get("FASTAD_BENCH_DEVICE", "cpu")
_times: dict = {}


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _record(benchmark, case, impl, **info):
    benchmark.extra_info.update(device=DEVICE, threads=torch.get_num_threads(), **info)
    _times[(case, impl)] = benchmark.stats.stats.min


def _kthvalue(x, q, dim=None):
    """torch.kthvalue at the lower rank of the quantile (half of what the quantile needs)."""
    rows = x.reshape(1, -1) if dim is None else x
    k = int(q * (rows.shape[-1] - 1)) + 1
    out = torch.kthvalue(rows, k, dim=-1).values
    return out[0] if dim is None else out


def _kernels(fn):
    """``fn`` with the Triton kernels forced (no measuring dispatcher)."""
    def forced(*args, **kwargs):
        with dispatch.kernels(triton=True):
            return fn(*args, **kwargs)
    return forced


FASTAD = ["fastad", "fastad_kernels"] if DEVICE == "cuda" else ["fastad"]
_QUANTILE = {"fastad": quantile, "fastad_kernels": _kernels(quantile), "torch.quantile": quantile_reference,
             "torch.kthvalue": _kthvalue}


@pytest.mark.parametrize("impl", [i for i in _QUANTILE if i in FASTAD or not i.startswith("fastad")])
@pytest.mark.parametrize("shape, dim", [((2**20,), None), ((2**24,), None), ((2**26,), None), ((64, 2**16), 1)],
                         ids=["1048576", "16777216", "67108864", "64x65536"])
def test_quantile(benchmark, impl, shape, dim):
    # one quantile of a whole tensor, or one per row (64 maps of 256 x 256: per-image thresholds)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(DEVICE) * 3
    fn = _QUANTILE[impl]  # torch.quantile: a sort where the installed torch refuses the size

    def run():
        out = fn(x, 0.9999, dim=dim)
        _sync()
        return out

    out = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    if impl == "torch.kthvalue":
        k = int(0.9999 * (shape[-1] - 1))
        assert torch.equal(out, select_rank(x, k, dim=dim))
    else:
        assert torch.equal(out.cpu(), quantile(x, 0.9999, dim=dim).cpu())
    n = x.numel()
    case = f"quantile 0.9999, {n / 2**20:.0f}M" + ("" if dim is None else f" as {shape[0]} rows")
    # the floor: two reads of x (a histogram pass and the pick); the radix select makes three
    _record(benchmark, case, impl, n=n, **({"bytes": 2 * n * x.element_size()} if impl.startswith("fastad") else {}))


def _adc_step(fn, maps):
    m = maps.clone().requires_grad_()
    loss = fn(m)
    loss.backward()
    _sync()
    return loss


@pytest.mark.parametrize("impl", [*FASTAD, "authors"])
@pytest.mark.parametrize("shape", [(16, 256, 256), (16, 1024, 1024)])
def test_adc_loss(benchmark, impl, shape):
    # MiniMaxAD's S: the sum of three 1 - cos maps, values in [0, 6]; 16 x 256^2 is the default batch
    maps = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(DEVICE) * 2
    # fastad as the models train: nonfinite='nan', no host read on the way
    fastad = lambda m: adc_loss(m, nonfinite="nan")  # noqa: E731
    fn = {"fastad": fastad, "fastad_kernels": _kernels(fastad)}.get(impl, adc_loss_reference)
    out = benchmark.pedantic(lambda: _adc_step(fn, maps), rounds=5, iterations=1, warmup_rounds=1)
    torch.testing.assert_close(out, adc_loss_reference(maps), rtol=1e-5, atol=0)
    n = maps.numel()
    info = {"bytes": 3 * n * maps.element_size()} if impl.startswith("fastad") else {}
    _record(benchmark, f"ADCLoss fwd+bwd, {n / 2**20:.0f}M points", impl, n=n, **info)


@pytest.mark.parametrize("impl", [*FASTAD, "authors"])
def test_hard_mining_cosine(benchmark, impl):
    # Dinomaly ViT-B: 2 groups of (16, 768, 28, 28), p = 0.9 after warm-up
    g = torch.Generator().manual_seed(0)
    enc = [torch.randn(16, 768, 28, 28, generator=g).to(DEVICE) for _ in range(2)]
    dec = [e + 0.3 * torch.randn(e.shape, generator=g).to(DEVICE) for e in enc]
    fastad = lambda e, d, p: hard_mining_cosine_loss(e, d, p, nonfinite="nan")  # noqa: E731
    fn = {"fastad": fastad, "fastad_kernels": _kernels(fastad)}.get(impl, hard_mining_cosine_loss_reference)

    def run():
        d = [x.clone().requires_grad_() for x in dec]
        loss = fn(enc, d, 0.9)
        loss.backward()
        _sync()
        return loss

    out = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    # against float64: the authors' float32 global cosine is off by ~2e-4 relative here, fastad by ~1e-8
    want = hard_mining_cosine_loss_reference([e.double() for e in enc], [d.double() for d in dec], 0.9)
    torch.testing.assert_close(out.double(), want, rtol=1e-5 if impl.startswith("fastad") else 1e-3, atol=0)
    # forward reads enc and dec, backward reads both again and writes dec's gradient
    info = {"bytes": 5 * sum(e.numel() * e.element_size() for e in enc)} if impl.startswith("fastad") else {}
    _record(benchmark, "Dinomaly HM cosine fwd+bwd, 2 x (16,768,28,28)", impl, **info)


def teardown_module(module):
    lines = ["", f"hard-mining speed-up of fastad on {DEVICE} ({torch.get_num_threads()} threads), min times:"]
    for case in dict.fromkeys(c for c, _ in _times):
        impls = {i: t for (c, i), t in _times.items() if c == case}
        if "fastad" not in impls:
            continue
        for base, t_base in impls.items():
            if base != "fastad":
                lines.append(f"  {case}: fastad {impls['fastad'] * 1e3:.2f} ms, {base} {t_base * 1e3:.2f} ms, "
                             f"{t_base / impls['fastad']:.2f}x")
    print("\n".join(lines))
