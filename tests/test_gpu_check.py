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
    r = tmp_path / "r"
    # the suites one by one, the open issues' first, each with its own results file
    suites = ["attention", "nearest", "feature_bank", "hard_mining", "throughput", "recon", "metrics", "coreset",
              "patch_embedding", "distributed", "anomalib"]
    assert steps == [
        "+ python -m pip install --no-build-isolation --no-deps -e .",
        f"+ python -m pytest tests -q -p no:cacheprovider -rf --junitxml {r}/tests.xml",
        *(f"+ python -m pytest bench/test_{s}_bench.py -s -q -p no:cacheprovider --benchmark-columns=min,mean,rounds "
          f"--benchmark-json {r}/bench-{s}.json | tee -a {r}/bench.txt" for s in suites),
        f"+ python bench/gpu_report.py {r}",
    ]
    assert sorted(suites) == sorted(p.name[5:-9] for p in (ROOT / "bench").glob("test_*_bench.py"))  # none left out
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
    (tmp_path / "bench-hard_mining.json").write_text(json.dumps({"benchmarks": [
        {"fullname": "bench/test_hard_mining_bench.py::test_quantile[16777216-fastad]",
         "stats": {"min": 0.001, "mean": 0.0012, "rounds": 5}, "extra_info": {"bytes": 2e9}},
        {"fullname": "bench/test_hard_mining_bench.py::test_quantile[16777216-torch.quantile]",
         "stats": {"min": 0.01, "mean": 0.011, "rounds": 5}, "extra_info": {}}]}))
    (tmp_path / "bench-attention.json").write_text(json.dumps({"benchmarks": [
        {"fullname": "bench/test_attention_bench.py::test_masked_attention[28-fastad]",
         "stats": {"min": 0.002, "mean": 0.002, "rounds": 5}, "extra_info": {"flops": 4e12}}]}))
    (tmp_path / "bench-throughput.json").write_text('{"benchmarks": [')  # a suite stopped mid-write
    (tmp_path / "autotune.json").write_text(json.dumps({"format": "fastad-autotune", "entries": {
        "quantile|NVIDIA H100|float32|fwd|1|16777216|False": {"choice": "triton",
                                                              "seconds": {"reference": 2e-3, "triton": 5e-4}}}}))
    (tmp_path / "bench.txt").write_text(
        "noise\n| case | ratio |\n|---|---|\n| quantile | 10.0x |\n"
        "attention speed-up of fastad on cuda (batch 4 for the masked cases), fwd+bwd min times:\n"
        "  local 64x64 w11: fastad 1.00 ms, sdpa_dense_mask 5.00 ms, 5.00x\n"
        "gpu_check: stopped at the time limit: bench/test_throughput_bench.py (its finished rows kept)\n"
        "gpu_check: not run (out of time): bench/test_anomalib_bench.py\n")
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu_report.py"), str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 1  # a failed test fails the check
    report = (tmp_path / "gpu_check.md").read_text()
    assert "- 3 tests: 1 passed, 1 failed or errored, 1 skipped (cuda-parametrised tests: 2)" in report
    assert "**FAILURE** `tests.test_attention::test_grad[cuda]`: AssertionError: error 1e-2 > 2 x PyTorch's 1e-3" in report
    assert "| test_quantile[16777216-fastad] | 1.000 | 1.200 | 5 | 2000 |" in report
    assert "| quantile | 10.0x |" in report and "noise" not in report
    assert "  local 64x64 w11: fastad 1.00 ms, sdpa_dense_mask 5.00 ms, 5.00x" in report
    assert "gpu_check: not run (out of time): bench/test_anomalib_bench.py" in report
    assert "unreadable benchmark file bench-throughput.json" in report
    assert "| test_masked_attention[28-fastad] | 2.000 | 2.000 | 5 |  |  | 2000.0 |  |" in report
    # what the measuring dispatcher chose, fastest candidate first
    assert "| quantile | NVIDIA H100 | float32 | fwd | 1 x 16777216 x False | triton | triton 0.500, reference 2.000 |" in report


def test_the_time_limit_stops_a_suite_and_lists_the_rest(tmp_path):
    """gpu_check.sh --seconds N with a stand-in interpreter (no GPU here): the tests and the first
    suites run, the suite running at the limit is stopped with SIGINT, later suites are listed as not
    run, and the report step still runs, all inside the limit."""
    fake = tmp_path / "python"
    log = tmp_path / "calls"
    fake.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {log}
case "$*" in
  "-c "*) echo 9.0 ;;                       # the compute capability
  *"bench/test_attention_bench.py"*) echo "| attention | 2.00x |" ;;
  *"bench/test_nearest_bench.py"*) exec sleep 60 ;;   # runs past the limit
  *gpu_report.py*) echo report ;;
esac
exit 0
""")
    fake.chmod(0o755)
    proc = subprocess.run(["bash", str(ROOT / "bench/gpu_check.sh"), "--seconds", "60", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "PYTHON": str(fake)})
    calls = log.read_text().splitlines()
    assert any("bench/test_attention_bench.py" in c for c in calls) and calls[-1].endswith(f"gpu_report.py {tmp_path / 'r'}")
    assert not any("bench/test_feature_bank_bench.py" in c for c in calls)  # no time left after the stopped one
    text = (tmp_path / "r" / "bench.txt").read_text()
    assert "| attention | 2.00x |" in text
    assert "gpu_check: stopped at the time limit: bench/test_nearest_bench.py" in text
    assert "gpu_check: not run (out of time): bench/test_anomalib_bench.py" in text
    assert proc.returncode == 0, proc.stderr  # a stopped suite is not a failure


def test_the_benchmarks_bottle_stand_in(tmp_path, monkeypatch):
    """Without MVTec AD bottle the bottle-based benchmarks skip, unless FASTAD_BENCH_STANDIN=1
    (gpu_check.sh): then a synthetic class of bottle's layout is written once and read as MVTec AD."""
    sys.path.insert(0, str(ROOT / "bench"))
    import mvtec_data
    from fastad.data import mvtec

    monkeypatch.setenv("FASTAD_MVTEC", str(tmp_path / "absent"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTAD_BENCH_STANDIN", raising=False)
    assert not mvtec_data.standin() and mvtec_data.mvtec_root() == tmp_path / "absent"
    monkeypatch.setenv("FASTAD_BENCH_STANDIN", "1")
    monkeypatch.setattr(mvtec_data, "SIZE", 96)
    monkeypatch.setattr(mvtec_data, "N_TRAIN", 3)
    monkeypatch.setattr(mvtec_data, "N_TEST", 2)
    root = mvtec_data.mvtec_root()
    assert mvtec_data.standin() and root == tmp_path / "cache" / "fastad" / "bench-standin"
    train, test = mvtec(root, "bottle", "train"), mvtec(root, "bottle", "test")
    assert len(train) == 3 and test.labels.tolist() == [1, 1, 0, 0]
    item = test[0]
    assert item["image"].shape[0] == 3 and item["has_mask"] and item["mask"].sum() > 0
    stamp = (root / "bottle" / "train" / "good" / "000.png").stat().st_mtime_ns
    assert mvtec_data.mvtec_root() == root  # written once
    assert (root / "bottle" / "train" / "good" / "000.png").stat().st_mtime_ns == stamp
