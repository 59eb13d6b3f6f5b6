"""The distributed coreset's price: one all_gather per selection step (gloo, 2 processes on this
machine) against the per-step read of a shard, and the whole selection on 1 vs 2 processes.

    pytest bench/test_distributed_bench.py -s
    FASTAD_BENCH_DIST_N=20000 pytest bench/test_distributed_bench.py -s   # a smaller N

Every process runs one thread, so "2 processes" uses 2 cores and "1 process" 1; the baseline a user
would otherwise run is the one-process selection (same indices, checked). Times are measured inside
the processes (``time.perf_counter``); the benchmark fixture times the whole run, process start
included. Break-even: splitting N points over W ranks pays when the per-step read of N/W points
plus the collective's latency L is below the read of N points: N > W L / ((W - 1) a), a the read
time per point (W = 2: N > 2 L / a).
"""
import os
import time

import torch

from fastad import distributed
from fastad.ops import greedy_coreset

N = int(os.environ.get("FASTAD_BENCH_DIST_N", "200000"))
D = 128  # the projected width the selection reads (projection_dim=128)
STEPS = 500
_rows: list[str] = []


def _measure(rank, world, n, d, steps):
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    lo, hi = distributed.shard_range(n, rank, world)
    group = distributed.world()
    out = {}
    if world > 1:  # the collective of one step: (distance, index, d floats) from every rank
        payload = torch.zeros(d)
        for _ in range(20):
            distributed.all_max_index(1.0, rank, payload, group)
        t0 = time.perf_counter()
        for _ in range(steps):
            distributed.all_max_index(1.0, rank, payload, group)
        out["collective_s"] = (time.perf_counter() - t0) / steps
    # per-step read of a shard: the C++ step over `size` points (d float32 each)
    out["step_s"] = {}
    for size in (10_000, n // world):
        shard = x[:size].contiguous()
        dist = torch.ops.fastad.kcenter_init(shard, shard[:10].contiguous())
        assign = torch.full((size,), -1, dtype=torch.int32)
        centers = x[size : size + steps].contiguous() if size + steps <= n else torch.randn(steps, d, generator=g)
        t0 = time.perf_counter()
        for t in range(min(steps, 100)):
            torch.ops.fastad.kcenter_step(shard, dist, assign, centers, t, -1, False)
        out["step_s"][size] = (time.perf_counter() - t0) / min(steps, 100)
    t0 = time.perf_counter()
    idx = greedy_coreset(x[lo:hi], k=steps, projection_dim=None, group=group)
    out["coreset_s"] = time.perf_counter() - t0
    out["indices"] = idx
    return out


def test_distributed_coreset_cost(benchmark):
    def run():
        return distributed.spawn(_measure, 1, N, D, STEPS, timeout_s=600)[0], \
            distributed.spawn(_measure, 2, N, D, STEPS, timeout_s=600)

    one, two = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    assert torch.equal(one["indices"], two[0]["indices"]) and torch.equal(two[0]["indices"], two[1]["indices"])
    latency = max(r["collective_s"] for r in two)
    per_point = one["step_s"][N] / N
    bytes_per_step = N * D * 4
    benchmark.extra_info.update(n=N, d=D, steps=STEPS, collective_s=latency, read_s_per_point=per_point,
                                one_process_s=one["coreset_s"], two_processes_s=max(r["coreset_s"] for r in two))
    _rows.extend([
        "",
        f"distributed coreset (gloo, 1 thread per process), N={N} x d={D} float32, {STEPS} steps:",
        f"  collective per step (all_gather of W x (d+2) float64): {latency * 1e6:.0f} us",
        f"  read per step, one process, {N} points: {one['step_s'][N] * 1e3:.2f} ms "
        f"({bytes_per_step / one['step_s'][N] / 1e9:.1f} GB/s); per point {per_point * 1e9:.2f} ns",
        f"  read per step, one of 2 processes, {N // 2} points: {two[0]['step_s'][N // 2] * 1e3:.2f} ms",
        f"  break-even (W=2): N > 2 L / a = {2 * latency / per_point:,.0f} points "
        f"({2 * latency / per_point / 1e3:.0f}k; at W ranks: W L / ((W-1) a))",
        f"  whole selection: 1 process {one['coreset_s']:.2f} s, 2 processes {max(r['coreset_s'] for r in two):.2f} s "
        f"({one['coreset_s'] / max(r['coreset_s'] for r in two):.2f}x), same indices",
    ])


def teardown_module(module):
    print("\n".join(_rows))
