"""Write ``gpu_check.md`` from what ``bench/gpu_check.sh`` left in a folder: ``tests.xml`` (pytest's
JUnit XML), ``bench-SUITE.json`` (pytest-benchmark, one per suite), ``bench.txt`` (the suites' printed ratio tables) and
``autotune.json`` (what fastad.ops.dispatch measured and chose while the benchmarks ran).

    python bench/gpu_report.py REPORT_DIR

Exits 1 when a test failed or errored (the report lists them first)."""
from __future__ import annotations

import datetime
import json
import platform
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def device_lines() -> tuple[list[str], float | None]:
    """Markdown lines describing the machine, and the GPU's peak memory bandwidth in bytes/s (None
    when torch does not report the memory clock and bus width)."""
    import torch

    lines = [f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})"]
    try:
        import triton

        from fastad.ops import select

        schedule = select._schedule()
        lines.append(f"- triton {triton.__version__} (radix select: {schedule} digits, "
                     f"{'/'.join(str(b) for _, b in select._SCHEDULES[schedule])} bits)")
    except ImportError:
        lines.append("- triton: not installed")
    import fastad

    lines.append(f"- fastad {fastad.__version__}, fastad._C with CUDA: {fastad.ops.dispatch.CUDA_COMPILED}")
    peak = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        clock, bus = getattr(p, "memory_clock_rate", 0), getattr(p, "memory_bus_width", 0)  # kHz, bits
        peak = 2 * clock * 1e3 * bus / 8 if clock and bus else None
        lines.insert(0, f"- device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                        f"{p.total_memory / 2**30:.0f} GiB" + (f", peak memory bandwidth {peak / 1e9:.0f} GB/s" if peak else ""))
    else:
        lines.insert(0, "- device: no CUDA device visible")
    return lines, peak


def test_lines(path: Path) -> tuple[list[str], int]:
    """Markdown lines for the JUnit XML: counts, then every failure / error with its first line."""
    if not path.exists():
        return [f"- no test results ({path} missing)"], 1
    root = ET.parse(path).getroot()
    cases = list(root.iter("testcase"))
    bad, skipped = [], 0
    for c in cases:
        for tag in ("failure", "error"):
            e = c.find(tag)
            if e is not None:
                first = (e.get("message") or e.text or "").strip().splitlines()[:1]
                bad.append(f"- **{tag.upper()}** `{c.get('classname')}::{c.get('name')}`: {first[0] if first else ''}"[:400])
        skipped += c.find("skipped") is not None
    passed = len(cases) - len(bad) - skipped
    head = [f"- {len(cases)} tests: {passed} passed, {len(bad)} failed or errored, {skipped} skipped"
            f" (cuda-parametrised tests: {sum('cuda' in (c.get('name') or '') for c in cases)})"]
    return head + bad, int(bool(bad))


def bench_lines(paths: list[Path], peak: float | None) -> list[str]:
    """One row per benchmark of the pytest-benchmark files ``paths`` (gpu_check.sh writes one per suite):
    min / mean seconds, rounds, GB/s (% of the device's peak) and the bandwidth floor (the bytes at
    peak) where the benchmark recorded the bytes it must move (``extra_info['bytes']``), TFLOP/s where
    it recorded its FLOPs (``extra_info['flops']``)."""
    if not paths:
        return ["no benchmark results (no bench*.json)"]
    rows = ["| benchmark | min (ms) | mean (ms) | rounds | GB/s | % of peak | TFLOP/s | floor (ms) |",
            "|---|---|---|---|---|---|---|---|"]
    benchmarks = []
    for path in paths:
        try:
            benchmarks += json.loads(path.read_text()).get("benchmarks", [])
        except ValueError:
            rows.insert(0, f"unreadable benchmark file {path.name} (a suite stopped while writing it)")
    for b in benchmarks:
        s, info = b["stats"], b.get("extra_info", {})
        gbs = pct = tflops = floor = ""
        if info.get("bytes"):
            rate = info["bytes"] / s["min"]
            gbs = f"{rate / 1e9:.0f}"
            pct = f"{100 * rate / peak:.0f}%" if peak else ""
            floor = f"{1e3 * info['bytes'] / peak:.3f}" if peak else ""
        if info.get("flops"):
            tflops = f"{info['flops'] / s['min'] / 1e12:.1f}"
        rows.append(f"| {b['fullname'].split('::', 1)[-1]} | {1e3 * s['min']:.3f} | {1e3 * s['mean']:.3f} | {s['rounds']} "
                    f"| {gbs} | {pct} | {tflops} | {floor} |")
    return rows


def choice_lines(path: Path) -> list[str]:
    """One row per (op, device, dtype, pass, shape key) the measuring dispatcher timed: its choice and the
    time of every candidate."""
    if not path.exists():
        return [f"no dispatcher choices ({path} missing)"]
    entries = json.loads(path.read_text()).get("entries", {})
    rows = ["| op | device | dtype | pass | shape key | chosen | candidates (ms per call) |", "|---|---|---|---|---|---|---|"]
    for key, e in sorted(entries.items()):
        op, device, dtype, passes, *shape = key.split("|")
        times = ", ".join(f"{n} {1e3 * t:.3f}" for n, t in sorted(e.get("seconds", {}).items(), key=lambda kv: kv[1]))
        rows.append(f"| {op} | {device} | {dtype} | {passes} | {' x '.join(shape)} | {e.get('choice')} | {times} |")
    return rows


# what the suites print that the report keeps: Markdown tables and headings, the ratio lines
# ("...: fastad 1.00 ms, sdpa 2.00 ms, 2.00x"), their titles, and gpu_check.sh's own notes on suites
# stopped or not run for time
_KEPT = re.compile(r"^(\||#|gpu_check:|throughput,)|speed-up|\d\.\d+x$")


def ratio_lines(path: Path) -> list[str]:
    """The ratio tables and lines the suites printed, and which suites the time limit cut."""
    if not path.exists():
        return []
    return [line for line in path.read_text().splitlines() if _KEPT.search(line)]


def main(argv=None) -> int:
    folder = Path((argv or sys.argv[1:] or ["gpu_check"])[0])
    dev, peak = device_lines()
    tests, failed = test_lines(folder / "tests.xml")
    text = "\n".join(["# fastad GPU check", "", *dev, "", "## Tests", "", *tests, "", "## Benchmarks (CUDA)", "",
                      *bench_lines(sorted(folder.glob("bench*.json"), key=lambda p: p.stat().st_mtime), peak), "",
                      "## Ratio tables (baseline time / fastad time)", "",
                      *ratio_lines(folder / "bench.txt"), "", "## What the dispatcher chose (measured on this device)", "",
                      *choice_lines(folder / "autotune.json"), ""])
    (folder / "gpu_check.md").write_text(text)
    print(text)
    return failed


if __name__ == "__main__":
    sys.exit(main())
