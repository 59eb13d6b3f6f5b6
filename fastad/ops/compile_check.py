"""Compile every Triton kernel configuration the ops launch on CUDA, for real GPU targets, without a GPU.

``python -m fastad.ops.compile_check`` (run by ``.ci/run``) compiles each entry of :func:`configs`
(kernel x pointer dtypes x constexprs x num_warps / num_stages: the ops' own config functions swept
over their input domain, so a new configuration cannot be missed; a new kernel must be added there,
``tests/test_compile_check.py`` fails otherwise) with Triton's own compiler and
ptxas for sm_80, sm_90, sm_100 and sm_120, and prints one table: registers per thread, spilled bytes,
shared memory per block and the occupancy they allow. It exits with 1 on a compile failure, shared
memory over a target's per-block limit, or more than :data:`SPILL_LIMIT` bytes of spills per thread
in a hot kernel (:data:`HOT`). Then it reports
the resource usage of the CUDA kernels built into ``fastad._C`` (``cuobjdump --dump-resource-usage``
on the extension: the figures ``nvcc -Xptxas -v`` prints, per architecture built).

Scalar kernel arguments are never specialised by Triton (``do_not_specialize``), so the constexprs
and dtypes below are all the variants; pointers are compiled 16-byte aligned (fresh or contiguous
tensors; a view at an odd offset would compile one more variant).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch

__all__ = ["HOT", "TARGETS", "Config", "check", "configs", "extension_usage", "main"]

DTYPES = ("fp16", "bf16", "fp32")  # float64 always takes the PyTorch path


@dataclass(frozen=True)
class Target:
    name: str
    max_warps: int  # resident warps per SM
    smem_sm: int  # shared memory per SM (bytes)
    smem_block: int  # largest shared memory one block may use (bytes)
    max_blocks: int = 32
    regs_sm: int = 65536


# per-SM limits from the CUDA C Programming Guide's compute-capability table
TARGETS = {
    80: Target("sm_80 (A100)", 64, 164 * 1024, 163 * 1024),
    90: Target("sm_90 (H100/H200)", 64, 228 * 1024, 227 * 1024),
    100: Target("sm_100 (B200)", 64, 228 * 1024, 227 * 1024),
    120: Target("sm_120 (RTX 50)", 48, 100 * 1024, 99 * 1024),
}

# kernels the benchmarks time (bench/test_attention_bench.py, test_hard_mining_bench.py,
# test_metrics_bench.py via quantile): a tile that does not fit in registers fails the check there.
# ptxas itself caps registers for occupancy (at 64 / 128 / 168) and spills a few dozen bytes per
# thread to do so; those are reported in the table, more than SPILL_LIMIT bytes fail
SPILL_LIMIT = 128  # bytes of spill stores per thread: 32 registers
HOT = frozenset({
    "grid_attention._fwd_kernel", "grid_attention._bwd_dq_kernel", "grid_attention._bwd_dkdv_kernel",
    "linear_attention._linear_state_kernel", "linear_attention._linear_out_kernel",
    "linear_attention._linear_dq_kernel", "linear_attention._linear_dkdv_kernel",
    "select._radix_hist_kernel", "select._radix_next_kernel", "hard_mining._square_tail_kernel", "hard_mining._adc_backward_kernel",
    "hard_mining._point_stats_kernel", "hard_mining._cosine_grad_kernel", "feature_bank._pair_kernel",
})


@dataclass(frozen=True)
class Config:
    """One compiled variant: ``kernel`` ('module._name' in fastad.ops), the dtypes of its pointer
    arguments (others: 'i32' ints, 'fp32' for ``floats``), its constexprs and launch options."""

    kernel: str
    pointers: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, object], ...]
    floats: tuple[str, ...] = ()
    num_warps: int = 4
    num_stages: int = 3

    def label(self) -> str:
        dt = sorted({t for _, t in self.pointers} - {"fp32", "i32"}) or ["fp32"]
        cx = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs)
        return f"{'/'.join(dt)} {cx} w{self.num_warps} s{self.num_stages}"

    def key(self) -> tuple:
        """What a launch is identified by: kernel, pointer dtypes, constexprs, options."""
        return (self.kernel, tuple(sorted(self.pointers)), tuple(sorted(self.constexprs)), self.num_warps, self.num_stages)


def _c(kernel, pointers: dict, constexprs: dict, floats=(), num_warps=4, num_stages=3) -> Config:
    return Config(kernel, tuple(pointers.items()), tuple(constexprs.items()), tuple(floats), num_warps, num_stages)


def configs(max_width: int = 129) -> list[Config]:
    """Every configuration the ops launch on CUDA: the ops' own config functions (the one place each
    choice is written) swept over their whole input domain: float16 / bfloat16 / float32 (float64
    takes the PyTorch path), head dims 1 .. the kernels' limit, grid widths 1 .. ``max_width`` (the
    tiles stop growing at 64; tests/test_compile_check.py sweeps wider), both attention kinds, the
    three radix passes of x and x^2. Pointer dtypes are those each launch site passes."""
    import importlib

    ga, la, se, hm, fb = (importlib.import_module(f"fastad.ops.{m}")
                          for m in ("grid_attention", "linear_attention", "select", "hard_mining", "feature_bank"))
    seen: dict[tuple, Config] = {}

    def add(kernel, pointers: dict, cfg: dict, floats=()):
        cfg = dict(cfg)
        options = (cfg.pop("num_warps"), cfg.pop("num_stages"))
        c = _c(kernel, pointers, cfg, floats, *options)
        seen.setdefault(c.key(), c)

    for dtype, dt in zip((torch.float16, torch.bfloat16, torch.float32), DTYPES):
        qkv = dict(Q=dt, K=dt, V=dt)
        for d, w, only in itertools.product(range(1, ga._max_head_dim(dtype) + 1), range(1, max_width + 1), (False, True)):
            cfg = {"ONLY": only, **ga._config(dtype, d, w, cuda=True, only=only)}
            add("grid_attention._fwd_kernel", {**qkv, "O": dt, "LSE": "fp32"}, cfg, ["scale"])
            add("grid_attention._bwd_dq_kernel", {**qkv, "DO": dt, "LSE": "fp32", "DELTA": "fp32", "DQ": dt}, cfg, ["scale"])
            add("grid_attention._bwd_dkdv_kernel", {**qkv, "DO": dt, "LSE": "fp32", "DELTA": "fp32", "DK": dt, "DV": dt}, cfg, ["scale"])
        for d in range(1, la.TRITON_MAX_HEAD_DIM + 1):
            cfg = la._linear_config(dtype, d, cuda=True)
            state = dict(KV="fp32", KSUM="fp32")
            add("linear_attention._linear_state_kernel", dict(K=dt, V=dt, **state), cfg)
            add("linear_attention._linear_out_kernel", dict(Q=dt, O=dt, **state), cfg, ["eps"])
            add("linear_attention._linear_dq_kernel", dict(Q=dt, DO=dt, DQ=dt, DKV="fp32", DKSUM="fp32", **state), cfg, ["eps"])
            add("linear_attention._linear_dkdv_kernel", dict(K=dt, V=dt, DK=dt, DV=dt, DKV="fp32", DKSUM="fp32"), cfg)
        for passes in se._SCHEDULES.values():  # both: which one runs depends on the Triton installed
            for p, square in itertools.product(range(len(passes)), (False, True)):
                add("select._radix_hist_kernel", dict(x_ptr=dt, hist_ptr="i32", bad_ptr="i32", state_ptr="i32"),
                    se._hist_config(passes, p, square, cuda=True))
        for square in (False, True):
            add("select._radix_next_kernel", dict(x_ptr=dt, state_ptr="i32"), se._next_config(square, cuda=True))
        add("hard_mining._square_tail_kernel", dict(x_ptr=dt, tau_ptr="fp32", count_ptr="i32", sum_ptr="fp32"),
            hm._ELEMENTWISE["square_tail"])
        add("hard_mining._adc_backward_kernel", dict(x_ptr=dt, out_ptr=dt, scale_ptr="fp32", tau_ptr="fp32"),
            hm._ELEMENTWISE["adc_backward"])
        add("hard_mining._point_stats_kernel", dict(a_ptr=dt, b_ptr=dt, out_ptr="fp32"), hm._POINT_CONFIG)
        add("hard_mining._cosine_grad_kernel",
            dict(a_ptr=dt, b_ptr=dt, out_ptr=dt, coef_a_ptr="fp32", coef_b_ptr="fp32", scale_ptr="fp32"), hm._POINT_CONFIG)
    # the per-row pick and value kernels read only the select state: no input dtype
    for passes in se._SCHEDULES.values():
        for p, nxt in itertools.product(range(len(passes)), (False, True)):
            add("select._radix_pick_kernel", dict(hist_ptr="i32", state_ptr="i32"), se._pick_config(passes, p, nxt))
    for nxt in (False, True):
        add("select._radix_values_kernel", dict(state_ptr="i32", out_ptr="fp32"), se._values_config(nxt))
    # the kNN / nearest re-scoring reads float32 rows whatever the input dtype; k up to the Triton limit
    for k, cosine in itertools.product(range(1, fb._TOP_MAX - fb._TOP_EXTRA + 1), (False, True)):
        add("feature_bank._pair_kernel", dict(x_ptr="fp32", y_ptr="fp32", col_ptr="i64", xn_ptr="fp64", yn_ptr="fp64",
                                              out_ptr="fp64"), {"COSINE": cosine, **fb._top_config(k)})
    return list(seen.values())


def kernel_function(name: str):
    """The ``triton.JITFunction`` behind 'module._name'."""
    import importlib

    module, attr = name.split(".")
    return getattr(importlib.import_module(f"fastad.ops.{module}"), attr)


def _signature(cfg: Config, fn) -> tuple[dict, dict]:
    pointers, constexprs = dict(cfg.pointers), dict(cfg.constexprs)
    sig, attrs = {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            if p.name not in constexprs:
                raise ValueError(f"{cfg.kernel}: constexpr {p.name} has no value in the configuration")
            sig[p.name] = "constexpr"
        elif p.name in pointers:
            sig[p.name] = "*" + pointers[p.name]
            attrs[(i,)] = [["tt.divisibility", 16]]  # 16-byte aligned
        else:
            sig[p.name] = "fp32" if p.name in cfg.floats else "i32"
    unknown = (set(pointers) | set(constexprs) | set(cfg.floats)) - {p.name for p in fn.params}
    if unknown:
        raise ValueError(f"{cfg.kernel} has no parameters {sorted(unknown)}")
    return sig, attrs


_PTXAS = {"regs": r"Used (\d+) registers", "spill_stores": r"(\d+) bytes spill stores",
          "spill_loads": r"(\d+) bytes spill loads", "stack": r"(\d+) bytes stack frame"}


def compile_one(cfg: Config, cc: int) -> dict:
    """Compile ``cfg`` for compute capability ``cc`` (e.g. 90): a row with regs, spill_stores,
    spill_loads, stack, shared (bytes per block), blocks_per_sm, occupancy, and error (None or why)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = {"kernel": cfg.kernel, "config": cfg.label(), "target": cc, "error": None}
    log = io.StringIO()
    try:
        fn = kernel_function(cfg.kernel)
        sig, attrs = _signature(cfg, fn)
        src = ASTSource(fn, sig, dict(cfg.constexprs), attrs)
        triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v of the real compile, printed
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                      options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    except Exception as exc:  # a compile failure is a result, reported in the table
        row["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        return row
    text = log.getvalue()
    for k, pattern in _PTXAS.items():
        m = re.search(pattern, text)
        row[k] = int(m.group(1)) if m else 0
    row["shared"] = int(compiled.metadata.shared)
    row["blocks_per_sm"], row["occupancy"] = occupancy(row["regs"], row["shared"], cfg.num_warps, TARGETS[cc])
    return row


def occupancy(regs: int, shared: int, num_warps: int, t: Target) -> tuple[int, float]:
    """(resident blocks per SM, resident warps / the SM's maximum) of a kernel using ``regs``
    registers per thread and ``shared`` bytes of shared memory per block of ``num_warps`` warps
    (registers are allocated per warp in units of 256; 1 KB of shared memory per block is reserved)."""
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (t.regs_sm // per_warp) // num_warps
    by_smem = t.smem_sm // (shared + 1024) if shared else t.max_blocks
    blocks = max(0, min(by_regs, by_smem, t.max_warps // num_warps, t.max_blocks))
    return blocks, blocks * num_warps / t.max_warps


def failures(rows: list[dict]) -> list[str]:
    """Why each failing row fails: a compile error, shared memory over the per-block limit, a hot
    kernel that spills, or no block fitting on an SM."""
    out = []
    for r in rows:
        where = f"{r['kernel']} [{r['config']}] sm_{r['target']}"
        if r["error"]:
            out.append(f"{where}: compile failed: {r['error']}")
            continue
        limit = TARGETS[r["target"]].smem_block
        if r["shared"] > limit:
            out.append(f"{where}: {r['shared']} bytes of shared memory per block, over the target's {limit}")
        if r["kernel"] in HOT and max(r["spill_stores"], r["spill_loads"]) > SPILL_LIMIT:
            out.append(f"{where}: hot kernel spills {r['spill_stores']} bytes (stores) / {r['spill_loads']} (loads), "
                       f"over {SPILL_LIMIT} per thread")
        if r["blocks_per_sm"] == 0 and r["shared"] <= limit:
            out.append(f"{where}: no block fits on an SM ({r['regs']} registers x {r['config']})")
    return out


def _compile_job(args):
    return compile_one(*args)


def check(config_list: list[Config], targets=(80, 90, 100, 120), jobs: int | None = None) -> list[dict]:
    """Compile every (config, target) in ``jobs`` processes (default: the CPU count) with an empty
    Triton cache (so ptxas runs and reports); the rows of :func:`compile_one`, in order."""
    import concurrent.futures
    import multiprocessing

    tasks = [(c, t) for c in config_list for t in targets]
    jobs = jobs or os.cpu_count() or 1
    saved = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="fastad-compile-check-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        try:
            if jobs == 1:
                return [compile_one(*t) for t in tasks]
            with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
                return list(pool.map(_compile_job, tasks, chunksize=4))
        finally:  # the caller's cache again (this one is deleted)
            if saved is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = saved


def extension_usage() -> tuple[list[dict], str | None]:
    """Per CUDA kernel of ``fastad._C`` and architecture built: registers, stack (spills live in
    local memory), shared memory, from ``cuobjdump --dump-resource-usage``. Returns (rows, note)."""
    import importlib.util

    spec = importlib.util.find_spec("fastad._C")
    if spec is None or not spec.origin:
        return [], "fastad._C is not built"
    tool = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")
    if not os.path.exists(tool):
        import triton.backends.nvidia as nvidia

        tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    try:
        text = subprocess.run([tool, "--dump-resource-usage", spec.origin], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return [], f"cuobjdump failed: {exc}"
    rows, arch = [], None
    for line in text.splitlines():
        m = re.search(r"arch = (sm_\d+\w*)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and arch:
            rows.append({"kernel": _demangle(name), "arch": arch, "regs": int(m.group(1)), "stack": int(m.group(2)),
                         "shared": int(m.group(3)), "local": int(m.group(4))})
    return rows, None if rows else "fastad._C holds no CUDA kernels (built without CUDA)"


def _demangle(name: str) -> str:
    try:
        return subprocess.run(["c++filt", name], capture_output=True, text=True, timeout=10).stdout.strip() or name
    except (OSError, subprocess.SubprocessError):
        return name


def markdown(rows: list[dict], ext_rows: list[dict], ext_note: str | None) -> str:
    """The tables: one line per (kernel, config, target), then the extension's CUDA kernels."""
    lines = ["| kernel | config | target | regs | spill st/ld (B) | shared (B) | blocks/SM | occupancy |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['kernel']} | {r['config']} | sm_{r['target']} | FAILED: {r['error']} | | | | |")
            continue
        lines.append(f"| {r['kernel']} | {r['config']} | sm_{r['target']} | {r['regs']} | {r['spill_stores']}/{r['spill_loads']} "
                     f"| {r['shared']} | {r['blocks_per_sm']} | {100 * r['occupancy']:.0f}% |")
    lines += ["", "| fastad._C CUDA kernel | arch | regs | stack (B) | shared (B) | local (B) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['kernel']} | {r['arch']} | {r['regs']} | {r['stack']} | {r['shared']} | {r['local']} |" for r in ext_rows]
    if ext_note:
        lines.append(f"\n{ext_note}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastad.ops.compile_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="80,90,100,120", help="compute capabilities, comma-separated")
    parser.add_argument("--kernels", default="", help="only kernels whose name contains this")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: the CPU count)")
    parser.add_argument("--markdown", default=None, help="also write the tables to this file")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter's kernels cannot be compiled: a clean process
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "fastad.ops.compile_check", *(argv or sys.argv[1:])], env=env).returncode
    targets = [int(t) for t in args.targets.split(",") if t]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown targets {unknown}; known: {sorted(TARGETS)}")
    chosen = [c for c in configs() if args.kernels in c.kernel]
    rows = check(chosen, targets, args.jobs)
    ext_rows, ext_note = extension_usage()
    table = markdown(rows, ext_rows, ext_note)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": rows, "extension": ext_rows}, f, indent=1)
    bad = failures(rows)
    kernels = len({c.kernel for c in chosen})
    import triton

    print(f"compile check (Triton {triton.__version__}): {len(chosen)} configurations of {kernels} kernels x {len(targets)} targets = {len(rows)} compiles; "
          f"{len(ext_rows)} extension kernel entries; {len(bad)} failure(s)")
    for b in bad:
        print(f"FAIL {b}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
