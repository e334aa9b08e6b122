#!/usr/bin/env bash
# One device-machine call that does the whole GPU check-up and leaves logs under $OUT:
#   bash tools/device_run.sh [precompile] [tests] [sanitize] [bench]   (default: all four)
# precompile: every specialization for this GPU into the kernel cache, 16 processes;
# tests: the GPU suite against both forward kernels; sanitize: compute-sanitizer memcheck and
# racecheck on a representative subset; bench: tools/bench.py forward cases, JSON + table.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 DMATTN_CACHE_DIR=/tmp/dmattn-cache
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
steps=${*:-precompile tests sanitize bench}
arch=sm_$(python3 -c 'import cupy; print(cupy.cuda.Device().compute_capability)')
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
python3 -m dmattn_cupy info | tee "$OUT/info.txt"
for step in $steps; do
  case $step in
    precompile)
      python3 -m dmattn_cupy.precompile --arch "$arch" --debug --jobs 16 --fill-cache \
        > "$OUT/precompile.log" 2>&1; echo "precompile rc=$?: $(tail -1 "$OUT/precompile.log")" ;;
    tests)
      python3 -m pytest -m gpu -q -n 8 --maxfail=200 --timeout=300 --tb=short -rf \
        -p no:cacheprovider tests/gpu > "$OUT/gpu_tests.log" 2>&1
      echo "pytest rc=$?"; grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | cut -c1-160 | head -60
      tail -3 "$OUT/gpu_tests.log" ;;
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
