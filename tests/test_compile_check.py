"""The compile check (fastad.ops.compile_check) compiles exactly what the ops launch on CUDA: its
written-out table equals the configurations the ops' config functions produce over their whole input
domain, every Triton kernel is in it and specialises no scalar argument (no hidden variants), and a
broken configuration fails the check."""
import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastad.ops
from fastad.ops.compile_check import configs

ROOT = Path(__file__).resolve().parents[1]
TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _kernels() -> dict:
    """'module._name' -> every Triton kernel object (JIT or interpreted) of every fastad.ops module."""
    found = {}
    for info in pkgutil.iter_modules(fastad.ops.__path__):
        module = importlib.import_module(f"fastad.ops.{info.name}")
        for name, obj in vars(module).items():
            if name.endswith("_kernel") and hasattr(obj, "fn") and hasattr(obj, "arg_names"):
                found[f"{info.name}.{name}"] = obj
    return found


def test_the_checked_configurations_are_every_one_the_ops_launch():
    checked = configs()
    assert len({c.key() for c in checked}) == len(checked) == 237
    # the tiles stop growing at grid width 64: a wider sweep finds nothing new
    assert {c.key() for c in configs(max_width=1024)} == {c.key() for c in checked}
    by_kernel = {k: sum(c.kernel == k for c in checked) for k in {c.kernel for c in checked}}
    # local: tiles of float16, bfloat16, float32 by grid width; neighbour mask: flat 64-token key
    # tiles, one per head-dim tile (32-token at 128)
    assert by_kernel["grid_attention._fwd_kernel"] == (11 + 11 + 8) + (4 + 4 + 3)
    # the radix passes of both schedules (3 of 11 bits, 4 of 8: which runs depends on the Triton installed)
    assert by_kernel["select._radix_hist_kernel"] == 3 * (3 + 4) * 2 and by_kernel["linear_attention._linear_dq_kernel"] == 3 * 3
    # the device-side pick per schedule: one variant before the last pass, the last with and without
    # the next value
    assert by_kernel["select._radix_pick_kernel"] == 3 + 3 and by_kernel["select._radix_next_kernel"] == 3 * 2
    assert by_kernel["select._radix_values_kernel"] == 2
    # the kNN / nearest re-scoring: 16 .. 256 candidates per query, l2 and cosine
    assert by_kernel["feature_bank._pair_kernel"] == 5 * 2


def test_every_kernel_is_checked_and_specialises_no_scalar():
    kernels = _kernels()
    assert sorted(kernels) == sorted({c.kernel for c in configs()})
    for name, k in kernels.items():
        skip = getattr(k, "kwargs", {}).get("do_not_specialize") if hasattr(k, "kwargs") else k.do_not_specialize
        skip = {k.arg_names[s] if isinstance(s, int) else s for s in (skip or [])}
        params = inspect.signature(k.fn).parameters
        pointers = {p for c in configs() if c.kernel == name for p, _ in c.pointers}
        scalars = {p for p, v in params.items() if "constexpr" not in str(v.annotation)} - pointers
        assert scalars <= skip, f"{name}: scalars {sorted(scalars - skip)} would be specialised into variants the check misses"


def test_head_dims_beyond_the_kernels_take_the_pytorch_path():
    ga = importlib.import_module("fastad.ops.grid_attention")
    la = importlib.import_module("fastad.ops.linear_attention")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(1, 1, 4, la.TRITON_MAX_HEAD_DIM + 1, device=device)
    y = torch.randn(1, 1, 4, ga.TRITON_MAX_HEAD_DIM_F32 + 1, device=device)  # float32
    if fastad.ops.dispatch.implementation(x, triton=True) == "triton":  # the kernels themselves refuse
        with pytest.raises(ValueError, match="head dims up to 64"):
            torch.ops.fastad.linear_attention(x, x, x, 0.0)
        with pytest.raises(ValueError, match="float32 head dims up to 64"):
            torch.ops.fastad.grid_attention(y, y, y, 2, 2, 0, False, 1.0)
    # the public ops take the PyTorch path for them
    torch.testing.assert_close(fastad.ops.linear_attention(x, x, x), la.linear_attention_reference(x, x, x))
    torch.testing.assert_close(fastad.ops.neighbour_masked_attention(y, y, y, (2, 2), 1),
                               ga.neighbour_masked_attention_reference(y, y, y, (2, 2), 1))


