#!/usr/bin/env bash
# One device-machine call that does the whole GPU check-up and leaves logs under $OUT:
#   bash tools/device_run.sh [tests] [sanitize] [bench]      (default: all three)
# tests: the GPU suite against both forward kernels; sanitize: compute-sanitizer memcheck and
# racecheck on a representative subset; bench: tools/bench.py forward cases, JSON + table.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 DMATTN_CACHE_DIR=/tmp/dmattn-cache
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
steps=${*:-tests sanitize bench}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
python3 -m dmattn_cupy info | tee "$OUT/info.txt"
for step in $steps; do
  case $step in
    tests)
      python3 -m pytest -m gpu -q -x --timeout=600 -p no:cacheprovider tests/gpu 2>&1 \
        | tee "$OUT/gpu_tests.log" | tail -25 ;;
    sanitize)
      for tool in memcheck racecheck; do
        compute-sanitizer --tool "$tool" --error-exitcode 9 python3 -m pytest -q -x \
          -p no:cacheprovider tests/gpu/test_forward.py -k "d64 or causal-sq9-sk33 or fully" \
          > "$OUT/sanitize_$tool.log" 2>&1
        echo "compute-sanitizer $tool: rc=$? ($(grep -c ERROR "$OUT/sanitize_$tool.log") ERROR lines)"
      done ;;
    bench)
      for k in mma; do  # the simple kernel is a correctness baseline, far too slow to time
        DMATTN_FWD_KERNEL=$k python3 tools/bench.py --suite forward --json "$OUT/bench_$k.json" \
          2>&1 | tee "$OUT/bench_$k.log" | tail -40
      done ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
