#!/usr/bin/env bash
# The one command to run on a GPU machine, on its own preinstalled stack (no internet needed):
#   bash bench/gpu_check.sh [--dry-run] [--quick] [REPORT_DIR]  (REPORT_DIR default: $OUT, else gpu_check/)
# 1. builds fastad._C in place for the local GPU only (TORCH_CUDA_ARCH_LIST = its compute capability),
# 2. runs the test suite (tests on every device are parametrised over cpu and cuda) -> tests.xml,
# 3. runs every benchmark suite on CUDA (fastad vs the baselines, ratio tables) -> bench.json, bench.txt,
# 4. writes REPORT_DIR/gpu_check.md: device, versions, per-test pass/fail, the benchmark table with
#    achieved bandwidth / TFLOP/s against the device's peak where a benchmark records its bytes / FLOPs,
#    the ratio tables, and what the measuring dispatcher chose per shape (autotune.json).
# Exits non-zero when the build fails, any test fails (a CUDA result that differs from its reference
# is a failing test) or a benchmark fails. --dry-run prints the commands without running them;
# --quick runs only the tests that touch the GPU (cuda-parametrised, GPU-only, the extension build:
# about 2 of the 10 minutes a lent machine's call allows; the CPU tests are CI's) and benchmarks
# without FlexAttention (FASTAD_FLEX=0: its compile time).
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0 quick=0
while :; do
  case "${1:-}" in
    --dry-run) dry=1; shift ;;
    --quick) quick=1; shift ;;
    *) break ;;
  esac
done
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
run "$py" -m pytest tests -q -p no:cacheprovider -rf "${select[@]}" --junitxml "$report_dir/tests.xml" || status=1
export FASTAD_BENCH_DEVICE=cuda
# --quick: no FlexAttention (its compiles, tens of seconds per shape, do not fit the 10 minutes); the
# full run measures it
[ "$quick" = 1 ] && export FASTAD_FLEX=0
export FASTAD_AUTOTUNE_CACHE="$report_dir/autotune.json"  # the dispatcher's measured choices, for the report
if [ "$dry" = 1 ]; then
  echo "+ $py -m pytest bench -s -q -p no:cacheprovider --benchmark-columns=min,mean,rounds --benchmark-json $report_dir/bench.json | tee $report_dir/bench.txt"
else
  "$py" -m pytest bench -s -q -p no:cacheprovider --benchmark-columns=min,mean,rounds \
    --benchmark-json "$report_dir/bench.json" | tee "$report_dir/bench.txt"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
run "$py" bench/gpu_report.py "$report_dir" || status=1
[ "$dry" = 1 ] || echo "gpu_check: report in $report_dir/gpu_check.md (status $status)"
exit $status
