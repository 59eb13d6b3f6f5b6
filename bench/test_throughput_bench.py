"""What a benchmark user waits for: the data path, the optimizer step, training iterations and a
whole `fastad run`, fastad next to the authors' way in the same run.

    pytest bench/test_throughput_bench.py -s --benchmark-columns=min,mean,rounds
    FASTAD_BENCH_DEVICE=cuda pytest bench/test_throughput_bench.py -s   (bench/gpu_check.sh runs it)

Rows (the tables are printed at the end; bench/RESULTS.md keeps the measured ones):
- data path, MVTec AD bottle (900 px PNGs) at Dinomaly's preprocessing (resize 448, crop 392):
  images/s of PIL decode + resize (the authors' per-epoch reading), of the first, cache-building
  pass (cold), of cached items (warm) and of cached batches gathered on the device.
- optimizer step on Dinomaly's trainable parameters (ViT-B decoder and bottleneck, random
  gradients): the authors' per-parameter StableAdamW (a host read per parameter) against the
  multi-tensor update.
- training iterations of Dinomaly (ViT-B/14, 392 px) and MiniMaxAD (UniRepLKNet-N, 256 px), batch 16,
  random weights, and RLR (EfficientNet-Lite0, 256 px, its batch 4), on bottle: the authors' way (PIL per epoch in the training process, per-parameter
  StableAdamW, every loss and NaN check read on the host) against fastad's (cached batches, sync-free
  steps), and fastad's at precision bf16 / fp16 and compiled (compile=True; on the CPU only with
  FASTAD_BENCH_COMPILE=1: compiling the training graphs there takes minutes), and on CUDA Dinomaly's
  and RLR's fp32 step with the Triton kernels forced against the PyTorch paths of the same ops;
  iterations/s, images/s and the share of each iteration spent waiting for data.
- a whole `fastad run` of PatchCore on bottle (fresh processes): wall clock with --no-cache, a first
  run into an empty cache, a second run; and, in-process, the time the run spends on data before
  the backbone (validation, cache, reading every train and test item) in each case.
Each needs MVTec AD bottle (bench/mvtec_data.py: ../shared/data/mvtec, or with FASTAD_BENCH_STANDIN=1 a
synthetic stand-in of its layout and size, named in the tables) and is skipped without it. FASTAD_BENCH_ITERS sets the
training iterations timed per row (default 2 on the CPU, 20 on CUDA).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import pytest
import torch

from fastad.data import ImageTransform, mvtec
from fastad.data.cache import batch_source, cached
from fastad.models import RLR, Dinomaly, MiniMaxAD
from fastad.models.training import _epoch_batches
from fastad.ops import dispatch
from fastad.optim import StableAdamW
from mvtec_data import mvtec_root, standin

DEVICE = os.environ.get("FASTAD_BENCH_DEVICE", "cpu")
DATA = mvtec_root()
ITERS = int(os.environ.get("FASTAD_BENCH_ITERS", 20 if DEVICE == "cuda" else 2))
needs_bottle = pytest.mark.skipif(not (DATA / "bottle").is_dir(), reason="needs ../shared/data/mvtec/bottle (or FASTAD_BENCH_STANDIN=1)")
_rows: dict = {}


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _seconds(fn, repeat=1) -> float:
    best = float("inf")
    for _ in range(repeat):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return best


DINOMALY_TRANSFORM = ImageTransform(448, 392)


@needs_bottle
def test_data_path(benchmark, tmp_path):
    ds = mvtec(DATA, "bottle", "train", DINOMALY_TRANSFORM)
    n_pil = 32
    pil = _seconds(lambda: [ds[i] for i in range(n_pil)]) / n_pil
    cold = _seconds(lambda: cached(ds, tmp_path / "cache", verbose=False)) / len(ds)
    c = cached(ds, tmp_path / "cache")

    def warm_items():
        for i in range(len(c)):
            c[i]

    benchmark.pedantic(warm_items, rounds=3, iterations=1, warmup_rounds=1)
    warm = benchmark.stats.stats.min / len(c)
    gather = batch_source(c, DEVICE)
    rows = list(range(16))
    batch = _seconds(lambda: [gather(rows) for _ in range(8)], repeat=3) / (8 * 16)
    benchmark.extra_info.update(device=DEVICE, pil_ms=pil * 1e3, cold_ms=cold * 1e3, warm_ms=warm * 1e3, batch_ms=batch * 1e3)
    _rows["data"] = [("PIL decode + resize (authors')", pil), ("first pass, writing the cache (cold)", cold),
                     ("cached items (warm)", warm), (f"cached batches of 16 on {DEVICE}", batch)]


# FASTAD_BENCH_COMPILE=0 leaves them out on CUDA too (gpu_check.sh --quick: minutes of compiling each)
COMPILE = os.environ.get("FASTAD_BENCH_COMPILE", "1" if DEVICE == "cuda" else "0") == "1"
# "fastad kernels" / "fastad PyTorch ops": fastad's fp32 row with the kernel families forced (the
# Triton attention, select and loss kernels, or the PyTorch paths of the same ops; CUDA only: the CPU
# always takes the PyTorch paths)
PATHS = {"fastad kernels": dict(triton=True), "fastad PyTorch ops": dict(triton=False, flex=False)}
TRAIN_IMPLS = ["authors", "fastad", *PATHS, "fastad bf16", "fastad fp16", "fastad bf16 compiled"]


def _dinomaly(**kw):
    torch.manual_seed(0)
    return Dinomaly(weights="random", **kw).to(DEVICE)


@pytest.mark.parametrize("impl", ["authors", "fastad"])
def test_optimizer_step(benchmark, impl):
    model = _dinomaly()
    params = [p for p in model.trainable_parameters()]
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(DEVICE) * 1e-3
    opt = StableAdamW(params, lr=2e-3, eps=1e-10, weight_decay=1e-4, amsgrad=True, foreach=impl == "fastad")

    def step():
        opt.step()
        _sync()

    benchmark.pedantic(step, rounds=5 if DEVICE == "cuda" else 3, iterations=1, warmup_rounds=1)
    numel = sum(p.numel() for p in params)
    # floor: the update reads p, g, m, v, vmax and writes p, m, v, vmax (float32), plus the ratio pass
    bytes_moved = numel * 4 * 11
    benchmark.extra_info.update(device=DEVICE, parameters=len(params), numel=numel, bytes=bytes_moved)
    _rows[("optimizer", impl)] = (benchmark.stats.stats.min, len(params), numel)


def _training_row(make, transform, impl):
    """(seconds per iteration, seconds waiting for data per iteration) of ITERS iterations after one
    warm-up, through the loop fit uses (_epoch_batches, training_step)."""
    model = make()
    train = mvtec(DATA, "bottle", "train", transform)
    model.on_nan = "stop"
    if impl.startswith("fastad"):
        train = cached(train, tempfile.mkdtemp(prefix="fastad-bench-cache-"), verbose=False)
        model._ensure_optimizer()
    else:  # torch's default Adam / AdamW (not fused), as the authors build it
        plain = lambda params, decoupled=False, **kw: (torch.optim.AdamW if decoupled else torch.optim.Adam)(list(params), **kw)
        with mock.patch.object(sys.modules[type(model).__module__], "adam", plain, create=True):
            model._ensure_optimizer()
        if isinstance(model.optimizer, StableAdamW):
            for group in model.optimizer.param_groups:
                group["foreach"] = False  # the authors' per-parameter loop
        model._skips_on_device = lambda: False  # every loss and NaN check read on the host, per step
    batches = _epoch_batches(train, model.train_batch_size, model.seed, 0, 0, (0, 1), model.device)
    model.train()
    wait = step = 0.0
    for it in range(ITERS + 1):
        _sync()
        t0 = time.perf_counter()
        batch = next(batches)
        _sync()
        t1 = time.perf_counter()
        loss = model.training_step(batch, it)
        if impl == "authors":
            model.loss_history.append(float(loss))  # logged every iteration
        else:
            model._pending.clear()  # fit reads these every 50 iterations: one transfer, not timed here
        _sync()
        t2 = time.perf_counter()
        if it:  # the first iteration warms up (allocations, the cache's pages)
            wait, step = wait + (t1 - t0), step + (t2 - t0)
    return step / ITERS, wait / ITERS, model.train_batch_size


TRAINED = {"Dinomaly ViT-B/14 392px": lambda **kw: Dinomaly(weights="random", **kw),
           "MiniMaxAD UniRepLKNet-N 256px": lambda **kw: MiniMaxAD(weights="random", **kw),
           "RLR EfficientNet-Lite0 256px": lambda **kw: RLR(**kw)}


@needs_bottle
@pytest.mark.parametrize("impl", TRAIN_IMPLS)
@pytest.mark.parametrize("name", list(TRAINED))
def test_training_iterations(benchmark, name, impl):
    if "compiled" in impl and not COMPILE:
        pytest.skip("compiled rows: FASTAD_BENCH_COMPILE=1, the default on CUDA (minutes of compiling)")
    if impl in PATHS and DEVICE != "cuda":
        pytest.skip("kernel rows: CUDA only (the CPU always takes the PyTorch paths)")
    if impl in PATHS and name.startswith("MiniMaxAD"):
        pytest.skip("kernel rows: Dinomaly and RLR (the attention models)")
    kw = {"precision": "fp32" if impl in PATHS or " " not in impl else impl.split()[1], "compile": "compiled" in impl}

    def make():
        torch.manual_seed(0)
        return TRAINED[name](**kw).to(DEVICE)

    transform = DINOMALY_TRANSFORM if name.startswith("Dinomaly") else make().transform()
    out = {}
    with dispatch.kernels(**PATHS.get(impl, {})):
        benchmark.pedantic(lambda: out.setdefault("r", _training_row(make, transform, impl)), rounds=1, iterations=1)
    per_it, wait, bs = out["r"]
    benchmark.extra_info.update(device=DEVICE, iterations=ITERS, s_per_iteration=per_it, data_wait_s=wait,
                                data_wait_share=wait / per_it, images_per_s=bs / per_it)
    _rows[("train", name, impl)] = (per_it, wait, bs)


def _cli_run(args, cache_dir) -> float:
    env = {**os.environ, "FASTAD_CACHE_DIR": str(cache_dir)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fastad", "run", *args], check=True, env=env, capture_output=True)
    return time.perf_counter() - t0


def _data_before_backbone(args, cache_dir) -> float:
    """Seconds `fastad run` spends on data before any model work: building the sets, validating every
    file, the cache pass, then reading every train and test item once."""
    from fastad import runs

    parser_args = argparse.Namespace(no_cache="--no-cache" in args, cache=str(cache_dir), cache_max_gb=50.0)
    t0 = time.perf_counter()
    model = runs._build("patchcore", {})
    sets = runs._datasets(f"mvtec:{DATA}", ["bottle"], model.transform())
    sets, _ = runs._check_data(sets, quiet=True)
    sets = runs._cache_sets(parser_args, sets)
    for _, train, test in sets:
        for ds in (train, test):
            for i in range(len(ds)):
                ds[i]
    return time.perf_counter() - t0


@needs_bottle
def test_whole_run(benchmark, tmp_path):
    base = ["--data", f"mvtec:{DATA}", "--classes", "bottle", "--overlays", "0", "--device", DEVICE]
    out = {}

    def runs():
        out["no-cache"] = _cli_run([*base, "--no-cache", "--out", str(tmp_path / "a")], tmp_path / "c")
        out["first"] = _cli_run([*base, "--out", str(tmp_path / "b")], tmp_path / "c")
        out["second"] = _cli_run([*base, "--out", str(tmp_path / "d")], tmp_path / "c")
        out["data no-cache"] = _data_before_backbone(["--no-cache"], tmp_path / "e")
        out["data first"] = _data_before_backbone([], tmp_path / "e")
        out["data second"] = _data_before_backbone([], tmp_path / "e")

    benchmark.pedantic(runs, rounds=1, iterations=1)
    results = [json.loads((tmp_path / o / "results.json").read_text())[0] for o in "abd"]
    assert len({r["image_auroc"] for r in results}) == 1  # the cache changes no result
    benchmark.extra_info.update(device=DEVICE, **out)
    _rows["run"] = out


def teardown_module(module):
    if not _rows:
        return
    data = "a synthetic stand-in of bottle (bench/mvtec_data.py)" if standin() else "MVTec AD bottle"
    print(f"\n\nthroughput, device {DEVICE}, {torch.get_num_threads()} threads, on {data}")
    if "data" in _rows:
        pil = _rows["data"][0][1]
        print("\n| data path (bottle, 448 -> 392) | ms / image | images/s | vs PIL |\n|---|---|---|---|")
        for label, s in _rows["data"]:
            print(f"| {label} | {s * 1e3:.2f} | {1 / s:.0f} | {pil / s:.1f}x |")
    a, f = _rows.get(("optimizer", "authors")), _rows.get(("optimizer", "fastad"))
    if a and f:
        print(f"\n| StableAdamW step, Dinomaly's {f[1]} tensors ({f[2] / 1e6:.1f}M values) | ms |\n|---|---|")
        print(f"| authors' per-parameter loop | {a[0] * 1e3:.1f} |\n| multi-tensor, sync-free | {f[0] * 1e3:.1f} |")
        print(f"| speed-up | {a[0] / f[0]:.2f}x |")
    names = dict.fromkeys(k[1] for k in _rows if isinstance(k, tuple) and k[0] == "train")
    if names:
        print(f"\n| training, {ITERS} iterations | way | batch | it/s | images/s | data wait |\n|---|---|---|---|---|---|")
        for name in names:
            for impl in TRAIN_IMPLS:
                r = _rows.get(("train", name, impl))
                if r:
                    print(f"| {name} | {impl} | {r[2]} | {1 / r[0]:.3f} | {r[2] / r[0]:.1f} | {100 * r[1] / r[0]:.1f}% |")
        for name in names:  # the kernels against the PyTorch paths of the same ops (CUDA)
            k, t = _rows.get(("train", name, "fastad kernels")), _rows.get(("train", name, "fastad PyTorch ops"))
            if k and t:
                print(f"{name}: a training step with the kernels is {t[0] / k[0]:.2f}x the PyTorch paths' speed")
    if "run" in _rows:
        r = _rows["run"]
        print("\n| fastad run PatchCore bottle | --no-cache | first run | second run |\n|---|---|---|---|")
        print(f"| wall clock s | {r['no-cache']:.1f} | {r['first']:.1f} | {r['second']:.1f} |")
        print(f"| data before the backbone s | {r['data no-cache']:.2f} | {r['data first']:.2f} | {r['data second']:.2f} |")
        print(f"\nsecond run's data time: {r['data first'] / r['data second']:.1f}x less than the first's, "
              f"{r['data no-cache'] / r['data second']:.1f}x less than --no-cache")
