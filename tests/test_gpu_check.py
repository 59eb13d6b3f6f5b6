"""bench/gpu_check.sh (the one command for a GPU machine): its dry run prints the steps, and its
report generator turns test and benchmark results into one Markdown report that flags failures."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_prints_every_step(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "bench/gpu_check.sh"), "--dry-run", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    steps = [line for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert steps == [
        "+ python -m pip install --no-build-isolation --no-deps -e .",
        f"+ python -m pytest tests -q -p no:cacheprovider -rf --junitxml {tmp_path / 'r'}/tests.xml",
        f"+ python -m pytest bench -s -q -p no:cacheprovider --benchmark-columns=min,mean,rounds --benchmark-json "
        f"{tmp_path / 'r'}/bench.json | tee {tmp_path / 'r'}/bench.txt",
        f"+ python bench/gpu_report.py {tmp_path / 'r'}",
    ]
    assert not (tmp_path / "r").exists()  # nothing ran
    quick = subprocess.run(["bash", str(ROOT / "bench/gpu_check.sh"), "--dry-run", "--quick", str(tmp_path / "r")],
                           capture_output=True, text=True, timeout=60)
    steps_quick = [line for line in quick.stdout.splitlines() if line.startswith("+ ")]
    # --quick: only the tests that touch the GPU; the same build, benchmarks and report
    assert steps_quick[1] == f"+ python -m pytest tests -q -p no:cacheprovider -rf -k cuda or gpu or extension --junitxml {tmp_path / 'r'}/tests.xml"
    assert steps_quick[:1] + steps_quick[2:] == steps[:1] + steps[2:]


def test_report_lists_failures_and_bandwidth(tmp_path):
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_select" name="test_quantile[cuda-fp16]"/>'
        '<testcase classname="tests.test_attention" name="test_grad[cuda]"><failure message="AssertionError: error 1e-2 &gt; 2 x PyTorch\'s 1e-3"/></testcase>'
        '<testcase classname="tests.test_x" name="test_y"><skipped message="no"/></testcase>'
        '</testsuite></testsuites>')
    (tmp_path / "bench.json").write_text(json.dumps({"benchmarks": [
        {"fullname": "bench/test_hard_mining_bench.py::test_quantile[16777216-fastad]",
         "stats": {"min": 0.001, "mean": 0.0012, "rounds": 5}, "extra_info": {"bytes": 2e9}},
        {"fullname": "bench/test_hard_mining_bench.py::test_quantile[16777216-torch.quantile]",
         "stats": {"min": 0.01, "mean": 0.011, "rounds": 5}, "extra_info": {}},
        {"fullname": "bench/test_attention_bench.py::test_masked_attention[28-fastad]",
         "stats": {"min": 0.002, "mean": 0.002, "rounds": 5}, "extra_info": {"flops": 4e12}}]}))
    (tmp_path / "autotune.json").write_text(json.dumps({"format": "fastad-autotune", "entries": {
        "quantile|NVIDIA H100|float32|fwd|1|16777216|False": {"choice": "triton",
                                                              "seconds": {"reference": 2e-3, "triton": 5e-4}}}}))
    (tmp_path / "bench.txt").write_text("noise\n| case | ratio |\n|---|---|\n| quantile | 10.0x |\n")
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu_report.py"), str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 1  # a failed test fails the check
    report = (tmp_path / "gpu_check.md").read_text()
    assert "- 3 tests: 1 passed, 1 failed or errored, 1 skipped (cuda-parametrised tests: 2)" in report
    assert "**FAILURE** `tests.test_attention::test_grad[cuda]`: AssertionError: error 1e-2 > 2 x PyTorch's 1e-3" in report
    assert "| test_quantile[16777216-fastad] | 1.000 | 1.200 | 5 | 2000 |" in report
    assert "| quantile | 10.0x |" in report and "noise" not in report
    assert "| test_masked_attention[28-fastad] | 2.000 | 2.000 | 5 |  |  | 2000.0 |  |" in report
    # what the measuring dispatcher chose, fastest candidate first
    assert "| quantile | NVIDIA H100 | float32 | fwd | 1 x 16777216 x False | triton | triton 0.500, reference 2.000 |" in report