CHILD = """
import json, sys
from fastad.ops.compile_check import _c, check, failures
broken = [
    # tl.arange needs a power of two
    _c("linear_attention._linear_out_kernel", dict(Q="fp32", O="fp32", KV="fp32", KSUM="fp32"),
       dict(BLOCK_N=16, BLOCK_D=24, F32=True), ["eps"], num_warps=8),
    # 64-token float32 tiles over 4 warps: the backward does not fit in registers
    _c("linear_attention._linear_dq_kernel",
       dict(Q="fp32", DO="fp32", DQ="fp32", KV="fp32", KSUM="fp32", DKV="fp32", DKSUM="fp32"),
       dict(BLOCK_N=64, BLOCK_D=64, F32=True), ["eps"], num_warps=4),
    # fine
    _c("hard_mining._adc_backward_kernel", dict(x_ptr="fp16", out_ptr="fp16", scale_ptr="fp32", tau_ptr="fp32"), dict(BLOCK=1024)),
]
rows = check(broken, targets=(90,), jobs=1)
print(json.dumps({"rows": rows, "failures": failures(rows)}))
"""


def _clean_env():
    return {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "PYTHONPATH": str(ROOT)}


def test_a_broken_configuration_fails_the_check():
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=_clean_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    bad, rows = result["failures"], result["rows"]
    assert len(bad) == 2, bad
    assert "compile failed" in bad[0] and "BLOCK_D=24" in bad[0]
    assert "BLOCK_N=64 BLOCK_D=64" in bad[1] and "hot kernel spills" in bad[1] and rows[1]["spill_stores"] > 128
    ok = rows[2]
    assert ok["error"] is None and ok["regs"] > 0 and ok["spill_stores"] == 0 and 0 < ok["occupancy"] <= 1


def test_shared_memory_and_occupancy_rules():
    from fastad.ops.compile_check import TARGETS, failures, occupancy

    row = {"kernel": "select._radix_hist_kernel", "config": "c", "target": 120, "error": None, "regs": 32,
           "spill_stores": 0, "spill_loads": 0, "shared": 101377, "blocks_per_sm": 0, "occupancy": 0.0}
    assert failures([row]) == ["select._radix_hist_kernel [c] sm_120: 101377 bytes of shared memory per block, over the target's 101376"]
    assert failures([{**row, "shared": 101376, "blocks_per_sm": 0}]) == [
        "select._radix_hist_kernel [c] sm_120: no block fits on an SM (32 registers x c)"]
    # 32 registers, 4 warps, no shared memory: 16 blocks = 64 warps, the whole SM (sm_90); 48 warps on sm_120
    assert occupancy(32, 0, 4, TARGETS[90]) == (16, 1.0) and occupancy(32, 0, 4, TARGETS[120]) == (12, 1.0)
    # 255 registers -> 256 x 32 per warp: 8 warps per SM; 8-warp blocks: one block
    assert occupancy(255, 0, 8, TARGETS[90]) == (1, 0.125)
    # shared memory bound: 100 KB blocks on a 228 KB SM (1 KB reserved each): 2 blocks
    assert occupancy(16, 100 * 1024, 4, TARGETS[90]) == (2, 0.125)


def test_the_command_prints_the_table_and_passes():
    proc = subprocess.run([sys.executable, "-m", "fastad.ops.compile_check", "--kernels", "hard_mining", "--targets", "80,90",
                           "--jobs", "1"], capture_output=True, text=True, env=_clean_env(), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| hard_mining._point_stats_kernel | bf16 BLOCK_C=32 BLOCK_P=64 w4 s3 | sm_90 |" in proc.stdout
    import triton

    assert f"compile check (Triton {triton.__version__}): 12 configurations of 4 kernels x 2 targets = 24 compiles" in proc.stdout
    assert proc.stdout.strip().endswith("0 failure(s)")
