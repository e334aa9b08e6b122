#!/usr/bin/env bash
# A/B of kernel variants in one device call (logs under $OUT):
#   bash tools/device_ab.sh "NAME|TREE|DEFINES" ...
# TREE: a source tree: . for this one, or an older commit unpacked with
#   `git archive C | tar -x -C _ab/base` and carried (_ab/ is in .git/info/exclude);
# DEFINES: that variant's DMATTN_NVRTC_DEFINES; optional 4th field ENV: space-separated
# VAR=VALUE set for that variant's bench only (host switches, e.g. DMATTN_NUM_SPLITS=3; CASES=...
# there overrides the case list for that variant, e.g. for an older tree without a case).
# Prints each variant's TFLOP/s or GB/s per case (CASES: default the issue-12 forward cases;
# ONLY: the specs to precompile first; BENCH_EXTRA: more bench flags, e.g. --peers cudnn).
set -u
export PYTHONUNBUFFERED=1 DMATTN_CACHE_DIR=/tmp/dmc
CASES=${CASES:-dense,causal,kbias,mask_bias}
ONLY=${ONLY:-fwd_sm90_bf16_d128}
for v in "$@"; do   # precompile every variant of the current tree at once
  IFS="|" read -r name tree defs _ <<< "$v"
  [ "$tree" = . ] && DMATTN_NVRTC_DEFINES="$defs" PYTHONPATH=$PWD timeout -s KILL 100 \
    python3 -m dmattn_cupy.precompile --arch sm_90 --only "$ONLY" --jobs 4 --fill-cache \
    > "$OUT/pre_$name.log" 2>&1 &
done
wait
for v in "$@"; do
  IFS='|' read -r name tree defs envs <<< "$v"
  pp=$(cd "$tree" && pwd)
  cases=$CASES
  for kv in ${envs:-}; do case $kv in CASES=*) cases=${kv#CASES=} ;; esac; done
  env ${envs:-} DMATTN_NVRTC_DEFINES="$defs" PYTHONPATH=$pp timeout -s KILL 150 python3 \
    "$pp/tools/bench" --case "$cases" --peers none --quick --no-smoke ${BENCH_EXTRA:-} \
    > "$OUT/bench_$name.log" 2>&1
  echo "$name rc=$?: $(grep -E '^summary' "$OUT/bench_$name.log" | awk '!s[$0]++' | sed -E 's/summary ([a-z_0-9]+): dmattn ([0-9.]+) (TFLOP|GB).*/\1 \2/' | tr '\n' ' ')"
  grep -E '^ *(dmattn|sdpa-cudnn)' "$OUT/bench_$name.log" | awk '!s[$0]++' | head -8
done
