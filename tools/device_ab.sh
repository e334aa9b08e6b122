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
# NCU=REGEX: instead, each variant's kernel time per case by Nsight Compute (one process per
# case, so a kernel two cases share is not averaged over both): mean/min/max us of the kernels
# whose name matches REGEX (e.g. flash_fwd_sm90) over NCU_COUNT launches (default 12), the
# bench at --warmup 2 --repeat 8 --max-repeat 8 (count its launches: the first ones are kept).
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
if [ -n "${NCU:-}" ]; then
  for c in ${CASES//,/ }; do
    for v in "$@"; do
      IFS='|' read -r name tree defs envs <<< "$v"
      pp=$(cd "$tree" && pwd)
      env ${envs:-} DMATTN_NVRTC_DEFINES="$defs" PYTHONPATH=$pp timeout -s KILL 120 ncu \
        --clock-control none --metrics gpu__time_duration.sum -k "regex:$NCU" \
        --launch-count "${NCU_COUNT:-12}" --print-summary per-kernel python3 "$pp/tools/bench" \
        --case "$c" --peers none --no-smoke --warmup 2 --repeat 8 --max-repeat 8 \
        ${BENCH_EXTRA:-} > "$OUT/ncu_${c}_$name.log" 2>&1
      echo "$c $name rc=$?: $(grep -A5 -E '^ +void ' "$OUT/ncu_${c}_$name.log" | grep -E '^ +void |gpu__time' | sed -E 's/^ +void ([A-Za-z0-9_:]+)<([^(]*)>\(.*Invocations ([0-9]+)/\1<\2> x\3:/; s/ +gpu__time_duration.sum +[a-z]+ +/ min max mean /' | tr '\n' ' ')"
    done
  done
  exit 0
fi
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
