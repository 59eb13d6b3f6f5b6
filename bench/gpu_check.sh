#!/usr/bin/env bash
# The one command to run on a GPU machine, on its own preinstalled stack (no internet needed):
#   bash bench/gpu_check.sh [--dry-run] [--quick] [--seconds N] [REPORT_DIR]  (REPORT_DIR default: $OUT, else gpu_check/)
# 1. builds fastad._C in place for the local GPU only (TORCH_CUDA_ARCH_LIST = its compute capability),
# 2. runs the test suite (tests on every device are parametrised over cpu and cuda) -> tests.xml,
# 3. runs every benchmark suite on CUDA (fastad vs the baselines, ratio tables) -> bench-SUITE.json, bench.txt,
# 4. writes REPORT_DIR/gpu_check.md: device, versions, per-test pass/fail, the benchmark table with
#    achieved bandwidth / TFLOP/s against the device's peak where a benchmark records its bytes / FLOPs,
#    the ratio tables, and what the measuring dispatcher chose per shape (autotune.json).
# Exits non-zero when the build fails, any test fails (a CUDA result that differs from its reference
# is a failing test) or a benchmark fails. --dry-run prints the commands without running them;
# --quick runs only the tests that touch the GPU (cuda-parametrised, GPU-only, the extension build:
# the CPU tests are CI's) and benchmarks without FlexAttention (FASTAD_FLEX=0) and without the
# compiled rows (FASTAD_BENCH_COMPILE=0): their compiles take minutes.
# The benchmark suites run one by one, the open issues' first (attention, nearest, feature bank,
# hard mining, throughput, ...), each with its own bench-SUITE.json, within --seconds N of the start
# (--quick: 560, inside one 10-minute call; default: no limit): a suite is stopped (SIGINT: the rows
# it finished are kept) when the time runs out, later ones are listed as not run, and the report is
# written either way. Bottle-based rows run on a synthetic stand-in of its layout where the real
# data is absent (FASTAD_BENCH_STANDIN=1, bench/mvtec_data.py).
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0 quick=0 seconds=""
while :; do
  case "${1:-}" in
    --dry-run) dry=1; shift ;;
    --quick) quick=1; shift ;;
    --seconds) seconds=$2; shift 2 ;;
    *) break ;;
  esac
done
[ -z "$seconds" ] && [ "$quick" = 1 ] && seconds=560
start=$SECONDS
left() {  # seconds left before the report must be written (a large number without --seconds)
  if [ -z "$seconds" ]; then echo 999999; else echo $((seconds - (SECONDS - start) - 25)); fi
}
py=${PYTHON:-python}
command -v "$py" >/dev/null || py=python3  # GPU images often have python3 only
select=()
[ "$quick" = 1 ] && select=(-k "cuda or gpu or extension")
report_dir="${1:-${OUT:-gpu_check}}"

run() {  # print, then run unless --dry-run; the status is the command's
  echo "+ $*"
  [ "$dry" = 1 ] || "$@"
}

if [ "$dry" = 1 ]; then
  arch="<local compute capability>"
else
  arch=$("$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('%d.%d' % torch.cuda.get_device_capability())") \
    || { echo "gpu_check: no CUDA device is visible; run this on a GPU machine (or --dry-run)" >&2; exit 2; }
  mkdir -p "$report_dir"
fi
export TORCH_CUDA_ARCH_LIST="$arch" FASTAD_EXPECT_CUDA=1

status=0
run "$py" -m pip install --no-build-isolation --no-deps -e . || { echo "gpu_check: building fastad._C failed" >&2; exit 1; }
limit=()  # with --seconds the tests leave the benchmarks at least 5 minutes (SIGINT: the report lists what ran)
[ -n "$seconds" ] && [ "$dry" = 0 ] && limit=(timeout -s INT -k 15 "$(( $(left) - 300 > 120 ? $(left) - 300 : 120 ))")
run "${limit[@]}" "$py" -m pytest tests -q -p no:cacheprovider -rf "${select[@]}" --junitxml "$report_dir/tests.xml" || status=1
export FASTAD_BENCH_DEVICE=cuda FASTAD_BENCH_STANDIN=1
# --quick: no FlexAttention and no compiled rows (tens of seconds to minutes of compiling each); the
# full run measures them
[ "$quick" = 1 ] && export FASTAD_FLEX=0 FASTAD_BENCH_COMPILE=0
export FASTAD_AUTOTUNE_CACHE="$report_dir/autotune.json"  # the dispatcher's measured choices, for the report
suites=(attention nearest feature_bank hard_mining throughput recon metrics coreset patch_embedding distributed anomalib)
[ "$dry" = 1 ] || : >"$report_dir/bench.txt"
for suite in "${suites[@]}"; do
  cmd=("$py" -m pytest "bench/test_${suite}_bench.py" -s -q -p no:cacheprovider --benchmark-columns=min,mean,rounds
       --benchmark-json "$report_dir/bench-$suite.json")
  if [ "$dry" = 1 ]; then
    echo "+ ${cmd[*]} | tee -a $report_dir/bench.txt"
    continue
  fi
  budget=$(left)
  if [ "$budget" -lt 30 ]; then
    echo "gpu_check: not run (out of time): bench/test_${suite}_bench.py" | tee -a "$report_dir/bench.txt"
    continue
  fi
  echo "+ ${cmd[*]}"
  timeout -s INT -k 15 "$budget" "${cmd[@]}" | tee -a "$report_dir/bench.txt"
  rc=${PIPESTATUS[0]}
  case $rc in
    0|5) ;;  # 5: every row skipped (no anomalib, one GPU)
    124|130|137) echo "gpu_check: stopped at the time limit: bench/test_${suite}_bench.py (its finished rows kept)" \
                   | tee -a "$report_dir/bench.txt" ;;
    *) status=1 ;;
  esac
done
run "$py" bench/gpu_report.py "$report_dir" || status=1
[ "$dry" = 1 ] || echo "gpu_check: report in $report_dir/gpu_check.md (status $status)"
exit $status
